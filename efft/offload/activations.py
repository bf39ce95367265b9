"""Activation offload: saved-for-backward tensors of the decoder layers go to host memory during
forward and come back, a few layers ahead, during backward.

Installed as module hooks, so the training loop does not change: a forward pre-hook on the decoder
stack (the module holding the layer list) enters ``torch.autograd.graph.saved_tensors_hooks`` and
its forward hook leaves it; hooks on each layer only say which layer is running. What is offloaded:

- tensors saved inside a decoder layer's forward, at least ``min_offload_bytes`` large, dense;
- never: parameters or buffers (recognised by storage, kept by reference), the last layer's tensors
  (backward needs them first), anything outside the layers (final norm, LM head, loss);
- ``activation_mode: checkpoint_inputs``: only each layer's input hidden states, which is what
  gradient checkpointing keeps. Recent transformers checkpoint ``forward``, so the layer hooks sit
  outside the checkpoint and the inputs are saved inside the layer's hook window; where the
  checkpoint wraps the whole module call instead, the inputs are saved between two layers and are
  recognised as the previous layer's output (layer 0's input then stays on the device);
- nothing when the sequence is shorter than ``min_seq_length``, in eval, or under no_grad.

One host copy per storage: views saved from the same memory (q/k/v's inputs, one norm output seen
through fresh views) share the copy of the byte range they cover, fetched back once; each unpacks
with its own size, stride and offset. A storage is recognised by address while it is alive (held
weakly) and at the same version counter value (written in place since: a new copy).

In backward, unpacking any tensor of layer L starts copies back for layers L .. L-``prefetch_layers``
on the side stream; the compute stream waits on each copy's event only when it needs the tensor.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Optional

import torch
from torch import nn

from .pinned import HostBufferPool
from .transfer import Mover

__all__ = ["ActivationOffload", "enable_activation_offload", "find_decoder_layers"]


def _cfg(cfg: Any, name: str, default):
    return default if cfg is None else getattr(cfg, name, default)


def find_decoder_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(stack, layers): the ModuleList of same-type blocks holding most parameters, and its owner."""
    best = None
    for name, mod in model.named_modules():
        for child_name, child in mod.named_children():
            # same type up to efft's class swaps (loss_tokens' last block, recompute: same-name subclasses)
            if isinstance(child, nn.ModuleList) and len(child) >= 1 and len({getattr(type(c), "_efft_base_class", type(c))
                                                                              for c in child}) == 1:
                n = sum(p.numel() for p in child.parameters())
                if best is None or n > best[0]:
                    best = (n, mod, child)
    if best is None:
        raise ValueError(f"activation offload: no list of decoder layers found in {type(model).__name__}; pass layers=")
    return best[1], best[2]


class _Kept:
    """A saved tensor left where it is (reference kept); remembers its layer to trigger prefetch."""

    __slots__ = ("tensor", "layer", "fid")

    def __init__(self, tensor, layer, fid):
        self.tensor, self.layer, self.fid = tensor, layer, fid


class _Span:
    """One host copy of a byte range of a device storage, shared by every view saved from it (the
    views saved by q/k/v of one norm output, say): copied to host once, fetched back once."""

    __slots__ = ("layer", "fid", "lo", "hi", "version", "nbytes", "buf", "pool", "dev", "event", "prefetched",
                 "__weakref__")

    def __init__(self, layer, fid, t: torch.Tensor, pool: HostBufferPool):
        self.layer, self.fid, self.pool = layer, fid, pool
        self.nbytes = t.numel() * t.element_size()
        self.lo = t.storage_offset() * t.element_size()  # bytes [lo, hi) of the storage
        self.hi = self.lo + self.nbytes
        self.version = t._version
        self.buf = pool.acquire(self.nbytes, what=f"activation {tuple(t.shape)} {t.dtype}")
        self.dev: Optional[torch.Tensor] = None  # the fetched bytes (uint8) on the device
        self.event = None
        self.prefetched = False

    def covers(self, t: torch.Tensor) -> bool:
        lo = t.storage_offset() * t.element_size()
        return (t._version == self.version and self.lo <= lo and lo + t.numel() * t.element_size() <= self.hi
                and (lo - self.lo) % t.element_size() == 0)

    def release(self, event=None) -> None:
        if self.buf is not None:
            buf, self.buf = self.buf, None
            self.pool.release(buf, event)

    def __del__(self):  # never fetched (forward without backward): the buffer goes back to the pool
        try:
            self.release(self.event)
        except Exception:
            pass


