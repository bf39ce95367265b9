"""Measured memory: what a run really holds, split the way the estimator predicts it.

The end-of-run report needs numbers a user can compare with ``efft estimate``: exact tensor bytes of
weights (trainable / frozen / buffers), gradients and optimizer state (summed over real tensors,
deduplicated by storage so views and tied weights count once), the saved-for-backward activation
bytes seen through ``torch.autograd.graph.saved_tensors_hooks``, and the process peak
(``torch.cuda.max_memory_allocated`` on a GPU, peak RSS on CPU).

Saved-tensor counting tracks *live* bytes: a tensor counts from the moment autograd saves it until
autograd drops it (graph node freed after backward), so the peak includes the recompute of a
checkpointed layer in backward when the counting context spans forward and backward. Caveats:
the innermost ``saved_tensors_hooks`` wins, so open this context *outside* any other hooks (activation
offload); with non-reentrant checkpointing (transformers' default) the checkpoint inputs are seen but
the recompute inside backward is not (use ``use_reentrant=True`` to see it).
"""
from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch

__all__ = [
    "MemoryTracker",
    "SavedTensorCounter",
    "LiveTensorBytes",
    "count_saved_tensors",
    "tensor_bytes",
    "storage_key",
    "weight_bytes",
    "gradient_bytes",
    "optimizer_state_bytes",
    "optimizer_state_tensors",
    "peak_rss_bytes",
    "current_rss_bytes",
    "reset_peak_rss",
    "report",
    "format_report",
    "format_bytes",
]


# ------------------------------------------------------------------------------------------ tensors
def storage_key(t: torch.Tensor) -> Optional[tuple]:
    """Identity of the memory behind ``t`` (device + storage address); None for meta / storage-less tensors."""
    if t.device.type == "meta":
        return None
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError, TypeError):
        return None
    ptr = st.data_ptr()
    if ptr == 0 and st.nbytes() == 0:
        return None
    return (t.device.type, t.device.index, ptr)


def _storage_nbytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError, TypeError):
        return int(t.numel() * t.element_size())


def _plain(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage holds the data (unwraps Parameter and bitsandbytes Params4bit/Int8Params,
    and FSDP2's DTensor to the shard this rank holds)."""
    t = t.data if isinstance(t, torch.nn.Parameter) else t
    local = getattr(t, "_local_tensor", None)  # DTensor: its storage is not addressable, its shard's is
    return local if isinstance(local, torch.Tensor) else t


def tensor_bytes(tensors: Iterable[torch.Tensor], seen: Optional[set] = None) -> int:
    """Bytes of distinct storages among ``tensors`` (views / tied tensors count once).

    A view keeps its whole storage alive, so the storage size is what memory holds. Meta tensors
    count ``numel * element_size`` (no storage to share). ``seen`` lets callers deduplicate across
    several calls (e.g. gradients that alias parameters)."""
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        t = _plain(t)
        key = storage_key(t)
        if key is None:
            total += t.numel() * t.element_size()
            continue
        if key in seen:
            continue
        seen.add(key)
        total += _storage_nbytes(t)
    return total


def _quant_stat_tensors(p: torch.Tensor) -> list[torch.Tensor]:
    """Statistics bitsandbytes keeps as attributes of its weight parameters (Params4bit.quant_state:
    absmax, code, offset, nested absmax/code; Int8Params.SCB), not as buffers."""
    out: list = []
    qs = getattr(p, "quant_state", None)
    while qs is not None:
        out += [t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), getattr(qs, "offset", None))
                if isinstance(t, torch.Tensor)]
        qs = getattr(qs, "state2", None)
    scb = getattr(p, "SCB", None)
    if isinstance(scb, torch.Tensor):
        out.append(scb)
    return out


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """``trainable`` / ``frozen`` parameter bytes and ``buffers`` bytes (all distinct storages).
    Quantization statistics that bitsandbytes hangs on its parameters count as frozen. Buffers whose
    master copy lives in host memory on purpose (efft.offload.weights marks them) are not device
    weights, nor are host-resident parameters (quant.embeddings: host): they are left out of
    ``total`` and reported as ``host``."""
    seen: set = set()
    all_params = list(model.parameters())
    on_host = [p for p in all_params if getattr(p, "_efft_host_resident", False)]
    params = [p for p in all_params if not getattr(p, "_efft_host_resident", False)]
    trainable = tensor_bytes((p for p in params if p.requires_grad), seen)
    frozen = tensor_bytes((p for p in params if not p.requires_grad), seen)
    frozen += tensor_bytes((t for p in params for t in _quant_stat_tensors(p)), seen)
    bufs = list(model.buffers())
    buffers = tensor_bytes((b for b in bufs if not getattr(b, "_efft_host_master", False)), seen)
    host = tensor_bytes((b for b in bufs if getattr(b, "_efft_host_master", False)), seen)
    host += tensor_bytes(on_host, seen)
    return {"trainable": trainable, "frozen": frozen, "buffers": buffers, "total": trainable + frozen + buffers,
            "host": host}


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of the ``.grad`` tensors currently alive on the model's parameters (host-resident
    parameters' gradients live in host memory and are not counted)."""
    return tensor_bytes(p.grad for p in model.parameters()
                        if p.grad is not None and not getattr(p, "_efft_host_resident", False))


