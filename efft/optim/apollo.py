"""APOLLO (Zhu et al. 2024): Adam moments on a random projection of the gradient, used only to
learn a per-channel (or, for APOLLO-Mini, per-tensor) scale of the *full-rank* gradient.

The Gaussian projection N(0, 1/r) is regenerated from an integer seed at every step, so it costs
no memory (``cache_projection=True`` keeps it outside the optimizer state until the next refresh:
~8% faster a step in the rank-128 CPU benchmark, r x n floats a weight); state_dict holds only the seed (apollo-torch stores the matrix), every DDP rank
generates the same matrix, and a resumed run regenerates it from the loaded seed. Seeds follow
apollo-torch (parameter position, advanced at each refresh), so results match it. The scaled
gradient is multiplied by sqrt(scale) and its norm growth between steps is capped at
``norm_growth_limit`` (Fira's limiter). The scale, the limiter, sqrt(scale) and the
learning rate are folded into one vector so the full-size update is a single ``addcmul_``.
"""
from __future__ import annotations

import math

import torch

from .base import CPU_CHUNK, ProjectedOptimizer
from .projectors import choose_side, gaussian_basis, mix_seed, next_seed, project, refresh_due, svd_basis

SCALE_TYPES = ("channel", "tensor")
PROJS = ("random", "svd")
_ROW_BLOCK = 32  # rows accumulated at a time for column sums of squares (the accumulator stays in cache)


