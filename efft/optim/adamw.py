"""AdamW with torch.optim.AdamW's exact conventions (eps after bias correction, weight decay
before the update), built on the shared base so it can step one parameter at a time: layer-wise
mode needs that, and torch's AdamW cannot do it without re-entering ``step``."""
from __future__ import annotations

from .base import ProjectedOptimizer


class AdamW(ProjectedOptimizer):
    """Plain AdamW; every group is full-rank (``rank`` keys are refused)."""

    decay_before_update = True
    eps_after_bias_correction = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, *, state_bits: int = 32):
        super().__init__(params, lr, betas, eps, weight_decay, True, state_bits=state_bits)

    def _check_lowrank_group(self, group):
        raise ValueError("rank: efft.optim.adamw.AdamW has no low-rank groups (use GaLoreAdamW, APOLLOAdamW or FRUGAL)")