def _walk(obj: Any, out: list, depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            _walk(v, out, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _walk(v, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)) and not callable(obj):
        # projector / quant-state objects kept in the state (peers do this): count their tensors too
        _walk(vars(obj), out, depth + 1)


def _optimizers(optimizer: Any) -> list:
    if optimizer is None:
        return []
    if isinstance(optimizer, Mapping):
        return [o for v in optimizer.values() for o in _optimizers(v)]
    if isinstance(optimizer, (list, tuple)):
        return [o for v in optimizer for o in _optimizers(v)]
    inner = [getattr(optimizer, a) for a in ("optimizers", "optimizer_dict") if hasattr(optimizer, a)]
    if inner and not hasattr(optimizer, "state"):
        return _optimizers(inner)
    return [optimizer]


def optimizer_state_tensors(optimizer: Any) -> list[torch.Tensor]:
    """Every tensor in ``optimizer.state`` (one optimizer, or a list/dict of them as in layer-wise mode)."""
    out: list = []
    for opt in _optimizers(optimizer):
        state = getattr(opt, "state", None)
        if state is not None:
            _walk(state, out)
    return out


def optimizer_state_bytes(optimizer: Any, by_device: bool = False) -> int | dict[str, int]:
    """Bytes of optimizer state (distinct storages). ``by_device`` splits them, e.g. {"cuda:0": .., "cpu": ..}."""
    tensors = optimizer_state_tensors(optimizer)
    if not by_device:
        return tensor_bytes(tensors)
    seen: set = set()
    out: dict[str, int] = {}
    for t in tensors:
        dev = str(t.device)
        out[dev] = out.get(dev, 0) + tensor_bytes([t], seen)
    return out


# ----------------------------------------------------------------------------------- saved tensors
class _Saved:
    """What autograd keeps instead of the tensor while counting; its lifetime is the saved tensor's."""

    __slots__ = ("t", "key", "counter", "__weakref__")

    def __init__(self, t, key, counter):
        self.t, self.key, self.counter = t, key, counter

    def __del__(self):
        c = self.counter
        if c is not None and self.key is not None:
            c._release(self.key)


class SavedTensorCounter:
    """Counts bytes saved for backward while active: ``live_bytes`` now, ``peak_bytes`` over the
    context, ``total_bytes`` ever saved (each storage once while it is alive), ``count`` tensors."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), exclude_module: Optional[torch.nn.Module] = None):
        self._excluded: set = set()
        ex = list(exclude)
        if exclude_module is not None:
            ex += list(exclude_module.parameters()) + list(exclude_module.buffers())
        for t in ex:
            k = storage_key(_plain(t))
            if k is not None:
                self._excluded.add(k)
        self._refs: dict = {}
        self._bytes: dict = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.total_bytes = 0
        self.count = 0
        self.excluded_count = 0
        self.by_shape: dict[tuple, int] = {}
        self._ctx = None

    # hooks
    def _pack(self, t: torch.Tensor):
        key = storage_key(t)
        if key is None:
            return t
        if key in self._excluded or isinstance(t, torch.nn.Parameter):
            self.excluded_count += 1
            return t
        self.count += 1
        n = self._refs.get(key, 0)
        if n == 0:
            b = _storage_nbytes(t)
            self._bytes[key] = b
            self.live_bytes += b
            self.total_bytes += b
            shape_key = (tuple(t.shape), str(t.dtype))
            self.by_shape[shape_key] = self.by_shape.get(shape_key, 0) + b
            if self.live_bytes > self.peak_bytes:
                self.peak_bytes = self.live_bytes
        self._refs[key] = n + 1
        return _Saved(t, key, self)

    @staticmethod
    def _unpack(obj):
        return obj.t if isinstance(obj, _Saved) else obj

    def _release(self, key) -> None:
        n = self._refs.get(key, 0) - 1
        if n <= 0:
            self._refs.pop(key, None)
            self.live_bytes -= self._bytes.pop(key, 0)
        else:
            self._refs[key] = n

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def __enter__(self) -> "SavedTensorCounter":
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)
        self._ctx = None


def count_saved_tensors(model: Optional[torch.nn.Module] = None, exclude: Iterable[torch.Tensor] = ()) -> SavedTensorCounter:
    """Context manager counting saved-for-backward bytes, excluding ``model``'s parameters and buffers.

    Wrap forward *and* backward to get the true peak (tensors are released as backward frees them)::

        with count_saved_tensors(model) as c:
            model(**batch).loss.backward()
        c.peak_bytes
    """
    return SavedTensorCounter(exclude=exclude, exclude_module=model)


# ------------------------------------------------------------------------------- live tensor bytes
class LiveTensorBytes:
    """Peak bytes of tensors allocated while active and still alive (a device-independent measured
    peak: on CPU, where there is no allocator counter like ``torch.cuda.max_memory_allocated``).

    Every aten op's outputs are seen through a ``TorchDispatchMode`` (forward, backward and the
    optimizer step); an output whose storage is not one of the op's inputs is a new allocation and
    counts until its storage is freed (checked with storage weak references). Tensors that existed
    before (weights, optimizer state of an earlier step) are not counted: ``peak_bytes`` is what a
    step adds on top of them. Slow (Python per op): for small models and tests."""

    def __init__(self):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self
        self.live: dict = {}
        self.current_bytes = 0
        self.peak_bytes = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                ins = set()
                for a in tree_flatten((args, kwargs))[0]:
                    if isinstance(a, torch.Tensor) and a.device.type != "meta":
                        ins.add(a.untyped_storage().data_ptr())
                out = func(*args, **kwargs)
                counter._sweep()
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        st = t.untyped_storage()
                        k = st.data_ptr()
                        if k and k not in ins and k not in counter.live:
                            counter.live[k] = (StorageWeakRef(st), st.nbytes())
                            counter.current_bytes += st.nbytes()
                counter.peak_bytes = max(counter.peak_bytes, counter.current_bytes)
                return out

        self._mode = _Mode()

    def _sweep(self) -> None:
        dead = [k for k, (ref, _) in self.live.items() if ref.expired()]
        for k in dead:
            self.current_bytes -= self.live.pop(k)[1]

    def __enter__(self) -> "LiveTensorBytes":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        self._sweep()


# ------------------------------------------------------------------------------------------ process
def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM, resettable on Linux; else ru_maxrss)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def current_rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # pragma: no cover - no /proc and no psutil
        return 0


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS (Linux ``clear_refs`` 5); False where not supported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------------------- tracker
class MemoryTracker:
    """Measured memory of one run: peak (CUDA allocator or process RSS) plus exact tensor accounting.

    ``host_bytes`` is an optional callable returning the bytes an offload engine holds on the host
    (pinned buffers, offloaded optimizer state); it is reported as ``host_offload_bytes``.
    """

    def __init__(self, device: Optional[torch.device | str] = None, host_bytes: Optional[Callable[[], int]] = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.host_bytes = host_bytes
        self.saved: Optional[SavedTensorCounter] = None
        self.saved_peak_bytes = 0
        self.reset_peak()

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def reset_peak(self) -> None:
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss_peak_resettable = reset_peak_rss()
        self.rss_at_start = current_rss_bytes()

    def start(self) -> None:
        """Start of the measured region (training begins): reset the peak counters."""
        self.reset_peak()

    def peak_bytes(self) -> int:
        if self.on_cuda:
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()

    @contextlib.contextmanager
    def count_saved_tensors(self, model: Optional[torch.nn.Module] = None, exclude: Iterable[torch.Tensor] = ()):
        """Like :func:`count_saved_tensors`; the largest peak seen is kept for :meth:`report`."""
        c = SavedTensorCounter(exclude=exclude, exclude_module=model)
        self.saved = c
        with c:
            yield c
        self.saved_peak_bytes = max(self.saved_peak_bytes, c.peak_bytes)

    def watch_gradients(self, model: torch.nn.Module) -> None:
        """Track the most gradient bytes alive at once during backward (``gradient_peak_bytes`` in the
        report). Tensor hooks run before gradient accumulation, hence before any post-accumulate hook
        of a layer-wise optimizer frees a gradient: each sample is the gradients alive plus the one
        arriving. Call :meth:`unwatch_gradients` to remove the hooks."""
        self.unwatch_gradients()
        self.grad_peak_bytes = 0

        def make(p):
            def hook(g):
                alive = gradient_bytes(model) + (g.numel() * g.element_size() if p.grad is None else 0)
                if alive > self.grad_peak_bytes:
                    self.grad_peak_bytes = alive
            return hook

        self._grad_handles = [p.register_hook(make(p)) for p in model.parameters() if p.requires_grad]

    def unwatch_gradients(self) -> None:
        for h in getattr(self, "_grad_handles", []):
            h.remove()
        self._grad_handles = []

    def begin_saved_tensors(self, model: Optional[torch.nn.Module] = None) -> SavedTensorCounter:
        """Start counting saved tensors (for callbacks: ``on_step_begin``); pair with :meth:`end_saved_tensors`."""
        if self.saved is not None and self.saved._ctx is not None:
            raise RuntimeError("saved-tensor counting is already running (call end_saved_tensors first)")
        self.saved = SavedTensorCounter(exclude_module=model)
        self.saved.__enter__()
        return self.saved

    def end_saved_tensors(self) -> int:
        """Stop counting (``on_step_end``); returns the step's peak and keeps the largest for :meth:`report`."""
        c = self.saved
        if c is None or c._ctx is None:
            return 0
        c.__exit__(None, None, None)
        self.saved_peak_bytes = max(self.saved_peak_bytes, c.peak_bytes)
        return c.peak_bytes

    def report(self, model: Optional[torch.nn.Module] = None, optimizer: Any = None) -> dict:
        d = report(model, optimizer, saved_activation_bytes=self.saved_peak_bytes or None, host_bytes=self.host_bytes)
        d["device"] = str(self.device)
        if getattr(self, "_grad_handles", None) or getattr(self, "grad_peak_bytes", 0):
            d["gradient_peak_bytes"] = int(self.grad_peak_bytes)
        if self.on_cuda:
            d["peak_bytes"] = int(torch.cuda.max_memory_allocated(self.device))
            d["peak_kind"] = "cuda_max_memory_allocated"
            d["reserved_peak_bytes"] = int(torch.cuda.max_memory_reserved(self.device))
        else:
            d["peak_bytes"] = peak_rss_bytes()
            d["peak_kind"] = "cpu_peak_rss" + ("" if getattr(self, "rss_peak_resettable", False) else "_since_process_start")
            d["rss_at_start_bytes"] = self.rss_at_start
        return d


