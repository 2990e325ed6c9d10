"""Ready-made integrations of the fused attention with model libraries.

* :mod:`rollingq_kernels.integrations.transformers`: ``register()`` adds an ``attn_implementation``
  to Hugging Face transformers (attention function and mask builder under one name).
* :mod:`rollingq_kernels.integrations.torch_nn`: ``replace_multihead_attention(model)`` swaps every
  ``nn.MultiheadAttention`` of a model (``nn.Transformer*`` layers included) for
  :class:`~rollingq_kernels.RollingQAttention`.
* Models that call ``torch.nn.functional.scaled_dot_product_attention`` themselves (timm, many
  hand-written blocks) switch with :func:`rollingq_kernels.patch_sdpa`.

Submodules are imported on demand, so importing this package never imports transformers.
"""
