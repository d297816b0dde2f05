"""The journal's content hash chain (format 3): what lets ``verify`` see a row changed inside a sound page.

SQLite checks its pages (``PRAGMA integrity_check``) but not what a row says: a byte changed inside a fact's
text or a file's checksum leaves a valid page. Each step ``s`` therefore carries a link (``steps.link``)

    link_s = sha256(link_{s−1} ‖ content_s),        link_0 = ""

where ``content_s`` is what step ``s`` wrote, read back through the journal's indexes: its own row (but its
``undone_by`` and ``snapshot`` flags, which later steps set), the fact rows it added, the rows it removed
(``facts.removed = s``), the steps it undid (``undone_by = s``) and its constraints file's row. Every column
of every row is covered by exactly one step's content or by the *rest* digest (meta key ``chain_rest``):
the schema, the manifest and format version, the Σ₀ and snapshot file rows and the snapshot flags — all
bounded by the number of layers, not by the history. ``chain_head`` repeats the newest link.

A commit costs O(its step): it hashes its own rows and the rest. Opening a ledger for writing checks the
rest and the newest link (:func:`tail_problem`); ``verify`` recomputes the whole chain (:func:`chain_problem`)
and names the first step whose link breaks. Ledgers of format 2 carry one digest of every row instead
(:func:`legacy_problem`; format 1 none); their first write adds the chain (:func:`upgrade`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Protocol

__all__ = ["HEAD_KEY", "REST_KEY", "chain_problem", "legacy_problem", "link", "rest_digest", "seal_rest",
           "seal_step", "step_content", "tail_problem", "upgrade"]

HEAD_KEY = "chain_head"
REST_KEY = "chain_rest"
LEGACY_KEY = "digest"  # format 2: sha256 of every row of every table
_SEALS = (HEAD_KEY, REST_KEY, LEGACY_KEY)
_LEGACY_TABLES = ("meta", "steps", "facts", "files")
# the indexes the chain's reads go through (format 3 adds the last three)
INDEXES = (
    "CREATE UNIQUE INDEX IF NOT EXISTS facts_slot_in_force ON facts(slot_subject, slot_prompt) WHERE removed IS NULL",
    "CREATE UNIQUE INDEX IF NOT EXISTS facts_id_in_force ON facts(fact_id) WHERE removed IS NULL",
    "CREATE INDEX IF NOT EXISTS facts_added ON facts(added)",
    "CREATE INDEX IF NOT EXISTS facts_removed ON facts(removed)",
    "CREATE INDEX IF NOT EXISTS steps_undone_by ON steps(undone_by)",
    "CREATE INDEX IF NOT EXISTS steps_snapshot ON steps(id) WHERE snapshot = 1",
    "CREATE INDEX IF NOT EXISTS files_step ON files(step)",
)
BROKEN = "its content digest does not match its rows"  # the words every row-level finding starts with


class Rows(Protocol):  # the part of ``Journal`` used here
    def rows(self, sql: str, params: Any = ()) -> list: ...
    def one(self, sql: str, params: Any = ()) -> Any: ...
    def run(self, sql: str, params: Any = ()) -> int: ...


def _dump(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8", "surrogatepass")


def step_content(j: Rows, step: int) -> list | None:
    """What ``step`` wrote, in a canonical order (``None``: no such step). Index lookups only."""
    r = j.one("SELECT id, kind, created, target, info FROM steps WHERE id = ?", (step,))
    if r is None:
        return None
    added = j.rows("SELECT row, fact_id, slot_subject, slot_prompt, fact, kv_step, kv_col FROM facts "
                   "WHERE added = ? ORDER BY row", (step,))
    removed = j.rows("SELECT row FROM facts WHERE removed = ? ORDER BY row", (step,))
    undone = j.rows("SELECT id FROM steps WHERE undone_by = ? ORDER BY id", (step,))
    files = j.rows("SELECT name, sha256, bytes FROM files WHERE step = ? AND name LIKE 'steps/%' ORDER BY name",
                   (step,))
    return [list(r), [list(a) for a in added], [x[0] for x in removed], [x[0] for x in undone],
            [list(f) for f in files]]


def link(prev: str, content: list | None) -> str:
    h = hashlib.sha256(prev.encode("ascii", "replace") + b"\n")
    h.update(_dump(content))
    return h.hexdigest()


def _stored_link(j: Rows, step: int) -> str:
    if step == 0:
        return ""
    r = j.one("SELECT link FROM steps WHERE id = ?", (step,))
    return "" if r is None or r[0] is None else str(r[0])


def seal_step(j: Rows, step: int) -> None:
    """(Re)write ``step``'s link and the chain head; ``step`` must be the newest step."""
    new = link(_stored_link(j, step - 1), step_content(j, step))
    j.run("UPDATE steps SET link = ? WHERE id = ?", (new, step))
    j.run("INSERT OR REPLACE INTO meta VALUES (?, ?)", (HEAD_KEY, new))


def rest_digest(j: Rows) -> str:
    """sha256 of everything no step's content covers (bounded by the number of layers). A file row whose
    name damage moved out of ``base/``, ``snapshots/`` and ``steps/`` is missed here but breaks the
    digest or the link that covered it."""
    h = hashlib.sha256()
    parts = [
        j.rows("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name"),
        # meta is read by a table scan: a damaged page of its key index is integrity_check's to report
        sorted(tuple(r) for r in j.rows("SELECT key, value FROM meta NOT INDEXED") if r[0] not in _SEALS),
        # Σ₀ and snapshot rows through the name index (the files table has a row per step)
        j.rows("SELECT name, sha256, bytes, step FROM files WHERE (name >= 'base/' AND name < 'base0') OR "
               "(name >= 'snapshots/' AND name < 'snapshots0') ORDER BY name"),
        j.rows("SELECT id FROM steps WHERE snapshot = 1 ORDER BY id"),
    ]
    for part in parts:
        for r in part:
            h.update(_dump(list(r)) + b"\n")
        h.update(b"--\n")
    return h.hexdigest()


