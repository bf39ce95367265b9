"""FRUGAL (Zmushko et al. 2024): split each 2-D gradient into a state-full subspace updated by
Adam and a state-free remainder updated by signSGD, so Adam state exists only for the subspace.

Subspaces (``projector``): ``block`` — a seeded random set of ``density`` x rows (or columns,
whichever dimension is larger) of the matrix, FRUGAL's coordinate choice; ``svd`` — the top-r
singular subspace; ``random`` — an orthonormalised seeded Gaussian basis. Every
``update_proj_gap`` steps the subspace changes and the Adam state restarts from zero (bias
correction included). The signSGD part uses lr x ``state_free_lr_scale``; decoupled weight decay
is applied before the update.
"""
from __future__ import annotations

import torch

from . import moments
from .base import ProjectedOptimizer
from .projectors import (add_back_projected_, block_indices, choose_side, mix_seed, next_seed, orthonormal_random_basis,
                         project, refresh_due, svd_basis)

PROJECTORS = ("block", "svd", "random")


class FRUGAL(ProjectedOptimizer):
    """FRUGAL with AdamW as the state-full part; groups without ``rank`` are plain AdamW."""

    decay_before_update = True
    eps_after_bias_correction = True
    lowrank_defaults = {"update_proj_gap": 200, "scale": 1.0, "proj_type": "std", "projector": "block",
                        "density": 0.25, "state_free_lr_scale": 0.1}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, correct_bias=True, *,
                 projector: str = "block", density: float = 0.25, state_free_lr_scale: float = 0.1, seed: int = 0,
                 stagger_refresh: bool = False, state_bits: int = 32):
        self.lowrank_defaults = {**type(self).lowrank_defaults, "projector": projector, "density": density,
                                 "state_free_lr_scale": state_free_lr_scale}
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, seed=seed,
                         stagger_refresh=stagger_refresh, state_bits=state_bits)

    def _check_lowrank_group(self, group):
        super()._check_lowrank_group(group)
        if group["projector"] not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS} for FRUGAL, got {group['projector']!r}")
        if not (0.0 < group["density"] <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {group['density']!r}")
        if not group["state_free_lr_scale"] >= 0.0:
            raise ValueError(f"state_free_lr_scale must be >= 0, got {group['state_free_lr_scale']!r}")

    def needs_full_grad(self, p: torch.Tensor) -> bool:
        return True  # sign() of the remainder is not linear in the gradient

    @staticmethod
    def block_dim(shape) -> int:
        """The dimension whose rows/columns are chosen: the larger one (finer blocks)."""
        return 0 if shape[0] >= shape[1] else 1

    @staticmethod
    def block_count(shape, density: float) -> int:
        d = shape[FRUGAL.block_dim(shape)]
        return max(1, min(d, round(density * d)))

    def _subspace(self, p, grad, group, state):
        """Indices (block) or orthonormal basis (svd/random) of the current state-full subspace."""
        shape = tuple(p.shape)
        step = state.get("step", 0)
        has = "proj_seed" in state or "basis" in state
        if refresh_due(step, group["update_proj_gap"], self._offset.get(p, 0), has):
            if has:
                moments.reset(state)
                state["adam_step"] = 0
            if group["projector"] == "svd":
                state["basis"] = svd_basis(grad, self._rank(p, group), choose_side(shape, group["proj_type"]),
                                           seed=mix_seed(self.seed, self._index[p], step)).to(grad.dtype)
            else:
                state["proj_seed"] = next_seed(state["proj_seed"]) if has else mix_seed(self.seed, self._index[p])
        if group["projector"] == "svd":
            return state["basis"]
        if group["projector"] == "random":
            side = choose_side(shape, group["proj_type"])
            return orthonormal_random_basis(shape, self._rank(p, group), side, state["proj_seed"], p.device).to(grad.dtype)
        dim = self.block_dim(shape)
        return block_indices(shape[dim], self.block_count(shape, group["density"]), state["proj_seed"], p.device)

    @torch.no_grad()
    def current_subspace(self, p: torch.Tensor) -> torch.Tensor:
        """The state-full subspace last used for ``p``: row/column indices (block) or basis."""
        group, state = self._group_of[p], self.state[p]
        if group["projector"] == "svd":
            return state["basis"]
        shape = tuple(p.shape)
        if group["projector"] == "random":
            side = choose_side(shape, group["proj_type"])
            return orthonormal_random_basis(shape, self._rank(p, group), side, state["proj_seed"], p.device)
        dim = self.block_dim(shape)
        return block_indices(shape[dim], self.block_count(shape, group["density"]), state["proj_seed"], p.device)

    def _update_lowrank(self, p, grad, group, state, clip):
        if not torch.isfinite(grad.sum()):  # a sum is inf/nan if any element is
            return self._skip()
        sub = self._subspace(p, grad, group, state)
        lr, wd = group["lr"], group["weight_decay"]
        free_lr = lr * group["state_free_lr_scale"]
        if group["projector"] == "block":
            dim = self.block_dim(p.shape)
            r = grad.index_select(dim, sub)
            free = grad.sign()
            free.index_fill_(dim, sub, 0.0)  # sign of the remainder: zero inside the block
        else:
            side = choose_side(tuple(p.shape), group["proj_type"])
            r = project(grad, sub, side)
            free = grad - (sub @ r if side == "left" else r @ sub)
            free.sign_()
        if clip != 1.0:
            r = r * clip  # sign() is unchanged by a positive clip factor
        state["step"] = state.get("step", 0) + 1
        direction, step_size = self._adam_direction(state, r, group)
        if wd > 0:
            p.mul_(1.0 - lr * wd)
        p.add_(free.to(p.dtype), alpha=-free_lr)
        alpha = -step_size * group["scale"]
        if group["projector"] == "block":
            p.index_add_(self.block_dim(p.shape), sub, direction.to(p.dtype), alpha=alpha)
        else:
            add_back_projected_(p, direction, sub, choose_side(tuple(p.shape), group["proj_type"]), alpha=alpha)

