"""rollingq_kernels: fused attention with query rotation and RollingQ statistics.

One call computes, in a single pass over K and V, the rotation of the chosen query rows,
exact scaled-dot-product attention (online softmax, O(L) memory) and the statistics RollingQ
needs (attention mass per modality, per-modality key sums, log-sum-exp).
"""

from ._stats import AttentionStats
from .api import patch_sdpa, rolling_attention, scaled_dot_product_attention
from .backends import NoBackendError, backend_status, backend_table, registered_backends
from .controller import RollingQ, RollingQReport
from .dropout import dropout_keep_mask
from .fusion import RollingQFusion
from .mha import RollingQAttention, RollingQStats
from .reference import rolling_attention_reference
from .rollingq_math import (
    attention_imbalance_rate,
    key_modality_from_lengths,
    modality_cosine,
    rollingq_target,
    rollingq_weights,
    rotation_between,
)

__version__ = "0.1.0"

__all__ = [
    "AttentionStats",
    "NoBackendError",
    "RollingQ",
    "RollingQAttention",
    "RollingQFusion",
    "RollingQReport",
    "RollingQStats",
    "attention_imbalance_rate",
    "backend_status",
    "backend_table",
    "dropout_keep_mask",
    "key_modality_from_lengths",
    "patch_sdpa",
    "modality_cosine",
    "registered_backends",
    "rolling_attention",
    "rolling_attention_reference",
    "rollingq_target",
    "rollingq_weights",
    "rotation_between",
    "scaled_dot_product_attention",
]
