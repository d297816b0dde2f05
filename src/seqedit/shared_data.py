"""Where the shared data lives: the data folder and the files of each dataset in it.

The folder is ``$SEQEDIT_DATA`` when set, else the first ``shared/data`` beside an ancestor of this
package's own source directory (for a checkout, its ``../shared/data``). The working directory plays
no part, so a path does not depend on where the user stands.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from .errors import SeqEditError

__all__ = ["counterfact_path", "shared_data_dir", "wikitext_path", "zsre_path"]

_DATA_FILES = {
    "counterfact": {
        "knowedit": "counterfact/counterfact.jsonl",
        "rome": "counterfact/rome_format/counterfact_rome_subset.jsonl",
    },
    "zsre": {
        "mend-train": "zsre/zsre_mend_train_1k.jsonl",
        "mend-eval": "zsre/zsre_mend_eval_portability_gpt4.jsonl",
        "knowedit": "zsre/knowedit_zsre_test_all.jsonl",
    },
    "wikitext": {
        "valid": "wikitext/wikitext-2-raw/wiki.valid.raw",
        "test": "wikitext/wikitext-2-raw/wiki.test.raw",
    },
}


def shared_data_dir() -> Path:
    """The shared data folder: ``$SEQEDIT_DATA`` if set, else the first ``shared/data`` found beside
    an ancestor of this package's source directory (the repository's ``../shared/data``)."""
    if env := os.environ.get("SEQEDIT_DATA"):
        path = Path(env).expanduser()
        if not path.is_dir():
            raise SeqEditError(f"SEQEDIT_DATA={env!r} is not a directory")
        return path.resolve()
    start = Path(__file__).resolve().parent
    for folder in (start, *start.parents):
        if (candidate := folder / "shared" / "data").is_dir():
            return candidate
    raise SeqEditError(
        f"no shared/data folder beside any ancestor of {start}; set SEQEDIT_DATA to the data folder"
    )


def _data_file(dataset: str, kind: str) -> Path:
    kinds = _DATA_FILES[dataset]
    if kind not in kinds:
        raise ValueError(f"unknown {dataset} file {kind!r}; expected one of {sorted(kinds)}")
    return shared_data_dir() / kinds[kind]


def counterfact_path(layout: Literal["knowedit", "rome"] = "knowedit") -> Path:
    """CounterFact: the full EasyEdit/KnowEdit layout (20,000 cases) or the ROME-layout subset."""
    return _data_file("counterfact", layout)


def zsre_path(kind: Literal["mend-train", "mend-eval", "knowedit"]) -> Path:
    """ZsRE: MEND-layout train (1k) or eval-with-portability file, or the KnowEdit test set."""
    return _data_file("zsre", kind)


def wikitext_path(split: Literal["valid", "test"]) -> Path:
    """WikiText-2 raw validation or test text."""
    return _data_file("wikitext", split)
