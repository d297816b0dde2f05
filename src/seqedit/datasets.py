"""Dataset loaders: CounterFact and ZsRE records (in their ROME/MEND and KnowEdit layouts) to facts.

Owns :data:`FORMATS` and a parser per layout, format detection from a record's keys, reading
records from JSON arrays, JSON Lines or iterables, CounterFact split ids (``easyedit_splits.json``),
:func:`load_facts` and :func:`dump_facts` (the ``plain`` layout, :meth:`Fact.to_dict` records).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from .atomic import atomic_write
from .errors import FactError
from .facts import Fact, check_distinct

__all__ = ["FORMATS", "dump_facts", "load_facts"]

FORMATS = ("counterfact-rome", "counterfact-knowedit", "zsre-mend", "zsre-knowedit", "plain")

_MISSING = object()


def _get(record: Mapping[str, Any], *path: str, kind: type | tuple[type, ...] = str, default: Any = _MISSING) -> Any:
    """``record[path[0]][path[1]]...`` checked against ``kind``; a FactError names the dotted path."""
    value: Any = record
    for depth, key in enumerate(path):
        if not isinstance(value, Mapping) or key not in value:
            if default is not _MISSING:
                return default
            raise FactError(f"missing field {'.'.join(path[: depth + 1])!r}")
        value = value[key]
    if not isinstance(value, kind):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise FactError(f"field {'.'.join(path)!r} should be {names}, got {type(value).__name__}")
    return value


def _first(value: str | list[Any]) -> Any:
    """KnowEdit gives answers either as a string or as a list of them; take the first."""
    return value[0] if isinstance(value, list) and value else (value or None)


def _from_counterfact_rome(record: Mapping[str, Any], number: int, **_: Any) -> Fact:
    case_id = _get(record, "case_id", kind=int)
    true_target = _get(record, "requested_rewrite", "target_true", "str")
    meta = {"source": "counterfact-rome", "record": number, "case_id": case_id}
    if (relation := _get(record, "requested_rewrite", "relation_id", default=None)) is not None:
        meta["relation_id"] = relation
    return Fact(
        prompt=_get(record, "requested_rewrite", "prompt"),
        subject=_get(record, "requested_rewrite", "subject"),
        target=_get(record, "requested_rewrite", "target_new", "str"),
        true_target=true_target,
        paraphrases=_get(record, "paraphrase_prompts", kind=list, default=[]),
        # A neighbour shares the relation and the TRUE object: its answer must stay the true target.
        neighbors=[(p, true_target) for p in _get(record, "neighborhood_prompts", kind=list, default=[])],
        generation_prompts=_get(record, "generation_prompts", kind=list, default=[]),
        id=f"cf-{case_id}",
        meta=meta,
    )


def _from_counterfact_knowedit(record: Mapping[str, Any], number: int, **_: Any) -> Fact:
    case_id = _get(record, "case_id", kind=int, default=None)
    rephrase = _get(record, "rephrase_prompt", default=None)
    locality = _get(record, "locality_prompt", default=None)
    meta: dict[str, Any] = {"source": "counterfact-knowedit", "record": number}
    if case_id is not None:
        meta["case_id"] = case_id
    return Fact(
        prompt=_get(record, "prompt"),
        subject=_get(record, "subject"),
        target=_get(record, "target_new"),
        true_target=_get(record, "ground_truth", default=None),
        paraphrases=[rephrase] if rephrase is not None else [],
        neighbors=[(locality, _get(record, "locality_ground_truth"))] if locality is not None else [],
        # Same ids as the ROME layout, so the two layouts of one case join.
        id=None if case_id is None else f"cf-{case_id}",
        meta=meta,
    )


def _from_zsre_mend(record: Mapping[str, Any], number: int, *, zsre_target: str = "answers", **_: Any) -> Fact:
    answers = _get(record, "answers", kind=list)
    if not answers:
        raise FactError("field 'answers' is empty")
    gold, alt = answers[0], _get(record, "alt", default=None)
    target, true_target = (gold, alt) if zsre_target == "answers" else (alt, gold)
    return Fact(
        prompt=_get(record, "src"),
        subject=_get(record, "subject"),
        target=target,
        true_target=true_target,
        paraphrases=[_get(record, "rephrase")],
        # ROME/MEMIT's dsets/zsre.py: the NQ question, "nq question: " prefix kept, plus "?",
        # scored against the ground-truth answer.
        neighbors=[(_get(record, "loc") + "?", _get(record, "loc_ans"))],
        meta={"source": "zsre-mend", "record": number},
    )


def _from_zsre_knowedit(record: Mapping[str, Any], number: int, **_: Any) -> Fact:
    rephrase = _get(record, "rephrase_prompt", default=None)
    groups = _get(record, "locality", kind=dict, default={})
    neighbors = [
        (_get(item, "prompt"), _first(_get(item, "ground_truth", kind=(str, list))))
        for group in groups
        for item in _get(record, "locality", group, kind=list)
    ]
    return Fact(
        prompt=_get(record, "prompt"),
        subject=_get(record, "subject"),
        target=_get(record, "target_new"),
        true_target=_first(_get(record, "ground_truth", kind=(str, list), default=[])),
        paraphrases=[rephrase] if rephrase is not None else [],
        neighbors=neighbors,
        meta={"source": "zsre-knowedit", "record": number},
    )


def _from_plain(record: Mapping[str, Any], number: int, **_: Any) -> Fact:
    return Fact.from_dict(record)


_PARSERS = {
    "counterfact-rome": _from_counterfact_rome,
    "counterfact-knowedit": _from_counterfact_knowedit,
    "zsre-mend": _from_zsre_mend,
    "zsre-knowedit": _from_zsre_knowedit,
    "plain": _from_plain,
}


def _detect(record: Any, where: str) -> str:
    if not isinstance(record, Mapping):
        raise FactError(f"{where}: expected a JSON object, got {type(record).__name__}")
    keys = set(record)
    if "requested_rewrite" in keys:
        return "counterfact-rome"
    if {"src", "answers"} <= keys:
        return "zsre-mend"
    if {"prompt", "subject", "target"} <= keys:
        return "plain"
    if {"prompt", "subject", "target_new"} <= keys:
        knowedit = "locality" in keys or isinstance(record.get("ground_truth"), list)
        return "zsre-knowedit" if knowedit else "counterfact-knowedit"
    raise FactError(f"{where}: unknown fact layout, keys seen: {sorted(map(str, keys))}; pass format= one of {FORMATS}")


def _records(source: str | os.PathLike[str] | Iterable[Any]) -> tuple[str, Iterator[tuple[int, Any]]]:
    """How to name a record ("FILE line", "FILE record" or "record"), and (1-based number, record) pairs."""
    if not isinstance(source, (str, os.PathLike)):
        return "record", enumerate(source, start=1)
    path = Path(source)
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FactError(f"{path}: invalid JSON: {exc}") from exc
        except RecursionError:
            raise FactError(f"{path}: invalid JSON: nested too deeply") from None
        return f"{path} record", enumerate(records, start=1)

    def lines() -> Iterator[tuple[int, Any]]:
        # split("\n"), not splitlines(): U+2028 and friends may stand unescaped inside JSON strings.
        for number, line in enumerate(text.split("\n"), start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise FactError(f"{path} line {number}: invalid JSON: {exc}") from exc
                except RecursionError:
                    raise FactError(f"{path} line {number}: invalid JSON: nested too deeply") from None

    return f"{path} line", lines()


def _read_text(path: Path) -> str:
    """The text of a facts file; a FactError names the file if it is missing, a folder, or not UTF-8."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FactError(f"facts file {path} does not exist") from None
    except IsADirectoryError:
        raise FactError(f"facts file {path} is a directory") from None
    except OSError as exc:
        raise FactError(f"cannot read facts file {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise FactError(
            f"{path} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} (line {line})"
        ) from None


