"""The :class:`Fact`: one edit, "prompt with subject -> target", validated and normalised.

A :class:`Fact` is a template holding exactly one ``{}`` where the subject goes, the subject, the new
target and, optionally, the answer it replaces, paraphrases, neighbours whose answers must not change,
and generation prompts. Reading facts from dataset files is :mod:`seqedit.datasets`; locating those
files is :mod:`seqedit.shared_data`.

Targets and answers are stored without a leading space; the tokenisation layer joins prompt and
target with one space (``prompt + " " + target``), as ROME/MEMIT do.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .errors import FactError

__all__ = ["Fact", "check_distinct", "visible"]

# Sentence punctuation only: brackets and quotes may belong to the relation, and "}" ends "{}".
_TRAILING_PUNCT = re.compile(r"[\s.,;:!?\u2026]+$")
_WHITESPACE = re.compile(r"\s+")


def _label(fact_id: object, prompt: object) -> str:
    """How error messages name a fact: its id, else its (shortened) prompt."""
    if fact_id is not None:
        return repr(fact_id)
    text = prompt if isinstance(prompt, str) else repr(prompt)
    return repr(text if len(text) <= 80 else text[:77] + "...")


# Characters that show nothing on their own: controls, formats (zero-width space, joiners, BOM), unassigned
# and surrogates, separators, combining marks without a base, and the blank letters some fonts draw as space.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Cs", "Zs", "Zl", "Zp", "Mn", "Me"})
_BLANK_LETTERS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def visible(text: str) -> bool:
    """Whether ``text`` holds at least one character that shows (not only whitespace or invisibles)."""
    return any(not (c.isspace() or c in _BLANK_LETTERS or unicodedata.category(c) in _INVISIBLE_CATEGORIES)
               for c in text)


def _norm(text: str) -> str:
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


@dataclass(frozen=True)
class Fact:
    """One edit: ``prompt.format(subject)`` should be completed by ``target``.

    ``prompt`` may also be given with the subject filled in (as KnowEdit/EasyEdit and ZsRE give it):
    the FIRST occurrence of ``subject`` is then replaced by ``{}``, so the key is read where the model
    first meets the subject and ``text`` reproduces the given prompt exactly.

    Normalisation: every string is stripped (an empty true target becomes ``None``), sequences
    become tuples and ``meta`` a read-only copy. ``meta`` counts in ``==`` but not in ``hash()``.
    """

    prompt: str
    subject: str
    target: str
    true_target: str | None = None
    paraphrases: tuple[str, ...] = ()
    neighbors: tuple[tuple[str, str], ...] = ()
    generation_prompts: tuple[str, ...] = ()
    id: str | None = None
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        name = _label(self.id, self.prompt)
        setattr_ = functools.partial(object.__setattr__, self)

        def fail(problem: str) -> FactError:
            return FactError(f"fact {name}: {problem}")

        def text(value: object, what: str) -> str:
            if not isinstance(value, str):
                raise fail(f"{what} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise fail(f"{what} is empty")
            if not visible(value):
                raise fail(f"{what} {value!r} has no visible character (only whitespace or invisible ones)")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise fail(f"{what} holds a lone surrogate (invalid Unicode): {value!r}") from None
            return value.strip()

        def items(values: object, what: str, kind: str) -> list[Any]:
            # A bare string is iterable too, and almost always a mistake here.
            if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
                raise fail(f"{what} must be a sequence of {kind}, got {type(values).__name__}")
            return list(values)

        def pair(value: object, what: str) -> tuple[str, str]:
            if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or len(value := tuple(value)) != 2:
                raise fail(f"{what} must be a (prompt, answer) pair, got {value!r}")
            return text(value[0], f"{what} prompt"), text(value[1], f"{what} answer")

        if self.id is not None and (not isinstance(self.id, str) or not self.id.strip()):
            raise fail("id must be a non-empty string or None")
        if not isinstance(self.meta, Mapping):
            raise fail(f"meta must be a mapping, got {type(self.meta).__name__}")
        subject = text(self.subject, "subject")
        prompt = text(self.prompt, "prompt")
        if "{}" not in prompt:
            if subject not in prompt:
                raise fail(f"subject {subject!r} does not occur in prompt {prompt!r}")
            prompt = prompt.replace(subject, "{}", 1)
        if (count := prompt.count("{}")) != 1:
            raise fail(f"prompt {prompt!r} must contain exactly one '{{}}', found {count}")
        if any(brace in prompt.replace("{}", "") for brace in "{}"):
            raise fail(f"prompt {prompt!r} has braces besides its one '{{}}'")

        setattr_("prompt", prompt)
        setattr_("subject", subject)
        setattr_("target", text(self.target, "target"))
        if isinstance(self.true_target, str) and not self.true_target.strip():
            setattr_("true_target", None)
        elif self.true_target is not None:
            setattr_("true_target", text(self.true_target, "true_target"))
        for field_ in ("paraphrases", "generation_prompts"):
            values = items(getattr(self, field_), field_, "strings")
            setattr_(field_, tuple(text(v, f"{field_}[{i}]") for i, v in enumerate(values)))
        neighbors = items(self.neighbors, "neighbors", "(prompt, answer) pairs")
        setattr_("neighbors", tuple(pair(v, f"neighbors[{i}]") for i, v in enumerate(neighbors)))
        setattr_("meta", MappingProxyType(dict(self.meta)))

    def __reduce__(self) -> tuple[Any, ...]:
        # mappingproxy cannot be pickled; rebuild from the JSON-safe form instead.
        return (type(self).from_dict, (self.to_dict(),))

    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.format(self.subject)

    @property
    def slot(self) -> tuple[str, str]:
        """``(subject, relation template)`` key: NFKC, casefolded, whitespace collapsed, trailing
        sentence punctuation dropped, so trivially different spellings of one slot compare equal."""
        return _norm(self.subject), _TRAILING_PUNCT.sub("", _norm(self.prompt))

    def with_id(self, id: str | None) -> Fact:
        """A copy of this fact with another id."""
        return dataclasses.replace(self, id=id)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (the ``plain`` format); :meth:`from_dict` inverts it."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "subject": self.subject,
            "target": self.target,
            "true_target": self.true_target,
            "paraphrases": list(self.paraphrases),
            "neighbors": [list(pair) for pair in self.neighbors],
            "generation_prompts": list(self.generation_prompts),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Fact:
        """Build a fact from :meth:`to_dict` output; missing optional keys take their defaults."""
        if not isinstance(data, Mapping):
            raise FactError(f"a fact must be a JSON object, got {type(data).__name__}")
        name = _label(data.get("id"), data.get("prompt"))
        if unknown := sorted(set(data) - _FIELD_NAMES):
            raise FactError(f"fact {name}: unknown keys {unknown}")
        if missing := [k for k in ("prompt", "subject", "target") if k not in data]:
            raise FactError(f"fact {name}: missing keys {missing}")
        return cls(**{k: v for k, v in data.items() if not (k == "meta" and v is None)})


_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(Fact))


def check_distinct(facts: Iterable[Fact], where: str = "facts") -> None:
    """Refuse a fact list that names one id twice or holds one edit twice (same slot, same target):
    it would be edited twice, weighing double. ``where`` names the list in the message."""
    ids: dict[str, int] = {}
    edits: dict[tuple[str, str, str], int] = {}
    for i, f in enumerate(facts, start=1):
        if f.id is not None:
            if (j := ids.setdefault(f.id, i)) != i:
                raise FactError(f"{where}: facts {j} and {i} have the same id {f.id!r}")
        key = (*f.slot, _norm(f.target))
        if (j := edits.setdefault(key, i)) != i:
            raise FactError(f"{where}: facts {j} and {i} are the same edit ({f.subject!r} -> {f.target!r})")
