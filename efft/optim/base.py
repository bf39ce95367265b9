"""What GaLore, APOLLO and FRUGAL share: group checks, plain AdamW for the other parameters,
per-parameter stepping (used by layer-wise mode), non-finite skipping and a weights_only state.

Param groups follow galore-torch / apollo-torch: a group with a ``rank`` key holds low-rank
parameters (``update_proj_gap``, ``scale``, ``proj_type`` beside it); every other group, and any
parameter that is not 2-D, gets AdamW in the same optimizer. lr, betas, eps and weight_decay are
read from each group at every step, so schedulers and per-group settings are honoured.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from . import moments
from .projectors import check_proj_type, effective_rank, stagger_offsets


def _positive_int(group: dict, key: str) -> None:
    v = group[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{key} must be a positive integer, got {v!r}")


class ProjectedOptimizer(Optimizer):
    """Base class; subclasses implement ``_update_lowrank`` for one 2-D parameter."""

    #: FRUGAL decays weights before its update (torch AdamW style); GaLore and APOLLO after it,
    #: as in the authors' code (kept so parity with their packages is exact).
    decay_before_update = False
    #: FRUGAL adds eps after bias correction (torch.optim.AdamW); GaLore/APOLLO before it.
    eps_after_bias_correction = False
    #: Defaults filled into low-rank groups that do not set them.
    lowrank_defaults: dict[str, Any] = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std"}

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        *,
        seed: int = 0,
        stagger_refresh: bool = False,
        state_bits: int = 32,
    ):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        moments.check_bits(state_bits)
        self.seed = int(seed)
        self.stagger_refresh = bool(stagger_refresh)
        #: Parameter updates skipped because their gradient held inf/nan (see ``skipped_nonfinite``).
        self.skipped_nonfinite = 0
        self._index: dict[torch.Tensor, int] = {}
        self._offset: dict[torch.Tensor, int] = {}
        self._group_of: dict[torch.Tensor, dict] = {}
        self._warned_rank: set[int] = set()
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        state_bits=state_bits)
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        moments.check_bits(group["state_bits"])
        if "rank" in group:
            for k, v in self.lowrank_defaults.items():
                group.setdefault(k, v)
            self._check_lowrank_group(group)
        for p in group["params"]:
            # 1-based over every parameter in group order: apollo-torch's seed convention.
            self._index[p] = len(self._index) + 1
            self._group_of[p] = group
        if "rank" in group:
            mats = [p for p in group["params"] if p.dim() == 2]
            offs = stagger_offsets(len(mats), group["update_proj_gap"]) if self.stagger_refresh else [0] * len(mats)
            self._offset.update(zip(mats, offs))

    def _check_lowrank_group(self, group: dict) -> None:
        _positive_int(group, "rank")
        _positive_int(group, "update_proj_gap")
        check_proj_type(group["proj_type"])
        if not (isinstance(group["scale"], (int, float)) and group["scale"] > 0):
            raise ValueError(f"scale must be a positive number, got {group['scale']!r}")

    def is_lowrank(self, p: torch.Tensor) -> bool:
        return "rank" in self._group_of[p] and p.dim() == 2

    def group_of(self, p: torch.Tensor) -> dict:
        return self._group_of[p]

    def _rank(self, p: torch.Tensor, group: dict) -> int:
        r = effective_rank(tuple(p.shape), group["rank"])
        if r < group["rank"] and self._index[p] not in self._warned_rank:
            self._warned_rank.add(self._index[p])
            warnings.warn(f"rank {group['rank']} exceeds min{tuple(p.shape)} of a parameter; using rank {r}", UserWarning, stacklevel=3)
        return r

    # --------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            plain, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if self.is_lowrank(p):
                    self._update_lowrank(p, p.grad, group, self.state[p], 1.0)
                else:
                    plain.append(p)
                    grads.append(p.grad)
            if plain:
                self._update_plain(plain, grads, group, 1.0)
        return loss

    @torch.no_grad()
    def update_param(self, p: torch.Tensor, grad: torch.Tensor, clip: float = 1.0) -> None:
        """Update one parameter from ``grad`` scaled by ``clip`` (layer-wise mode calls this)."""
        group = self._group_of[p]
        if self.is_lowrank(p):
            self._update_lowrank(p, grad, group, self.state[p], clip)
        else:
            self._update_plain([p], [grad], group, clip)

    # ---------------------------------------------------------------------- plain AdamW part
    def _update_plain(self, params: list, grads: list, group: dict, clip: float) -> None:
        """AdamW (bias-corrected) over many parameters with torch._foreach ops: few kernel launches."""
        norms = torch._foreach_norm(grads)
        finite = torch.stack(norms).isfinite().tolist()
        if not all(finite):
            self.skipped_nonfinite += finite.count(False)
            params = [p for p, ok in zip(params, finite) if ok]
            grads = [g for g, ok in zip(grads, finite) if ok]
            if not params:
                return
        beta1, beta2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        states = [self.state[p] for p in params]
        for p, st in zip(params, states):
            if "step" not in st:
                st["step"] = 0
                moments.init(st, p.shape, p.device, group["state_bits"], moment_dtype(p))
            st["step"] += 1
        step_sizes, v_scales = zip(*(self._step_size(lr, beta1, beta2, st["step"], group["correct_bias"]) for st in states))
        step_sizes = [-s for s in step_sizes]
        grads = [g if g.dtype == moment_dtype(p) else g.to(moment_dtype(p)) for g, p in zip(grads, params)]
        if clip != 1.0:
            grads = torch._foreach_mul(grads, clip)
        if wd > 0 and self.decay_before_update:
            torch._foreach_mul_(params, 1.0 - lr * wd)
        if group["state_bits"] == 32 and all(p.device.type == "cpu" for p in params):
            for p, g, st, s, c in zip(params, grads, states, step_sizes, v_scales):
                for pc, gc, m, v in _cpu_chunks(p, g, st["exp_avg"], st["exp_avg_sq"]):
                    direction = moments.adam_direction({"exp_avg": m, "exp_avg_sq": v}, gc, beta1, beta2, eps, c)
                    pc.add_(direction.to(pc.dtype), alpha=s)
                    del direction  # one temporary alive at a time
        elif group["state_bits"] == 32:
            ms = [st["exp_avg"] for st in states]
            vs = [st["exp_avg_sq"] for st in states]
            torch._foreach_mul_(ms, beta1)
            torch._foreach_add_(ms, grads, alpha=1.0 - beta1)
            torch._foreach_mul_(vs, beta2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - beta2)
            denom = torch._foreach_sqrt(vs)
            if any(c != 1.0 for c in v_scales):
                torch._foreach_mul_(denom, list(v_scales))
            torch._foreach_add_(denom, eps)
            direction = torch._foreach_div(ms, denom)  # div then add: the authors' rounding exactly
            del denom
            same_dtype = all(p.dtype == d.dtype for p, d in zip(params, direction))
            if same_dtype and len(set(step_sizes)) == 1:
                torch._foreach_add_(params, direction, alpha=step_sizes[0])
            else:
                for p, d, s in zip(params, direction, step_sizes):
                    p.add_(d.to(p.dtype), alpha=s)
        else:
            for p, g, st, s, c in zip(params, grads, states, step_sizes, v_scales):
                direction = moments.adam_direction(st, g, beta1, beta2, eps, c)
                p.add_(direction.to(p.dtype), alpha=s)
        if wd > 0 and not self.decay_before_update:
            torch._foreach_add_(params, params, alpha=-lr * wd)

    def _adam_direction(self, state: dict, r: torch.Tensor, group: dict) -> tuple[torch.Tensor, float]:
        """Adam's m / (sqrt(v) + eps) on a (projected) gradient, and the bias-corrected step size."""
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state and "exp_avg_q" not in state:
            moments.init(state, r.shape, r.device, group["state_bits"], torch.float32)
        state["adam_step"] = state.get("adam_step", 0) + 1
        step_size, v_scale = self._step_size(group["lr"], beta1, beta2, state["adam_step"], group["correct_bias"])
        return moments.adam_direction(state, r, beta1, beta2, group["eps"], v_scale), step_size

    def _step_size(self, lr: float, beta1: float, beta2: float, step: int, correct_bias: bool) -> tuple[float, float]:
        """(step size, factor on sqrt(v)) for the class's eps convention."""
        if not correct_bias:
            return lr, 1.0
        if self.eps_after_bias_correction:
            return lr / (1.0 - beta1 ** step), 1.0 / math.sqrt(1.0 - beta2 ** step)
        return bias_corrected_lr(lr, beta1, beta2, step), 1.0

    def _skip(self) -> None:
        self.skipped_nonfinite += 1

    def _update_lowrank(self, p: torch.Tensor, grad: torch.Tensor, group: dict, state: dict, clip: float) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _update_lowrank")

    # ------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        # torch casts floating state tensors to the parameter's dtype, and uint8 codes as well when
        # the parameter is floating: put the saved tensors back as saved (fp32 moments of bf16
        # parameters stay fp32, 8-bit codes stay uint8), moved to the parameter's device.
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, saved in state_dict["state"].items():
            p = params[pid]
            for k, v in saved.items():
                if isinstance(v, torch.Tensor):
                    self.state[p][k] = v.to(device=p.device)
        # torch replaces the group dicts: point every parameter at its new group, or schedulers
        # (which write into the new dicts) would no longer reach the low-rank updates.
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}

    def trainer_callbacks(self) -> list:
        """Callbacks for ``transformers.Trainer`` (logs ``skipped_nonfinite``)."""
        from .callbacks import OptimizerLogCallback

        return [OptimizerLogCallback(self)]

    def state_bytes(self) -> int:
        """Bytes held in tensors of ``optimizer.state`` (what the memory tests and cards report)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for v in st.values() if isinstance(v, torch.Tensor))


#: Elements per slice of the CPU AdamW loop (1 MiB of fp32 per tensor: the slice's m, v, g, p and
#: one temporary stay in cache across the eight elementwise ops).
CPU_CHUNK = 1 << 18


def _cpu_chunks(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor):
    """(p, g, m, v) in matching flat slices of CPU_CHUNK elements, or whole when not all contiguous.

    On CPU, torch._foreach ops are a loop of the per-tensor kernels (so results are identical) that
    allocates sqrt(v) and m / denom for every parameter at once and streams each full-size tensor
    through memory once per op; on slices the eight ops of an AdamW update find their operands in
    cache, one small temporary is alive at a time and no large one is page-faulted in anew each step.
    """
    ts = (p, g, m, v)
    if p.numel() <= CPU_CHUNK or not all(t.is_contiguous() and t.shape == p.shape for t in ts):
        return [ts]
    return zip(*(t.view(-1).split(CPU_CHUNK) for t in ts))


def moment_dtype(p: torch.Tensor) -> torch.dtype:
    """Moments in fp32 for low-precision parameters (bf16 moments lose small updates)."""
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def bias_corrected_lr(lr: float, beta1: float, beta2: float, step: int, correct_bias: bool = True) -> float:
    if not correct_bias:
        return lr
    return lr * math.sqrt(1.0 - beta2 ** step) / (1.0 - beta1 ** step)
