"""The nn layers of the package, importable from one place: :class:`RollingQAttention` (a drop-in
``nn.MultiheadAttention``, in ``mha.py``) and :class:`RollingQFusion` (the paper's [CLS] fusion,
in ``fusion.py``)."""

from .fusion import RollingQFusion, SharedHeadAttentionFunction
from .mha import RollingQAttention, RollingQStats

__all__ = ["RollingQStats", "RollingQAttention", "RollingQFusion", "SharedHeadAttentionFunction"]