def report(
    model: Optional[torch.nn.Module] = None,
    optimizer: Any = None,
    saved_activation_bytes: Optional[int] = None,
    host_bytes: Optional[Callable[[], int]] = None,
) -> dict:
    """Tensor accounting of ``model`` and ``optimizer`` now (plain ints, JSON-ready for the run card)."""
    d: dict[str, Any] = {}
    if model is not None:
        w = weight_bytes(model)
        d["weights_trainable_bytes"] = w["trainable"]
        d["weights_frozen_bytes"] = w["frozen"]
        d["buffers_bytes"] = w["buffers"]
        d["weights_bytes"] = w["total"]
        if w["host"]:
            d["weights_host_bytes"] = w["host"]
        d["gradient_bytes"] = gradient_bytes(model)
        d["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        d["total_params"] = sum(p.numel() for p in model.parameters())
    if optimizer is not None:
        by_dev = optimizer_state_bytes(optimizer, by_device=True)
        d["optimizer_state_bytes"] = sum(by_dev.values())
        d["optimizer_state_by_device"] = by_dev
    if saved_activation_bytes is not None:
        d["saved_activation_peak_bytes"] = int(saved_activation_bytes)
    if host_bytes is not None:
        d["host_offload_bytes"] = int(host_bytes())
    if "peak_bytes" not in d:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            d["peak_bytes"] = int(torch.cuda.max_memory_allocated())
            d["peak_kind"] = "cuda_max_memory_allocated"
        else:
            d["peak_bytes"] = peak_rss_bytes()
            d["peak_kind"] = "cpu_peak_rss"
    return d


def format_bytes(n: Optional[float]) -> str:
    """Binary units, three significant figures: 1536 -> '1.50 KiB'."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            if unit == "B":
                return f"{int(n)} B"
            digits = 0 if abs(n) >= 100 else 1 if abs(n) >= 10 else 2
            return f"{n:.{digits}f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


_ROWS = [
    ("weights (trainable)", "weights_trainable_bytes"),
    ("weights (frozen)", "weights_frozen_bytes"),
    ("buffers", "buffers_bytes"),
    ("weights in host memory (streamed)", "weights_host_bytes"),
    ("gradients", "gradient_bytes"),
    ("gradients (peak in backward)", "gradient_peak_bytes"),
    ("optimizer state", "optimizer_state_bytes"),
    ("saved activations (peak)", "saved_activation_peak_bytes"),
    ("host (offload)", "host_offload_bytes"),
]


def format_report(d: Mapping) -> str:
    """A short two-column table of a :func:`report` dict, peak last."""
    rows = [(label, format_bytes(d[k])) for label, k in _ROWS if k in d]
    kind = d.get("peak_kind", "peak")
    if "peak_bytes" in d:
        rows.append((f"peak ({kind})", format_bytes(d["peak_bytes"])))
    if not rows:
        return "memory: nothing measured"
    w = max(len(r[0]) for r in rows)
    lines = ["memory" + (f" on {d['device']}" if "device" in d else "")]
    lines += [f"  {a:<{w}}  {b:>11}" for a, b in rows]
    return "\n".join(lines)