class _Offloaded:
    """A saved (dense) tensor whose bytes live in a shared :class:`_Span` until backward fetches it;
    unpacking rebuilds it with its own size, stride and offset over the fetched bytes."""

    __slots__ = ("span", "layer", "fid", "shape", "stride", "dtype", "start", "nbytes")

    def __init__(self, span: _Span, layer, fid, t: torch.Tensor):
        self.span, self.layer, self.fid = span, layer, fid
        self.shape, self.stride, self.dtype = t.shape, t.stride(), t.dtype
        self.nbytes = t.numel() * t.element_size()
        self.start = t.storage_offset() * t.element_size() - span.lo  # byte offset into the span

    def over(self, raw: torch.Tensor) -> torch.Tensor:
        """This tensor laid over ``raw`` (the span's bytes, uint8) with its own size and stride."""
        return raw[self.start:self.start + self.nbytes].view(self.dtype).as_strided(self.shape, self.stride)


class ActivationOffload:
    """The installed hooks; ``remove()`` takes them out. ``stats`` counts tensors and bytes
    (``offloaded``: host copies made; ``shared``: saved tensors served by an existing copy of their
    storage); ``trace`` (when asked) lists every decision in order, for tests."""

    def __init__(self, model: nn.Module, cfg: Any = None, *, layers: Optional[nn.ModuleList] = None,
                 stack: Optional[nn.Module] = None, trace: bool = False):
        mode = _cfg(cfg, "activation_mode", "all")
        if mode not in ("all", "checkpoint_inputs"):
            raise ValueError(f"activation_mode must be 'all' or 'checkpoint_inputs', got {mode!r}")
        if layers is None:
            stack, layers = find_decoder_layers(model)
        elif stack is None:
            raise ValueError("pass stack= (the module whose forward runs the layers) together with layers=")
        if len(layers) < 2:
            raise ValueError("activation offload needs at least 2 decoder layers (the last one is never offloaded)")
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        self.model, self.stack, self.layers = model, stack, layers
        self.mode = mode
        self.min_bytes = int(_cfg(cfg, "min_offload_bytes", 1 << 20))
        self.prefetch_layers = int(_cfg(cfg, "prefetch_layers", 1))
        self.min_seq_length = int(_cfg(cfg, "min_seq_length", 0))
        if self.min_bytes < 0 or self.prefetch_layers < 0 or self.min_seq_length < 0:
            raise ValueError("min_offload_bytes, prefetch_layers and min_seq_length must be >= 0")
        self.pool = HostBufferPool(pin_memory=_cfg(cfg, "pin_memory", True), max_pinned_bytes=_cfg(cfg, "max_pinned_bytes", 8 << 30),
                                   name="activations")
        self.trace: Optional[list] = [] if trace else None
        self.mover = Mover(self.device)
        self.stats = {"offloaded": 0, "offloaded_bytes": 0, "kept": 0, "kept_bytes": 0, "prefetched": 0, "fetched": 0,
                      "shared": 0, "shared_bytes": 0, "forwards_offloaded": 0, "forwards_skipped": 0}
        self._lock = threading.Lock()
        self._ctx = None
        self._layer: Optional[int] = None
        self._layer_input: Optional[torch.Tensor] = None
        self._between: Optional[tuple] = None  # (next layer, previous layer's output) between layers
        self._fid = 0
        self._param_ptrs: set = set()
        self._dedupe: dict = {}
        self._pending: dict = {}  # (forward id, layer) -> [weakref to _Offloaded not yet fetched]
        self._handles = [
            stack.register_forward_pre_hook(self._stack_pre, with_kwargs=True),
            stack.register_forward_hook(self._stack_post, always_call=True),
        ]
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._layer_pre(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._layer_post(i), always_call=True))

    # ------------------------------------------------------------------------------ hooks
    def _checkpointing(self) -> bool:
        flags = [getattr(layer, "gradient_checkpointing", None) for layer in self.layers]
        if any(f is not None for f in flags):  # transformers' GradientCheckpointingLayer
            return any(bool(f) for f in flags)
        return bool(getattr(self.model, "is_gradient_checkpointing", False))

    def _stack_pre(self, module, args, kwargs):
        if self._ctx is not None or not (module.training and torch.is_grad_enabled()):
            return None
        seq = _seq_len(args, kwargs)
        if seq is not None and seq < self.min_seq_length:
            self.stats["forwards_skipped"] += 1
            return None
        if self.mode == "checkpoint_inputs" and not self._checkpointing():
            raise ValueError("activation offload with activation_mode 'checkpoint_inputs' needs gradient checkpointing "
                             "(train.gradient_checkpointing: true / model.gradient_checkpointing_enable()); "
                             "use activation_mode 'all' without it")
        self._param_ptrs = {t.untyped_storage().data_ptr() for t in self.model.parameters()}
        self._param_ptrs |= {t.untyped_storage().data_ptr() for t in self.model.buffers()}
        self._fid += 1
        self._dedupe.clear()
        with self._lock:
            self._pending = {k: v for k, v in self._pending.items() if k[0] > self._fid - 4}
        self.stats["forwards_offloaded"] += 1
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._ctx.__enter__()
        return None

    def _stack_post(self, module, args, output):
        if self._ctx is not None:
            ctx, self._ctx = self._ctx, None
            ctx.__exit__(None, None, None)
            self._layer = self._layer_input = self._between = None
            self._dedupe.clear()
        return None

    def _layer_pre(self, i: int):
        def hook(module, args, kwargs):
            if self._ctx is not None:
                self._layer, self._between = i, None
                x = args[0] if args else kwargs.get("hidden_states")
                self._layer_input = x if isinstance(x, torch.Tensor) else None
            return None
        return hook

    def _layer_post(self, i: int):
        def hook(module, args, output):
            self._layer = self._layer_input = self._between = None
            if self._ctx is not None:
                out = output[0] if isinstance(output, (tuple, list)) and output else output
                if isinstance(out, torch.Tensor) and i + 1 < len(self.layers):
                    self._between = (i + 1, out)
            return None
        return hook

    # ------------------------------------------------------------------------------ pack / unpack
    def _where(self, t: torch.Tensor) -> tuple[Optional[int], Optional[torch.Tensor]]:
        """(layer the tensor belongs to, that layer's input) for a tensor being saved now."""
        if self._layer is None and self._between is not None and _same(t, self._between[1]):
            return self._between  # a checkpoint saving the next layer's input before its hooks ran
        return self._layer, self._layer_input

    def _keep_reason(self, t: torch.Tensor, layer: Optional[int], x: Optional[torch.Tensor]) -> Optional[str]:
        if layer is None:
            return "outside layers"
        if layer == len(self.layers) - 1:
            return "last layer"
        if t.layout != torch.strided or t.is_sparse or t.is_quantized or t.is_nested:
            return "layout"
        if type(t) not in (torch.Tensor, nn.Parameter):
            return "tensor subclass"
        if t.device.type != self.device.type:
            return "not on the device"
        if t.untyped_storage().data_ptr() in self._param_ptrs:
            return "parameter"
        if t.numel() * t.element_size() < self.min_bytes:
            return "small"
        if not _dense(t):
            return "not dense"
        if self.mode == "checkpoint_inputs" and (x is None or not _same(t, x)):
            return "not a checkpoint input"
        return None

    def _note(self, *event) -> None:
        if self.trace is not None:
            self.trace.append(event)

    def _pack(self, t: torch.Tensor):
        layer, x = self._where(t)
        why = self._keep_reason(t, layer, x)
        if why is not None:
            self.stats["kept"] += 1
            self.stats["kept_bytes"] += t.numel() * t.element_size()
            self._note("keep", layer, why)
            return _Kept(t, layer, self._fid)
        # One host copy per storage: views saved from the same memory (q/k/v's views of one norm output)
        # share it. The storage is held weakly: a dead one (its address reused by a new tensor) is a
        # miss, and so is one written in place since it was copied (its version moved on).
        st = t.untyped_storage()
        key = (t.device.type, t.device.index, st.data_ptr())
        entry = self._dedupe.get(key)
        span = None
        if entry is not None and entry[0]() is st:
            span = next((sp for sp in entry[1] if sp.covers(t)), None)
        if span is not None:
            h = _Offloaded(span, layer, self._fid, t)
            if layer > span.layer:  # backward needs it first for this (later) layer: fetch it with that one
                span.layer = layer
                with self._lock:
                    self._pending.setdefault((self._fid, layer), []).append(weakref.ref(span))
            self.stats["shared"] += 1
            self.stats["shared_bytes"] += h.nbytes
            self._note("share", layer, h.nbytes)
            return h
        span = _Span(layer, self._fid, t, self.pool)
        h = _Offloaded(span, layer, self._fid, t)
        span.event = self.mover.to_host(h.over(span.buf), t, tag=("activation", layer))
        if t.numel() > 0:
            if entry is None or entry[0]() is not st:
                entry = self._dedupe[key] = (weakref.ref(st), [])
            entry[1][:] = [sp for sp in entry[1] if sp.version == span.version] + [span]
        with self._lock:
            self._pending.setdefault((self._fid, layer), []).append(weakref.ref(span))
        self.stats["offloaded"] += 1
        self.stats["offloaded_bytes"] += span.nbytes
        self._note("offload", layer, span.nbytes)
        return h

    def _unpack(self, obj):
        if isinstance(obj, _Kept):
            if obj.layer is not None:
                self._prefetch(obj.fid, obj.layer)
            return obj.tensor
        self._prefetch(obj.fid, obj.layer)
        span = obj.span
        if span.dev is None:
            self._start_fetch(span, ahead=False)
        self.mover.wait_here(span.event)
        return obj.over(span.dev)

    def _prefetch(self, fid: int, layer: int) -> None:
        """Start the copies back for layers layer .. layer - prefetch_layers (own layer included)."""
        if self.prefetch_layers == 0:
            return
        for L in range(layer, layer - self.prefetch_layers - 1, -1):
            with self._lock:
                refs = self._pending.pop((fid, L), None)
            for ref in refs or ():
                sp = ref()
                if sp is not None and sp.dev is None:
                    self._start_fetch(sp, ahead=True)

    def _start_fetch(self, sp: _Span, ahead: bool) -> None:
        # On CPU (host == device) this is still a real copy, so CI runs the same path. The offload
        # copy ran earlier on the same side stream, so this one is ordered after it. One copy serves
        # every view of the span; its host buffer goes back to the pool once the copy is done.
        with self._lock:  # once per span, even if two of its views are unpacked at the same time
            if sp.dev is not None:
                return
            dev = torch.empty(sp.nbytes, dtype=torch.uint8, device=self.device)
            sp.event = self.mover.to_device(dev, sp.buf, tag=("activation", sp.layer))
            sp.dev, sp.prefetched = dev, ahead
            sp.release(sp.event)
        self.stats["prefetched" if ahead else "fetched"] += 1
        self._note("prefetch" if ahead else "fetch", sp.layer, sp.nbytes)

    # ------------------------------------------------------------------------------ misc
    def host_bytes(self) -> int:
        return self.pool.bytes_held

    def remove(self) -> None:
        """Take the hooks out (a forward in progress keeps its context until it ends)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __deepcopy__(self, memo):  # reached through the model's hooks: say what to do instead of failing on a lock
        raise TypeError("this model has efft activation offload installed, whose hooks hold transfer streams and host "
                        "buffers a copy cannot share: copy the model before enabling it, or call .remove() on the "
                        "ActivationOffload first and enable it again on each model")

    def __reduce_ex__(self, protocol):
        self.__deepcopy__(None)

    def __repr__(self) -> str:
        return (f"ActivationOffload(mode={self.mode}, layers={len(self.layers)}, min_offload_bytes={self.min_bytes}, "
                f"prefetch_layers={self.prefetch_layers}, min_seq_length={self.min_seq_length})")


def _same(t: torch.Tensor, x: torch.Tensor) -> bool:
    """The same memory seen the same way (what autograd saves of a tensor is often a new wrapper)."""
    return t.data_ptr() == x.data_ptr() and t.shape == x.shape and t.dtype == x.dtype


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense (a permutation of a contiguous layout): a host copy with the same
    strides covers exactly numel elements, so backward sees the same layout it would have seen."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _seq_len(args, kwargs) -> Optional[int]:
    for k in ("input_ids", "inputs_embeds", "hidden_states"):
        v = kwargs.get(k)
        if isinstance(v, torch.Tensor) and v.dim() >= 2:
            return int(v.shape[1])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return int(args[0].shape[1])
    return None


def enable_activation_offload(model: nn.Module, cfg: Any = None, **kw) -> ActivationOffload:
    """Install activation offload on ``model`` (hooks only); returns the handle (``.remove()``)."""
    return ActivationOffload(model, cfg, **kw)
