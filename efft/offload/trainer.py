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

    def on_train_begin(self, args, state, control, **kwargs):
        opt = self.optimizer
        opt.gradient_accumulation_steps = int(args.gradient_accumulation_steps)
        if args.max_grad_norm is not None and args.max_grad_norm > 0:
            opt.max_grad_norm = float(args.max_grad_norm)
            self._saved_norm = args.max_grad_norm
            args.max_grad_norm = 0.0
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._saved_norm is not None:
            args.max_grad_norm = self._saved_norm
            self._saved_norm = None
        return control