def _split_ids(split: str, splits_file: str | os.PathLike[str] | None, source: object) -> frozenset[int]:
    """The case ids of ``split``; by default from easyedit_splits.json beside the data file ``source``."""
    if splits_file is None:
        if not isinstance(source, (str, os.PathLike)):
            raise FactError(f"split={split!r} on in-memory records needs splits_file=")
        here = Path(source).parent
        # The ROME-layout subset lives one folder below easyedit_splits.json.
        candidates = [here / "easyedit_splits.json", here.parent / "easyedit_splits.json"]
        splits_path = next((c for c in candidates if c.is_file()), None)
        if splits_path is None:
            raise FactError(
                f"split={split!r} needs easyedit_splits.json, not found in {here} or {here.parent}; pass splits_file="
            )
    else:
        splits_path = Path(splits_file)
        if not splits_path.is_file():
            raise FactError(f"split={split!r}: splits file {splits_path} does not exist")
    splits = json.loads(splits_path.read_text(encoding="utf-8"))
    if not isinstance(splits, Mapping) or split not in splits:
        available = sorted(splits) if isinstance(splits, Mapping) else []
        raise FactError(f"split {split!r} not in {splits_path} (splits there: {available})")
    return frozenset(splits[split])


def load_facts(
    path_or_records: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    *,
    format: str = "auto",
    split: str | None = None,
    limit: int | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    zsre_target: Literal["answers", "alt"] = "answers",
    splits_file: str | os.PathLike[str] | None = None,
    distinct: bool = False,
) -> list[Fact]:
    """Read facts from a JSON array or JSON Lines file, or from an iterable of records.

    ``format`` is one of :data:`FORMATS` or ``"auto"`` (detected from the first record's keys).

    - ``counterfact-rome``: id ``cf-{case_id}``; neighbours answer the true target.
    - ``counterfact-knowedit`` (EasyEdit): id ``cf-{case_id}`` when a ``case_id`` is present.
    - ``zsre-mend``: prompt = ``src``, paraphrase = ``rephrase``, neighbour = ``(loc + "?", loc_ans)``
      as in ROME/MEMIT. ``zsre_target="answers"`` (default, ROME/MEMIT) edits towards ``answers[0]``
      with ``alt`` as the competing "true" target; ``"alt"`` (EasyEdit) edits towards ``alt`` with
      ``answers[0]`` as the true target.
    - ``zsre-knowedit``: neighbours from every ``locality`` group (ZsRE has Relation_Specificity).
    - ``plain``: :meth:`Fact.to_dict` records, as written by :func:`dump_facts`.

    ``split`` (CounterFact only) keeps the case ids listed under that key of ``splits_file``, by
    default ``easyedit_splits.json`` next to the data file or one folder up. ``limit`` caps the
    number of facts returned. An unusable record (missing field, subject not in the question, empty
    target, ...) raises a FactError naming its 1-based line (array element, for JSON arrays and
    iterables); with ``on_error="skip"`` it is dropped. Invalid JSON always raises. ``distinct``
    refuses a list that holds one edit twice (:func:`~seqedit.facts.check_distinct`, as ``Editor.run``
    would; off by default because the shared CounterFact and ZsRE files repeat a few edits).
    """
    for name, value in (("on_error", on_error), ("zsre_target", zsre_target), ("format", format)):
        if not isinstance(value, str):
            raise FactError(f"{name} must be a string, got {type(value).__name__}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)):
        raise FactError(f"limit must be an int or None, got {type(limit).__name__}")
    if split is not None and not isinstance(split, str):
        raise FactError(f"split must be a string or None, got {type(split).__name__}")
    if not isinstance(path_or_records, (str, os.PathLike, Iterable)) or isinstance(path_or_records, (bytes, Mapping)):
        raise FactError(f"load_facts reads a path or an iterable of records, got {type(path_or_records).__name__}")
    if on_error not in ("raise", "skip"):
        raise FactError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if zsre_target not in ("answers", "alt"):
        raise FactError(f"zsre_target must be 'answers' or 'alt', got {zsre_target!r}")
    if format != "auto" and format not in _PARSERS:
        raise FactError(f"unknown format {format!r}; expected 'auto' or one of {FORMATS}")
    if limit is not None and limit < 0:
        raise FactError(f"limit must be >= 0, got {limit}")

    unit, records = _records(path_or_records)
    facts: list[Fact] = []
    keep: frozenset[int] | None = None
    for number, record in records:
        where = f"{unit} {number}"
        if format == "auto":
            format = _detect(record, where)
        if split is not None and keep is None:
            if not format.startswith("counterfact"):
                raise FactError(f"split={split!r} applies to CounterFact only, not to format {format!r}")
            keep = _split_ids(split, splits_file, path_or_records)
        if limit is not None and len(facts) >= limit:
            break
        try:
            if not isinstance(record, Mapping):
                raise FactError(f"expected a JSON object, got {type(record).__name__}")
            if keep is not None and _get(record, "case_id", kind=int) not in keep:
                continue
            facts.append(_PARSERS[format](record, number, zsre_target=zsre_target))
        except FactError as exc:
            if on_error == "raise":
                raise FactError(f"{where}: {exc}") from exc
    if distinct:  # the guard Editor.apply and run apply to a step (seqedit.guards.check_batch)
        check_distinct(facts, str(path_or_records) if isinstance(path_or_records, (str, os.PathLike)) else "facts")
    return facts


def dump_facts(facts: Iterable[Fact], path: str | os.PathLike[str]) -> Path:
    """Write facts as ``plain`` JSON Lines, atomically: a reader sees the old file or the new one."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            for fact in facts:
                out.write(json.dumps(fact.to_dict(), ensure_ascii=False) + "\n")

    return atomic_write(path, write)
