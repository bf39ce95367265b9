"""The optimizer of a model whose embedding/LM head are host-resident: the recipe's optimizer for the
device parameters, plus an OffloadOptimizer (``resident=True``) stepping the host parameters on
CPU worker threads as soon as their gradient is complete.

The host parameters get the main optimizer's plain-AdamW part (same class: efft's projected
optimizers and efft AdamW update non-low-rank parameters with AdamW), or ``torch.optim.AdamW``
when the main optimizer is a torch/bitsandbytes one (float32 state in host memory). Clipping
follows the main optimizer, so the host parameters are clipped as they would be inside it:

* a whole-step optimizer (torch AdamW, efft projected without layer-wise): global-norm clipping over
  all parameters, as ``clip_grad_norm_`` over the model's parameters in model order; the host
  norms are computed on the workers during backward, the steps wait for the global norm in
  ``step()``. Without clipping the host steps run during backward.
* efft's ``LayerwiseOptimizer`` (clips step t by step t-1's global norm): the host gradients are
  scaled by its current coefficient in backward and their norms join the norm it records.
* ``Int8LayerwiseOptimizer`` (clips each parameter by its own norm): the same per-parameter clip.

One object for Trainer: ``param_groups`` holds both optimizers' groups (schedulers reach both),
``state_dict`` both states, ``trainer_callbacks`` moves Trainer's clipping and accumulation here.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

import torch
from torch.optim import Optimizer

from efft.integrations.ddp import world_size

from .optimizer import OffloadOptimizer, init_wrapper

__all__ = ["HostParamsOptimizer", "host_params_optimizer", "SINGLE_PROCESS"]

#: Why quant.embeddings: host refuses several processes (the recipe check, the optimizer and its
#: Trainer callback say the same)
SINGLE_PROCESS = ("host is single-process: the host parameters are stepped on this process's CPU during backward, "
                  "before DDP could all-reduce their gradients")


def _host_inner(main: Optimizer, params: list, *, lr, weight_decay, betas, eps, state_bits: int) -> Optimizer:
    """The main optimizer's plain-AdamW part over ``params`` (one decayed group, as the factory puts 2-D weights)."""
    from efft.optim.base import ProjectedOptimizer

    base = getattr(main, "inner", main)
    groups = [{"params": params, "weight_decay": weight_decay}]
    if isinstance(base, ProjectedOptimizer):
        cls = type(base)
        kw = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, state_bits=state_bits)
        if cls.__name__ == "AdamW":
            return cls(groups, **kw)
        return cls(groups, correct_bias=base.defaults.get("correct_bias", True), **kw)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


