"""Layer-wise mode: each parameter is updated inside backward, from a post-accumulate-grad hook,
and its gradient freed at once, so only the gradients of the layer being differentiated are
alive (the peak is one layer's, not the model's).

Gradient accumulation (``gradient_accumulation_steps`` = N): the hook counts the backward passes
of each parameter and updates it on the N-th. Between micro-batches, GaLore parameters keep only
the projected gradient P^T g (exact, since the projection is linear and the basis is fixed
between refreshes; on a parameter's refresh step its full gradient is kept so the new basis sees
the whole batch). APOLLO, FRUGAL and full-rank parameters need the full gradient (APOLLO scales
it, FRUGAL takes its sign), so theirs accumulates in ``.grad`` as usual until the N-th pass.
``step()`` closes the optimizer step: it updates parameters that saw fewer than N passes (a short
last accumulation), records the gradient norm and computes the next clip coefficient.

Clipping semantics (``max_grad_norm`` > 0): the global norm is only known after the whole
backward, when the updates are already done. So step t is clipped with the norm of step t-1:
every gradient consumed at step t is multiplied by c_t = min(1, max_grad_norm / (n_{t-1} + 1e-6)),
c_0 = 1, where n_{t-1} is the L2 norm over all parameters of the (accumulated, unclipped)
gradients consumed at step t-1 (for a GaLore parameter accumulated in the projected space, of
P^T G: the part of G the optimizer sees). With Adam a uniform scale of the first step's gradient
changes nothing but eps' weight, so the lag costs little; it never lets an update see the whole
of a spike twice in a row. ``last_grad_norm`` is that norm, for logs.

The learning-rate scheduler is stepped by the caller once per optimizer step, after ``step()``;
the hooks read each group's lr when they update, so the update of step t uses lr_t, as without
layer-wise mode. Not for DDP: its all-reduce runs after these hooks (use the plain optimizer).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim import Optimizer

from .base import ProjectedOptimizer


class LayerwiseOptimizer(Optimizer):
    """Wraps an efft optimizer; shares its param_groups and state, updates inside backward."""

    def __init__(self, inner: ProjectedOptimizer, *, gradient_accumulation_steps: int = 1, max_grad_norm: float = 0.0):
        if not isinstance(inner, ProjectedOptimizer):
            raise TypeError(f"inner must be an efft optimizer (GaLoreAdamW, APOLLOAdamW, FRUGAL, AdamW), got {type(inner).__name__}")
        if isinstance(gradient_accumulation_steps, bool) or not isinstance(gradient_accumulation_steps, int) or gradient_accumulation_steps < 1:
            raise ValueError(f"gradient_accumulation_steps must be an integer >= 1, got {gradient_accumulation_steps!r}")
        if not max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm!r}")
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            raise ValueError("layerwise: not supported with several processes (DDP all-reduces gradients after "
                             "the hooks that consume them); use the optimizer without layer-wise mode")
        self.inner = inner
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.max_grad_norm = float(max_grad_norm)
        super().__init__(inner.param_groups, inner.defaults)
        self.param_groups = inner.param_groups
        self.state = inner.state
        self.last_grad_norm = 0.0
        self._clip = 1.0
        self._sq_norm = 0.0
        self._calls: dict[torch.Tensor, int] = {}
        self._acc: dict[torch.Tensor, torch.Tensor] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._hook)
                         for g in inner.param_groups for p in g["params"] if p.requires_grad]

    # ------------------------------------------------------------------------------- hooks
    @torch.no_grad()
    def _hook(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        calls = self._calls[p] = self._calls.get(p, 0) + 1
        if calls < self.gradient_accumulation_steps:
            if self._projectable(p):
                r = self.inner.project_grad(p, p.grad)
                self._acc[p] = r if p not in self._acc else self._acc[p].add_(r)
                p.grad = None
            return
        self._finish(p)

    def _projectable(self, p: torch.Tensor) -> bool:
        needs = getattr(self.inner, "needs_full_grad", None)
        return needs is not None and hasattr(self.inner, "project_grad") and not needs(p)

    def _finish(self, p: torch.Tensor) -> None:
        """The parameter's last micro-batch: update from the accumulated gradient, free it."""
        acc = self._acc.pop(p, None)
        if acc is not None:
            if p.grad is not None:
                acc.add_(self.inner.project_grad(p, p.grad))
            self._sq_norm = self._sq_norm + acc.float().square().sum().double()  # no host sync per layer
            self.inner.apply_projected(p, acc, self._clip)
        elif p.grad is not None:
            self._sq_norm = self._sq_norm + p.grad.float().square().sum().double()
            self.inner.update_param(p, p.grad, self._clip)
        p.grad = None

    # -------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Close the optimizer step (the updates already happened in backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for p in [q for q, n in self._calls.items() if n < self.gradient_accumulation_steps]:
            self._finish(p)  # fewer micro-batches than N (end of an epoch)
        for p in list(self._acc):
            self._finish(p)
        norm = math.sqrt(float(self._sq_norm))  # the step's one host sync
        self.last_grad_norm = norm
        if self.max_grad_norm > 0:
            self._clip = min(1.0, self.max_grad_norm / (norm + 1e-6)) if math.isfinite(norm) else 1.0
        self._sq_norm = 0.0
        self._calls.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @property
    def clip_coefficient(self) -> float:
        """The factor the next optimizer step's gradients will be multiplied by."""
        return self._clip

    @property
    def skipped_nonfinite(self) -> int:
        return self.inner.skipped_nonfinite

    def state_bytes(self) -> int:
        return self.inner.state_bytes()

    # ---------------------------------------------------------------------- checkpointing
    def state_dict(self):
        sd = self.inner.state_dict()
        sd["layerwise"] = {"clip": self._clip, "last_grad_norm": self.last_grad_norm}
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("layerwise", None)
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        if extra:
            self._clip, self.last_grad_norm = float(extra["clip"]), float(extra["last_grad_norm"])

    def remove_hooks(self) -> None:
        """Detach from the parameters (after which backward no longer updates them)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def trainer_callbacks(self) -> list:
        """Callbacks for ``transformers.Trainer`` (checks accumulation, logs the grad norm)."""
        from .callbacks import LayerwiseCallback

        return [LayerwiseCallback(self)]
