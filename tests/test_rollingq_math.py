"""RollingQ maths (docs/design.md section 5) against the paper's formulas on hand-made vectors."""

import math
import subprocess
import sys

import pytest
import torch

from rollingq_kernels import (
    AttentionStats,
    attention_imbalance_rate,
    modality_cosine,
    rollingq_target,
    rollingq_weights,
    rotation_between,
)
from rollingq_kernels.rollingq_math import compose_rotations, orthonormalize


def _check_rotation(R, x, y, atol=1e-10):
    E = x.numel()
    eye = torch.eye(E, dtype=torch.float64)
    assert torch.allclose(R.T @ R, eye, atol=atol), "not orthogonal"
    assert abs(torch.linalg.det(R).item() - 1.0) < 1e-8, "det is not +1"
    assert torch.allclose(R @ (x / x.norm()), y / y.norm(), atol=atol), "R x_hat != y_hat"


@pytest.mark.parametrize("method", ["plane", "svd"])
@pytest.mark.parametrize("E", [2, 3, 17, 768])
def test_rotation_maps_x_to_y(method, E):
    g = torch.Generator().manual_seed(E)
    x = torch.randn(E, dtype=torch.float64, generator=g)
    y = torch.randn(E, dtype=torch.float64, generator=g) * 3.0
    _check_rotation(rotation_between(x, y, method=method), x, y, atol=1e-9)


def test_plane_rotation_is_identity_off_the_plane():
    g = torch.Generator().manual_seed(1)
    x, y = (
        torch.randn(9, generator=g, dtype=torch.float64),
        torch.randn(9, generator=g, dtype=torch.float64),
    )
    R = rotation_between(x, y)
    basis = torch.linalg.qr(torch.stack([x, y], 1), mode="complete").Q
    complement = basis[:, 2:]  # orthonormal basis of span(x, y)'s complement
    assert torch.allclose(R @ complement, complement, atol=1e-12)
    # and it is a rotation by the angle between x and y within the plane
    angle = math.acos((x @ y / (x.norm() * y.norm())).item())
    assert abs(torch.trace(R).item() - (9 - 2 + 2 * math.cos(angle))) < 1e-10


@pytest.mark.parametrize("method", ["plane", "svd"])
def test_parallel_and_antiparallel(method):
    x = torch.tensor([1.0, 2.0, -0.5, 0.25], dtype=torch.float64)
    R = rotation_between(x, 5 * x, method=method)
    _check_rotation(R, x, x)
    if method == "plane":
        assert torch.allclose(R, torch.eye(4, dtype=torch.float64))
    R = rotation_between(x, -x, method=method)
    _check_rotation(R, x, -x)
    assert not torch.isnan(R).any()


def test_svd_method_matches_the_formula():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(6, generator=g, dtype=torch.float64)
        y = torch.randn(6, generator=g, dtype=torch.float64)
        # the construction written out: SVD of y x^T, R = U V^T, det fixed on U's last column
        U, S, Vh = torch.linalg.svd(torch.outer(y / y.norm(), x / x.norm()))
        R = U @ Vh
        if torch.linalg.det(R) < 0:
            U[:, -1] *= -1
            R = U @ Vh
        assert torch.allclose(rotation_between(x, y, method="svd"), R, atol=1e-12)


def test_rotation_dtype_and_bad_args():
    x = torch.randn(5)
    assert rotation_between(x, torch.randn(5)).dtype == torch.float32
    with pytest.raises(ValueError, match="same length"):
        rotation_between(x, torch.randn(6))
    with pytest.raises(ValueError, match="non-zero"):
        rotation_between(x, torch.zeros(5))
    with pytest.raises(ValueError, match="method"):
        rotation_between(x, x, method="qr")


def test_composition_does_not_drift():
    # 1000 compositions of SVD rotations: the plain float64 product drifts from orthogonality
    # (linearly in the count), compose_rotations stays at the rounding of one product.
    E = 8
    g = torch.Generator().manual_seed(11)
    eye = torch.eye(E, dtype=torch.float64)
    plain, composed = eye.clone(), eye.clone()
    for _ in range(1000):
        x = torch.randn(E, dtype=torch.float64, generator=g)
        y = torch.randn(E, dtype=torch.float64, generator=g)
        r = rotation_between(x, y, method="svd")
        plain = r @ plain
        composed = compose_rotations(r, composed)
    drift = float((plain.T @ plain - eye).abs().max())
    err = float((composed.T @ composed - eye).abs().max())
    assert drift > 1e-14, f"the plain product should show the drift ({drift:.3g})"
    assert err < 2e-15, f"compose_rotations drifted: {err:.3g}"
    # and it is the same rotation, only without the drift
    assert torch.allclose(composed, plain, atol=1e-12)
    # float32 buffers: composed in float64, returned in float32
    r32 = compose_rotations(r, composed.float())
    assert r32.dtype == torch.float32
    assert float((r32.double().T @ r32.double() - eye).abs().max()) < 1e-6


