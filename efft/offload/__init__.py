"""efft.offload: optimizer state and saved activations in host memory, copies overlapped with compute.

- ``OffloadOptimizer(params, optimizer_class, cfg, **kw)`` / ``offload_optimizer(optimizer, cfg, **kw)``
- ``enable_activation_offload(model, cfg) -> handle`` (``handle.remove()``)
- ``host_bytes_in_use()`` / ``peak_host_bytes()`` for the end-of-run memory report
- ``recipe_problems(recipe)`` for recipe validation
"""
from .activations import ActivationOffload, enable_activation_offload
from .checks import recipe_problems
from .optimizer import OffloadOptimizer, offload_optimizer
from .pinned import HostBufferPool, HostMemoryError, host_bytes_in_use, peak_host_bytes

__all__ = [
    "ActivationOffload",
    "HostBufferPool",
    "HostMemoryError",
    "OffloadOptimizer",
    "enable_activation_offload",
    "host_bytes_in_use",
    "offload_optimizer",
    "peak_host_bytes",
    "recipe_problems",
]
