"""Pure float64 linear algebra of seqedit: tensors in, tensors out; knows nothing of models.

``LayerSystem`` (normal equations of one edited layer) and the kernels behind it in ``solvers``;
the method operators (AlphaEdit's null space, PRUNE / RECT, Algorithm 1's error compensation) in
``regularizers``.
"""

from seqedit.linalg import normal_eq, regularizers, solvers
from seqedit.linalg.normal_eq import *  # noqa: F403  (the names are listed in each module's __all__)
from seqedit.linalg.regularizers import *  # noqa: F403
from seqedit.linalg.solvers import *  # noqa: F403

__all__ = [*normal_eq.__all__, *regularizers.__all__, *solvers.__all__]
