"""torch.nn models: swap every ``nn.MultiheadAttention`` for :class:`RollingQAttention`.

::

    from rollingq_kernels.integrations.torch_nn import replace_multihead_attention

    model = replace_multihead_attention(model)  # nn.Transformer, TransformerEncoder(Layer), ...

Weights, configuration and train/eval mode are copied; the rotation starts at the identity, so
the model computes what it did (attention dropout then comes from the kernels' keep-mask).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..mha import RollingQAttention

__all__ = ["replace_multihead_attention"]


def replace_multihead_attention(model: nn.Module, **kwargs: Any) -> nn.Module:
    """Replace, in place, every ``nn.MultiheadAttention`` inside ``model`` (or ``model`` itself)
    by :meth:`RollingQAttention.from_multihead_attention` of it; returns the model (or the new
    module when ``model`` is a MultiheadAttention). ``kwargs`` go to ``from_multihead_attention``
    (e.g. ``rotated_queries``, ``backend``).

    An ``nn.TransformerEncoder`` that would turn padded inputs into nested tensors in eval mode
    (``enable_nested_tensor=True``) gets ``use_nested_tensor = False``: its fused path reads the
    attention weights directly and would bypass the replacement.
    """
    if isinstance(model, nn.MultiheadAttention):
        return RollingQAttention.from_multihead_attention(model, **kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MultiheadAttention):
                setattr(parent, name, RollingQAttention.from_multihead_attention(child, **kwargs))
                replaced += 1
    if replaced:
        for mod in model.modules():
            if isinstance(mod, nn.TransformerEncoder) and getattr(mod, "use_nested_tensor", False):
                mod.use_nested_tensor = False
    return model
