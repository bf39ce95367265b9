"""Exact activation recompute for norms and the gated MLP product (``sparsity.recompute``).

A decoder layer keeps, besides the tensors the linears need, things that are cheap to rebuild:

- every RMSNorm keeps its input, an fp32 copy (the input itself in fp32), the per-row rstd and the
  normalized tensor (for the weight gradient): about one hidden-sized tensor beyond the input.
- the gated MLP ``down(act(gate(x)) * up(x))`` keeps gate (the activation's input), act(gate) and
  up (the product's inputs) and the product (down_proj's input): four intermediate-sized tensors.

``norms``: each norm-like module of the decoder layers and the final norm (a leaf whose class name
contains "norm" and that has a 1-D weight) runs its own forward inside :class:`RecomputeFn`, which
saves only the input and re-runs the module's forward in backward. Re-running the module's own
code keeps every family's formula (Gemma's ``1 + w``, fp32 upcasts) without copying it.

``gated_mlp``: an MLP with ``gate_proj``/``up_proj``/``down_proj``/``act_fn`` computes
``down_proj(GatedProduct(gate_proj(x), up_proj(x)))``; :class:`GatedProduct` saves gate and up only
and rebuilds act(gate) in backward with the module's own ``act_fn`` (differentiated by autograd on
a detached gate, so no per-activation formula). Installed only where the replacement equals the
module's own forward (outputs and gradients) on a probe input; otherwise the module is left alone
and the reason recorded. GPT-2's ungated MLP (c_fc/act/c_proj) has nothing to drop: left alone.

Both are installed by swapping the module's class for a subclass whose ``forward`` does this, so
instance-level wrappers (loss_tokens' last-block row restriction, sampled_linear on the
projections) stack outside it in either application order: they call the module's class forward
at call time. Backward re-runs the forward under the autocast state of the forward. Exact: the
loss and every gradient equal the unpatched model's (same ops, same order).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["apply_recompute", "remove_recompute", "RecomputeFn", "GatedProduct", "Recompute", "recompute_state"]


def _autocast_state(device_type: str) -> tuple[bool, Optional[torch.dtype]]:
    try:
        if torch.is_autocast_enabled(device_type):
            return True, torch.get_autocast_dtype(device_type)
    except (RuntimeError, TypeError):  # device type without autocast
        pass
    return False, None


def _autocast(device_type: str, state: tuple[bool, Optional[torch.dtype]]):
    enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype, enabled=True) if enabled else torch.autocast(device_type, enabled=False)


class RecomputeFn(torch.autograd.Function):
    """y = fn(x) keeping only x for backward; backward re-runs fn on x (under the forward's
    autocast state) and differentiates it w.r.t. x and ``params`` (the trainable parameters fn reads)."""

    @staticmethod
    def forward(ctx, fn: Callable, amp, x, *params):
        ctx.fn, ctx.amp, ctx.params = fn, amp, params
        ctx.save_for_backward(x)
        return fn(x)

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        with torch.enable_grad(), _autocast(x.device.type, ctx.amp):
            xd = x.detach().requires_grad_(need[0])
            y = ctx.fn(xd)
        inputs = [t for t, n in zip((xd, *ctx.params), need) if n]
        grads = iter(torch.autograd.grad(y, inputs, gy, allow_unused=True)) if inputs else iter(())
        return (None, None, *[next(grads) if n else None for n in need])


class GatedProduct(torch.autograd.Function):
    """act(gate) * up keeping only gate and up for backward; act(gate) and its derivative are
    rebuilt in backward by running ``act`` under autograd on a detached gate."""

    @staticmethod
    def forward(ctx, gate, up, act: Callable, amp):
        ctx.act, ctx.amp = act, amp
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, gy):
        gate, up = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[:2]
        with torch.enable_grad(), _autocast(gate.device.type, ctx.amp):
            g = gate.detach().requires_grad_(need_gate)
            a = ctx.act(g)
        # as mul's backward: each input's gradient is gy times the other input, in that input's dtype
        grad_up = (gy * a.detach()).to(up.dtype) if need_up else None
        grad_gate = torch.autograd.grad(a, g, (gy * up).to(a.dtype))[0] if need_gate else None
        return grad_gate, grad_up, None, None


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _norm_forward(self, x, *args, **kwargs):
    base = type(self)._efft_base_forward
    if args or kwargs or not torch.is_tensor(x) or not torch.is_grad_enabled():
        return base(self, x, *args, **kwargs)
    params = _trainable(self)
    if not (x.requires_grad or params):
        return base(self, x)
    return RecomputeFn.apply(functools.partial(base, self), _autocast_state(x.device.type), x, *params)


def _mlp_forward(self, x, *args, **kwargs):
    if args or kwargs or not torch.is_grad_enabled():
        return type(self)._efft_base_forward(self, x, *args, **kwargs)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if gate.requires_grad or up.requires_grad:
        h = GatedProduct.apply(gate, up, self.act_fn, _autocast_state(gate.device.type))
    else:
        h = self.act_fn(gate) * up
    return self.down_proj(h)


_CLASSES: dict[tuple[type, str], type] = {}


def _rebuild(base: type, kind: str, state: Optional[dict] = None) -> nn.Module:
    """Unpickling / deepcopy: an empty instance of the recompute subclass; its state is set after
    (in the state slot, not the arguments, so a state that refers back to the module, as an
    instance-level forward wrapper does, is copied once). ``state``: pickles written before that."""
    obj = object.__new__(_recompute_class(base, kind))
    if state is not None:
        obj.__setstate__(state)
    return obj


def _reduce_ex(self, protocol):
    # the subclass shares its base's name, so pickle cannot find it by reference: rebuild it instead
    cls = type(self)
    if cls.__dict__.get("_efft_base_class") is None:  # a subclass made later (FSDP2's): its own protocol
        return object.__reduce_ex__(self, protocol)
    return _rebuild, (cls._efft_base_class, cls._efft_recompute_kind), self.__getstate__()


def _recompute_class(cls: type, kind: str) -> type:
    """A subclass of ``cls`` (same name, so class-name checks still match) whose forward recomputes."""
    key = (cls, kind)
    if key not in _CLASSES:
        fwd = _norm_forward if kind == "norm" else _mlp_forward
        _CLASSES[key] = type(cls.__name__, (cls,), {
            "forward": fwd, "_efft_base_forward": cls.forward, "_efft_recompute_kind": kind, "_efft_base_class": cls,
            "__module__": cls.__module__, "__doc__": f"{cls.__name__} with efft.sparsity.recompute ({kind})",
            "__reduce_ex__": _reduce_ex,
        })
    return _CLASSES[key]


@dataclass
class Recompute:
    """What :func:`apply_recompute` installed (kept as ``model._efft_recompute``)."""

    norms: list[str] = field(default_factory=list)  # module names whose output is recomputed in backward
    mlps: list[str] = field(default_factory=list)  # gated MLPs whose act(gate) is recomputed
    skipped: dict[str, str] = field(default_factory=dict)  # module name -> why it was left alone


def recompute_state(model: nn.Module) -> Optional[Recompute]:
    return getattr(model, "_efft_recompute", None)


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return ("norm" in type(m).__name__.lower() and next(m.children(), None) is None
            and isinstance(w, nn.Parameter) and w.dim() == 1 and w.is_floating_point())


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj")) and callable(getattr(m, "act_fn", None))


def _in_features(m: nn.Module) -> Optional[int]:
    for cand in (m, getattr(m, "base_layer", None)):
        n = getattr(cand, "in_features", None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def _probe_dtype(lm: nn.Module) -> torch.dtype:
    emb = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if torch.is_tensor(w) and w.is_floating_point():
        return w.dtype
    return next((p.dtype for p in lm.parameters() if p.is_floating_point()), torch.float32)


def _run(module: nn.Module, x: torch.Tensor, gy_seed: int):
    params = _trainable(module)
    xi = x.clone().requires_grad_(True)
    y = module(xi)
    g = torch.Generator().manual_seed(gy_seed)
    gy = torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)
    grads = torch.autograd.grad(y, [xi, *params], gy, allow_unused=True)
    return y.detach(), grads


def _same(a, b, dtype: torch.dtype) -> bool:
    rtol, atol = (1e-5, 1e-6) if dtype in (torch.float32, torch.float64) else (2e-2, 1e-2)
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol)


def _install_checked(module: nn.Module, kind: str, width: int, dtype: torch.dtype) -> Optional[str]:
    """Swap ``module``'s class for its recompute subclass if that equals the module's own forward on a
    probe input (outputs, input and parameter gradients); else restore it and say why."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    g = torch.Generator().manual_seed(1234)  # a private generator: the global RNG stream is untouched
    x = torch.randn(2, 3, width, generator=g).to(device=device, dtype=dtype)
    training = {m: m.training for m in module.modules()}
    orig_cls = type(module)
    try:
        for m in module.modules():  # eval: no dropout, no sampled weight gradients in the comparison
            m.training = False
        with torch.enable_grad():
            ref = _run(module, x, 7)
            module.__class__ = _recompute_class(orig_cls, kind)
            got = _run(module, x, 7)
        # train mode, forward only (with grad: the recompute path), same seed: a module that draws
        # dropout in its own forward, which the recompute forward replaces, differs here, not in eval
        for m in module.modules():
            m.training = True
        with torch.enable_grad(), torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
            module.__class__ = orig_cls
            torch.manual_seed(99)
            train_ref = module(x).detach()
            module.__class__ = _recompute_class(orig_cls, kind)
            torch.manual_seed(99)
            train_got = module(x).detach()
    except Exception as e:  # noqa: BLE001 - any failure leaves the module as it was
        module.__class__ = orig_cls
        return f"probe failed: {type(e).__name__}: {e}"
    finally:
        for m, t in training.items():
            m.training = t
    if not (_same(ref[0], got[0], dtype) and len(ref[1]) == len(got[1])
            and all(_same(a, b, dtype) for a, b in zip(ref[1], got[1]))):
        module.__class__ = orig_cls
        return "the recompute forward differs from the module's own forward (output or gradients) on a probe input"
    if not _same(train_ref, train_got, dtype):
        module.__class__ = orig_cls
        return "the module's own forward differs in training mode (dropout?), which the recompute forward would drop"
    return None


