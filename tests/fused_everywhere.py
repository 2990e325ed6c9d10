"""A test fixture: the reference registered as one more *fused* backend, behind the real ones.

The drop-in (``rollingq_kernels.scaled_dot_product_attention``) hands a call that no fused backend
of this package can run to torch's own SDPA. While a compiled kernel still declines a feature
(masks, dropout, GQA, other causal alignments), such calls would test torch, not this package's
path. Inside :func:`fused_everywhere` every call the real kernels decline is taken by the
reference through the same path a fused kernel takes (validation, mask canonicalisation, dropout
seed, output layout), so the integration tests check this package's glue in every state of the
kernels; once a kernel implements a feature, the real kernel takes those calls first.
"""

from __future__ import annotations

import contextlib

from rollingq_kernels import backends as _b

NAME = "reference_as_fused"


@contextlib.contextmanager
def fused_everywhere():
    saved_registry, saved_order = dict(_b._REGISTRY), list(_b._AUTO_ORDER)
    ref = _b._REGISTRY["reference"]
    spec = _b.BackendSpec(
        name=NAME,
        module=ref.module,
        dtypes=ref.dtypes,
        features=ref.features,
        fused=True,
        description="the reference, registered as a fused backend for tests",
    )
    _b.register_backend(spec, priority=_b._AUTO_ORDER.index("reference"))
    try:
        yield
    finally:
        _b._REGISTRY.clear()
        _b._REGISTRY.update(saved_registry)
        _b._AUTO_ORDER[:] = saved_order
        _b._AUTO_CACHE.clear()
