"""The attention-dropout keep-mask every backend generates: counter-based, so it is never stored.

Element (b, h, i, j) of the (B, H, Lq, Lk) probability matrix (h is the query head) is kept when
one 32-bit word of Philox4x32-10 is at least ``threshold(p) = floor(p * 2**32)``:

* keys of a row are taken in groups of four: group ``g = ((b * H + h) * Lq + i) * ceil(Lk / 4)
  + j // 4``, lane ``j % 4``;
* counter = (low 32 bits of g, high 32 bits of g, low and high 32 bits of ``offset``), key = (low
  and high 32 bits of ``seed``); the lane picks one of the four output words.

The kept probabilities are scaled by ``1 / (1 - p)``. ``rng_state`` is an int64 CPU tensor
``(seed, offset)``; :func:`new_rng_state` draws the seed from torch's default CPU generator, so
``torch.manual_seed`` reproduces a dropout call on every backend and every device.

This module is the specification: the C++, Triton and CUDA kernels implement the same function,
and the tests compare their masks with :func:`dropout_keep_mask` bit for bit.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["dropout_keep_mask", "dropout_threshold", "new_rng_state", "philox4x32"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key schedule (Weyl) increments
ROUNDS = 10


def dropout_threshold(p: float) -> int:
    """The 32-bit threshold below which a word drops its element: floor(p * 2**32)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must lie in [0, 1); got {p}")
    return min(int(math.floor(p * 4294967296.0)), _MASK32)


def _mulhilo(m: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    # (hi, lo) 32-bit halves of m * x for uint32 m and x held in int64, without int64 overflow:
    # x = xh * 2^16 + xl, so m * x = m * xh * 2^16 + m * xl with both products below 2^48.
    xl, xh = x & 0xFFFF, x >> 16
    a = xl * m
    b = xh * m
    t = a + ((b & 0xFFFF) << 16)
    return (b >> 16) + (t >> 32), t & _MASK32


def philox4x32(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors that hold uint32 values."""
    for _ in range(ROUNDS):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _W0) & _MASK32
        k1 = (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _split(x: int) -> Tuple[int, int]:
    x &= (1 << 64) - 1  # two's complement bits of an int64
    return x & _MASK32, x >> 32


def dropout_keep_mask(
    rng_state: torch.Tensor,
    p: float,
    shape: Tuple[int, int, int, int],
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Bool (B, H, Lq, Lk): True where attention dropout keeps the probability.

    rng_state: int64 tensor (seed, offset), as given to the kernels. shape: (B, H, Lq, Lk) with
    H the number of query heads.
    """
    if rng_state.dtype != torch.int64 or tuple(rng_state.shape) != (2,):
        raise ValueError(
            f"rng_state must be an int64 tensor (seed, offset) of shape (2,); got "
            f"{rng_state.dtype} {tuple(rng_state.shape)}"
        )
    seed, offset = (int(x) for x in rng_state.tolist())
    B, H, Lq, Lk = (int(n) for n in shape)
    threshold = dropout_threshold(p)
    groups = -(-Lk // 4)
    g = torch.arange(B * H * Lq * groups, dtype=torch.int64, device=device)
    k0, k1 = _split(seed)
    o0, o1 = _split(offset)
    words = philox4x32(g & _MASK32, g >> 32, torch.full_like(g, o0), torch.full_like(g, o1), k0, k1)
    words = torch.stack(words, dim=-1).view(B, H, Lq, groups * 4)[..., :Lk]
    return words >= threshold


def new_rng_state() -> torch.Tensor:
    """A fresh (seed, offset = 0) from torch's default CPU generator (``torch.manual_seed``)."""
    seed = torch.randint(-(2**63), 2**63 - 1, (1,), dtype=torch.int64)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64)])