def channel_sq_norms(grad: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of squares of ``grad`` (m x n) over ``dim``, kept as a column (dim=1) or row (dim=0), in
    fp32, without a full-size temporary (``grad.square()`` allocated and wrote an m x n tensor each
    step: on CPU an mmap and page faults for every matrix). Rows: ``vector_norm`` over the
    contiguous dim, squared. Columns: ``vector_norm`` over a strided dim is several times slower on
    CPU, so blocks of ``_ROW_BLOCK`` rows are multiplied-and-added into one ``_ROW_BLOCK`` x n fp32
    accumulator (no temporary per block), which is summed over its rows at the end."""
    if dim == 1 or grad.device.type != "cpu":
        return torch.linalg.vector_norm(grad, dim=dim, keepdim=True, dtype=torch.float32).square_()
    m = grad.shape[0]
    acc = torch.zeros(min(_ROW_BLOCK, m), grad.shape[1], dtype=torch.float32, device=grad.device)
    for i in range(0, m, _ROW_BLOCK):
        block = grad[i:i + _ROW_BLOCK]
        if block.dtype != torch.float32:
            block = block.float()
        acc[:block.shape[0]].addcmul_(block, block)
    return acc.sum(dim=0, keepdim=True)


class APOLLOAdamW(ProjectedOptimizer):
    """APOLLO; APOLLO-Mini is ``rank=1, scale_type="tensor"`` (scale 128). apollo-torch group keys
    (``rank``, ``proj``, ``scale_type``, ``update_proj_gap``, ``scale``, ``proj_type``) work."""

    lowrank_defaults = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "proj": "random", "scale_type": "channel"}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True, *,
                 norm_growth_limit: float | None = 1.01, scale_front: bool = False, seed: int = 0,
                 stagger_refresh: bool = False, state_bits: int = 32, cache_projection: bool = False):
        #: Keep each parameter's Gaussian projection between refreshes (outside ``self.state``:
        #: state_dict carries only the seed; a resumed run regenerates the same matrix from it, so
        #: resume stays bitwise). Costs rank x n (or m x rank) per matrix in the gradient's dtype;
        #: False regenerates it at every step instead (no memory, one randn per matrix per step).
        self.cache_projection = bool(cache_projection)
        self._proj_cache: dict[torch.Tensor, tuple] = {}
        if norm_growth_limit is not None and not norm_growth_limit > 1.0:
            raise ValueError(f"norm_growth_limit must be > 1 or None, got {norm_growth_limit!r}")
        self.norm_growth_limit = norm_growth_limit
        del scale_front  # apollo-torch's flag; both placements give the same product here
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, seed=seed,
                         stagger_refresh=stagger_refresh, state_bits=state_bits)

    def _check_lowrank_group(self, group):
        super()._check_lowrank_group(group)
        if group["scale_type"] not in SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {group['scale_type']!r}")
        if group["proj"] not in PROJS:
            raise ValueError(f"proj must be one of {PROJS}, got {group['proj']!r}")

    def needs_full_grad(self, p: torch.Tensor) -> bool:
        return True  # the update scales the full-rank gradient itself

    def _basis(self, p, grad, group, state, side, rank) -> torch.Tensor:
        step = state.get("step", 0)
        has = "proj_seed" in state or "basis" in state
        due = refresh_due(step, group["update_proj_gap"], self._offset.get(p, 0), has)
        if group["proj"] == "svd":
            if due:
                state["basis"] = svd_basis(grad, rank, side, seed=mix_seed(self.seed, self._index[p], step)).to(grad.dtype)
            return state["basis"]
        if due:
            state["proj_seed"] = next_seed(state["proj_seed"]) if has else self.seed + self._index[p]
        key = (state["proj_seed"], rank, side, grad.dtype, p.device)
        cached = self._proj_cache.get(p)
        if cached is not None and cached[0] == key:
            return cached[1]
        basis = gaussian_basis(tuple(p.shape), rank, side, state["proj_seed"], p.device, grad.dtype)
        if self.cache_projection:
            self._proj_cache[p] = (key, basis)
        return basis

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)
        self._proj_cache.clear()  # regenerated from the loaded seeds on the next step

    def _update_lowrank(self, p, grad, group, state, clip):
        side = choose_side(tuple(p.shape), group["proj_type"])
        rank = self._rank(p, group)
        if group["proj"] == "svd" and not torch.isfinite(grad.sum()):
            return self._skip()
        basis = self._basis(p, grad, group, state, side, rank)
        r = project(grad, basis, side).float()  # statistics in fp32 (no-op for fp32 parameters)
        # Channels are along the side that is not projected: columns for left, rows for right.
        # square().sum() rather than norm(dim=...): several times faster on CPU for strided dims.
        dim = 0 if side == "left" else 1
        r_sq = r.square().sum(dim=dim, keepdim=True)
        if not torch.isfinite(r_sq.sum()):  # inf/nan anywhere in G reaches R through the GEMM
            return self._skip()
        if clip != 1.0:
            r = r * clip
            r_sq = r_sq * (clip * clip)
        state["step"] = state.get("step", 0) + 1
        direction, step_size = self._adam_direction(state, r, group)
        d_sq = direction.square().sum(dim=dim, keepdim=True)
        if group["scale_type"] == "channel":
            factor = d_sq.sqrt() / (r_sq.sqrt() + 1e-8)
            full_norm = (channel_sq_norms(grad, dim) * factor.square()).sum().sqrt()
        else:
            factor = d_sq.sum().sqrt() / (r_sq.sum().sqrt() + 1e-8)
            full_norm = torch.linalg.vector_norm(grad, dtype=torch.float32) * factor
        factor = factor * clip
        full_norm = full_norm * clip
        if self.norm_growth_limit is not None:
            gamma = self.norm_growth_limit
            if "scaled_grad_norm" in state:
                limiter = (full_norm / (state["scaled_grad_norm"] + 1e-8)).clamp(min=gamma) / gamma
                factor = factor / limiter
                state["scaled_grad_norm"] = full_norm / limiter
            else:
                state["scaled_grad_norm"] = full_norm.reshape(())
        factor = factor * math.sqrt(group["scale"])
        if factor.dtype != p.dtype:
            factor = factor.to(p.dtype)
        decay = group["lr"] * group["weight_decay"]
        # Update, then decay (the authors' order and rounding); on CPU both ops run on row slices so
        # the decay finds the slice in cache instead of streaming p through memory a second time.
        for pr, gr, fr in _row_slices(p, grad, factor, decay > 0):
            pr.addcmul_(gr, fr, value=-step_size)
            if decay > 0:
                pr.add_(pr, alpha=-decay)


def _row_slices(p: torch.Tensor, grad: torch.Tensor, factor: torch.Tensor, sliced: bool):
    """(p, grad, factor) whole, or in matching slices of about base.CPU_CHUNK elements (rows) on CPU
    when ``sliced``; ``factor`` is a column (one per row, sliced along) or a row/scalar (shared)."""
    rows = max(1, CPU_CHUNK // max(1, p.shape[1]))
    if not sliced or p.device.type != "cpu" or p.shape[0] <= rows or not (p.is_contiguous() and grad.is_contiguous()):
        return [(p, grad, factor)]
    per_row = factor.dim() == 2 and factor.shape[0] == p.shape[0] and p.shape[0] > 1
    return [(p[i:i + rows], grad[i:i + rows], factor[i:i + rows] if per_row else factor)
            for i in range(0, p.shape[0], rows)]
