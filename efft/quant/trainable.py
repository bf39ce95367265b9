"""Full-parameter training on int8 weights (block-wise absmax codes, stochastic-rounding write-back).

Design (why it looks like this):

* Each ``nn.Linear`` becomes an :class:`Int8TrainableLinear` holding ``weight_codes`` (int8) and
  ``weight_scale`` (float32, one per block) as buffers. There is no persistent full-precision weight.
* Torch optimizers key their state on float ``nn.Parameter`` objects and autograd needs a float leaf
  to deliver a gradient to, so the layer keeps ``weight`` as a *grad carrier*: a Parameter with the
  weight's shape and dtype float32 whose storage is one element expanded with stride 0 (4 bytes).
  The forward (a custom autograd Function) never reads it; it dequantizes the codes on the fly
  (again in backward, so no dequantized copy lives between the two) and returns ``dW`` (float32)
  as the carrier's gradient. Optimizer state is therefore keyed on the carrier as usual, so any
  torch optimizer, efft's included, works unchanged and its ``state_dict`` stays ordinary.
* An update needs a real weight for the moment it runs: ``materialize()`` swaps the carrier's
  ``.data`` for the dequantized float32 weight, the optimizer updates it in place, and ``commit()``
  writes it back onto the codes with stochastic rounding (see :mod:`efft.quant.stochastic`) and
  swaps the 4-byte carrier back in (a weight left unchanged is dropped without touching the codes).
* Who calls materialize/commit, so that every optimizer works without knowing about int8:
  - any ``Optimizer.step()``: a process-wide step pre/post hook does it for each int8 carrier with a
    gradient (a whole-model step materializes every layer for the step's duration);
  - :class:`Int8LayerwiseOptimizer` (recommended): updates each parameter inside backward through
    the wrapped optimizer's ``update_param`` (efft) or a one-parameter ``step()`` (torch), so one
    layer's float32 gradient and weight exist at a time;
  - layer-wise optimizers that update in their own post-accumulate-grad hook (efft's
    ``LayerwiseOptimizer``, the factory's ``layerwise: true``): the carrier's own hook, registered
    first, materializes it, and the write-back happens when the next carrier's hook runs or at the
    end of backward (at most two layers materialized);
  - anything else: ``with int8_update(p): ...``.
* Stochastic rounding uses counter-based seeds (layer seed, write-back counter), both saved with
  the codes (``sr_state``), so save/resume reproduces training bit for bit.
* The layer subclasses ``nn.Linear`` (without its __init__) so the optimizer factory treats its
  weight as a 2-D Linear weight (low-rank groups); code wanting a plain Linear tests ``type(m) is``.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from efft.integrations.ddp import check_trainer_world, hook_reduction, ignore_in_ddp, require_one_process, world_size

from .stochastic import (dequantize_int8_blockwise, mix_seed, n_blocks, quantize_int8_blockwise,
                         requantize)

__all__ = [
    "Int8TrainableLinear", "Int8LayerwiseOptimizer", "prepare_int8_training", "int8_layers",
    "export_full_precision", "save_int8_checkpoint", "load_int8_checkpoint", "load_int8_pretrained", "int8_training_problems",
    "validate_int8_training", "is_int8_carrier", "int8_update", "full_precision_state_dict", "EMBEDDING_MODES",
    "flush_deferred_writebacks", "carriers_to_update",
]

EMBEDDING_MODES = ("frozen", "trainable", "host")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _carrier_data(shape, device) -> torch.Tensor:
    """A float32 tensor of ``shape`` backed by one element (stride 0): what the carrier holds at rest."""
    return torch.zeros((), dtype=torch.float32, device=device).expand(*shape)


def is_int8_carrier(p: torch.Tensor) -> bool:
    return getattr(p, "_efft_int8_owner", None) is not None


def _owner(p: torch.Tensor) -> Optional["Int8TrainableLinear"]:
    ref = getattr(p, "_efft_int8_owner", None)
    return ref() if ref is not None else None


# ------------------------------------------------------------------------------------------ autograd
class _Int8LinearFn(torch.autograd.Function):
    """y = x W^T + b with W dequantized from int8 codes in forward and again in backward."""

    @staticmethod
    def forward(ctx, x, carrier, bias, layer):
        cd = layer.compute_dtype
        w = layer.dequantize(cd)
        y = torch.nn.functional.linear(x.to(cd), w, None if bias is None else bias.to(cd))
        del w
        ctx.layer = layer
        ctx.version = layer.weight_codes._version
        ctx.x_dtype = x.dtype
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        if layer.weight_codes._version != ctx.version:
            raise RuntimeError(f"{layer._name or 'Int8TrainableLinear'}: its int8 weight was updated between forward "
                               "and backward (an optimizer step inside the graph?); the gradient would be wrong")
        cd = layer.compute_dtype
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (gy.to(cd) @ layer.dequantize(cd)).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g2 = gy.reshape(-1, gy.shape[-1]).to(cd)
            x2 = x.reshape(-1, x.shape[-1]).to(cd)
            gw = (g2.t() @ x2).float()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.reshape(-1, gy.shape[-1]).float().sum(0)
        return gx, gw, gb, None


# ------------------------------------------------------------------------------------------- module
class Int8TrainableLinear(nn.Linear):
    """A Linear whose weight is int8 codes + float32 block scales, trained through a grad carrier.

    ``rounding``: "stochastic" (default) or "nearest" (the ablation that loses small updates).
    ``shrink``: a block is re-gridded when its absmax falls below this fraction of its range.
    It subclasses ``nn.Linear`` (without running its __init__, which would allocate a float weight) so
    that code selecting Linear layers with ``isinstance`` (efft's optimizer factory putting 2-D Linear
    weights in low-rank groups) treats it as one; code that needs a plain float Linear checks
    ``type(m) is nn.Linear`` and leaves it alone.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, blocksize: int = 64,
                 compute_dtype: torch.dtype = torch.float32, seed: int = 0, rounding: str = "stochastic",
                 shrink: float = 0.5, device=None):
        nn.Module.__init__(self)
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {rounding!r}")
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.compute_dtype = blocksize, compute_dtype
        self.rounding, self.shrink = rounding, shrink
        self._name = ""
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.zeros(n_blocks(out_features * in_features, blocksize),
                                                         dtype=torch.float32, device=device))
        # [seed, number of write-backs so far]: the stochastic-rounding stream, saved for exact resume
        self.register_buffer("sr_state", torch.tensor([int(seed), 0], dtype=torch.int64, device=device))
        self.weight = nn.Parameter(_carrier_data((out_features, in_features), device))
        self.weight._efft_int8_owner = weakref.ref(self)
        self.weight.register_post_accumulate_grad_hook(_carrier_hook)
        _ensure_step_hooks()
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self._materialized = False
        # Buffers whose placement another component owns (efft.offload.weights keeps their master copy
        # in host memory and swaps device copies in while the layer runs): .to()/.cuda() leave them be,
        # and optimizer steps leave this layer's update to that component.
        self._host_buffers: tuple[str, ...] = ()

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kw) -> "Int8TrainableLinear":
        """Quantize ``linear.weight`` (nearest rounding: the smallest initial error)."""
        w = linear.weight.detach()
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, **kw)
        codes, scale = quantize_int8_blockwise(w, m.blocksize, "nearest")
        m.weight_codes.copy_(codes)
        m.weight_scale.copy_(scale)
        if linear.bias is not None:
            m.bias.data = linear.bias.detach().float().clone()
            m.bias.requires_grad_(linear.bias.requires_grad)
        m.weight.requires_grad_(linear.weight.requires_grad)
        return m

    # --------------------------------------------------------------------------------- values
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_int8_blockwise(self.weight_codes, self.weight_scale, self.blocksize, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._materialized:
            raise RuntimeError(f"{self._name or 'Int8TrainableLinear'}: forward during an optimizer update "
                               "(weight materialized, not yet written back)")
        return _Int8LinearFn.apply(x, self.weight, self.bias, self)

    # ---------------------------------------------------------------------------- update cycle
    def materialize(self) -> None:
        """Give the carrier the dequantized float32 weight, for an optimizer to update in place."""
        if not self._materialized:
            self.weight.data = self.dequantize(torch.float32)
            self._materialized = True

    def commit(self) -> None:
        """Write the (updated) float32 weight back onto the codes with this layer's rounding; free it."""
        if not self._materialized:
            return
        w = self.weight.data
        if not torch.isfinite(w).all():
            self.weight.data = _carrier_data(self.weight.shape, w.device)
            self._materialized = False
            raise FloatingPointError(f"{self._name or 'Int8TrainableLinear'}: non-finite weight after the update; "
                                     "the int8 weight was left unchanged")
        if torch.equal(w, self.dequantize(torch.float32)):
            # nothing was updated (materialized for an optimizer that only accumulated): leave the
            # codes and the rounding stream alone, so the stream depends on updates only
            self.weight.data = _carrier_data(self.weight.shape, w.device)
            self._materialized = False
            return
        seed, counter = (int(v) for v in self.sr_state.tolist())
        codes, scale, _ = requantize(w, self.weight_codes, self.weight_scale, self.blocksize, self.rounding,
                                     shrink=self.shrink, seed=mix_seed(seed, counter))
        self.weight_codes.copy_(codes)
        self.weight_scale.copy_(scale)
        self.sr_state[1] += 1
        self.weight.data = _carrier_data(self.weight.shape, w.device)
        self._materialized = False

    # ------------------------------------------------------------------------- torch plumbing
    def _apply(self, fn, recurse=True):
        # .to(dtype) must not materialize the carrier or cast the scales: move them, keep float32.
        # Host-owned buffers (_host_buffers) stay where they are; the carrier follows the move.
        carrier = self._parameters.pop("weight")
        kept = {k: self._buffers.pop(k) for k in self._host_buffers}
        scale = self._buffers.pop("weight_scale", None)
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = carrier
            if scale is not None:
                self._buffers["weight_scale"] = scale
            self._buffers.update(kept)
        if self._host_buffers:
            device = fn(torch.empty(0, dtype=torch.int8, device=carrier.device)).device
        else:
            device = self.weight_codes.device
        if scale is not None and scale.device != device:
            self._buffers["weight_scale"] = scale.to(device)
        if carrier.device != device:
            carrier.data = _carrier_data(carrier.shape, device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._materialized:
            raise RuntimeError(f"{self._name or 'Int8TrainableLinear'}: state_dict during an update")
        for name in ("weight_codes", "weight_scale", "sr_state"):
            t = self._buffers[name]
            destination[prefix + name] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Loads int8 keys (``weight_codes``, ``weight_scale``, ``sr_state``), or a float ``weight``
        (quantized with nearest rounding), plus ``bias``."""
        def take(name):
            return state_dict.get(prefix + name)

        codes, scale, sr, w = take("weight_codes"), take("weight_scale"), take("sr_state"), take("weight")
        shape = (self.out_features, self.in_features)
        if codes is not None:
            if codes.dtype != torch.int8 or tuple(codes.shape) != shape:
                error_msgs.append(f"{prefix}weight_codes: expected int8 {shape}, got {codes.dtype} {tuple(codes.shape)}")
            elif scale is None or scale.numel() != self.weight_scale.numel():
                error_msgs.append(f"{prefix}weight_scale: expected {self.weight_scale.numel()} float32 block scales "
                                  f"(blocksize {self.blocksize}), got {None if scale is None else scale.numel()}")
            else:
                self.weight_codes.copy_(codes)
                self.weight_scale.copy_(scale.float())
        elif w is not None:
            if tuple(w.shape) != shape:
                error_msgs.append(f"{prefix}weight: expected shape {shape}, got {tuple(w.shape)}")
            else:
                c, s = quantize_int8_blockwise(w.to(self.weight_codes.device), self.blocksize, "nearest")
                self.weight_codes.copy_(c)
                self.weight_scale.copy_(s)
        elif strict:
            missing_keys.append(prefix + "weight_codes")
        if sr is not None:
            self.sr_state.copy_(sr)
        if self.bias is not None:
            b = take("bias")
            if b is None:
                if strict:
                    missing_keys.append(prefix + "bias")
            else:
                self.bias.data.copy_(b)
        if strict:
            known = {prefix + k for k in ("weight_codes", "weight_scale", "sr_state", "weight", "bias")}
            for k in state_dict:
                if k.startswith(prefix) and "." not in k[len(prefix):] and k not in known:
                    unexpected_keys.append(k)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"blocksize={self.blocksize}, compute_dtype={self.compute_dtype}, rounding={self.rounding}")


@contextmanager
def int8_update(p: torch.Tensor):
    """``with int8_update(p): <update p in place>``: for an int8 carrier, gives it the float32 weight
    and writes the result back (stochastic rounding) on exit; for any other tensor, does nothing.
    The entry point for optimizers that update parameters outside ``Optimizer.step()``."""
    layer = _owner(p) if is_int8_carrier(p) else None
    if layer is None:
        yield p
        return
    layer.materialize()
    try:
        yield p
    finally:
        layer.commit()


def int8_layers(model: nn.Module) -> list[Int8TrainableLinear]:
    return [m for m in model.modules() if isinstance(m, Int8TrainableLinear)]


# ------------------------------------------------------------------------------------ step hooks
_hooks: list = []
# One pre/post pair for the whole process: any Optimizer.step() materializes the int8 carriers it
# will update (those with a gradient) and writes them back afterwards.


def carriers_to_update(opt: torch.optim.Optimizer):
    """(carrier, its Int8TrainableLinear or None) for each int8 carrier ``opt.step()`` will update: those
    with a gradient, and those efft's LayerwiseOptimizer accumulated in a projected space (GaLore,
    short accumulation cycle) whose .grad is already None."""
    pending = getattr(opt, "_acc", None)
    pending = pending if isinstance(pending, dict) else {}
    for g in opt.param_groups:
        for p in g["params"]:
            if (p.grad is not None or p in pending) and is_int8_carrier(p):
                yield p, _owner(p)


def _pre_step(opt, args, kwargs):
    todo = []
    for _, layer in carriers_to_update(opt):
        # a streamed layer (efft.offload.weights) is updated by the streamer's own step hook
        if layer is not None and not layer._materialized and not layer._host_buffers:
            layer.materialize()
            todo.append(layer)
    if todo:
        opt.__dict__.setdefault("_efft_int8_pending", []).extend(todo)


def _post_step(opt, args, kwargs):
    todo = opt.__dict__.pop("_efft_int8_pending", None)
    for layer in todo or ():
        layer.commit()


# Layer-wise optimizers written without int8 in mind update a parameter in their own
# post-accumulate-grad hook. Each carrier gets, at prepare time (so before theirs), a hook that
# materializes the weight when some other hook is registered on it; the write-back happens when the
# next carrier's hook runs (theirs has finished by then) or at the end of backward: at most two
# layers are materialized at once. Carriers driven by Int8LayerwiseOptimizer skip this.
_deferred: list = []
_callback_queued = [False]


def flush_deferred_writebacks() -> None:
    """Write back now the layers a foreign layer-wise hook updated and that wait for the next
    carrier's hook (or the end of backward): weight streaming calls it before releasing a layer."""
    while _deferred:
        _deferred.pop().commit()


def _end_of_backward() -> None:
    _callback_queued[0] = False
    flush_deferred_writebacks()


def _carrier_hook(p: torch.Tensor) -> None:
    if getattr(p, "_efft_int8_driven", False):
        return
    hooks = getattr(p, "_post_accumulate_grad_hooks", None)
    if not hooks or len(hooks) <= 1:
        return
    layer = _owner(p)
    if layer is None:
        return
    flush_deferred_writebacks()
    layer.materialize()
    _deferred.append(layer)
    if not _callback_queued[0]:
        _callback_queued[0] = True
        torch.autograd.Variable._execution_engine.queue_callback(_end_of_backward)


def _ensure_step_hooks() -> None:
    if not _hooks:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        _hooks.append(register_optimizer_step_pre_hook(_pre_step))
        _hooks.append(register_optimizer_step_post_hook(_post_step))


# ------------------------------------------------------------------------------------ layer-wise
def per_parameter_clip(grad: torch.Tensor, max_norm: float) -> float:
    """The factor ``Int8LayerwiseOptimizer`` scales one parameter's gradient by: ``max_norm / (norm + 1e-6)``
    when its norm is finite and above ``max_norm``, else 1.0 (one host read of the norm)."""
    norm = float(grad.float().norm())
    return max_norm / (norm + 1e-6) if math.isfinite(norm) and norm > max_norm else 1.0


class Int8LayerwiseOptimizer(torch.optim.Optimizer):
    """Layer-wise driver: updates each parameter inside backward, as soon as its gradient is complete.

    Wraps an ordinary optimizer built over the parameters (efft ``APOLLOAdamW`` / ``GaLoreAdamW`` /
    ``FRUGAL``, ``torch.optim.AdamW``, ...). In each parameter's post-accumulate-grad hook an int8
    carrier is materialized, updated through the wrapped optimizer's per-parameter entry
    ``update_param(p, grad, clip)`` (efft's optimizers; others: ``step()`` with every other gradient
    hidden), written back with stochastic rounding, and its gradient freed: one layer's float32
    weight and gradient exist at a time. ``param_groups`` and ``state`` are the wrapped optimizer's
    own objects, so schedulers, state sums and checkpoints see the usual structures.

    Gradient accumulation: the update runs on every ``gradient_accumulation_steps``-th accumulation
    of a parameter (the loss is expected to be divided by that number, as Trainer does); ``step()``
    applies any gradient still pending (a short last cycle) and is otherwise a no-op.
    Clipping: ``max_grad_norm`` clips each parameter's gradient norm separately (the global norm does
    not exist yet when the first layer is updated); ``None`` disables it.
    Several processes (DDP): build it after ``init_process_group`` and call ``keep_out_of_ddp(model)``
    before wrapping the model; each gradient is averaged across ranks before its update (and its
    clip), so every rank takes the steps of one process on the global batch (efft.integrations.ddp).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, gradient_accumulation_steps: int = 1,
                 max_grad_norm: Optional[float] = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Int8LayerwiseOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be >= 1, got {gradient_accumulation_steps}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None, got {max_grad_norm}")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        super().__init__(params, dict(optimizer.defaults))
        self.inner = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.accumulation = gradient_accumulation_steps
        self.max_grad_norm = max_grad_norm
        self._params = [p for p in params if p.requires_grad]
        self._counts: dict[int, int] = {id(p): 0 for p in self._params}
        # Several processes: see efft.integrations.ddp (1-D parameters stay with DDP; the others are
        # averaged here, asynchronously, on the micro-batch that completes their accumulation).
        self.world_size = world_size()
        self._layerwise, self._ddp_params, self._reducer = hook_reduction(
            self._params, lambda p, g, _: self._update(p), self._update, "Int8LayerwiseOptimizer")
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self._layerwise]
        for p in self._params:
            if is_int8_carrier(p):
                p._efft_int8_driven = True

    def _on_grad(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if self._reducer is not None:
            self._reducer.arrived()  # the update whose all-reduce is in flight runs first
        self._counts[id(p)] += 1
        if self._counts[id(p)] >= self.accumulation:
            self._finish(p)

    def _finish(self, p: torch.Tensor) -> None:
        if self._reducer is not None:
            self._reducer.launch(p, p.grad)  # averages p.grad in place, then _update(p)
        else:
            require_one_process("Int8LayerwiseOptimizer")
            self._update(p)

    def keep_out_of_ddp(self, model: nn.Module) -> list[str]:
        """Tell DDP to leave the parameters updated here alone: call before wrapping ``model`` in
        ``DistributedDataParallel`` (Trainer/accelerate wrap later and honour it). Returns the names."""
        return ignore_in_ddp(model, self._layerwise, "Int8LayerwiseOptimizer") if self._reducer else []

    @torch.no_grad()
    def _update(self, p: torch.Tensor) -> None:
        clip = 1.0 if self.max_grad_norm is None else per_parameter_clip(p.grad, self.max_grad_norm)
        layer = _owner(p)
        if layer is not None:
            layer.materialize()
        try:
            if hasattr(self.inner, "update_param"):
                self.inner.update_param(p, p.grad, clip)
            else:
                self._step_one(p, clip)
        finally:
            if layer is not None:
                layer.commit()
        p.grad = None
        self._counts[id(p)] = 0

    def _step_one(self, p: torch.Tensor, clip: float) -> None:
        hidden = [(q, q.grad) for q in self._params if q is not p and q.grad is not None]
        for q, _ in hidden:
            q.grad = None
        if clip != 1.0:
            p.grad.mul_(clip)
        try:
            self.inner.step()
        finally:
            for q, g in hidden:
                q.grad = g

    def finish_param(self, p: torch.Tensor) -> None:
        """Apply ``p``'s pending gradient now (what ``step()`` does for each parameter of a short
        accumulation cycle); weight streaming calls it one resident layer at a time."""
        if p.grad is not None:
            self._finish(p)
            if self._reducer is not None:
                self._reducer.complete()

    def step(self, closure=None):
        """Applies gradients still pending (an accumulation cycle cut short); normally a no-op."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in self._layerwise:
            if p.grad is not None:
                self._finish(p)  # same order on every rank
        if self._reducer is not None:
            self._reducer.end_step()  # and the parameters left to DDP, after a short last cycle
        return loss

    def zero_grad(self, set_to_none: bool = True):
        for p in self._params:
            p.grad = None
        self._counts = {k: 0 for k in self._counts}

    def state_dict(self) -> dict:
        sd = self.inner.state_dict()
        sd["int8_layerwise_counts"] = [self._counts[id(p)] for p in self._params]
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        sd = dict(state_dict)
        counts = sd.pop("int8_layerwise_counts", None)
        self.inner.load_state_dict(sd)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        if counts is not None:
            if len(counts) != len(self._params):
                raise ValueError(f"Int8LayerwiseOptimizer.load_state_dict: {len(counts)} accumulation counters for "
                                 f"{len(self._params)} parameters")
            self._counts = {id(p): int(c) for p, c in zip(self._params, counts)}

    def trainer_callbacks(self) -> list:
        """For ``transformers.Trainer`` (EfftPlugin passes these): refuses a Trainer whose
        ``gradient_accumulation_steps`` differs from this optimizer's (updates would fire mid-cycle)."""
        from transformers import TrainerCallback

        opt = self

        class _Check(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                check_trainer_world(args.world_size, opt.world_size, "Int8LayerwiseOptimizer")
                if args.gradient_accumulation_steps != opt.accumulation:
                    raise ValueError(f"gradient_accumulation_steps: Trainer uses {args.gradient_accumulation_steps}, "
                                     f"Int8LayerwiseOptimizer was built for {opt.accumulation}; build it with the same value")

        return [_Check()]

    def remove_hooks(self) -> None:
        if self._reducer is not None:
            self._reducer.complete()
        for h in self._handles:
            h.remove()
        self._handles = []
        for p in self._params:
            if is_int8_carrier(p):
                p._efft_int8_driven = False


# ---------------------------------------------------------------------------------------- prepare
def _matches(name: str, patterns: Iterable[str]) -> bool:
    parts = name.split(".")
    for s in patterns:
        if name == s or name.endswith("." + s) or s in parts:
            return True
    return False


def prepare_int8_training(model: nn.Module, quant_cfg: Any = None, *, embeddings: str = "frozen", seed: int = 0,
                          rounding: str = "stochastic", shrink: float = 0.5, head_chunk_rows: Optional[int] = None,
                          host_cfg: Any = None) -> nn.Module:
    """Replace every ``nn.Linear`` not in ``quant_cfg.skip`` (default ``["lm_head"]``) by an
    :class:`Int8TrainableLinear` (in place; returns ``model``).

    ``quant_cfg``: an ``efft.config.QuantConfig`` (``type: int8, trainable: true``) or None for the
    defaults (blocksize 64, compute dtype float32). ``embeddings``: "frozen" (input embeddings and
    the skipped Linear layers, i.e. the LM head, get ``requires_grad=False``: no gradient, no
    optimizer state) or "trainable" (left full precision and trainable; with ``optim.state_bits: 8``
    their state is 8-bit) or "host" (float32 in host memory, streamed to the device in chunks of
    ``head_chunk_rows`` vocabulary rows, default ``quant_cfg.head_chunk_rows``, and updated on the CPU:
    efft.offload.host_embeddings; ``host_cfg``, an OffloadConfig, sets pinning). Other parameters
    (norms, biases) stay full precision and trainable.
    """
    blocksize, cd, skip = 64, torch.float32, ["lm_head"]
    chunk_rows = head_chunk_rows or getattr(quant_cfg, "head_chunk_rows", None) or 16384
    if quant_cfg is not None:
        problems = _quant_problems(quant_cfg)
        if problems:
            raise ValueError("prepare_int8_training: " + "; ".join(f"quant.{k}: {m}" for k, m in problems))
        blocksize, cd, skip = quant_cfg.blocksize, _DTYPES[quant_cfg.compute_dtype], list(quant_cfg.skip)
    if embeddings not in EMBEDDING_MODES:
        raise ValueError(f"embeddings must be one of {EMBEDDING_MODES}, got {embeddings!r}")
    if any(isinstance(m, Int8TrainableLinear) for m in model.modules()):
        raise ValueError("prepare_int8_training: the model already has int8 trainable layers")
    adapters = [n for n, m in model.named_modules() if hasattr(m, "lora_A") or type(m).__name__.startswith("Lora")]
    if adapters:
        raise ValueError(f"prepare_int8_training: the model carries LoRA adapters ({adapters[0]}, ...): train the int8 "
                         "weights or an adapter, not both; load the model without the adapter (or merge it first)")
    frozen_q = [n for n, m in model.named_modules() if type(m).__name__ in ("QuantLinear", "Linear4bit", "Linear8bitLt")]
    if frozen_q:
        raise ValueError(f"prepare_int8_training: {frozen_q[0]} is already a frozen quantized layer "
                         f"({type(model.get_submodule(frozen_q[0])).__name__}); start from the full-precision model")
    linears = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and not _matches(n, skip)]
    if not linears:
        raise ValueError(f"prepare_int8_training: no nn.Linear left to convert (skip={skip})")
    if embeddings == "host":
        get_head = getattr(model, "get_output_embeddings", None)
        head = get_head() if callable(get_head) else None
        if any(m is head for _, m in linears):
            raise ValueError("prepare_int8_training: embeddings='host' keeps the LM head in full precision in host "
                             "memory: keep it in quant.skip")
    # a weight shared with another module (tied LM head) cannot become int8 codes on one side only
    owners: dict[int, list[str]] = {}
    for n, m in model.named_modules():
        for pn, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{n}.{pn}" if n else pn)
    for n, m in linears:
        if len(owners.get(id(m.weight), [])) > 1:
            raise ValueError(f"prepare_int8_training: {n}.weight is shared with {owners[id(m.weight)]} (tied "
                             f"weights); add {n.split('.')[-1]!r} to quant.skip")
    for i, (name, lin) in enumerate(linears):
        new = Int8TrainableLinear.from_linear(lin, blocksize=blocksize, compute_dtype=cd,
                                              seed=mix_seed(seed, i) & 0x7FFFFFFFFFFFFFFF, rounding=rounding,
                                              shrink=shrink)
        new._name = name
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, new)
        del lin
    if embeddings == "host":
        from efft.offload.host_embeddings import make_host_resident

        make_host_resident(model, chunk_rows=int(chunk_rows), cfg=host_cfg)
    if embeddings == "frozen":
        frozen = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        frozen += [m for n, m in model.named_modules() if type(m) is nn.Linear]
        for m in frozen:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    info = {"blocksize": blocksize, "compute_dtype": str(cd).replace("torch.", ""), "skip": skip,
            "embeddings": embeddings, "rounding": rounding, "shrink": shrink, "layers": len(linears)}
    if embeddings == "host":
        info["head_chunk_rows"] = int(chunk_rows)
    model._efft_int8_training = info
    cfg = getattr(model, "config", None)
    if cfg is not None:
        # written to config.json by save_pretrained, so load_int8_pretrained can rebuild the layout
        cfg.efft_int8_trainable = dict(info)
    return model


