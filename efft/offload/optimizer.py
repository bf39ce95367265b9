"""Optimizer-state offload: any torch optimizer's state in host memory, stepped on the CPU while
backward is still running.

How a step goes (``eager=True``, the default):

1. During backward, a post-accumulate-grad hook fires when a parameter's gradient is complete. On the
   last micro-batch of an optimizer step (``gradient_accumulation_steps``, counted per parameter),
   the gradient is copied to a host buffer on the side stream and the parameter's CPU step is handed
   to a worker thread at once: early layers are still in backward while late ones are updated.
2. ``step()`` runs the steps of parameters that kept their state on the device (small ones), waits
   for each worker, and copies each updated parameter back on the side stream with its own event;
   the compute stream waits on those events (on the GPU, not the CPU).

Global-norm clipping (``max_grad_norm``): an eager step cannot know the global norm, so with
clipping the workers only copy gradients and compute per-parameter norms during backward; the steps
start in ``step()`` once the norm over *all* this optimizer's gradients is known. The norm and the
scaling are those of ``torch.nn.utils.clip_grad_norm_`` over the parameters in group order (bitwise
the same on CPU). Clipping done *outside* (e.g. Trainer's own ``clip_grad_norm_``) after an eager step
is detected (the gradient's version changed) and raises; ``trainer_callbacks()`` moves Trainer's
clipping and accumulation settings into this optimizer instead.

The inner optimizer is a clone of the one given, its offloaded parameters replaced by host copies,
so every attribute it keys by parameter (seeds, refresh offsets) stays aligned. It is stepped one
parameter at a time: through ``update_param(p, grad)`` when the class has one (efft's projected
optimizers), else through a per-parameter view sharing the state dict (valid for optimizers whose
step treats parameters independently, as every torch.optim one does).

``resident=True`` serves parameters that already live in host memory (host-resident embeddings,
efft.offload.host_embeddings): the same hooks, workers and clipping, but each parameter is stepped
in place from its own ``.grad``; nothing is copied. Two seams let a caller that owns more
parameters than this optimizer decide the clipping: ``total_norm_fn`` (per-parameter norms of this
optimizer -> the global norm) and ``scale_fn`` (eager steps: (param, grad) -> the factor its
gradient is multiplied by before the update, e.g. a layer-wise optimizer's coefficient).
"""
from __future__ import annotations

import copy
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Optional

import torch
from torch.optim import Optimizer

from .pinned import HostBufferPool, register_host_bytes_provider
from .transfer import Mover, wait_cpu

__all__ = ["OffloadOptimizer", "offload_optimizer"]


def _cfg(cfg: Any, name: str, default):
    return default if cfg is None else getattr(cfg, name, default)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Slot:
    """One parameter: where its state lives and what is in flight for it."""

    __slots__ = ("index", "param", "group", "inner", "on_host", "gbuf", "stepper", "count", "launched", "in_backward",
                 "future", "norm", "grad_ref", "grad_version", "grad_norm", "h2d_event", "version", "pinned_bytes")

    def __init__(self, index: int, param: torch.Tensor, group: int):
        self.index, self.param, self.group = index, param, group
        self.inner: torch.Tensor = param  # the tensor the inner optimizer updates (host copy or param)
        self.on_host = False
        self.gbuf: Optional[torch.Tensor] = None
        self.stepper = None
        self.count = 0
        self.launched = False
        self.in_backward = False
        self.future: Optional[Future] = None
        self.norm: Optional[Future] = None
        self.grad_ref = None
        self.grad_version = -1
        self.grad_norm: Optional[torch.Tensor] = None
        self.h2d_event = None
        self.version = -1
        self.pinned_bytes = 0


