"""RollingQFusion's options for the official recipe: its initialisation and its dropout."""

import math

import pytest
import torch

from rollingq_kernels import RollingQFusion

F64 = torch.float64


def _kurtosis(x: torch.Tensor) -> float:
    x = x.double().flatten()
    x = x - x.mean()
    return float((x**4).mean() / (x**2).mean() ** 2)


def test_xavier_normal_init_per_projection():
    E = 256
    torch.manual_seed(0)
    fusion = RollingQFusion(E, 4, init="xavier_normal")
    attn = fusion.attn
    weights = [*attn.in_proj_weight.detach().view(3, E, E).unbind(0), attn.out_proj.weight.detach()]
    for name, w in zip(("q", "k", "v", "out"), weights):
        # xavier_normal_ on an (E, E) matrix: N(0, 2 / (E + E)); 65536 draws pin the std to ~0.5%
        assert float(w.std()) == pytest.approx(1 / math.sqrt(E), rel=0.02), name
        assert abs(float(w.mean())) < 5 / E, name
        assert _kurtosis(w) == pytest.approx(3.0, abs=0.1), name  # normal, not uniform (1.8)
    assert not torch.equal(weights[0], weights[1])
    assert bool((attn.in_proj_bias == 0).all()) and bool((attn.out_proj.bias == 0).all())
    # the default is nn.MultiheadAttention's: xavier_uniform_ on the stacked (3E, E) weight
    torch.manual_seed(0)
    default = RollingQFusion(E, 4)
    w = default.attn.in_proj_weight.detach()
    bound = math.sqrt(6 / (E + 3 * E))
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    assert _kurtosis(w) == pytest.approx(1.8, abs=0.05)
    # the reset keeps the parameters (the optimiser's references) in place
    ptr = default.attn.in_proj_weight.data_ptr()
    default.reset_projections_xavier_normal()
    assert default.attn.in_proj_weight.data_ptr() == ptr
    assert _kurtosis(default.attn.in_proj_weight.detach()) == pytest.approx(3.0, abs=0.1)


def test_fusion_option_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        RollingQFusion(8, init="kaiming")
    with pytest.raises(ValueError, match="mode must be one of"):
        RollingQFusion(8, mode="sparse")
