"""efft.memory: the planner (``efft.memory.estimate(recipe)``, meta device, no weights) and the
tracker (measured bytes and peaks for the end-of-run report). Imported lazily: the tracker needs
only torch, the planner also transformers and the recipe schema."""
import importlib

_TRACKER = ("MemoryTracker", "SavedTensorCounter", "count_saved_tensors", "format_report", "report", "tensor_bytes")
_ESTIMATE = ("Estimate", "parse_size", "shipped_configs", "resolve_config")


def __getattr__(name):
    if name in ("estimate", "tracker"):
        return importlib.import_module(f".{name}", __name__)
    if name in _TRACKER:
        return getattr(importlib.import_module(".tracker", __name__), name)
    if name in _ESTIMATE:
        return getattr(importlib.import_module(".estimate", __name__), name)
    raise AttributeError(f"module 'efft.memory' has no attribute {name!r}")
