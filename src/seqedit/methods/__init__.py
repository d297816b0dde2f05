"""Editing methods as pure per-layer linear algebra, behind an open registry (REFERENCE_NOTES §2).

- :mod:`~seqedit.methods.registry`: ``register_method`` / ``method_info``, the forms (alignments) of
  each method with their :class:`Capabilities` and options; :data:`METHODS` is a live view.
- :mod:`~seqedit.methods.spec`: :class:`MethodSpec` / :func:`parse_method`, validated against it.
- :mod:`~seqedit.methods.state`: the :class:`LayerMethodState` interface (``step(K, R, W)``,
  ``finalize``, ``state_dict``) a method implements.
- :mod:`~seqedit.methods.builtin`: memit, alphaedit, prune, rect, rlsedit, memorize_latest.
- :mod:`~seqedit.methods.equivalence`: sequential vs one-time editing of fixed ``(K, V)``.

Nothing here knows about models; everything is float64.
"""

from . import builtin  # noqa: E402,F401  (registers the built-in methods)
from .equivalence import equivalence
from .registry import (
    METHODS,
    Capabilities,
    Form,
    MethodInfo,
    Option,
    float_option,
    forms_accepting,
    method_info,
    register_method,
    unregister_method,
)
from .spec import MethodSpec, parse_method
from .state import LayerMethodState, StepResult
from .tensors import as64

__all__ = [
    "METHODS",
    "Capabilities",
    "Form",
    "LayerMethodState",
    "MethodInfo",
    "MethodSpec",
    "Option",
    "StepResult",
    "as64",
    "equivalence",
    "float_option",
    "forms_accepting",
    "method_info",
    "parse_method",
    "register_method",
    "unregister_method",
]
