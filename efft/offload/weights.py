"""Weight streaming: the decoder layers' trainable int8 weights live in host memory; each layer is
copied to the device just before it runs and released right after, in forward and in backward.

For models that do not fit on the device even as int8 codes. What is streamed: each decoder layer's
:class:`~efft.quant.trainable.Int8TrainableLinear` buffers (``weight_codes``, ``weight_scale``,
``sr_state``); their master copy is in host memory (pinned through a
:class:`~efft.offload.pinned.HostBufferPool` when CUDA is present, pageable otherwise). Everything
else (gradient carriers, biases, norms, embeddings, final norm, LM head) stays on the device.

Schedule (module hooks on the layers, tensor hooks on their outputs; the training loop is unchanged):

- forward, layer i: its pre-hook makes i resident (waiting for its prefetch) and starts copies of
  i+1 .. i+k on the side stream (k = ``weights_prefetch_layers``); its post-hook releases i;
- backward: a hook on layer i's outputs fires before any of i's backward runs (with gradient
  checkpointing, before its recomputation): layers above i are done, so they are written back (if
  updated) and released, then i is made resident and i-1 .. i-k prefetched; the end of backward
  releases the rest;
- updates: a layer-wise optimizer updates a layer inside its backward, while it is resident; the
  new codes, scales and rounding counters are copied back to the host master before the device copy
  is dropped. An optimizer ``step()`` that finds streamed layers still pending (a short gradient
  accumulation cycle) updates them one resident layer at a time through the optimizer's
  ``finish_param``; a whole-model optimizer (no ``finish_param``) is refused: it would need every
  layer's float32 weight on the device at once.

So the device holds at most 1 + k layers' int8 weights (``resident_bytes`` / ``peak_resident_bytes``
count the device copies). On a CPU-only machine host and device are the same memory: the device
copies are real copies made synchronously, so the same code and accounting run in CI.
"""
from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import nn

from efft.integrations.ddp import queue_callback, world_size

from .activations import _cfg, find_decoder_layers
from .pinned import HostBufferPool, register_host_bytes_provider
from .transfer import Mover, wait_cpu

__all__ = ["WeightStreamer", "enable_weight_streaming", "STREAMED_BUFFERS"]

STREAMED_BUFFERS = ("weight_codes", "weight_scale", "sr_state")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _grad_tensors(out) -> list[torch.Tensor]:
    """The tensors in a layer's output (tensor, tuple/list, dict/ModelOutput) that backward reaches."""
    if isinstance(out, torch.Tensor):
        return [out] if out.requires_grad and out.grad_fn is not None else []
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _grad_tensors(o)]
    return []


class _Copies:
    """One layer's device copies: per int8 module a dict buffer name -> tensor, the copy events, and
    each tensor's version counter when installed (a change means the layer was updated)."""

    __slots__ = ("tensors", "events", "versions", "nbytes")

    def __init__(self, tensors: list[dict], events: list, nbytes: int):
        self.tensors, self.events, self.nbytes = tensors, events, nbytes
        self.versions: Optional[list[dict]] = None