def _decoder_scope(model: nn.Module):
    """(causal LM, decoder layers, the module that holds them) or a reason."""
    from .loss_tokens import decoder_layers, find_causal_lm

    lm = find_causal_lm(model)
    layers = decoder_layers(lm)
    if layers is None or len(layers) == 0:
        return lm, None, None
    holder = next((m for m in lm.modules() if any(c is layers for c in m.children())), None)
    return lm, layers, holder


def apply_recompute(model: nn.Module, norms: bool = True, gated_mlp: bool = True) -> nn.Module:
    """Recompute norms' outputs and/or the gated MLP's activation in backward (exact).

    Returns the model; what was installed and what was left alone (with why) is in
    ``model._efft_recompute`` (a :class:`Recompute`). Raises ValueError when neither part is asked
    for or nothing in the model can be patched.
    """
    if not (norms or gated_mlp):
        raise ValueError("sparsity.recompute: set norms and/or gated_mlp to true (both are false)")
    lm, layers, holder = _decoder_scope(model)
    if layers is None:
        raise ValueError(f"sparsity.recompute: cannot find the decoder layers of {type(lm).__name__}")
    state = recompute_state(model) or Recompute()
    dtype = _probe_dtype(lm)
    prefix = {id(m): n for n, m in lm.named_modules()}
    if norms:
        found = []
        for layer in layers:
            found += [(prefix[id(m)], m) for m in layer.modules() if _is_norm(m)]
        if holder is not None:  # the final norm: a direct child of the module holding the layers
            found += [(prefix[id(m)], m) for m in holder.children() if _is_norm(m)]
        for name, m in found:
            if getattr(type(m), "_efft_recompute_kind", None) or name in state.norms:
                continue
            why = _install_checked(m, "norm", m.weight.numel(), dtype)
            if why is None:
                state.norms.append(name)
            else:
                state.skipped[name] = why
        if not found:
            state.skipped["norms"] = "no norm-like module (a leaf named *Norm* with a 1-D weight) in the decoder layers"
    if gated_mlp:
        for layer in layers:
            for m in layer.modules():
                name = prefix[id(m)]
                if getattr(type(m), "_efft_recompute_kind", None) or name in state.mlps:
                    continue
                if _is_gated_mlp(m):
                    width = _in_features(m.gate_proj)
                    if isinstance(m.act_fn, nn.Module) and any(True for _ in m.act_fn.parameters()):
                        why = "act_fn has parameters (their gradients would need the activation's own backward)"
                    elif width is None or width != _in_features(m.up_proj):
                        why = "gate_proj/up_proj in_features unknown or different"
                    else:
                        why = _install_checked(m, "mlp", width, dtype)
                    if why is None:
                        state.mlps.append(name)
                    else:
                        state.skipped[name] = why
                elif name.rsplit(".", 1)[-1] == "mlp":
                    state.skipped[name] = (f"{type(m).__name__} is not gated (no gate_proj/up_proj/down_proj/act_fn): "
                                           "no activation product to drop")
    if not state.norms and not state.mlps:
        why = "; ".join(f"{k}: {v}" for k, v in state.skipped.items()) or "nothing matched"
        raise ValueError(f"sparsity.recompute: nothing to recompute in {type(lm).__name__} "
                         f"(norms={norms}, gated_mlp={gated_mlp}): {why}")
    model._efft_recompute = state
    return model


def remove_recompute(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_recompute` (every swapped module gets its own class back)."""
    for m in model.modules():
        base = type(m).__dict__.get("_efft_base_class")
        if base is not None:
            m.__class__ = base
    model.__dict__.pop("_efft_recompute", None)
    return model
