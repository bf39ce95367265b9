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
layer-wise mode.

Several processes (DDP, ``torchrun``): build the optimizer after ``init_process_group`` and call
``keep_out_of_ddp(model)`` before wrapping the model (the factory does; Trainer and accelerate wrap
later and honour it), so DDP's reducer never holds these gradients (efft.integrations.ddp says
how and why). The hooks average them across ranks themselves, on the micro-batch that completes
the step only (earlier micro-batches accumulate locally): GaLore off its refresh steps all-reduces
the r x n projection P^T G (exact: P is the same on every rank and the projection is linear),
everything else the full gradient (GaLore's refresh, so every rank takes the same SVD basis;
APOLLO scales the full gradient by a factor learnt from its projection, and FRUGAL takes the sign
of the full remainder, so both need the averaged full gradient; their seeded projections are equal
on every rank already). The all-reduce is asynchronous; the update waits for it in the next
parameter's tensor hook, which fires before an int8 carrier's hook can write that weight back.
Parameters with fewer than two dimensions stay with DDP and are updated at the end of the
backward that completes the step (after a short last accumulation cycle, in ``step()``, where
Trainer's clip has scaled them by their own norm first). Norms, clip coefficients and updates
are computed from the averaged gradients, so every rank takes identical steps, equal to one
process on the global batch.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch.optim import Optimizer

from efft.integrations.ddp import hook_reduction, ignore_in_ddp, require_one_process, world_size

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
        self.world_size = world_size()
        params = [p for g in inner.param_groups for p in g["params"] if p.requires_grad]
        #: ``ddp_params``: left to DDP under several processes (see efft.integrations.ddp); empty in
        #: one process, where every parameter is updated in its own hook.
        self.layerwise_params, self.ddp_params, self._reducer = hook_reduction(
            params, self._apply, lambda p: self._apply(p, p.grad, False), "layerwise")
        self._handles = [p.register_post_accumulate_grad_hook(self._hook) for p in self.layerwise_params]
        if self._reducer is not None:
            self._handles += [p.register_hook(self._reducer.arrived) for p in self.layerwise_params]

    def keep_out_of_ddp(self, model: torch.nn.Module) -> list[str]:
        """Tell DDP (``torch.nn.parallel.DistributedDataParallel``, also as Trainer/accelerate build
        it) to leave this optimizer's layer-wise parameters alone: call before wrapping ``model``.
        Returns the names added to the model's ignore list (none in one process)."""
        return ignore_in_ddp(model, self.layerwise_params, "LayerwiseOptimizer") if self._reducer else []

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
        """The parameter's last micro-batch: update from the accumulated gradient, free it.
        Several processes: average it across ranks first (asynchronously: efft.integrations.ddp)."""
        acc = self._acc.pop(p, None)
        if acc is None and self.world_size > 1 and p.grad is not None and self._projectable(p):
            acc = self.inner.project_grad(p, p.grad)  # only the projection travels
        elif acc is not None and p.grad is not None:
            acc.add_(self.inner.project_grad(p, p.grad))
        grad = acc if acc is not None else p.grad
        if acc is not None:
            p.grad = None
        if grad is None:
            return
        if self._reducer is not None:
            self._reducer.launch(p, grad, acc is not None)  # _apply runs when the average is in
        else:
            require_one_process("layerwise")
            self._apply(p, grad, acc is not None)

    def _apply(self, p: torch.Tensor, grad: torch.Tensor, projected: bool) -> None:
        self._sq_norm = self._sq_norm + grad.float().square().sum().double()  # no host sync per layer
        if projected:
            self.inner.apply_projected(p, grad, self._clip)
        else:
            self.inner.update_param(p, grad, self._clip)
        p.grad = None

    @torch.no_grad()
    def finish_param(self, p: torch.Tensor) -> None:
        """Apply ``p``'s pending gradient now, outside backward (what ``step()`` does for a short
        accumulation cycle); weight streaming calls it one resident layer at a time."""
        self._finish(p)
        if self._reducer is not None:
            self._reducer.complete()

    # -------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        """Close the optimizer step (the updates already happened in backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._reducer is not None:
            self._reducer.complete()
        for p in [q for q, n in self._calls.items() if n < self.gradient_accumulation_steps]:
            self._finish(p)  # fewer micro-batches than N (end of an epoch); same order on every rank
        for p in list(self._acc):
            self._finish(p)
        if self._reducer is not None:
            self._reducer.end_step()  # and the parameters left to DDP, after a short last cycle
        norm = math.sqrt(float(self._sq_norm))  # the step's one host sync
        self.last_grad_norm = norm
        if self.max_grad_norm > 0:
            self._clip = min(1.0, self.max_grad_norm / (norm + 1e-6)) if math.isfinite(norm) else 1.0
        self._sq_norm = 0.0
        self._calls.clear()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_external_norm_sq(self, sq) -> None:
        """Count gradients that another optimizer consumed this step (host-resident parameters
        stepped on the CPU) in the global norm that sets the next step's clip coefficient; call
        before ``step()``."""
        self._sq_norm = self._sq_norm + sq

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
        if self._reducer is not None:
            self._reducer.complete()
        for h in self._handles:
            h.remove()
        self._handles = []

    def trainer_callbacks(self) -> list:
        """Callbacks for ``transformers.Trainer`` (checks accumulation, logs the grad norm)."""
        from .callbacks import LayerwiseCallback

        return [LayerwiseCallback(self)]