def seal_rest(j: Rows) -> None:
    j.run("INSERT OR REPLACE INTO meta VALUES (?, ?)", (REST_KEY, rest_digest(j)))


def _meta(j: Rows) -> dict[str, str]:
    return {r[0]: r[1] for r in j.rows("SELECT key, value FROM meta")}


def _rest_and_head(j: Rows, meta: dict[str, str]) -> str | None:
    if meta.get(REST_KEY) != rest_digest(j):
        return f"{BROKEN} (its schema, manifest, Σ₀ or snapshot rows were changed outside seqedit)"
    last = j.one("SELECT COALESCE(MAX(id), 0) FROM steps")[0]
    if meta.get(HEAD_KEY, "") != _stored_link(j, last):
        return f"{BROKEN} (the hash chain's head is not step {last}'s link)"
    return None


def tail_problem(j: Rows) -> str | None:
    """Why the rest digest, the head or the newest step's link disagree with the rows (``None``: they
    agree). O(newest step): what a writer checks on open; :func:`chain_problem` checks every step."""
    meta = _meta(j)
    if meta.get("format_version") in ("1", "2"):
        return legacy_problem(j, meta)
    if problem := _rest_and_head(j, meta):
        return problem
    last = j.one("SELECT COALESCE(MAX(id), 0) FROM steps")[0]
    if last and link(_stored_link(j, last - 1), step_content(j, last)) != _stored_link(j, last):
        return _broken_at(last)
    return None


def _broken_at(step: int) -> str:
    return (f"{BROKEN}: the hash chain breaks at step {step} (a row that step wrote was changed outside "
            "seqedit)")


_DANGLING = (
    ("facts", "added", "SELECT row, added FROM facts WHERE added NOT IN (SELECT id FROM steps)"),
    ("facts", "removed", "SELECT row, removed FROM facts WHERE removed IS NOT NULL AND removed NOT IN (SELECT id FROM steps)"),
    ("steps", "undone_by", "SELECT id, undone_by FROM steps WHERE undone_by IS NOT NULL AND undone_by NOT IN (SELECT id FROM steps)"),
    ("files", "step", "SELECT name, step FROM files WHERE name LIKE 'steps/%' AND (step IS NULL OR step NOT IN (SELECT id FROM steps))"),
)


def chain_problem(j: Rows) -> str | None:
    """The first disagreement between the rows and the whole chain (``None``: none): steps numbered
    1..N, no row naming a step that does not exist, every link recomputed from the start, the head and
    the rest digest. O(history): ``verify``'s check."""
    meta = _meta(j)
    if meta.get("format_version") in ("1", "2"):
        return legacy_problem(j, meta)
    ids = j.rows("SELECT id, link FROM steps ORDER BY id")
    if [r[0] for r in ids] != list(range(1, len(ids) + 1)):
        return f"{BROKEN} (its steps are not numbered 1..{len(ids)})"
    for table, column, sql in _DANGLING:
        if bad := j.one(sql):
            return f"{BROKEN} ({table} row {bad[0]} names {column} step {bad[1]}, which does not exist)"
    prev = ""
    for step, stored in ids:
        prev = link(prev, step_content(j, step))
        if prev != stored:
            return _broken_at(step)
    return _rest_and_head(j, meta)


# ---------------------------------------------------------------------------------- format 2 and before
def legacy_digest(j: Rows) -> str:
    """Format 2's digest: sha256 of every row of every table but the digest's own, sorted."""
    h = hashlib.sha256()
    for table in _LEGACY_TABLES:
        rows = sorted(json.dumps([table, *r]) for r in j.rows(f"SELECT * FROM {table}"))
        for line in rows:
            if not line.startswith(f'["meta", "{LEGACY_KEY}",'):
                h.update(line.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def legacy_problem(j: Rows, meta: dict[str, str]) -> str | None:
    stored = meta.get(LEGACY_KEY)
    if stored is None:
        return None if meta.get("format_version") == "1" else "its content digest is missing"
    if stored != legacy_digest(j):
        return f"{BROKEN} (a row was changed outside seqedit)"
    return None


def upgrade(j: Rows) -> None:
    """Move a format 1 or 2 journal to format 3 inside the caller's transaction: the ``link`` column and
    the new indexes, every step's link from the first, the head; the old digest goes."""
    if "link" not in {r[1] for r in j.rows("PRAGMA table_info(steps)")}:
        j.run("ALTER TABLE steps ADD COLUMN link TEXT")
    for stmt in INDEXES:
        j.run(stmt)
    prev = ""
    for (step,) in j.rows("SELECT id FROM steps ORDER BY id"):
        prev = link(prev, step_content(j, step))
        j.run("UPDATE steps SET link = ? WHERE id = ?", (prev, step))
    j.run("INSERT OR REPLACE INTO meta VALUES (?, ?)", (HEAD_KEY, prev))
    j.run("DELETE FROM meta WHERE key = ?", (LEGACY_KEY,))