# ------------------------------------------------------------------------------------- validation
def _quant_problems(q: Any) -> list[tuple[str, str]]:
    p = []
    if q.type != "int8":
        p.append(("type", f"trainable quantized weights need type: int8, got {q.type!r}"))
    if not q.trainable:
        p.append(("trainable", "prepare_int8_training needs trainable: true (a frozen int8 base is quantize_model's job)"))
    if q.outlier_threshold is not None:
        p.append(("outlier_threshold", "fp16 outlier columns (LLM.int8()) are not supported for trainable int8 "
                                       "weights: block-wise scales already bound outliers to their block; remove it"))
    if q.kernel == "triton":
        p.append(("kernel", "trainable int8 layers run the torch path only; use kernel: auto or torch"))
    return p


def int8_training_problems(recipe: Any) -> list[tuple[str, str]]:
    """``(path, message)`` for each combination that cannot work with ``quant.trainable: true``,
    beyond those ``efft.config._combination_problems`` already reports. Empty when not trainable."""
    q = recipe.quant
    if not q.trainable:
        return []
    p = [(f"quant.{k}", m) for k, m in _quant_problems(q) if k != "type"]  # type: the schema reports it
    s = recipe.sparsity
    if s.sampled_linear.enabled and recipe.offload.weights:
        p.append(("sparsity.sampled_linear.enabled", "sampled-linear backward with int8 layers streamed from host memory "
                                                      "(offload.weights) is not tested together; turn one of them off"))
    if recipe.offload.optimizer:
        p.append(("offload.optimizer", "optimizer-state offload is not wired to trainable int8 weights (the update "
                                       "materializes the weight on the device); turn one of them off"))
    if recipe.optim.name == "adamw8bit" and recipe.optim.layerwise:
        pass  # the schema reports this one
    if q.embeddings == "host":
        p += _host_embedding_problems(recipe)
    return p


