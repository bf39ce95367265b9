"""transformers.Trainer callbacks for efft optimizers: checks that Trainer and a layer-wise
optimizer agree on gradient accumulation, and puts the optimizer's own numbers in the logs."""
from __future__ import annotations

from transformers import TrainerCallback

from efft.integrations.ddp import check_trainer_world


class OptimizerLogCallback(TrainerCallback):
    """Adds ``skipped_nonfinite`` (parameter updates skipped for inf/nan gradients) to the logs."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and "loss" in logs:
            self._put(state, logs, "skipped_nonfinite", self.optimizer.skipped_nonfinite)

    @staticmethod
    def _put(state, logs: dict, key: str, value) -> None:
        """Into the logs the reporters see and into the history entry Trainer already appended."""
        logs[key] = value
        if state.log_history and state.log_history[-1].get("loss") == logs.get("loss"):
            state.log_history[-1][key] = value


class LayerwiseCallback(OptimizerLogCallback):
    """For a LayerwiseOptimizer: Trainer's own clipping sees no gradients (they are freed in
    backward), so the optimizer clips and this callback logs its ``grad_norm``."""

    def on_train_begin(self, args, state, control, **kw):
        check_trainer_world(args.world_size, self.optimizer.world_size, "layerwise")
        n = self.optimizer.gradient_accumulation_steps
        if args.gradient_accumulation_steps != n:
            raise ValueError(
                f"gradient_accumulation_steps: Trainer uses {args.gradient_accumulation_steps}, the layer-wise "
                f"optimizer was built for {n}; build it with the same value")
        if args.max_grad_norm and args.max_grad_norm > 0 and self.optimizer.max_grad_norm != args.max_grad_norm:
            raise ValueError(
                f"max_grad_norm: Trainer has {args.max_grad_norm} but the layer-wise optimizer clips at "
                f"{self.optimizer.max_grad_norm}; layer-wise clipping happens inside the optimizer: build it with "
                f"max_grad_norm={args.max_grad_norm} (Trainer's own clip then sees no gradients and does nothing)")

    def on_log(self, args, state, control, logs=None, **kw):
        super().on_log(args, state, control, logs=logs, **kw)
        if logs is not None and "loss" in logs:
            self._put(state, logs, "grad_norm", self.optimizer.last_grad_norm)
