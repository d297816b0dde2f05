"""seqedit: sequential knowledge editing whose every step equals the one-time solution.

    import seqedit
    model = seqedit.load_model("smollm2-135m")
    facts = seqedit.load_facts("facts.jsonl")
    editor = seqedit.Editor(model, method="memit")
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
from .models.load import LoadedModel, load_model
from .models.presets import EditHParams, preset_for

__version__ = "0.1.0"

__all__ = [
    "Editor",
    "StepReport",
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
