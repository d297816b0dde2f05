"""CounterFact fluency on the ROME-layout generation prompts, for facts of either layout.

ROME-layout facts carry their ``generation_prompts``. KnowEdit-layout facts (``cf-<case_id>`` ids)
have none, so they are joined by case id to the ROME-layout subset in the shared data (1,115 cases),
which holds the original 10 generation prompts per case; facts found in neither way are skipped and
counted. Texts are sampled as ROME does (top-k 5, 100 tokens in all including the prompt, one sample
per prompt) and scored with :func:`~seqedit.evaluate.fluency.text_entropy_score`, averaged over a
record's prompts, then over records (bits; the paper reports ×100). Consistency is not computable:
see :data:`~seqedit.evaluate.fluency.CONSISTENCY_UNAVAILABLE`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..facts import Fact
from ..shared_data import counterfact_path
from .fluency import CONSISTENCY_UNAVAILABLE, generate_texts, text_entropy_score

__all__ = ["counterfact_fluency", "generation_prompts_for", "rome_generation_prompts"]


@functools.lru_cache(maxsize=4)
def _read_prompts(path: str) -> dict[str, tuple[str, ...]]:
    out = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[f"cf-{r['case_id']}"] = tuple(r.get("generation_prompts") or ())
    return out


def rome_generation_prompts(path: str | Path | None = None) -> dict[str, tuple[str, ...]]:
    """``{"cf-<case_id>": generation prompts}`` of the ROME-layout CounterFact file (default: the shared subset)."""
    return _read_prompts(str(path or counterfact_path("rome")))


def generation_prompts_for(facts: Sequence[Fact], path: str | Path | None = None) -> list[tuple[str, ...]]:
    """Each fact's own generation prompts, else those of its case in the ROME-layout file, else ``()``."""
    table: dict[str, tuple[str, ...]] | None = None
    out = []
    for f in facts:
        if f.generation_prompts:
            out.append(f.generation_prompts)
            continue
        table = table if table is not None else rome_generation_prompts(path)
        out.append(table.get(f.id or "", ()))
    return out


def counterfact_fluency(
    loaded,
    facts: Sequence[Fact],
    max_records: int = 50,
    *,
    seed: int = 0,
    max_total_tokens: int = 100,
    batch_rows: int = 32,
    prompts_path: str | Path | None = None,
) -> dict[str, Any]:
    """Fluency of the first ``max_records`` facts (in the given order) that have generation prompts.

    Returns JSON-safe ``{"fluency" (bits, None if no record), "n_records", "n_texts",
    "n_without_prompts", "consistency": None, "consistency_note"}``.
    """
    prompts = generation_prompts_for(facts, prompts_path)
    chosen = [p for p in prompts if p][: max(0, max_records)]
    flat = [q for p in chosen for q in p]
    texts = iter(generate_texts(loaded, flat, max_total_tokens, top_k=5, seed=seed, batch_rows=batch_rows))
    per_record = [float(np.mean([text_entropy_score(next(texts)) for _ in p])) for p in chosen]
    return {
        "fluency": float(np.mean(per_record)) if per_record else None,
        "n_records": len(chosen),
        "n_texts": len(flat),
        "n_without_prompts": sum(1 for p in prompts if not p),
        "consistency": None,
        "consistency_note": CONSISTENCY_UNAVAILABLE,
    }
