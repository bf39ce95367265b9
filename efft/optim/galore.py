"""GaLore (Zhao et al. 2024): Adam in the top-r singular subspace of each 2-D gradient.

The basis is refreshed every ``update_proj_gap`` steps by an exact fp32 SVD (``projector="svd"``,
the paper's choice) or by a randomized SVD warm-started from the previous basis
(``projector="rsvd"``: a few matmuls instead of a full SVD). Moments are kept across refreshes, the
update is back-projected and scaled by ``scale``, and weight decay follows the update, as in the
authors' code; both go into p with one ``addmm_`` (no full-size temporary, one pass over p). With ``stagger_refresh`` the refreshes of different matrices fall on different steps.
"""
from __future__ import annotations

import torch

from .base import ProjectedOptimizer
from .projectors import add_back_projected_, choose_side, mix_seed, project, randomized_svd_basis, refresh_due, svd_basis

PROJECTORS = ("svd", "rsvd")


class GaLoreAdamW(ProjectedOptimizer):
    """AdamW with GaLore projection for groups that carry ``rank``; galore-torch's group keys work."""

    lowrank_defaults = {"update_proj_gap": 200, "scale": 0.25, "proj_type": "std", "projector": "svd"}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, correct_bias=True, *,
                 projector: str = "svd", seed: int = 0, stagger_refresh: bool = False, state_bits: int = 32):
        self.lowrank_defaults = {**type(self).lowrank_defaults, "projector": projector}
        super().__init__(params, lr, betas, eps, weight_decay, correct_bias, seed=seed,
                         stagger_refresh=stagger_refresh, state_bits=state_bits)

    def _check_lowrank_group(self, group):
        super()._check_lowrank_group(group)
        if group["projector"] not in PROJECTORS:
            raise ValueError(f"projector must be one of {PROJECTORS} for GaLore, got {group['projector']!r}")

    # Layer-wise mode accumulates micro-batch gradients in the projected space (exact: P^T is
    # linear); on a refresh step the full gradient is needed for the new basis.
    def needs_full_grad(self, p: torch.Tensor) -> bool:
        if not self.is_lowrank(p):
            return True
        group, state = self._group_of[p], self.state[p]
        return refresh_due(state.get("step", 0), group["update_proj_gap"], self._offset.get(p, 0), "basis" in state)

    @torch.no_grad()
    def project_grad(self, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """P^T G with the current basis (only when ``needs_full_grad(p)`` is False)."""
        state = self.state[p]
        return project(grad.to(state["basis"].dtype), state["basis"], state_side(p, self._group_of[p]))

    def _refresh(self, p, grad, group, state) -> None:
        side = state_side(p, group)
        rank = self._rank(p, group)
        n = state.get("refreshes", 0)
        seed = mix_seed(self.seed, self._index[p], n)
        if group["projector"] == "rsvd":
            basis = randomized_svd_basis(grad, rank, side, previous=state.get("basis"), seed=seed)
        else:
            basis = svd_basis(grad, rank, side, seed=seed)
        state["basis"] = basis.to(p.dtype)
        state["refreshes"] = n + 1

    def _update_lowrank(self, p, grad, group, state, clip):
        step = state.get("step", 0)
        if refresh_due(step, group["update_proj_gap"], self._offset.get(p, 0), "basis" in state):
            if not torch.isfinite(grad.sum()):
                return self._skip()
            self._refresh(p, grad, group, state)
        self.apply_projected(p, project(grad.to(state["basis"].dtype), state["basis"], state_side(p, group)), clip)

    @torch.no_grad()
    def apply_projected(self, p: torch.Tensor, r: torch.Tensor, clip: float = 1.0) -> None:
        """The GaLore update from a projected gradient R (full-gradient path and layer-wise path)."""
        group, state = self._group_of[p], self.state[p]
        if not torch.isfinite(r.sum()):  # one reduction; inf/nan in G reach R through the GEMM
            return self._skip()
        if clip != 1.0:
            r = r * clip
        state["step"] = state.get("step", 0) + 1
        direction, step_size = self._adam_direction(state, r, group)
        # Weight decay follows the update (authors' order), so it folds into the GEMM's beta.
        decay = 1.0 - group["lr"] * group["weight_decay"]
        add_back_projected_(p, direction, state["basis"], state_side(p, group),
                            alpha=-step_size * group["scale"] * decay, beta=decay)


def state_side(p: torch.Tensor, group: dict) -> str:
    return choose_side(tuple(p.shape), group["proj_type"])
