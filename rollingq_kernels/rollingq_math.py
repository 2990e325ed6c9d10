"""The RollingQ maths (docs/design.md section 5): modality layouts, cosines, the Attention
Imbalance Rate, the target direction and the rotation that reaches it.

Used by the controller and the modules at training time; independent of every attention backend
and of the reference oracle.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ._stats import AttentionStats

__all__ = [
    "key_modality_from_lengths",
    "modality_cosine",
    "attention_imbalance_rate",
    "rollingq_weights",
    "rollingq_target",
    "rotation_between",
    "orthonormalize",
    "compose_rotations",
]


def key_modality_from_lengths(
    lengths: Sequence[int],
    counted: Optional[Sequence[bool]] = None,
    *,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Modality ids (int64, (sum(lengths),)) for a sequence made of consecutive segments.

    Segment s gets the next modality id if ``counted[s]`` (default: every segment counts), else -1.
    ``key_modality_from_lengths((1, 512, 588), (False, True, True))`` gives
    ``[-1, 0 x512, 1 x588]``: a [CLS] key followed by two modalities.
    """
    lengths = [int(n) for n in lengths]
    if any(n < 0 for n in lengths):
        raise ValueError(f"lengths must be non-negative; got {lengths}")
    if counted is None:
        counted = [True] * len(lengths)
    counted = [bool(c) for c in counted]
    if len(counted) != len(lengths):
        raise ValueError(
            f"counted must have one entry per segment: got {len(counted)} for {len(lengths)} lengths"
        )
    ids = []
    next_id = 0
    for n, c in zip(lengths, counted):
        ids.append(torch.full((n,), next_id if c else -1, dtype=torch.long, device=device))
        next_id += int(c)
    if not ids:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.cat(ids)


# Statistics are taken over the full embedding E = H * D.


def _full_embedding(x: torch.Tensor) -> torch.Tensor:
    # (B, H, N, D) -> (B, N, H * D), heads concatenated as nn.MultiheadAttention lays them out.
    B, H, N, D = x.shape
    return x.permute(0, 2, 1, 3).reshape(B, N, H * D)


def modality_cosine(query: torch.Tensor, stats: AttentionStats, eps: float = 1e-12) -> torch.Tensor:
    """Cosine between each query row and each modality's mean key, over the full embedding.

    Args:
        query: (B, H, Lq, D), the query rows as the kernel saw them (already rotated).
        stats: the :class:`AttentionStats` of that call (key_sum, key_count are used).
    Returns:
        (B, Lq, M) float; 0 for a modality with no key in a sample.
    """
    q = _full_embedding(query.to(stats.key_sum.dtype))
    means = _full_embedding(stats.key_mean())  # (B, M, E)
    qn = q / q.norm(dim=-1, keepdim=True).clamp_min(eps)
    mn = means / means.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.matmul(qn, mn.transpose(-1, -2))


def attention_imbalance_rate(cosines: torch.Tensor) -> torch.Tensor:
    """The paper's AIR for two modalities: mean over samples of (c_0 - c_1).

    cosines: (..., 2), e.g. (B, 2) for the [CLS] row of each sample. Positive: modality 0 favoured.
    """
    if cosines.shape[-1] != 2:
        raise ValueError(
            "attention_imbalance_rate is defined for two modalities: cosines must have shape "
            f"(..., 2); got {tuple(cosines.shape)}"
        )
    return (cosines[..., 0] - cosines[..., 1]).mean()


def rollingq_weights(cosines: torch.Tensor, sigma: float) -> torch.Tensor:
    """Weights of the modalities' key directions in the rotation target.

    cosines: (M,) mean cosines, or (N, M) per-sample cosines (averaged first).
    Returns softmax(-2 * sigma * c) over modalities, (M,). For M = 2 this is the paper's
    alpha = (1 + tanh(-sigma * AIR)) / 2 for modality 0 and 1 - alpha for modality 1.
    """
    c = cosines if cosines.dim() == 1 else cosines.reshape(-1, cosines.shape[-1]).mean(0)
    return torch.softmax(-2.0 * sigma * c, dim=-1)


def rollingq_target(
    query_mean: torch.Tensor,
    key_means: torch.Tensor,
    weights: torch.Tensor,
    eps: float = 1e-12,
) -> torch.Tensor:
    """sum_m w_m * normalize(key_means[m]), rescaled to the norm of ``query_mean``.

    query_mean: (E,) mean [CLS] query; key_means: (M, E); weights: (M,). Returns (E,).
    """
    directions = key_means / key_means.norm(dim=-1, keepdim=True).clamp_min(eps)
    target = (weights[:, None].to(directions.dtype) * directions).sum(0)
    return target * (query_mean.norm() / target.norm().clamp_min(eps))


def _orthogonal_unit(u: torch.Tensor) -> torch.Tensor:
    # A unit vector orthogonal to unit u: Gram-Schmidt on the axis least aligned with u.
    axis = torch.zeros_like(u)
    axis[torch.argmin(u.abs())] = 1.0
    w = axis - torch.dot(axis, u) * u
    return w / w.norm()


