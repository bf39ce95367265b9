"""transformers.Trainer glue for the offloaded optimizer (imports transformers, so kept apart)."""
from __future__ import annotations

from transformers import TrainerCallback


class OffloadTrainerCallback(TrainerCallback):
    """Hands Trainer's gradient accumulation and clipping to an OffloadOptimizer.

    Trainer clips the model's gradients between backward and ``optimizer.step()``; by then the eager
    CPU steps have used them. So at train begin the callback gives ``max_grad_norm`` to the
    optimizer (which clips with the same global norm before stepping) and sets Trainer's to 0 for the
    run, restoring it at train end. The pre-clip norm is in ``optimizer.last_grad_norm``.
    """

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self._saved_norm = None

    def _check(self, args) -> None:
        """Refuse a run the optimizer cannot serve (called first at train begin)."""

    def _set_accumulation(self, steps: int) -> None:
        self.optimizer.gradient_accumulation_steps = steps

    def _set_max_grad_norm(self, norm: float) -> None:
        self.optimizer.max_grad_norm = norm

    def on_train_begin(self, args, state, control, **kwargs):
        self._check(args)
        self._set_accumulation(int(args.gradient_accumulation_steps))
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            self._set_max_grad_norm(float(args.max_grad_norm))
            self._saved_norm = args.max_grad_norm
            args.max_grad_norm = 0.0
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._saved_norm is not None:
            args.max_grad_norm = self._saved_norm
            self._saved_norm = None
        return control


class HostParamsTrainerCallback(OffloadTrainerCallback):
    """For a HostParamsOptimizer (host-resident embedding/LM head): the host parameters may be
    stepped during backward, before Trainer would clip, so Trainer's clipping is handed to the
    optimizer for the run (restored at the end) and its accumulation count is copied there.
    Several processes are refused (the host steps run before DDP could all-reduce)."""

    def _check(self, args) -> None:
        if args.world_size > 1:
            from .host_optimizer import SINGLE_PROCESS

            raise ValueError(f"quant.embeddings: {SINGLE_PROCESS}")

    def _set_accumulation(self, steps: int) -> None:
        self.optimizer.host.gradient_accumulation_steps = steps

    def _set_max_grad_norm(self, norm: float) -> None:
        self.optimizer.set_max_grad_norm(norm)

    def on_log(self, args, state, control, logs=None, **kwargs):
        norm = self.optimizer.last_grad_norm
        if logs is not None and "loss" in logs and norm is not None and self.optimizer.mode == "global":
            logs["grad_norm"] = float(norm)
        return control
