"""Prompt formats: a fact asked as a bare completion, or as a question through the chat template.

``prompt_format`` is one of :data:`PROMPT_FORMATS`:

* ``"bare"``: the row is ``context ∘ prompt(subject)`` and the target follows as ``" " + target``
  (ROME/MEMIT's rows; :func:`~seqedit.locate.tokens.encode_prompt`).
* ``"chat"``: the user turn asks the fact's question (a context prefix, if any, goes inside the user
  turn), rendered by the tokenizer's own ``apply_chat_template(..., add_generation_prompt=True)``; the
  assistant turn starts with the answer, so the target follows the assistant prefix directly, without
  a leading space. The subject's last token is located by character offsets in the rendered text.
* ``"both"``: the bare and the chat rows of every fact, weighted equally in the values; one key column
  per format (``EditHParams.format_columns``, the default) or one key averaged over them.

The question rule (:func:`question_template`), one rule for every record, read from the prompt text
alone: a prompt that is already a question (ends with ``?``, as ZsRE's ``src`` questions do) is asked
as it is; a cloze prompt (CounterFact's relation templates, ``"The mother tongue of {} is"``) is asked
as its echo question, trailing sentence punctuation dropped and ``" what?"`` appended (``"The mother
tongue of {} is what?"``). No per-record or per-relation question is written by hand.
"""

from __future__ import annotations

import re

from ..errors import LocateError
from .tokens import EncodedPrompt, encode_prompt, fill_template, locate_subject, target_ids

__all__ = ["PROMPT_FORMATS", "answer_ids", "chat_ids", "chat_prompt", "check_chat_template", "check_prompt_format", "encode_chat", "encode_row",
           "formats", "question_template"]

PROMPT_FORMATS = ("bare", "chat", "both")
_TRAILING = re.compile(r"[\s.,;:!\u2026]+$")


def check_prompt_format(value: object) -> str:
    """``value`` if it names a prompt format, else a one-line ``LocateError``."""
    if value not in PROMPT_FORMATS:
        raise LocateError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {value!r}")
    return value  # type: ignore[return-value]


def formats(prompt_format: str) -> tuple[str, ...]:
    """The row formats of ``prompt_format``, primary first: ``("bare",)``, ``("chat",)`` or both."""
    check_prompt_format(prompt_format)
    return ("bare", "chat") if prompt_format == "both" else (prompt_format,)


def question_template(prompt: str) -> str:
    """The question form of ``prompt`` (a template with ``{}`` or a filled text): see the module doc."""
    text = prompt.strip()
    if text.endswith("?"):
        return text
    return _TRAILING.sub("", text) + " what?"


def check_chat_template(tokenizer, prompt_format: str = "chat") -> None:
    """Refuse (one line) a format with chat rows on a tokenizer without a chat template."""
    if "chat" in formats(prompt_format) and not getattr(tokenizer, "chat_template", None):
        raise LocateError(f"prompt format {prompt_format!r} needs a chat template and the tokenizer has none "
                          "(set tokenizer.chat_template, or use prompt_format='bare')")


def chat_prompt(tokenizer, user: str) -> tuple[str, int]:
    """``(rendered, offset)``: the conversation of one user turn ``user`` with the assistant's turn
    opened, as the tokenizer's chat template writes it, and where ``user`` starts in it."""
    check_chat_template(tokenizer)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    at = rendered.rfind(user)
    if at < 0:
        raise LocateError(f"the chat template does not keep the user message {user!r} verbatim; "
                          "its subject cannot be located")
    return rendered, at


def chat_ids(tokenizer, user: str) -> list[int]:
    """Token ids of the conversation ``user`` → assistant's turn opened (the template's own special
    tokens, none added)."""
    return list(tokenizer(chat_prompt(tokenizer, user)[0], add_special_tokens=False)["input_ids"])


def encode_chat(tokenizer, context: str, prompt: str, subject: str) -> EncodedPrompt:
    """The chat row of ``prompt`` under ``context``: the user asks ``context ∘ question(prompt)``.

    The rendered text carries the template's own special tokens (BOS included, where the template
    writes one), so it is tokenised without adding any.
    """
    user, start, end = fill_template(context, question_template(prompt), subject)
    rendered, at = chat_prompt(tokenizer, user)
    return locate_subject(tokenizer, rendered, at + start, at + end, add_special_tokens=False)


def encode_row(tokenizer, fmt: str, context: str, prompt: str, subject: str) -> EncodedPrompt:
    """One row of format ``fmt`` (``"bare"`` or ``"chat"``)."""
    if fmt == "bare":
        return encode_prompt(tokenizer, context, prompt, subject)
    if fmt == "chat":
        return encode_chat(tokenizer, context, prompt, subject)
    raise LocateError(f"row format must be 'bare' or 'chat', got {fmt!r}")


def answer_ids(tokenizer, fmt: str, target: str) -> tuple[int, ...]:
    """Target ids after a row of format ``fmt``: ``" " + target`` in a sentence, ``target`` at the
    start of the assistant's turn."""
    return target_ids(tokenizer, target, lead_space=fmt == "bare")