def rotation_between(
    x: torch.Tensor, y: torch.Tensor, method: str = "plane", eps: float = 1e-7
) -> torch.Tensor:
    """An orthogonal (E, E) matrix R with det +1 and R x_hat = y_hat.

    method="plane": the rotation within span(x, y), identity on its orthogonal complement.
        x ~ y gives the identity; x ~ -y rotates by pi in a plane through x (any such plane works).
    method="svd": U V^T from the SVD of y x^T, with the last column of U negated if that makes
        det +1 (the construction of the official RollingQ code). Only x_hat -> y_hat is fixed:
        y x^T has rank one, so the rest of U and V is whichever orthonormal completion LAPACK
        returns, which changes with the build, the device, the dtype and the last bits of the
        input; it is not the identity on the complement of span(x, y), even for x ~ y.
    Computed in float64 internally; returned in x's dtype.
    """
    if x.dim() != 1 or y.shape != x.shape:
        raise ValueError(
            f"x and y must be vectors of the same length; got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    out_dtype = x.dtype
    xd, yd = x.to(torch.float64), y.to(torch.float64)
    if xd.norm() == 0 or yd.norm() == 0:
        raise ValueError("rotation_between needs non-zero x and y")
    u = xd / xd.norm()
    t = yd / yd.norm()
    E = u.numel()
    eye = torch.eye(E, dtype=torch.float64, device=x.device)
    if method == "svd":
        U, _, Vh = torch.linalg.svd(torch.outer(t, u))
        R = U @ Vh
        if torch.linalg.det(R) < 0:
            U = U.clone()
            U[:, -1] = -U[:, -1]
            R = U @ Vh
        return R.to(out_dtype)
    if method != "plane":
        raise ValueError(f"method must be 'plane' or 'svd'; got {method!r}")
    cos = torch.dot(u, t).clamp(-1.0, 1.0)
    w = t - cos * u
    sin = w.norm()
    if sin < eps:
        if cos > 0:
            return eye.to(out_dtype)
        w = _orthogonal_unit(u)
        cos, sin = torch.tensor(-1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    else:
        w = w / sin
    # Rotation by theta in the plane (u, w): u -> cos u + sin w, w -> -sin u + cos w.
    R = (
        eye
        + sin * (torch.outer(w, u) - torch.outer(u, w))
        + (cos - 1.0) * (torch.outer(u, u) + torch.outer(w, w))
    )
    return R.to(out_dtype)


def orthonormalize(R: torch.Tensor, *, tol: float = 1e-15, max_iter: int = 10) -> torch.Tensor:
    """The orthogonal matrix nearest to an almost orthogonal square ``R`` (its polar factor).

    Newton-Schulz iterations ``X <- X (3 I - X^T X) / 2`` in float64, until the largest entry of
    ``X^T X - I`` is at most ``tol`` (or stops shrinking); each costs two (E, E) products. The
    determinant's sign is kept, and a matrix that is exactly the identity on a subspace stays so
    up to rounding. Returned in R's dtype.

    Raises ValueError when R is not close enough to orthogonal for the iteration to converge
    (largest entry of ``R^T R - I`` above 0.5): that is a wrong matrix, not rounding drift.
    """
    if R.dim() != 2 or R.shape[0] != R.shape[1]:
        raise ValueError(f"R must be a square matrix; got shape {tuple(R.shape)}")
    X = R.to(torch.float64)
    eye = torch.eye(X.shape[0], dtype=torch.float64, device=X.device)
    err = float((X.transpose(0, 1) @ X - eye).abs().max())
    if not err <= 0.5:  # also catches NaN
        raise ValueError(
            f"R is not close to orthogonal (max |R^T R - I| = {err:.3g}, wanted <= 0.5): "
            "orthonormalize removes rounding drift, it does not repair a wrong matrix"
        )
    for _ in range(max_iter):
        if err <= tol:
            break
        Y = 1.5 * X - 0.5 * X @ (X.transpose(0, 1) @ X)
        new_err = float((Y.transpose(0, 1) @ Y - eye).abs().max())
        if new_err >= err:  # at the rounding floor
            break
        X, err = Y, new_err
    return X.to(R.dtype)


def compose_rotations(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new @ old`` computed in float64 and re-orthonormalised (:func:`orthonormalize`).

    A plain product of rotations drifts away from orthogonality by rounding, linearly in the
    number of products (about 1e-14 after 1000 float64 compositions); re-orthonormalising after
    each product keeps the error at the rounding floor of one product. Returned in ``old``'s dtype.
    """
    if new.shape != old.shape:
        raise ValueError(
            f"new and old must have the same shape; got {tuple(new.shape)} and {tuple(old.shape)}"
        )
    composed = new.to(torch.float64) @ old.to(device=new.device, dtype=torch.float64)
    return orthonormalize(composed).to(old.dtype)
