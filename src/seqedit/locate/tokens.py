"""Token rows for keys and values: subject location by character offsets, targets by concatenation.

Conventions (REFERENCE_NOTES §6.4–6.5): right padding; the subject's last token is the token whose
character span contains the subject's last character in the *final* text (no re-tokenisation of
pieces, so BPE merges across the prefix are handled); target ids are ``tok(" " + target)`` without
special tokens, appended to the prompt ids (never re-tokenised together with the prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LocateError


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt: ``ids`` with special tokens, ``subject_last`` an index into ``ids``."""

    ids: tuple[int, ...]
    subject_last: int
    text: str


def fill_template(context: str, prompt: str, subject: str) -> tuple[str, int, int]:
    """``context`` ("{}" or "Prefix. {}") around ``prompt`` (one "{}"), subject filled in.

    Returns ``(text, start, end)`` with ``text[start:end] == subject``. Uses ``str.replace`` rather
    than ``str.format`` so braces inside subjects or prompts are harmless.
    """
    if context.count("{}") != 1 or prompt.count("{}") != 1:
        raise LocateError(f"template {context!r} and prompt {prompt!r} must each hold one '{{}}'")
    combined = context.replace("{}", prompt)
    start = combined.index("{}")
    text = combined[:start] + subject + combined[start + 2 :]
    return text, start, start + len(subject)


def encode_prompt(tokenizer, context: str, prompt: str, subject: str) -> EncodedPrompt:
    """Tokenise ``context ∘ prompt(subject)`` and locate the subject's last token by offsets."""
    text, start, end = fill_template(context, prompt, subject)
    if end <= start:
        raise LocateError(f"empty subject in prompt {prompt!r}")
    return locate_subject(tokenizer, text, start, end)


def locate_subject(tokenizer, text: str, start: int, end: int, *, add_special_tokens: bool = True) -> EncodedPrompt:
    """Tokenise ``text`` and locate the last token of the subject ``text[start:end]`` by offsets."""
    subject = text[start:end]
    if not getattr(tokenizer, "is_fast", False):
        raise LocateError("a fast tokenizer (with offset mapping) is required to locate subjects")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    last_char = end - 1
    idx = None
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if a <= last_char < b:
            idx = i
    if idx is None:
        raise LocateError(f"subject {subject!r} of prompt {text!r} is not covered by any token")
    return EncodedPrompt(tuple(enc["input_ids"]), idx, text)


def target_ids(tokenizer, target: str, *, lead_space: bool = True) -> tuple[int, ...]:
    """Ids of ``" " + target`` (leading space added if missing; with ``lead_space=False`` the target
    as written, leading spaces dropped: an answer that starts a turn), without special tokens."""
    text = (target if target.startswith(" ") else " " + target) if lead_space else target.lstrip()
    ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids or not target.strip():
        raise LocateError(f"target {target!r} tokenises to nothing")
    return ids


def pad_right(seqs: list[tuple[int, ...]] | list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``seqs`` → ``(ids [B, T] long, mask [B, T] long)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids, mask


def pad_left(seqs: list[tuple[int, ...]] | list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad ``seqs`` → ``(ids [B, T] long, mask [B, T] long)`` (an empty sequence is all padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
    return ids, mask


def pad_id_of(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise LocateError("the tokenizer has neither a pad nor an eos token")
    return int(pid)
