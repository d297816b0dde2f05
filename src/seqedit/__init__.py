"""seqedit: sequential knowledge editing whose every step equals the one-time solution.

    import seqedit
    model = seqedit.load_model("smollm2-135m")
    facts = seqedit.load_facts("facts.jsonl")
    editor = seqedit.Editor(model, method="memit")        # or ledger="edits/" (durable; docs/ledger.md)
    step = editor.apply(facts[:100])

Extend it: ``seqedit.register_method`` (a new editing method) and ``seqedit.register_architecture``
(a new decoder family); the layers of the package are described in ``docs/architecture.md``.
"""

from .bank import LayerBank
from .editor import Editor
from .errors import (
    FactError,
    IllConditionedError,
    LocateError,
    ModelLoadError,
    PlacementError,
    SeqEditError,
    UnsupportedArchitectureError,
)
from .datasets import dump_facts, load_facts
from .facts import Fact
from .methods import Capabilities, Form, MethodSpec, Option, method_info, parse_method, register_method
from .models.arch import ArchSpec, register_architecture
from .progress import Phase, ProgressEvent
from .steps import EditorCallback, RunPosition, StepReport
from .ledger import Ledger, LedgerCorruptError, LedgerError, StepRecord, VerifyReport, apply_delta, load_delta
from .models.load import LoadedModel, load_model
from .models.presets import EditHParams, preset_for

from .version import __version__

__all__ = [
    "__version__",
    "ArchSpec",
    "Capabilities",
    "Editor",
    "EditorCallback",
    "Form",
    "LayerBank",
    "MethodSpec",
    "Option",
    "Phase",
    "ProgressEvent",
    "RunPosition",
    "StepReport",
    "method_info",
    "parse_method",
    "register_architecture",
    "register_method",
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
    "PlacementError",
    "UnsupportedArchitectureError",
]
