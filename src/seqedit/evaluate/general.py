"""General-capability tasks, zero-shot, by option likelihood (REFERENCE_NOTES §3.4, prediction (b)).

Tasks: sst2, mrpc, cola, rte, mmlu, nli from ``<shared data>/general/*.jsonl``. Prompts are the
official 0-shot ones. Each example predicts the option whose ``" " + option`` has the lowest mean
per-token NLL after the prompt (one prompt forward per example when every option is one token) (:func:`~seqedit.evaluate.scoring.score_targets`). The prompt is
right-stripped before scoring because the option already carries its leading space (CoLA's official
prompt ends in ``"Answer: "``, which would otherwise give a double space).

Split: items ``start..stop-1`` of each file, default 10..109 (the official 100 test items; the first 10
are the unused few-shot pool).

Labels: RTE follows GLUE by default (0 = entailment → "True"). ``official_rte_inversion=True`` maps
label 1 → "True" as the official code does (which is why the paper's RTE scores are below chance).

F1 is **weighted** F1 (sklearn's ``average="weighted"``: per-class F1 over the union of gold and
predicted classes, weighted by gold support, 0 where undefined); MCC is the multiclass (Gorodkin) MCC,
equal to the usual phi coefficient for two classes. Both in numpy, without sklearn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..shared_data import shared_data_dir
from .scoring import score_targets

__all__ = [
    "TASKS",
    "GeneralExample",
    "TaskResult",
    "choose_options",
    "general_metrics",
    "load_general_task",
    "matthews_corrcoef",
    "task_result",
    "weighted_f1",
]

TASKS = ("sst2", "mrpc", "cola", "rte", "mmlu", "nli")


@dataclass(frozen=True)
class GeneralExample:
    """One item: the prompt, its answer options (without leading space) and the gold option index."""

    prompt: str
    options: tuple[str, ...]
    label: int


def _example(task: str, r: dict[str, Any], official_rte_inversion: bool) -> GeneralExample:
    yes_no = ("No", "Yes")  # label 1 = Yes for MRPC and CoLA
    true_false = ("True", "False")
    if task == "sst2":
        return GeneralExample("Review :" + r["sentence"] + "\nSentiment :", ("negative", "positive"), r["label"])
    if task == "mrpc":
        prompt = ("Are the sentences paraphrases of each other.\nSentence 1: " + r["sentence1"]
                  + "\nSentence 2: " + r["sentence2"] + "\nAnswer:")
        return GeneralExample(prompt, yes_no, r["label"])
    if task == "cola":
        prompt = "Is this sentence linguistically acceptable?\nSentence: " + r["sentence"] + "\nAnswer: "
        return GeneralExample(prompt, yes_no, r["label"])
    if task == "rte":
        prompt = r["sentence1"] + "\nquestion: " + r["sentence2"] + " True or False?\nanswer:"
        # GLUE: 0 = entailment = "True" (index 0). The official code says 1 → "True".
        return GeneralExample(prompt, true_false, 1 - r["label"] if official_rte_inversion else r["label"])
    if task == "nli":
        prompt = r["sentence1"] + " entails the " + r["sentence2"] + " True or False? Answer:"
        return GeneralExample(prompt, true_false, 0 if r["label"] == "entailment" else 1)
    if task == "mmlu":
        choices = "".join(f"\n({letter}) {c}" for letter, c in zip("ABCD", r["choices"], strict=True))
        return GeneralExample("Question: " + r["question"] + choices + "\nAnswer:", tuple("ABCD"), r["answer"])
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def load_general_task(
    task: str, start: int = 10, stop: int = 110, *, official_rte_inversion: bool = False
) -> list[GeneralExample]:
    """Items ``start..stop-1`` of ``general/<task>.jsonl`` as prompts with options and gold index."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    path = shared_data_dir() / "general" / f"{task}.jsonl"
    with path.open(encoding="utf-8") as f:
        lines = [line for line in f if line.strip()][start:stop]
    return [_example(task, json.loads(line), official_rte_inversion) for line in lines]


def _confusion(y_true: Sequence[int], y_pred: Sequence[int]) -> np.ndarray:
    """Confusion counts ``[k, k]`` over the sorted union of classes (rows gold, columns predicted)."""
    classes = sorted(set(y_true) | set(y_pred))
    at = {c: i for i, c in enumerate(classes)}
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(y_true, y_pred, strict=True):
        cm[at[t], at[p]] += 1
    return cm


def weighted_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Support-weighted mean of per-class F1 (sklearn ``f1_score(average="weighted")``)."""
    cm = _confusion(y_true, y_pred).astype(float)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    denom = support + predicted  # F1 = 2TP / (gold + predicted); 0/0 counts as 0, as sklearn does
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float((f1 * support).sum() / support.sum()) if support.sum() else 0.0


def matthews_corrcoef(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Multiclass MCC ``(c·s − Σ p_k t_k) / sqrt((s² − Σ p_k²)(s² − Σ t_k²))``; 0 when undefined."""
    cm = _confusion(y_true, y_pred).astype(float)
    t, p, c, s = cm.sum(1), cm.sum(0), np.trace(cm), cm.sum()
    denom = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denom) if denom > 0 else 0.0


@dataclass(frozen=True)
class TaskResult:
    """One task: accuracy, weighted F1 and MCC in [0, 1] / [-1, 1], over ``n`` examples."""

    accuracy: float
    f1: float
    mcc: float
    n: int
    predictions: tuple[int, ...]
    labels: tuple[int, ...]


def task_result(pred: Sequence[int], gold: Sequence[int]) -> TaskResult:
    """Accuracy, weighted F1 and MCC of predicted option indices against gold ones (all 0 if empty)."""
    if not gold:
        return TaskResult(0.0, 0.0, 0.0, 0, tuple(pred), ())
    acc = float(np.mean(np.array(pred) == np.array(gold)))
    return TaskResult(acc, weighted_f1(gold, pred), matthews_corrcoef(gold, pred), len(gold), tuple(pred), tuple(gold))


def choose_options(loaded, examples: Sequence[GeneralExample], batch_rows: int = 64) -> list[int]:
    """Index of the lowest-mean-NLL option per example, batched.

    An example whose options are all single tokens (``" " + option``; the usual case: Yes/No,
    True/False, A–D) costs ONE prompt forward: every option is read off the log-probs at the prompt's
    last position (:func:`~seqedit.evaluate.scoring.shared_rows`).
    """
    prompts = [ex.prompt.rstrip() for ex in examples]
    pairs = list(dict.fromkeys((p, o) for ex, p in zip(examples, prompts) for o in ex.options))
    nll = {pair: sc.mean_nll for pair, sc in zip(pairs, score_targets(loaded, pairs, batch_rows=batch_rows))}
    # min() keeps the first option on ties, so ties resolve deterministically.
    return [min(range(len(ex.options)), key=lambda k: nll[(p, ex.options[k])]) for ex, p in zip(examples, prompts)]


def general_metrics(
    loaded,
    tasks: Sequence[str] = TASKS,
    start: int = 10,
    stop: int = 110,
    *,
    official_rte_inversion: bool = False,
    batch_rows: int = 64,
) -> dict[str, TaskResult]:
    """Zero-shot likelihood evaluation of ``tasks`` on items ``start..stop-1``; one batched pass."""
    data = {t: load_general_task(t, start, stop, official_rte_inversion=official_rte_inversion) for t in tasks}
    flat = [ex for t in tasks for ex in data[t]]
    chosen = iter(choose_options(loaded, flat, batch_rows))
    return {t: task_result([next(chosen) for _ in data[t]], [ex.label for ex in data[t]]) for t in tasks}