def _move_state(st: dict, device: torch.device, step_follows: bool = False) -> dict:
    """State tensors to ``device``. torch keeps "step" on the CPU unless the group is fused or
    capturable (then it lives with the parameter): ``step_follows`` says which."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) and (k != "step" or step_follows) else v for k, v in st.items()}


def _step_follows(group: dict) -> bool:
    return bool(group.get("fused") or group.get("capturable"))


def _clone_with_params(optimizer: Optimizer, mapping: dict[int, torch.Tensor]) -> Optimizer:
    """A copy of ``optimizer`` whose parameters ``id(p) -> q`` are replaced everywhere (groups, any
    per-parameter dict such as seeds or refresh offsets); existing state moves to ``q``'s device."""
    memo: dict[int, Any] = dict(mapping)
    for group in optimizer.param_groups:
        for p in group["params"]:
            memo.setdefault(id(p), p)
    new = object.__new__(type(optimizer))
    # "state" is handled below (no deep copy of device tensors); "step" may be a scheduler's patch.
    d = {k: v for k, v in optimizer.__dict__.items() if k not in ("state", "step")}
    new.__dict__.update(copy.deepcopy(d, memo))
    new.state = defaultdict(dict)
    follows = {id(p): _step_follows(g) for g in optimizer.param_groups for p in g["params"]}
    for p, st in optimizer.state.items():
        q = memo.get(id(p), p)
        new.state[q] = _move_state(st, q.device, follows.get(id(p), False)) if q is not p else st
    return new