def _host_embedding_problems(recipe: Any) -> list[tuple[str, str]]:
    """What ``quant.embeddings: host`` cannot be combined with (its weights are stepped on the CPU
    during backward, from gradients on the host)."""
    import os

    p = []
    if not _matches("lm_head", recipe.quant.skip):
        p.append(("quant.embeddings", "host keeps the LM head in host memory in full precision: keep 'lm_head' in "
                                      "quant.skip (it would otherwise become int8 codes)"))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from efft.offload.host_optimizer import SINGLE_PROCESS

        p.append(("quant.embeddings", f"{SINGLE_PROCESS}; use trainable or frozen with several processes"))
    if recipe.train.fp16:
        p.append(("quant.embeddings", "host steps the embedding/LM head during backward, before fp16 loss scaling "
                                      "could unscale (or skip) their gradients; use train.bf16"))
    return p


def validate_int8_training(recipe: Any) -> None:
    """Raise ``efft.config.RecipeError`` listing every problem of a trainable-int8 recipe, before any
    weight is loaded (the schema's own combination rules included)."""
    from efft.config import RecipeError, _combination_problems

    problems = [x for x in _combination_problems(recipe) if x[0] in ("quant.trainable", "adapter.type")
                and recipe.quant.trainable]
    problems += int8_training_problems(recipe)
    if problems:
        raise RecipeError(problems)


