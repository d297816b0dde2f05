"""Edit metrics through the chat template: is the edited fact the model's answer when it is asked?

Every prompt of a record is asked as a question (``locate/chat.question_template``: a question as it
is, a cloze as its echo question) in one user turn of the tokenizer's chat template, and the answer
is scored right after the assistant prefix (``rendered ids + ids(target)``, the target without a
leading space, as it starts the turn). ``s(T)`` is the length-normalised mean NLL of ``T`` there
(nats/token), as in the bare CounterFact metrics (``evaluate/counterfact.py``):

* efficacy: ``s(new) < s(true)`` on the fact's question;
* generalization: mean over the record's paraphrases, asked as questions, of ``s(new) < s(true)``;
* specificity: mean over its neighbour questions of ``s(answer) < s(new)``;
* answer: the greedy reply to the fact's question (``max_new_tokens``, special tokens skipped); the
  record counts when the reply's first sentence contains the new target (case-insensitive), and
  ``answer_true`` when it contains the true one.

Records without a ``true_target`` get no efficacy or generalization (there is nothing to compare), but
are still asked.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..facts import Fact
from ..locate.chat import answer_ids, chat_ids, question_template
from .counterfact import Summarised, mean_known
from .scoring import greedy_continuations, map_target_log_probs, target_score

__all__ = ["ChatRecord", "ChatResult", "chat_metrics", "chat_replies", "first_sentence", "names_target"]

_SENTENCE_END = re.compile(r"(?<=[.!?])\s|\n")


@dataclass(frozen=True)
class ChatRecord:
    """Metrics of one record through the chat template (indicators in [0, 1]; ``None``: undefined)."""

    fact_id: str | None
    efficacy: float | None
    generalization: float | None
    specificity: float | None
    answer_new: float
    answer_true: float | None
    reply: str


@dataclass(frozen=True)
class ChatResult(Summarised):
    """Per-record chat metrics and their means over the records where each is defined."""

    records: tuple[ChatRecord, ...]
    efficacy: float | None
    generalization: float | None
    specificity: float | None
    answer_new: float | None
    answer_true: float | None


def first_sentence(reply: str) -> str:
    """The reply up to its first sentence end (``.``, ``!`` or ``?`` before a space) or line break."""
    return _SENTENCE_END.split(reply.strip(), maxsplit=1)[0]


def names_target(reply: str, target: str) -> bool:
    """The answer check: the reply's first sentence contains ``target`` (case-insensitive)."""
    return target.casefold() in first_sentence(reply).casefold()


def chat_replies(loaded, questions: Sequence[str], max_new_tokens: int = 24) -> list[str]:
    """The greedy reply to each question asked in one user turn of the chat template."""
    return greedy_continuations(loaded, [chat_ids(loaded.tokenizer, q) for q in questions], max_new_tokens)


def chat_scores(loaded, pairs: Sequence[tuple[str, str]], batch_rows: int = 64) -> list[float]:
    """``s(target)`` after the chat-templated question, for every distinct ``(question text, target)``."""
    tok = loaded.tokenizer
    prompts = {q: chat_ids(tok, q) for q in dict.fromkeys(q for q, _ in pairs)}
    rows, spans = [], []
    for q, target in pairs:
        t = answer_ids(tok, "chat", target)
        rows.append(prompts[q] + list(t))
        spans.append((len(prompts[q]), t))

    return map_target_log_probs(loaded, rows, spans, lambda i, logp: target_score(spans[i][1], logp).mean_nll,
                                batch_rows)


def chat_metrics(loaded, facts: Sequence[Fact], batch_rows: int = 64, max_new_tokens: int = 24) -> ChatResult:
    """Score ``facts`` through the chat template on the current model (one de-duplicated scoring pass,
    then one greedy reply per fact)."""
    index: dict[tuple[str, str], int] = {}

    def slot(text: str, target: str) -> tuple[str, str]:
        pair = (question_template(text), target)
        index.setdefault(pair, len(index))
        return pair

    plans = []
    for f in facts:
        new = slot(f.text, f.target)
        true = slot(f.text, f.true_target) if f.true_target is not None else None
        paras = [(slot(p, f.target), slot(p, f.true_target)) for p in f.paraphrases] if true else []
        neigh = [(slot(p, f.target), slot(p, a)) for p, a in f.neighbors]
        plans.append((f, new, true, paras, neigh))
    scores = chat_scores(loaded, list(index), batch_rows)
    s = {pair: scores[i] for pair, i in index.items()}
    replies = chat_replies(loaded, [question_template(f.text) for f in facts], max_new_tokens)
    records = []
    for (f, new, true, paras, neigh), reply in zip(plans, replies):
        records.append(ChatRecord(
            fact_id=f.id,
            efficacy=float(s[new] < s[true]) if true else None,
            generalization=mean_known([float(s[a] < s[b]) for a, b in paras]),
            specificity=mean_known([float(s[b] < s[a]) for a, b in neigh]),
            answer_new=float(names_target(reply, f.target)),
            answer_true=float(names_target(reply, f.true_target)) if f.true_target is not None else None,
            reply=reply,
        ))
    return ChatResult(
        records=tuple(records),
        **{k: mean_known([getattr(r, k) for r in records])
           for k in ("efficacy", "generalization", "specificity", "answer_new", "answer_true")},
    )