def test_orthonormalize_is_the_polar_factor():
    g = torch.Generator().manual_seed(12)
    E = 10
    Q = torch.linalg.qr(torch.randn(E, E, dtype=torch.float64, generator=g)).Q
    if torch.linalg.det(Q) < 0:
        Q[:, 0] = -Q[:, 0]
    noisy = Q + 1e-6 * torch.randn(E, E, dtype=torch.float64, generator=g)
    U, _, Vh = torch.linalg.svd(noisy)
    got = orthonormalize(noisy)
    assert torch.allclose(got, U @ Vh, atol=1e-13)  # the nearest orthogonal matrix
    assert abs(float(torch.linalg.det(got)) - 1.0) < 1e-12
    # a matrix that is the identity on a subspace stays so: a plane rotation
    x, y = (
        torch.randn(E, dtype=torch.float64, generator=g),
        torch.randn(E, dtype=torch.float64, generator=g),
    )
    R = rotation_between(x, y)
    assert torch.allclose(orthonormalize(R), R, atol=1e-15)
    with pytest.raises(ValueError, match="not close to orthogonal"):
        orthonormalize(2.0 * Q)
    with pytest.raises(ValueError, match="not close to orthogonal"):
        orthonormalize(torch.full((E, E), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="square"):
        orthonormalize(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same shape"):
        compose_rotations(torch.eye(3), torch.eye(4))


def test_air_and_weights_match_paper_formulas():
    # per-sample cosines with the [CLS] query: modality 0 is favoured
    cos = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.8, 0.4]], dtype=torch.float64)
    air = attention_imbalance_rate(cos)
    assert abs(air.item() - ((0.8 + 0.4 + 0.4) / 3)) < 1e-12
    for sigma in (0.0, 0.5, 2.0, 10.0):
        w = rollingq_weights(cos, sigma)
        alpha = (1 + math.tanh(-sigma * air.item())) / 2
        assert abs(w[0].item() - alpha) < 1e-12 and abs(w[1].item() - (1 - alpha)) < 1e-12
    # sigma = 0 (paper default): equal weights
    assert torch.allclose(rollingq_weights(cos, 0.0), torch.tensor([0.5, 0.5], dtype=torch.float64))
    # M = 3 generalisation: softmax(-2 sigma c)
    c3 = torch.tensor([0.2, 0.5, -0.1], dtype=torch.float64)
    assert torch.allclose(rollingq_weights(c3, 1.5), torch.softmax(-3.0 * c3, 0))
    with pytest.raises(ValueError, match="two modalities"):
        attention_imbalance_rate(torch.zeros(4, 3))


def test_target_formula_by_hand():
    q = torch.tensor([3.0, 4.0, 0.0], dtype=torch.float64)  # norm 5
    keys = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 7.0]], dtype=torch.float64)
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    t = rollingq_target(q, keys, w)
    direction = torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64)
    assert torch.allclose(t, direction / direction.norm() * 5.0, atol=1e-12)


def test_modality_cosine_over_full_embedding():
    g = torch.Generator().manual_seed(5)
    B, H, Lq, M, D = 2, 3, 4, 2, 5
    query = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64)
    key_sum = torch.randn(B, H, M, D, generator=g, dtype=torch.float64)
    count = torch.tensor([[3.0, 5.0], [2.0, 0.0]], dtype=torch.float64)
    key_sum[1, :, 1] = 0  # modality 1 absent in sample 1
    st = AttentionStats(torch.zeros(B, H, Lq, M), key_sum, count, torch.zeros(B, H, Lq))
    cos = modality_cosine(query, st)
    assert cos.shape == (B, Lq, M)
    for b in range(B):
        for i in range(Lq):
            qe = torch.cat([query[b, h, i] for h in range(H)])
            for m in range(M):
                if count[b, m] == 0:
                    assert cos[b, i, m] == 0
                    continue
                ke = torch.cat([key_sum[b, h, m] / count[b, m] for h in range(H)])
                want = (qe @ ke / (qe.norm() * ke.norm())).item()
                assert abs(cos[b, i, m].item() - want) < 1e-12


def test_reference_runs_with_torch_alone():
    # The oracle must import and run with torch alone: no triton, no compiled extension.
    code = (
        "import sys\n"
        "import torch\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'triton' or name.startswith('rollingq_kernels._C'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import rollingq_kernels as rk\n"
        "q = torch.randn(1, 2, 5, 8); k = torch.randn(1, 2, 6, 8); v = torch.randn(1, 2, 6, 8)\n"
        "out, st = rk.rolling_attention(q, k, v, backend='reference', return_stats=True)\n"
        "ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)\n"
        "assert (out - ref).abs().max() < 1e-5, 'wrong answer'\n"
        "assert 'triton' not in sys.modules\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")
