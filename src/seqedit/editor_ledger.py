"""The ledger half of :class:`~seqedit.editor.Editor`: the operations that need a ledger.

Opening the editor's ledger (a new one waits for the first commit, ``pending.py``), closing it, and the
operations: forget, undo, verify, constraint fit, key drift, rekey and export, and the facts in force. Each goes
through the editor's :class:`~seqedit.ledger.session.LedgerSession` (refused with a clear error
without a ledger) and brings the bank to the ledger's state first (``prepare``). The class is a mixin:
it holds no state of its own and uses the editor's ``loaded``, ``bank``, ``hparams``, ``session``,
``templates`` and ``prepare``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch

from .errors import SeqEditError
from .facts import Fact
from .ledger import export as ledger_export
from .ledger.fit import FitReport, constraint_fit, key_drift
from .ledger.manifest import build_manifest, check_base, check_storage
from .ledger.session import LedgerSession, check_journalable
from .ledger.store import Ledger, StepRecord
from .ledger.verify import VerifyReport
from .locate.keys import ContextRows, KeyReader
from .pending import EditorLedger, PendingLedger
from .progress import ProgressCallback
from .rekey import rekey_step
from .steps import StepReport

if TYPE_CHECKING:
    from .bank import LayerBank
    from .methods import MethodSpec
    from .models.load import LoadedModel
    from .models.presets import EditHParams

__all__ = ["LedgerOperations"]


class LedgerOperations:
    """Ledger operations of an editor (module docstring)."""

    loaded: LoadedModel
    bank: LayerBank
    spec: MethodSpec
    hparams: EditHParams
    prompt_format: str
    stats_corpus: str | None
    last_record: StepRecord | None
    _lh: EditorLedger
    # and the editor's prepare(progress) and templates()

    def _open_ledger(self, path: str | os.PathLike, kv_dtype: str, snapshot_every: int) -> None:
        check_storage(kv_dtype, snapshot_every)
        check_journalable(self.spec)  # before a new ledger directory is created
        lh = self._lh
        if lh.ledger is None:
            check_base(self.loaded, path)
            man = build_manifest(self.loaded, self.spec, self.hparams, self.stats_corpus, kv_dtype, snapshot_every,
                                 self.prompt_format)
            lh.pending = PendingLedger.check(path, man, kv_dtype, snapshot_every)
            return
        try:
            lh.session = LedgerSession(lh.ledger, self.bank, kv_dtype, snapshot_every, lh.lam_for)
            if lh.ledger.last_step:
                self.prepare()
                lh.session.restore()
        except BaseException:
            self.close()
            raise

    @property
    def ledger(self) -> Ledger | None:
        """The ledger (``None`` without one); a new one is created by the first step, or here."""
        self._lh.create(self.bank)
        return self._lh.ledger

    @property
    def committed_ledger(self) -> Ledger | None:
        """The ledger if it exists: ``None`` without one and while a new one waits for its first commit
        (unlike :attr:`ledger`, reading this never creates it)."""
        return self._lh.ledger

    @property
    def session(self) -> LedgerSession | None:
        self._lh.create(self.bank)
        return self._lh.session

    def close(self) -> None:
        """Release the ledger (its lock and journal connection); the model keeps its weights. A ledger
        this editor created and never committed to is removed."""
        self._lh.close()

    def _need_session(self, what: str) -> LedgerSession:
        if self.session is None:
            raise SeqEditError(f"{what} needs a ledger: Editor(model, ledger='dir/')")
        self.session.open()
        return self.session

    def facts_in_force(self) -> list[Fact]:
        """The facts whose constraints the edited weights hold, oldest first."""
        return [r.fact for r in self._need_session("facts_in_force").in_force()]

    def applied_steps(self) -> int:
        """How many apply steps the ledger holds (rekey, forget and undo steps not counted)."""
        return self._need_session("applied_steps").ledger.count_steps("apply")

    def rekey(self, progress: ProgressCallback | None = None) -> StepRecord:
        """Re-read the keys of every fact in force on the current model and re-solve every edited layer from
        W₀ on them and the facts' stored z-layer targets: the weights become the one-time edit of the
        facts in force as a one-time editor would read their keys (:mod:`seqedit.rekey`). Exact forms only;
        committed as a ``rekey`` step (undo restores the keys it replaced)."""
        session = self._need_session("rekey")
        self.prepare(progress)
        record = rekey_step(self.loaded, self.bank, session, self.hparams, self.templates, progress)
        self.last_record = record
        return record

    def forget(self, ids: str | Iterable[str]) -> StepRecord:
        """Remove the facts ``ids`` (exactly: the weights become the one-time solution without them)."""
        session = self._need_session("forget")
        self.prepare()
        return session.forget([ids] if isinstance(ids, str) else list(ids))

    def undo(self, step: int | StepReport | StepRecord) -> StepRecord:
        """Revert ``step`` (an id or a report): the facts it added leave, those it replaced or forgot
        come back. Undoing an undo redoes the step."""
        session = self._need_session("undo")
        step_id = getattr(step, "id", step)
        if isinstance(step_id, bool) or not isinstance(step_id, int):
            raise ValueError(f"undo needs a step id (int) or a step report, got {step!r}")
        session.ledger.step(step_id)  # an unknown step fails before any work
        self.prepare()
        return session.undo(step_id)

    def verify(self, tol: float = 1e-8) -> VerifyReport:
        """Re-solve the one-time problem of the facts in force and compare with the live weights; check
        the ledger's file checksums (:class:`~seqedit.ledger.VerifyReport`)."""
        session = self._need_session("verify")
        self.prepare()
        return session.verify(tol)

    def constraint_fit(self, groups: int = 10, at_step: int | None = None) -> FitReport:
        """How much of each stored constraint of the facts in force the live weights (or, ``at_step``, the
        weights after that step) leave unmet, per layer and by the step that wrote it
        (:func:`~seqedit.ledger.fit.constraint_fit`)."""
        session = self._need_session("constraint_fit")
        self.prepare()
        return constraint_fit(self.bank, session.open(), groups, at_step)

    def key_drift(self, groups: int = 10) -> FitReport:
        """How far the keys the live model computes for the facts in force have moved from the keys their
        constraints hold, and what that leaves unmet, per layer and by writing step
        (:func:`~seqedit.ledger.fit.key_drift`)."""
        session = self._need_session("key_drift")
        self.prepare()
        layers = list(self.hparams.layers)

        def reread(facts: Sequence[Fact], fmt: str, split: bool) -> dict[int, torch.Tensor]:
            ctx = ContextRows.build(self.loaded.tokenizer, facts, self.templates(), fmt, split)
            return KeyReader(self.loaded, ctx, self.hparams.key_batch_rows).read(layers).keys

        return key_drift(self.bank, session.open(), reread, groups)

    def export(self, path: str | os.PathLike, *, delta: bool = False, delta_dtype: str = "float32") -> Path:
        """Write the edited model as a plain HF directory, or with ``delta=True`` only the edited
        matrices' ``W − W₀`` and a loader (:mod:`seqedit.ledger.export`)."""
        session = self._need_session("export")
        self.prepare()
        if delta:
            return ledger_export.export_delta(self.loaded, self.bank, session.ledger, path, dtype=delta_dtype)
        return ledger_export.export_model(self.loaded, session.ledger, path)