class HostParamsOptimizer(Optimizer):
    """``main`` (device parameters) + ``host`` (an OffloadOptimizer with ``resident=True``) as one optimizer.

    ``order``: every trainable parameter in model order (global-norm clipping sums the per-parameter
    norms in this order, as ``clip_grad_norm_(model.parameters())`` does).
    """

    def __init__(self, main: Optimizer, host: OffloadOptimizer, *, max_grad_norm: Optional[float] = None,
                 order: Optional[list] = None):
        if not getattr(host, "resident", False):
            raise TypeError("host must be an OffloadOptimizer built with resident=True")
        if world_size() > 1:
            raise ValueError(f"quant.embeddings: {SINGLE_PROCESS}")
        self.main, self.host = main, host
        self.mode = self._mode(main)
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        self.order = list(order) if order is not None else None
        self.last_grad_norm: Optional[float] = None
        self._sq_lock = threading.Lock()
        self._host_sq = 0.0
        init_wrapper(self, main.defaults, list(main.param_groups) + list(host.param_groups))
        self._configure()

    @staticmethod
    def _mode(main: Optimizer) -> str:
        from efft.optim.layerwise import LayerwiseOptimizer
        from efft.quant.trainable import Int8LayerwiseOptimizer

        if isinstance(main, LayerwiseOptimizer):
            return "lagged"
        if isinstance(main, Int8LayerwiseOptimizer):
            return "per_parameter"
        if isinstance(main, OffloadOptimizer):
            raise ValueError("quant.embeddings: host cannot sit beside offload.optimizer (both step on CPU workers "
                             "with their own clipping); use one of them")
        return "global"

    def _configure(self) -> None:
        """Set the host optimizer's clipping seams for the current mode and max_grad_norm."""
        h = self.host
        h.scale_fn = h.total_norm_fn = None
        h.max_grad_norm = None
        if self.mode == "global":
            if self.max_grad_norm:
                h.max_grad_norm = self.max_grad_norm
                h.total_norm_fn = self._global_norm
        elif self.mode == "lagged":
            h.scale_fn = self._lagged_scale
        else:
            h.scale_fn = self._per_parameter_scale if self.main.max_grad_norm is not None else None

    # ------------------------------------------------------------------------------ clipping
    def _global_norm(self, host_norms: dict) -> torch.Tensor:
        """clip_grad_norm_'s total over host + device gradients, per-parameter norms in model order."""
        norms = dict(host_norms)
        for g in self.main.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    norms[p] = torch.linalg.vector_norm(p.grad, 2.0)
        order = self.order if self.order is not None else list(norms)
        seen = set()
        ordered = []
        for p in order:
            if p in norms and id(p) not in seen:
                seen.add(id(p))
                ordered.append(norms[p])
        ordered += [n for p, n in norms.items() if id(p) not in seen]
        total = torch.nn.utils.get_total_norm(ordered, 2.0)
        self._total = total
        return total

    def _lagged_scale(self, p: torch.Tensor, grad: torch.Tensor):
        sq = grad.float().square().sum().double()
        with self._sq_lock:
            self._host_sq = self._host_sq + sq
        c = self.main.clip_coefficient
        return None if c == 1.0 else c

    def _per_parameter_scale(self, p: torch.Tensor, grad: torch.Tensor):
        from efft.quant.trainable import per_parameter_clip

        c = per_parameter_clip(grad, self.main.max_grad_norm)  # Int8LayerwiseOptimizer's own clip
        return None if c == 1.0 else c

    # ------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._total = None
        self.host.step()
        if self.mode == "global" and self.max_grad_norm:
            total = self._total
            if total is None:  # no host gradient this step: the norm over the device ones
                total = self._global_norm({})
            coef = torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)
            for g in self.main.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.grad.mul_(coef.to(p.grad.device))
            self.last_grad_norm = float(total)
        elif self.mode == "lagged":
            with self._sq_lock:
                sq, self._host_sq = self._host_sq, 0.0
            self.main.add_external_norm_sq(sq)  # the host gradients count in the global norm
        self.main.step()
        if self.mode == "lagged":
            self.last_grad_norm = self.main.last_grad_norm
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The host gradients stay in their pooled buffers either way: ``set_to_none=False`` zeroes the
        rows written since the last zeroing (efft.offload.host_embeddings.zero_host_grad)."""
        from .host_embeddings import zero_host_grad

        self.main.zero_grad(set_to_none=set_to_none)
        for g in self.host.param_groups:
            for p in g["params"]:
                zero_host_grad(p, set_to_none)

    # ------------------------------------------------------------------------------ state
    @property
    def state(self):
        merged = dict(self.main.state)
        merged.update(self.host.state)
        return merged

    @state.setter
    def state(self, value):  # Optimizer internals assign it; the two optimizers own their states
        pass

    def state_dict(self) -> dict:
        return {"main": self.main.state_dict(), "host": self.host.state_dict(),
                "host_params": {"last_grad_norm": self.last_grad_norm}}

    def load_state_dict(self, state_dict: dict) -> None:
        if not (isinstance(state_dict, dict) and "main" in state_dict and "host" in state_dict):
            raise ValueError("HostParamsOptimizer.load_state_dict: expected the {'main', 'host'} state of a run with "
                             "quant.embeddings: host; this checkpoint's optimizer state was saved without it")
        self.main.load_state_dict(state_dict["main"])
        self.host.load_state_dict(state_dict["host"])
        self.last_grad_norm = state_dict.get("host_params", {}).get("last_grad_norm")
        self.param_groups[:] = list(self.main.param_groups) + list(self.host.param_groups)

    def state_bytes(self) -> int:
        n = 0
        for st in self.state.values():
            n += sum(v.numel() * v.element_size() for v in st.values() if isinstance(v, torch.Tensor))
        return n

    # ------------------------------------------------------------------------------ plumbing
    def add_param_group(self, param_group: dict) -> None:
        raise NotImplementedError("add parameter groups to the main or the host optimizer before combining them")

    def trainer_callbacks(self) -> list:
        """The main optimizer's callbacks, then one that gives Trainer's clipping and accumulation to
        this optimizer (Trainer's clip would run after the host steps used the gradients)."""
        from .trainer import HostParamsTrainerCallback

        extra = list(getattr(self.main, "trainer_callbacks", lambda: [])())
        return extra + [HostParamsTrainerCallback(self)]

    def set_max_grad_norm(self, value: Optional[float]) -> None:
        if self.mode == "global":
            self.max_grad_norm = float(value) if value else None
            self._configure()

    def remove_hooks(self) -> None:
        for o in (self.main, self.host):
            fn = getattr(o, "remove_hooks", None)
            if callable(fn):
                fn()

    def close(self) -> None:
        """Remove the hooks, stop the workers and give the host gradient buffers back."""
        self.remove_hooks()
        self.host.close()
        for g in self.host.param_groups:
            for p in g["params"]:
                acc = getattr(p, "_efft_host_grad", None)
                if acc is not None:
                    acc.release()

    @property
    def skipped_nonfinite(self) -> int:
        return int(getattr(self.main, "skipped_nonfinite", 0)) + int(getattr(self.host.inner, "skipped_nonfinite", 0))

    def __repr__(self) -> str:
        return f"HostParamsOptimizer(main={type(self.main).__name__}, host={self.host!r}, clipping={self.mode})"


def host_params_optimizer(main: Optimizer, host_params: list, cfg: Any = None, *, lr: float, weight_decay: float = 0.0,
                          betas=(0.9, 0.999), eps: float = 1e-8, max_grad_norm: Optional[float] = None,
                          gradient_accumulation_steps: int = 1, state_bits: int = 32, order: Optional[list] = None,
                          workers: Optional[int] = None) -> HostParamsOptimizer:
    """Combine ``main`` (built over every trainable parameter except ``host_params``) with a CPU
    optimizer for the host-resident ``host_params``. ``cfg``: efft.config.OffloadConfig (pinning)."""
    if not host_params:
        raise ValueError("host_params_optimizer: no host-resident parameters")
    inner = _host_inner(main, list(host_params), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps,
                        state_bits=state_bits)
    host = OffloadOptimizer.wrap(inner, cfg, gradient_accumulation_steps=gradient_accumulation_steps, resident=True,
                                 workers=workers)
    return HostParamsOptimizer(main, host, max_grad_norm=max_grad_norm, order=order)
