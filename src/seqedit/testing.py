"""Offline tiny models and tokenizer for tests: no download, built in well under a second.

``tiny_tokenizer()`` is a byte-level BPE (vocab ~1000) trained at call time on the start of WikiText-2;
``tiny_model(family)`` is a randomly initialised 4-layer decoder of one supported family paired with it.
Both are deterministic for a given seed and data file.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

from .errors import SeqEditError
from .shared_data import shared_data_dir
from .models.load import LoadedModel, wrap_model

__all__ = ["FAMILIES", "SPECIAL_TOKEN", "TINY_CHAT_TEMPLATE", "tiny_model", "tiny_tokenizer"]

SPECIAL_TOKEN = "<|endoftext|>"
# A ChatML-like template with a default system turn (as SmolLM2-Instruct's); its markers are plain text
# to the tiny vocabulary, which is all the chat prompt format needs.
TINY_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_VOCAB = 1000
_TRAIN_BYTES = 200_000
_WIKITEXT = Path("wikitext", "wikitext-2-raw", "wiki.valid.raw")

# Used when the shared data folder is absent, so the tokenizer (and every test) still works.
_FALLBACK_TEXT = """\
The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named
after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.
The mother tongue of Danielle Darrieux is French. Michael Jordan plays the sport of basketball.
Toko Yasuda is known for playing the guitar. The capital of Italy is Rome, and the capital of Spain is
Madrid. Apple was founded by Steve Jobs, Steve Wozniak and Ronald Wayne in April 1976 in California.
The Amazon is the largest river in South America and flows into the Atlantic Ocean. Water boils at
one hundred degrees Celsius at sea level. In 1969 the first humans walked on the Moon.
"""


def _training_text() -> str:
    """The first ~200 KB of WikiText-2 validation, or the built-in fallback text."""
    try:
        path = shared_data_dir() / _WIKITEXT
    except SeqEditError:
        return _FALLBACK_TEXT * 20
    if not path.is_file():
        return _FALLBACK_TEXT * 20
    with path.open("rb") as f:
        return f.read(_TRAIN_BYTES).decode("utf-8", errors="ignore")


@functools.lru_cache(maxsize=None)
def _trained_bpe() -> str:
    tok = Tokenizer(models.BPE(unk_token=None))
    # add_prefix_space=False and trim_offsets=False keep offsets contiguous: token spans tile the text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=[SPECIAL_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    tok.train_from_iterator(_training_text().splitlines(keepends=True), trainer=trainer)
    return tok.to_str()


@functools.lru_cache(maxsize=None)
def _tokenizer_json(add_bos: bool) -> str:
    # Cache the serialised tokenizer, not the HF wrapper: each caller gets a fresh object it may mutate.
    tok = Tokenizer.from_str(_trained_bpe())
    byte_level = processors.ByteLevel(trim_offsets=False)
    if add_bos:
        bos = processors.TemplateProcessing(
            single=f"{SPECIAL_TOKEN} $A",
            pair=f"{SPECIAL_TOKEN} $A {SPECIAL_TOKEN} $B:1",
            special_tokens=[(SPECIAL_TOKEN, tok.token_to_id(SPECIAL_TOKEN))],
        )
        tok.post_processor = processors.Sequence([byte_level, bos])
    else:
        tok.post_processor = byte_level
    return tok.to_str()


def tiny_tokenizer(*, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Byte-level BPE tokenizer (vocab ~1000) with ``<|endoftext|>`` as bos/eos/pad/unk.

    Padding is on the right; ``return_offsets_mapping=True`` gives character spans that tile the input.
    ``add_bos=True`` prepends ``<|endoftext|>`` to every encoding (a Llama-3-style BOS), for BOS tests.
    Its chat template is :data:`TINY_CHAT_TEMPLATE`.
    """
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(add_bos)),
        bos_token=SPECIAL_TOKEN,
        eos_token=SPECIAL_TOKEN,
        pad_token=SPECIAL_TOKEN,
        unk_token=SPECIAL_TOKEN,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "qwen3")


def _tiny_config(
    family: str, *, n_layers: int, hidden: int, intermediate: int, n_heads: int, vocab_size: int, special: int
) -> PretrainedConfig:
    from transformers import (
        GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config,
    )

    ids = {"bos_token_id": special, "eos_token_id": special, "pad_token_id": special}
    common = {"vocab_size": vocab_size, "attn_implementation": "eager", **ids}  # eager: bitwise-stable
    head_dim = hidden // n_heads
    if family == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=n_layers, n_head=n_heads, n_inner=intermediate,
                          n_positions=1024, **common)
    if family == "gptj":
        return GPTJConfig(n_embd=hidden, n_layer=n_layers, n_head=n_heads, n_inner=intermediate,
                          rotary_dim=max(2, head_dim // 2), n_positions=1024, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                             intermediate_size=intermediate, rotary_pct=0.5, max_position_embeddings=1024,
                             **common)
    llama_like = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
    if family in llama_like:
        return llama_like[family](
            hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=max(1, n_heads // 2), head_dim=head_dim,
            max_position_embeddings=1024, **common,
        )
    raise ValueError(f"unknown tiny family {family!r}: choose from {', '.join(FAMILIES)}")


def tiny_model(
    family: str,
    *,
    seed: int = 0,
    n_layers: int = 4,
    hidden: int = 32,
    intermediate: int = 64,
    vocab_size: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """A randomly initialised (``seed``) CPU decoder of ``family`` with ``tiny_tokenizer()``.

    Edited matrices are ``[d_out, d_in] = [hidden, intermediate]``; 4 attention heads (GQA with 2 KV heads
    for Llama-like families); ``vocab_size`` defaults to the tokenizer's and may only exceed it.
    """
    tokenizer = tiny_tokenizer()
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    config = _tiny_config(
        family, n_layers=n_layers, hidden=hidden, intermediate=intermediate, n_heads=4,
        vocab_size=vocab_size, special=tokenizer.eos_token_id,
    )
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    return wrap_model(model, tokenizer, f"tiny-{family}")
