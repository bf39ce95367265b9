"""efft.offload: optimizer state, saved activations and int8 weights in host memory, copies overlapped with compute.

- ``OffloadOptimizer(params, optimizer_class, cfg, **kw)`` / ``offload_optimizer(optimizer, cfg, **kw)``
- ``enable_activation_offload(model, cfg) -> handle`` (``handle.remove()``)
- ``enable_weight_streaming(model, cfg) -> WeightStreamer``: trainable int8 decoder layers kept in
  host memory, each copied to the device just before it runs
- ``make_host_resident(model, chunk_rows=, cfg=)``: input embedding and LM head in host memory (the
  head streamed in vocabulary chunks); ``host_params_optimizer(main, params, ...)`` steps them on CPU
  workers beside the recipe's optimizer
- ``host_bytes_in_use()`` / ``peak_host_bytes()`` for the end-of-run memory report
- ``recipe_problems(recipe)`` for recipe validation
"""
from .activations import ActivationOffload, enable_activation_offload
from .checks import recipe_problems
from .host_embeddings import make_host_resident
from .host_optimizer import HostParamsOptimizer, host_params_optimizer
from .optimizer import OffloadOptimizer, offload_optimizer
from .pinned import HostBufferPool, HostMemoryError, host_bytes_in_use, peak_host_bytes
from .weights import WeightStreamer, enable_weight_streaming

__all__ = [
    "ActivationOffload",
    "HostBufferPool",
    "HostParamsOptimizer",
    "HostMemoryError",
    "OffloadOptimizer",
    "enable_activation_offload",
    "host_bytes_in_use",
    "host_params_optimizer",
    "make_host_resident",
    "offload_optimizer",
    "peak_host_bytes",
    "recipe_problems",
    "WeightStreamer",
    "enable_weight_streaming",
]
