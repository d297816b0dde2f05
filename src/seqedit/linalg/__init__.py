"""Pure float64 linear algebra of seqedit: tensors in, tensors out; knows nothing of models.

- ``normal_eq``: ``LayerSystem``, the normal equations of one edited layer; ``solvers``: its kernels.
- ``nullspace``: AlphaEdit's ``NullSpace`` and reduced r×r ``AlphaEditSystem``.
- ``postprocess``: the post-processors R_p of PRUNE and RECT (``prune``, ``rect``, ``PostProcessor``).
- ``compensation``: ``ErrorCompensation``, Algorithm 1's carried error.
- ``checks``: ``real``, the float validator (and the shape checks the modules share);
  ``system_base``: the update skeleton ``LayerSystem`` and ``AlphaEditSystem`` share.
"""

from seqedit.linalg import checks, compensation, normal_eq, nullspace, postprocess, solvers
from seqedit.linalg.checks import *  # noqa: F403  (the names are listed in each module's __all__)
from seqedit.linalg.compensation import *  # noqa: F403
from seqedit.linalg.normal_eq import *  # noqa: F403
from seqedit.linalg.nullspace import *  # noqa: F403
from seqedit.linalg.postprocess import *  # noqa: F403
from seqedit.linalg.solvers import *  # noqa: F403

__all__ = [  # noqa: PLE0604  (each module lists its names: the union, not a copy)
    *checks.__all__,
    *compensation.__all__,
    *normal_eq.__all__,
    *nullspace.__all__,
    *postprocess.__all__,
    *solvers.__all__,
]