class WeightStreamer:
    """Streams the int8 weights of ``model``'s decoder layers from host memory (see the module doc).

    ``remove()`` puts the weights back on the device (only for a model that fits) and takes the
    hooks off. ``trace`` (when asked) records ``(event, layer)`` in order: ``fetch`` (a copy started
    when the layer was needed), ``prefetch`` (started ahead), ``resident``, ``write_back``, ``release``.
    """

    def __init__(self, model: nn.Module, cfg: Any = None, *, layers: Optional[nn.ModuleList] = None,
                 prefetch_layers: Optional[int] = None, trace: bool = False):
        from efft.quant.trainable import Int8TrainableLinear

        k = int(_cfg(cfg, "weights_prefetch_layers", 1) if prefetch_layers is None else prefetch_layers)
        if k not in (1, 2):
            raise ValueError(f"weights_prefetch_layers must be 1 or 2, got {k}")
        if world_size() > 1:
            raise ValueError("offload.weights runs in one process: under DDP a layer-wise update is applied after "
                             "the next parameter's gradient arrives, when its layer may already be back in host "
                             "memory; train without streaming or in one process")
        if getattr(model, "_efft_weight_stream", None) is not None:
            raise ValueError("weight streaming is already enabled on this model")
        if layers is None:
            _, layers = find_decoder_layers(model)
        mods = [[m for m in layer.modules() if isinstance(m, Int8TrainableLinear)] for layer in layers]
        missing = [i for i, ms in enumerate(mods) if not ms]
        if missing:
            raise ValueError(f"offload.weights streams trainable int8 layers, but decoder layer {missing[0]} has no "
                             "Int8TrainableLinear: prepare the model with quant.type: int8, trainable: true first "
                             "(efft.quant.trainable.prepare_int8_training)")
        if any(m._materialized for ms in mods for m in ms):
            raise ValueError("weight streaming: an int8 layer is in the middle of an update (materialized)")
        self.model, self.layers, self.prefetch_layers = model, layers, k
        self.mods = mods
        self.pool = HostBufferPool(pin_memory=_cfg(cfg, "pin_memory", True),
                                   max_pinned_bytes=_cfg(cfg, "max_pinned_bytes", 8 << 30), name="weights")
        self.masters: list[list[dict[str, torch.Tensor]]] = []
        self._pinned: list[int] = []
        self.layer_bytes: list[int] = []
        self._index: dict[int, int] = {}
        for i, ms in enumerate(mods):
            per_layer, nbytes = [], 0
            for m in ms:
                d = {}
                for name in STREAMED_BUFFERS:
                    t = m._buffers[name]
                    host, pooled = self.pool.alloc_persistent(t, what=f"{m._name or 'int8 layer'}.{name}")
                    with torch.no_grad():
                        host.copy_(t)
                    host._efft_host_master = True  # efft.memory.tracker leaves it out of the device weights
                    if pooled:
                        self._pinned.append(host.numel() * host.element_size())
                    d[name] = host
                    nbytes += t.numel() * t.element_size()
                per_layer.append(d)
                self._index[id(m)] = i
            self.masters.append(per_layer)
            self.layer_bytes.append(nbytes)
        for ms, per_layer in zip(mods, self.masters):  # the device originals are dropped only now
            for m, d in zip(ms, per_layer):
                m._buffers.update(d)
                m._host_buffers = STREAMED_BUFFERS
        self.host_bytes_total = sum(self.layer_bytes)
        self.trace: Optional[list] = [] if trace else None
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.stats = {"fetched": 0, "prefetched": 0, "write_backs": 0, "step_updates": 0}
        self._installed: dict[int, _Copies] = {}
        self._ahead: dict[int, _Copies] = {}
        self._writebacks: list = []
        self._generation = [0] * len(layers)  # write-backs per layer, to catch one between forward and backward
        self._callback_queued = False
        self._mover: Optional[Mover] = None
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i)))
            self._handles.append(layer.register_forward_hook(self._post_hook(i), always_call=True))
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        ref = weakref.ref(self)

        def before_step(opt, args, kwargs):  # weak: the global hook must not keep the model alive
            s = ref()
            if s is not None:
                s._before_step(opt)

        self._handles.append(register_optimizer_step_pre_hook(before_step))
        register_host_bytes_provider(self.host_bytes)
        model._efft_weight_stream = self

    # ------------------------------------------------------------------------------ accounting
    def host_bytes(self) -> int:
        """Host bytes held for the streamed weights (their master copies)."""
        return self.host_bytes_total

    def device_bytes_per_layer(self) -> int:
        return max(self.layer_bytes)

    def resident_layers(self) -> list[int]:
        return sorted(set(self._installed) | set(self._ahead))

    def _note(self, event: str, i: int) -> None:
        if self.trace is not None:
            self.trace.append((event, i))

    # ------------------------------------------------------------------------------ copies
    def _device(self, i: int) -> torch.device:
        return self.mods[i][0].weight.device  # the carrier sits where the model was moved

    def _mover_for(self, device: torch.device) -> Mover:
        if self._mover is None or self._mover.device != device:
            self._mover = Mover(device)
        return self._mover

    def _fetch(self, i: int, ahead: bool) -> _Copies:
        """Start copying layer i's masters to the device (side stream on CUDA)."""
        device = self._device(i)
        mover = self._mover_for(device)
        tensors, events = [], []
        for d in self.masters[i]:
            dev = {}
            for name, host in d.items():
                t = torch.empty(host.shape, dtype=host.dtype, device=device)
                events.append(mover.to_device(t, host, tag=("weights", i)))
                dev[name] = t
            tensors.append(dev)
        c = _Copies(tensors, events, self.layer_bytes[i])
        self.resident_bytes += c.nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self.stats["prefetched" if ahead else "fetched"] += 1
        self._note("prefetch" if ahead else "fetch", i)
        return c

    def _ensure(self, i: int, direction: int) -> None:
        """Make layer i resident (installed in its modules), then prefetch ``direction``-wards."""
        if i not in self._installed:
            c = self._ahead.pop(i, None) or self._fetch(i, ahead=False)
            mover = self._mover_for(self._device(i))
            for ev in c.events:
                mover.wait_here(ev)
            for m, dev in zip(self.mods[i], c.tensors):
                m._buffers.update(dev)
            c.versions = [{n: t._version for n, t in dev.items()} for dev in c.tensors]
            self._installed[i] = c
            self._note("resident", i)
        for step in range(1, self.prefetch_layers + 1):
            j = i + direction * step
            if 0 <= j < len(self.layers) and j not in self._installed and j not in self._ahead:
                self._ahead[j] = self._fetch(j, ahead=True)

    def _release(self, i: int) -> None:
        """Write layer i back to its host master if it was updated, then drop its device copies."""
        from efft.quant.trainable import flush_deferred_writebacks

        c = self._installed.get(i)
        if c is None:
            return
        flush_deferred_writebacks()  # a foreign layer-wise hook's last update of this layer
        for m in self.mods[i]:
            if m._materialized:
                raise RuntimeError(f"weight streaming: {m._name or 'an int8 layer'} is still materialized (an update "
                                   f"in progress) when layer {i} is released")
        changed = any(t._version != c.versions[k][n] for k, dev in enumerate(c.tensors) for n, t in dev.items())
        if changed:
            mover = self._mover_for(self._device(i))
            for host, dev in zip(self.masters[i], c.tensors):
                for n, t in dev.items():
                    self._writebacks.append(mover.to_host(host[n], t, tag=("weights", i)))
            self._generation[i] += 1
            self.stats["write_backs"] += 1
            self._note("write_back", i)
        for m, host in zip(self.mods[i], self.masters[i]):
            m._buffers.update(host)
        del self._installed[i]
        self.resident_bytes -= c.nbytes
        self._note("release", i)

    def _drop_ahead(self) -> None:
        for j in list(self._ahead):
            c = self._ahead.pop(j)
            self.resident_bytes -= c.nbytes
            self._note("release", j)

    def synchronize(self) -> None:
        """Wait (on the CPU) until every write-back copy has landed in the host masters."""
        evs, self._writebacks = self._writebacks, []
        for ev in evs:
            wait_cpu(ev)

    def _release_all(self) -> None:
        for j in sorted(self._installed, reverse=True):
            self._release(j)
        self._drop_ahead()
        self.synchronize()

    # ------------------------------------------------------------------------------ hooks
    def _pre_hook(self, i: int):
        def hook(module, args):
            if _in_backward():  # a recomputation that runs module hooks: the layer is resident already
                self._ensure(i, -1)
                return None
            for j in [j for j in self._installed if j != i]:  # left over from an interrupted pass
                self._release(j)
            self._ensure(i, +1)
            return None
        return hook

    def _post_hook(self, i: int):
        def hook(module, args, output):
            if _in_backward():
                return None
            outs = _grad_tensors(output) if torch.is_grad_enabled() else []
            gen = self._generation[i]
            for t in outs:
                t.register_hook(self._backward_hook(i, gen))
            self._release(i)
            return None
        return hook

    def _backward_hook(self, i: int, generation: int):
        def hook(grad):
            if self._generation[i] != generation:
                raise RuntimeError(f"weight streaming: decoder layer {i}'s int8 weights were updated between its "
                                   "forward and its backward (an optimizer step inside the graph?); the gradient "
                                   "would be wrong")
            if not self._callback_queued:
                self._callback_queued = True
                queue_callback(self._end_of_backward)
            for j in sorted((j for j in self._installed if j > i), reverse=True):
                self._release(j)  # their backward is over: everything below reads only layer i and down
            self._ensure(i, -1)
            return None
        return hook

    def _end_of_backward(self) -> None:
        self._callback_queued = False
        self._release_all()

    # ------------------------------------------------------------------------------ optimizer steps
    def _before_step(self, opt: torch.optim.Optimizer) -> None:
        """Updates of streamed layers still pending at ``step()`` (a short accumulation cycle), one
        resident layer at a time; a whole-model optimizer is refused before it touches anything."""
        from efft.quant.trainable import carriers_to_update, int8_update

        pending: dict[int, list] = {}
        for p, m in carriers_to_update(opt):
            i = self._index.get(id(m)) if m is not None else None
            if i is None or i in self._installed:  # not ours, or updated inside backward right now
                continue
            pending.setdefault(i, []).append(p)
        if not pending:
            return
        finish = getattr(opt, "finish_param", None)
        if finish is None:
            n = sum(len(v) for v in pending.values())
            raise RuntimeError(
                f"offload.weights: {type(opt).__name__}.step() would update {n} int8 weights of streamed decoder layers "
                "outside backward, which needs every layer's float32 weight on the device at once; streaming needs "
                "layer-wise updates (optim.layerwise: true, or efft.quant.trainable.Int8LayerwiseOptimizer)")
        for i in sorted(pending, reverse=True):
            self._ensure(i, 0)  # no prefetch: only the pending layers are needed
            for p in pending[i]:
                with int8_update(p):
                    finish(p)
                self.stats["step_updates"] += 1
            self._release(i)
        self._release_all()

    def __deepcopy__(self, memo):  # reached through the model's hooks: say what to do instead of failing on a lock
        raise TypeError("this model streams its int8 layers from host memory (efft offload.weights): its hooks own the "
                        "host master copies, which a copy cannot share; copy the model before enabling it")

    def __reduce_ex__(self, protocol):
        self.__deepcopy__(None)

    # ------------------------------------------------------------------------------ removal
    def remove(self) -> None:
        """Put every layer's weights back on the device (the whole model must fit) and unhook."""
        self._release_all()
        for h in self._handles:
            h.remove()
        self._handles = []
        for i, (ms, per_layer) in enumerate(zip(self.mods, self.masters)):
            device = self._device(i)
            for m, d in zip(ms, per_layer):
                m._buffers.update({n: t.to(device, copy=True) for n, t in d.items()})
                m._host_buffers = ()
        for nbytes in self._pinned:
            self.pool.forget_pinned(nbytes)
        self._pinned = []
        self.masters = [[{} for _ in ms] for ms in self.mods]
        self.host_bytes_total = 0
        if getattr(self.model, "_efft_weight_stream", None) is self:
            del self.model._efft_weight_stream

    def __repr__(self) -> str:
        return (f"WeightStreamer(layers={len(self.layers)}, prefetch_layers={self.prefetch_layers}, "
                f"host_bytes={self.host_bytes_total}, bytes_per_layer={self.device_bytes_per_layer()})")


def enable_weight_streaming(model: nn.Module, cfg: Any = None, **kw) -> WeightStreamer:
    """Stream ``model``'s trainable int8 decoder layers from host memory (``cfg``: an
    ``efft.config.OffloadConfig`` or None for the defaults); returns the streamer (``.remove()``)."""
    return WeightStreamer(model, cfg, **kw)