# ------------------------------------------------------------------------------------------ saving
def full_precision_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The model's state dict with each int8 layer's ``weight`` dequantized (``dtype``) and the int8
    keys removed; other floating tensors cast to ``dtype``: the layout of the original model."""
    int8 = {n: m for n, m in model.named_modules() if isinstance(m, Int8TrainableLinear)}
    out = {}
    for k, v in model.state_dict().items():
        mod, _, leaf = k.rpartition(".")
        if mod in int8 and leaf in ("weight_codes", "weight_scale", "sr_state"):
            if leaf == "weight_codes":
                out[f"{mod}.weight"] = int8[mod].dequantize(dtype)
            continue
        out[k] = v.to(dtype) if v.is_floating_point() else v
    return out


def export_full_precision(model: nn.Module, out_dir: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Save a plain full-precision checkpoint (``save_pretrained`` layout, ``from_pretrained``-loadable
    as the original architecture) of an int8-trained model."""
    out_dir = Path(out_dir)
    sd = full_precision_state_dict(model, dtype)
    save = getattr(model, "save_pretrained", None)
    if save is None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(out_dir / "model.safetensors"))
        return out_dir
    save(str(out_dir), state_dict=sd)
    # save_pretrained records the in-memory parameters' dtype (the float32 carriers); record the file's
    cfg_file = out_dir / "config.json"
    if cfg_file.is_file():
        import json

        cfg = json.loads(cfg_file.read_text())
        cfg["dtype"] = str(dtype).replace("torch.", "")
        cfg.pop("efft_int8_trainable", None)  # a plain full-precision model now
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def save_int8_checkpoint(model: nn.Module, path: str | Path) -> Path:
    """The int8 model (codes, scales, rounding-stream state, every other tensor) as one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    # tied weights: safetensors refuses shared storage; keep the first name
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        out[k] = v
    save_file(out, str(path), metadata={"format": "efft-int8-trainable"})
    return path


def load_int8_pretrained(path: str | Path, *, dtype: Optional[torch.dtype] = None, **model_kwargs) -> nn.Module:
    """Load a ``save_pretrained`` directory of an int8-trained model (what Trainer checkpoints hold).

    A plain ``from_pretrained`` cannot: it would build float Linear layers and leave them randomly
    initialised (``weight_codes`` are not its keys). The model is built from the config (so its
    non-Linear weights are allocated at ``dtype`` once), prepared with the settings recorded in
    ``config.efft_int8_trainable``, then loaded; every key must match.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from efft.config import QuantConfig

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    info = getattr(config, "efft_int8_trainable", None)
    if not isinstance(info, dict):
        raise ValueError(f"{path}: config.json has no efft_int8_trainable section: not an int8-trained efft model "
                         "(load it with from_pretrained)")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or getattr(config, "dtype", None) or torch.float32,
                                             **model_kwargs)
    q = QuantConfig(type="int8", trainable=True, blocksize=info["blocksize"], compute_dtype=info["compute_dtype"],
                    skip=list(info["skip"]))
    prepare_int8_training(model, q, embeddings=info.get("embeddings", "frozen"), rounding=info.get("rounding", "stochastic"),
                          shrink=info.get("shrink", 0.5), head_chunk_rows=info.get("head_chunk_rows"))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    from safetensors.torch import load_file

    sd = {}
    for f in files:
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not _is_tied_copy(model, k, sd)]
    if missing or unexpected:
        raise ValueError(f"load_int8_pretrained({path}): missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return model


def load_int8_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load :func:`save_int8_checkpoint`'s file into a model already prepared with the same layout."""
    from safetensors.torch import load_file

    sd = load_file(str(path), device=str(next(iter(model.buffers())).device))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not _is_tied_copy(model, k, sd)]
    if missing or unexpected:
        raise ValueError(f"load_int8_checkpoint({path}): missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return model


def _is_tied_copy(model: nn.Module, key: str, sd: dict) -> bool:
    """A key left out of the file because its tensor is the same as another saved key's."""
    try:
        t = model.get_parameter(key)
    except AttributeError:
        return False
    return any(model.get_parameter(k) is t for k in sd if k != key and _is_param(model, k))


def _is_param(model: nn.Module, key: str) -> bool:
    try:
        model.get_parameter(key)
        return True
    except AttributeError:
        return False
