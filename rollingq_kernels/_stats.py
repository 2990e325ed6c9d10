"""The statistics record every backend returns next to the attention output, and the dtype it
is accumulated in."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["AttentionStats", "accumulation_dtype", "read_all_entries"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else: the dtype every backend
    accumulates in and returns its statistics in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def read_all_entries(t: torch.Tensor, read):
    """``read(t)``; inside torch.func transforms, ``read`` of the plain tensor under their
    wrappers (under vmap, the data of every vmapped entry), with the transforms off so that
    nothing it computes is wrapped again. For checks that must read values (key_modality's ids):
    they check every entry, and the number of modalities inferred is the same for all of them,
    as vmap requires."""
    if not torch._C._are_functorch_transforms_active():
        return read(t)
    from torch._C import _functorch

    with torch._C._DisableFuncTorch():
        while _functorch.is_functorch_wrapped_tensor(t):
            t = _functorch.get_unwrapped(t)
        return read(t)


class AttentionStats(NamedTuple):
    """What RollingQ needs from one attention call, computed in the same pass as the output.

    A NamedTuple, so it is a pytree: it passes through ``torch.compile`` and DDP unchanged.
    All fields are float32 (float64 when the inputs are float64) and carry no gradient.

    Fields:
        modality_mass: (B, H, Lq, M) -- sum of the softmax probabilities of query row i over the
            keys of modality m. Keys with id -1 are attended but counted in no modality, so a row
            sums to 1 minus its mass on those keys (0 for a row that sees no key).
        key_sum: (B, H, M, D) -- sum of the unscaled keys of modality m over non-padded keys.
        key_count: (B, M) -- number of non-padded keys of modality m.
        lse: (B, H, Lq) -- natural-log log-sum-exp of the scaled scores of row i over its visible
            keys; -inf for a row that sees no key.
    """

    modality_mass: torch.Tensor
    key_sum: torch.Tensor
    key_count: torch.Tensor
    lse: torch.Tensor

    @property
    def num_modalities(self) -> int:
        return self.key_count.shape[-1]

    def key_mean(self) -> torch.Tensor:
        """(B, H, M, D) mean key of each modality; zero where a modality has no key."""
        count = self.key_count.clamp_min(1.0)[:, None, :, None]
        return self.key_sum / count
