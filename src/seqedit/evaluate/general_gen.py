"""General-capability tasks scored by generation (REFERENCE_NOTES §3.4, prediction (a)), batched.

Each prompt is continued greedily by ``max_new_tokens`` tokens (official: 5), and the lower-cased
continuation is parsed into an option index, −1 when unparseable (the −1 class counts against recall
in weighted F1, as in the official ``f1``). Parsing, and where it deviates from the official code:

* yes/no, positive/negative, true/false tasks: the option WORD (``\\b``-delimited) that occurs first in
  the continuation. The official code tests fixed substrings in a fixed order (RTE "false" first, NLI
  "true" first, and "no" also matches inside "not"/"know"); whole words in order of appearance avoid
  those accidents and agree whenever the continuation names one option.
* MMLU: the first non-space character must be a letter A–D, alone or followed by ``) . : ,`` or a line
  break (``"B"``, ``"(B)"``, ``"B."``, ``"B\n"``; not the article in ``"a cat"``);
  the official code searches for ``"a\\n"`` … ``"d\\n"``, which misses an answer followed by end of text.

Greedy decoding is :func:`~seqedit.evaluate.scoring.greedy_completions` (batched, KV-cached, cut after
the end-of-sequence token as ``generate`` in the official code stops there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from .scoring import greedy_completions
from .general import TASKS, GeneralExample, TaskResult, load_general_task, task_result

__all__ = ["general_metrics_generation", "parse_answer"]

_LETTER = re.compile(r"^\s*\(?([abcd])(?:[).:,\n]|\s*$)")


def parse_answer(example: GeneralExample, continuation: str) -> int:
    """Option index named by ``continuation`` (see the module docstring), or −1."""
    text = continuation.lower()
    options = [o.lower() for o in example.options]
    if options == list("abcd"):
        m = _LETTER.match(text)
        return options.index(m.group(1)) if m else -1
    hits = [(m.start(), k) for k, o in enumerate(options) if (m := re.search(rf"\b{re.escape(o)}\b", text))]
    return min(hits)[1] if hits else -1


def general_metrics_generation(
    loaded,
    tasks: Sequence[str] = TASKS,
    start: int = 10,
    stop: int = 110,
    *,
    official_rte_inversion: bool = False,
    max_new_tokens: int = 5,
    batch_rows: int = 32,
) -> dict[str, TaskResult]:
    """Zero-shot generation-based evaluation of ``tasks`` on items ``start..stop-1`` (same prompts as
    the likelihood scorer, un-stripped as the official code feeds them)."""
    data = {t: load_general_task(t, start, stop, official_rte_inversion=official_rte_inversion) for t in tasks}
    flat = [ex for t in tasks for ex in data[t]]
    texts = iter(greedy_completions(loaded, [ex.prompt for ex in flat], max_new_tokens, batch_rows))
    return {t: task_result([parse_answer(ex, next(texts)) for ex in data[t]], [ex.label for ex in data[t]])
            for t in tasks}