class OffloadOptimizer(Optimizer):
    """Wraps ``optimizer_class(params, **optimizer_kwargs)`` with host-resident optimizer state.

    ``cfg`` is duck-typed (``efft.config.OffloadConfig``): ``keep_small_params_on_device_bytes``,
    ``pin_memory``, ``max_pinned_bytes``. Keyword options: ``gradient_accumulation_steps`` (micro-batches
    per step; the eager step fires on the last), ``max_grad_norm`` (global-norm clipping done here),
    ``eager`` (False: nothing happens before ``step()``, as in torchao), ``release_grads`` (free each
    offloaded parameter's device gradient once copied: saves its memory, but nothing may read
    gradients between backward and ``step()``, e.g. Trainer then logs grad_norm 0), ``workers`` (CPU threads),
    ``trace`` (record every copy, launch and step, with perf_counter times, in ``self.trace``).
    """

    def __init__(self, params: Iterable, optimizer_class: type, cfg: Any = None, *, gradient_accumulation_steps: int = 1,
                 max_grad_norm: Optional[float] = None, eager: bool = True, release_grads: bool = False,
                 workers: Optional[int] = None, trace: bool = False, resident: bool = False, **optimizer_kwargs):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            raise TypeError(f"optimizer_class must be a torch.optim.Optimizer subclass, got {optimizer_class!r}")
        base = optimizer_class(params, **optimizer_kwargs)
        self._setup(base, cfg, gradient_accumulation_steps, max_grad_norm, eager, workers, trace, release_grads, resident)

    @classmethod
    def wrap(cls, optimizer: Optimizer, cfg: Any = None, **kw) -> "OffloadOptimizer":
        self = object.__new__(cls)
        self._setup(optimizer, cfg, kw.pop("gradient_accumulation_steps", 1), kw.pop("max_grad_norm", None),
                    kw.pop("eager", True), kw.pop("workers", None), kw.pop("trace", False), kw.pop("release_grads", False),
                    kw.pop("resident", False))
        if kw:
            raise TypeError(f"unexpected options: {sorted(kw)}")
        return self

    # ------------------------------------------------------------------------------ set-up
    def _setup(self, base: Optimizer, cfg, accumulation, max_grad_norm, eager, workers, trace, release_grads=False,
               resident=False) -> None:
        if isinstance(base, OffloadOptimizer):
            raise TypeError("this optimizer is already offloaded")
        if getattr(base, "layerwise", False) or type(base).__name__.lower().startswith("layerwise"):
            raise ValueError("optimizer offload cannot wrap a layer-wise optimizer (both step inside backward): "
                             "use one of optim.layerwise or offload.optimizer")
        params = [p for g in base.param_groups for p in g["params"]]
        if not params:
            raise ValueError("optimizer has no parameters")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter appears more than once in the optimizer's groups")
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device to offload their state, got {sorted(map(str, devices))}")
        if any(p.is_sparse for p in params):
            raise ValueError("sparse parameters cannot be offloaded")
        self.device = params[0].device
        self.resident = bool(resident)
        if self.resident and self.device.type != "cpu":
            raise ValueError(f"resident=True steps parameters that live in host memory; these are on {self.device}")
        if self.resident and release_grads:
            raise ValueError("resident=True steps from the parameters' own gradients: release_grads does not apply")
        #: see the module docstring: callers clipping over more parameters than this optimizer holds
        self.total_norm_fn = None
        self.scale_fn = None
        self.keep_small_bytes = int(_cfg(cfg, "keep_small_params_on_device_bytes", 1 << 20))
        self.pool = HostBufferPool(pin_memory=_cfg(cfg, "pin_memory", True), max_pinned_bytes=_cfg(cfg, "max_pinned_bytes", 8 << 30),
                                   name="optimizer state")
        self.gradient_accumulation_steps = accumulation
        self.max_grad_norm = max_grad_norm
        self.eager = bool(eager)
        self.release_grads = bool(release_grads)
        self.trace: Optional[list] = [] if trace else None
        self.mover = Mover(self.device, trace=self.trace)
        self.last_grad_norm: Optional[torch.Tensor] = None
        self._migrated = False

        # The wrapper's groups are the user's (schedulers write lr there)
        init_wrapper(self, base.defaults, base.param_groups)

        self._slots: list[_Slot] = []
        for gi, g in enumerate(base.param_groups):
            for p in g["params"]:
                self._slots.append(_Slot(len(self._slots), p, gi))
        mapping = {}
        for s in self._slots:
            if self.resident:
                s.on_host = s.param.requires_grad  # stepped in place on a worker; no copy
            elif _nbytes(s.param) >= max(self.keep_small_bytes, 1) and s.param.requires_grad:
                mapping[id(s.param)] = self._host_copy(s)
        # An optimizer that already stepped brings its state along; do not use ``base`` afterwards.
        self.inner = _clone_with_params(base, mapping)
        base.state = defaultdict(dict)
        self._synced = False
        for s in self._slots:
            s.version = s.param._version
        self._build_steppers()
        n = workers if workers is not None else max(1, min(4, (os.cpu_count() or 2) // 2))
        if n < 1:
            raise ValueError(f"workers must be >= 1, got {n}")
        # host == device: the caller's intra-op thread count, so CPU reductions give the same bits as
        # without offload; with a GPU, the cores are shared among the workers.
        # (resident parameters on a CUDA machine: the host is not the device either)
        gpu = self.mover.cuda or (self.resident and torch.cuda.is_available())
        nthreads = torch.get_num_threads() if not gpu else max(1, (os.cpu_count() or 1) // n)
        self._pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="efft-offload",
                                        initializer=torch.set_num_threads, initargs=(nthreads,))
        self._hooks = [s.param.register_post_accumulate_grad_hook(self._hook_for(s)) for s in self._slots if s.param.requires_grad]
        register_host_bytes_provider(self.host_bytes)

    def _host_copy(self, s: _Slot) -> torch.Tensor:
        p = s.param
        hp, pinned = self.pool.alloc_persistent(p, what=f"parameter {s.index} {tuple(p.shape)}")
        s.gbuf, gp = self.pool.alloc_persistent(p, what=f"gradient {s.index} {tuple(p.shape)}")
        s.pinned_bytes = _nbytes(p) * (int(pinned) + int(gp))
        wait_cpu(self.mover.to_host(hp, p.detach(), tag=("param", s.index)))
        s.on_host = True
        s.inner = hp
        return hp

    def _build_steppers(self) -> None:
        """Per-parameter step functions on the inner optimizer (re-made after load_state_dict)."""
        inner = self.inner
        for s in self._slots:
            s.inner = inner.param_groups[s.group]["params"][self._pos_in_group(s)]
        if callable(getattr(inner, "update_param", None)):
            for s in self._slots:
                s.stepper = (lambda t: (lambda: inner.update_param(t, t.grad)))(s.inner)
            return
        for s in self._slots:
            view = object.__new__(type(inner))
            view.__dict__.update(inner.__dict__)  # shares state, hooks, defaults
            view.param_groups = [dict(inner.param_groups[s.group], params=[s.inner])]
            s.stepper = self._view_stepper(view, s.group)

    def _view_stepper(self, view: Optimizer, gi: int):
        def run():
            view.param_groups[0].update({k: v for k, v in self.inner.param_groups[gi].items() if k != "params"})
            view.step()
        return run

    def _pos_in_group(self, s: _Slot) -> int:
        start = sum(len(self.param_groups[g]["params"]) for g in range(s.group))
        return s.index - start

    # ------------------------------------------------------------------------------ hooks
    def _hook_for(self, s: _Slot):
        def hook(param: torch.Tensor) -> None:
            if s.launched:
                raise RuntimeError(
                    f"efft offload: parameter {s.index} {tuple(param.shape)} got a gradient after its optimizer step "
                    f"was launched; this optimizer steps on backward number {self.gradient_accumulation_steps} of each "
                    f"step: set gradient_accumulation_steps to the number of backward passes per optimizer.step()")
            s.count += 1
            if self.eager and s.count >= self.gradient_accumulation_steps:
                self._launch(s, in_backward=True)
        return hook

    def _sync_groups(self) -> None:
        """Hyperparameters (lr from a scheduler, ...) from the user's groups into the inner ones; done
        once per step, before the first worker of that step starts, so no worker sees a half update."""
        if not self._synced:
            self._copy_groups()
            self._synced = True

    def _copy_groups(self) -> None:
        for g, ig in zip(self.param_groups, self.inner.param_groups):
            for k, v in g.items():
                if k != "params":
                    ig[k] = v

    def _launch(self, s: _Slot, in_backward: bool) -> None:
        """Gradient complete (last micro-batch): stream it to host and start the CPU work."""
        s.launched, s.in_backward = True, in_backward
        g = s.param.grad
        if self.trace is not None:
            self.trace.append(("launch", s.index, "backward" if in_backward else "step", time.perf_counter()))
        if not s.on_host:
            return  # stepped on the device in step()
        # A fingerprint (one reduction, on the device) to tell a real later change from a x1.0.
        s.grad_ref, s.grad_version = g, g._version
        s.grad_norm = torch.linalg.vector_norm(g.detach(), 2.0) if in_backward and not self.release_grads else None
        if self.resident:
            s.gbuf, ev = g, None  # stepped in place from its own gradient: nothing to copy
        else:
            if s.param._version != s.version:  # changed outside the optimizer (weights loaded): refresh the host copy
                wait_cpu(s.h2d_event)
                wait_cpu(self.mover.to_host(s.inner, s.param.detach(), tag=("param", s.index)))
                s.version = s.param._version
            ev = self.mover.to_host(s.gbuf, g, tag=("grad", s.index))
            if self.release_grads:  # the copy holds the memory until it ran (record_stream)
                s.param.grad = None
                s.grad_ref = None
        if self.max_grad_norm:
            s.norm = self._pool.submit(self._host_norm, s, ev)
        else:
            self._sync_groups()
            s.future = self._pool.submit(self._host_step, s, ev, None)

    def _check_grads_unchanged(self, launched: list) -> None:
        """Eager steps used the gradients as backward left them; a change since (clip_grad_norm_, a
        grad scaler) would be silently ignored, so it raises. A version bump alone is not a change:
        Trainer multiplies every gradient by 1.0 to log the norm, so values are compared by norm."""
        if self.release_grads:
            launched = [s for s in launched if s.param.grad is not None or s.grad_ref is not None]
        touched = [s for s in launched if s.param.grad is not s.grad_ref or s.param.grad._version != s.grad_version]
        if not touched:
            return
        bad = [s for s in touched if s.param.grad is None or s.param.grad is not s.grad_ref]
        if not bad:
            before = torch.stack([s.grad_norm for s in touched])
            now = torch.stack([torch.linalg.vector_norm(s.param.grad, 2.0) for s in touched])
            bad = [s for s, same in zip(touched, (before == now).tolist()) if not same]
        if bad:
            s = bad[0]
            raise RuntimeError(
                f"efft offload: the gradient of parameter {s.index} {tuple(s.param.shape)} changed after it was "
                "copied for its eager step (clip_grad_norm_ or a grad scaler between backward and step()?). "
                "Give max_grad_norm to the offload optimizer (with transformers.Trainer add "
                "optimizer.trainer_callbacks()), or build it with eager=False")

    def _host_norm(self, s: _Slot, ev) -> torch.Tensor:
        wait_cpu(ev)
        if self.trace is not None:
            self.trace.append(("norm", s.index, threading.current_thread().name))
        return torch.linalg.vector_norm(s.gbuf, 2.0)

    @torch.no_grad()
    def _host_step(self, s: _Slot, ev, coef: Optional[torch.Tensor]) -> None:
        wait_cpu(ev)
        wait_cpu(s.h2d_event)  # the last copy-back must have read the host copy before it changes
        t = s.inner
        if coef is None and self.scale_fn is not None:
            coef = self.scale_fn(s.param, s.gbuf)
        if self.resident:
            # the parameter's own gradient: left as backward made it (scaled into a copy)
            t.grad = s.gbuf if coef is None else s.gbuf.mul(coef)
        else:
            t.grad = s.gbuf
            if coef is not None:
                t.grad.mul_(coef)
        try:
            s.stepper()
        finally:
            t.grad = s.gbuf if self.resident else None
        if self.trace is not None:
            self.trace.append(("step", s.index, threading.current_thread().name, time.perf_counter()))

    # ------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        slots = [s for s in self._slots if s.launched or s.param.grad is not None]
        try:
            if self.resident:  # a resident step swaps the parameter's .grad while it runs: let it finish
                for s in slots:
                    if s.future is not None:
                        s.future.result()
            self._check_grads_unchanged([s for s in slots if s.launched and s.on_host])
            for s in slots:
                if not s.launched:
                    self._launch(s, in_backward=False)
            self._sync_groups()
            coef = self._clip(slots) if self.max_grad_norm else None
            if coef is not None:
                coef_host = coef.cpu()
                for s in slots:
                    if s.on_host:
                        s.future = self._pool.submit(self._host_step, s, None, coef_host)
            for s in slots:  # device-resident state: step here, while the workers run
                if not s.on_host:
                    self._device_step(s, coef)
            for s in slots:  # per-parameter copy-back, each with its own event
                if s.on_host:
                    s.future.result()
                    if self.resident:
                        continue
                    s.h2d_event = self.mover.to_device(s.param, s.inner, tag=("param", s.index))
                    self.mover.wait_here(s.h2d_event)
                    s.version = s.param._version
        finally:
            for s in self._slots:
                for f in (s.future, s.norm):
                    if f is not None and not f.done():
                        f.exception()  # never leave a worker writing behind an exception
                s.count, s.launched, s.future, s.norm, s.grad_ref = 0, False, None, None, None
            self._synced = False
        if not self._migrated:
            self._migrated = True
            if not self.resident:
                self._migrate_small_states()
        return loss

    def _device_step(self, s: _Slot, coef: Optional[torch.Tensor]) -> None:
        t, g = s.inner, s.param.grad
        if g is None:
            return
        if coef is not None:
            g.mul_(coef.to(g.device))
        t.grad = g  # t is the parameter, or (state moved back) a tensor sharing its storage
        try:
            s.stepper()
        finally:
            if t is not s.param:
                t.grad = None
        if self.trace is not None:
            self.trace.append(("step", s.index, "device", time.perf_counter()))

    def _clip(self, slots: list) -> torch.Tensor:
        """clip_grad_norm_'s total norm and clamped coefficient, over this optimizer's gradients."""
        norms = []
        for s in slots:
            if s.on_host:
                norms.append(s.norm.result())
            else:
                norms.append(torch.linalg.vector_norm(s.param.grad, 2.0))
        # get_total_norm over the per-parameter norms groups them by device and dtype exactly as
        # clip_grad_norm_ groups the gradients (the norm of a 0-d norm is itself).
        if self.total_norm_fn is not None:
            total = self.total_norm_fn({s.param: n for s, n in zip(slots, norms)})
        else:
            total = torch.nn.utils.get_total_norm(norms, 2.0)
        self.last_grad_norm = total
        coef = self.max_grad_norm / (total + 1e-6)
        return torch.clamp(coef, max=1.0)

    def _migrate_small_states(self) -> None:
        """Only the largest states stay on host: after the first step, a parameter whose state came out
        smaller than keep_small_params_on_device_bytes (a projected optimizer's) moves back."""
        state = self.inner.state
        for s in self._slots:
            if not s.on_host:
                continue
            st = state.get(s.inner, {})
            size = sum(_nbytes(v) for v in st.values() if isinstance(v, torch.Tensor))
            if st and size < self.keep_small_bytes:
                wait_cpu(s.h2d_event)
                st.update(_move_state(st, self.device, _step_follows(self.inner.param_groups[s.group])))
                # The inner optimizer's tensor (its key everywhere) becomes an alias of the parameter:
                # from now on it updates the parameter in place, on the device.
                torch.utils.swap_tensors(s.inner, s.param.detach())
                s.on_host, s.gbuf, s.h2d_event = False, None, None
                self.pool.forget_pinned(s.pinned_bytes)
                if self.trace is not None:
                    self.trace.append(("to_device_state", s.index, size))

    # ------------------------------------------------------------------------------ grads
    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self._slots:
            p = s.param
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    # ------------------------------------------------------------------------------ checkpoints
    @property
    def state(self):  # what memory reports and Trainer read: parameter -> its (host or device) state
        return {s.param: self.inner.state[s.inner] for s in self._slots if s.inner in self.inner.state}

    @state.setter
    def state(self, value):  # Optimizer internals assign it; the inner optimizer owns the state
        pass

    def state_dict(self) -> dict:
        self._wait_idle()
        self._copy_groups()  # not marked synced: a scheduler may still change lr before the next step
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._wait_idle()
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(a["params"]) != len(b["params"]) for a, b in zip(groups, self.param_groups)):
            raise ValueError("optimizer state_dict does not match this optimizer's parameter groups "
                             f"({[len(g['params']) for g in groups]} vs {[len(g['params']) for g in self.param_groups]})")
        keep = self.inner.param_groups
        self.inner.load_state_dict(state_dict)  # moves each state tensor to its parameter's device
        for old, new in zip(keep, self.inner.param_groups):  # keep group identity (optimizers cache them)
            old.update(new)
        self.inner.param_groups = keep
        if isinstance(getattr(self.inner, "_group_of", None), dict):
            # efft's optimizers look a parameter's group up in _group_of, which their load_state_dict
            # pointed at the dicts just replaced: point it at the kept ones, or the lr a scheduler
            # syncs into them would never reach the update (accelerate reloads the state at wrap)
            self.inner._group_of = {p: g for g in keep for p in g["params"]}
        for g, sg in zip(self.param_groups, keep):
            g.update({k: v for k, v in sg.items() if k != "params"})
        self._build_steppers()
        if self.inner.state:  # placement as it was after the first step of the saved run
            self._migrated = True
            if not self.resident:
                self._migrate_small_states()

    def _wait_idle(self) -> None:
        for s in self._slots:
            if s.future is not None:
                s.future.result()
            wait_cpu(s.h2d_event)

    # ------------------------------------------------------------------------------ misc
    def host_bytes(self) -> int:
        """Host bytes held: host copies of parameters, gradient buffers and host-side state."""
        n = 0
        for s in self._slots:
            if s.on_host and not self.resident:  # a resident parameter is counted by its owner
                n += 2 * _nbytes(s.param)
        if self.device.type != "cpu":
            for st in self.inner.state.values():
                n += sum(_nbytes(v) for v in st.values() if isinstance(v, torch.Tensor) and v.device.type == "cpu")
        else:
            for s in self._slots:
                if s.on_host:
                    n += sum(_nbytes(v) for v in self.inner.state.get(s.inner, {}).values() if isinstance(v, torch.Tensor))
        return n

    def placement(self) -> dict[int, str]:
        """Parameter index (group order) -> "host" or "device": where its optimizer state lives."""
        return {s.index: "host" if s.on_host else "device" for s in self._slots}

    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("add parameter groups to the optimizer before offloading it")

    def trainer_callbacks(self) -> list:
        """Callbacks for transformers.Trainer (see efft.offload.trainer)."""
        from .trainer import OffloadTrainerCallback

        return [OffloadTrainerCallback(self)]

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def close(self) -> None:
        """Remove the gradient hooks and stop the worker threads."""
        self.remove_hooks()
        self._pool.shutdown(wait=True)

    def __repr__(self) -> str:
        on_host = sum(s.on_host for s in self._slots)
        return f"OffloadOptimizer({type(self.inner).__name__}, {on_host}/{len(self._slots)} parameters with host state)"

    def __getstate__(self):
        raise TypeError("OffloadOptimizer is not picklable; save state_dict() instead")


def init_wrapper(opt: Optimizer, defaults: dict, param_groups: list) -> None:
    """What ``Optimizer.__init__`` sets up, for a wrapper that must not call it (it would rebuild
    ``param_groups``, which the wrapper shares with the optimizers it wraps)."""
    opt.defaults = defaults
    opt.param_groups = param_groups
    opt._optimizer_step_pre_hooks = {}
    opt._optimizer_step_post_hooks = {}
    opt._optimizer_state_dict_pre_hooks = {}
    opt._optimizer_state_dict_post_hooks = {}
    opt._optimizer_load_state_dict_pre_hooks = {}
    opt._optimizer_load_state_dict_post_hooks = {}
    opt._zero_grad_profile_name = f"Optimizer.zero_grad#{type(opt).__name__}.zero_grad"


def offload_optimizer(optimizer: Optimizer, cfg: Any = None, **kw) -> OffloadOptimizer:
    """Wrap an already-built optimizer (no step taken, or its state moves along); see OffloadOptimizer."""
    return OffloadOptimizer.wrap(optimizer, cfg, **kw)
