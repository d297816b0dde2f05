"""seqedit: sequential knowledge editing whose every step equals the one-time solution.

    import seqedit
    model = seqedit.load_model("smollm2-135m")
    facts = seqedit.load_facts("facts.jsonl")
    editor = seqedit.Editor(model, method="memit")        # or ledger="edits/" (durable; docs/ledger.md)
    step = editor.apply(facts[:100])
"""

from .editor import Editor, StepReport
from .errors import (
    FactError,
    IllConditionedError,
    LocateError,
    ModelLoadError,
    SeqEditError,
    UnsupportedArchitectureError,
)
from .facts import Fact, dump_facts, load_facts
from .ledger import Ledger, LedgerCorruptError, LedgerError, StepRecord, VerifyReport, apply_delta, load_delta
from .models.load import LoadedModel, load_model
from .models.presets import EditHParams, preset_for

__version__ = "0.1.0"

__all__ = [
    "Editor",
    "StepReport",
    "Ledger",
    "LedgerError",
    "LedgerCorruptError",
    "StepRecord",
    "VerifyReport",
    "apply_delta",
    "load_delta",
    "Fact",
    "load_facts",
    "dump_facts",
    "load_model",
    "LoadedModel",
    "EditHParams",
    "preset_for",
    "SeqEditError",
    "FactError",
    "LocateError",
    "ModelLoadError",
    "IllConditionedError",
    "UnsupportedArchitectureError",
]
