"""FSDP2 for efft recipes: which features it can carry, and the sharding itself.

efft applies ``torch.distributed.fsdp.fully_shard`` itself (each decoder layer, then the root) instead
of going through ``TrainingArguments.fsdp``: accelerate 1.15 keeps its FSDP plugin only on
accelerators (on CPU it silently trains with DDP instead), and Trainer refuses an optimizer passed in
under its own FSDP. The sharded model is marked the way transformers marks a model sharded at load
time (``is_distributed_loading_by_transformers``), so Trainer neither wraps it in DDP nor shards it
again, and averages the gradients of trainable parameters that FSDP does not hold.

Packed quantized weights are buffers, not parameters: FSDP2 leaves them whole on every rank (the
quantized base is replicated, as under DDP) and shards the float parameters beside them (LoRA
matrices, PEQA scales, biases).

Checkpoints (:func:`fsdp_checkpoints`): transformers writes the gathered model (``save_only_model``: it
saves no optimizer for a model it did not shard); efft adds the optimizer state, sharded per rank with
``torch.distributed.checkpoint`` (each rank writes only its own shards, nothing is gathered, and DCP
can reshard on load), the scheduler and each rank's RNG state, and loads them back on resume.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

PROJECTED = ("galore", "apollo", "apollo_mini", "frugal")
# the optimizer's DCP folder in a checkpoint; Trainer tries to load any folder named like "optimizer*" or
# "pytorch_model_fsdp*" itself, so this name must contain neither
STATE_DIR = "efft_fsdp_state"
ALONE = ("FSDP shards over several processes: launch with torchrun --nproc_per_node N (or accelerate launch); "
         "this process is alone")


def fsdp_problems(recipe: Any) -> list[tuple[str, str]]:
    """What FSDP2 cannot carry in this recipe, as ``(path, reason)`` pairs (empty when all can run).

    Each reason was seen when the combination ran on 2 CPU processes: an error, or results that differ
    from one process on the same global batch (PaCA)."""
    p: list[tuple[str, str]] = []
    o, q, off, sp = recipe.optim, recipe.quant, recipe.offload, recipe.sparsity
    if o.name in PROJECTED:
        p.append(("optim.name", f"{o.name} projects each 2-D weight's gradient as a whole (SVD, channel norms or a block "
                                "choice over the full matrix); FSDP2 hands each rank a row shard of it, and gathering it "
                                "back would put every full gradient on every rank. Use DDP (torchrun without train.fsdp)"))
    if o.layerwise:
        p.append(("optim.layerwise", "layer-wise updates average each gradient across the ranks in its own hook, "
                                     "as DDP needs; under FSDP2 the hook gets a row shard already averaged by the "
                                     "reduce-scatter. Use DDP (layer-wise runs there) or optim.layerwise: false"))
    if o.name == "adamw8bit" or (o.name == "adamw" and o.state_bits == 8 and not o.layerwise):
        p.append(("optim.state_bits" if o.name == "adamw" else "optim.name",
                  "the 8-bit AdamW (bitsandbytes' here; efft's own 8-bit moments run in layer-wise mode only) "
                  "steps plain tensors, not FSDP2's sharded (DTensor) parameters. Use optim.state_bits: 32 under "
                  "FSDP, or DDP"))
    if q.trainable:
        p.append(("quant.trainable", "trainable int8 weights keep a 4-byte stride-0 carrier parameter (the codes are "
                                     "buffers), which FSDP2 cannot split into row shards. Use DDP"))
    if sp.partial.enabled:
        p.append(("sparsity.partial.enabled", "PaCA writes its trained columns into the gathered weight during the "
                                              "forward; FSDP2 gathers the weight again from its unchanged shards for "
                                              "backward, so input gradients would use stale columns. Use DDP"))
    if off.activations:
        p.append(("offload.activations", "activation offload tells weights from activations by their storage when the "
                                         "layers start; FSDP2 gathers each layer's weights into new storage during the "
                                         "forward, so they would be copied to host as activations. Use DDP"))
    return p


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks (``_no_split_modules`` classes of the transformers model inside)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    if not names:
        raise ValueError(f"shard_model: {type(model).__name__} names no decoder-layer classes (_no_split_modules); "
                         "FSDP needs a transformers model")
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root, over all ranks of the default process group.

    Call after the model is prepared (quantized, adapters, sparsity) and before the optimizer is built,
    so that the optimizer holds the sharded parameters."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model: no process group; launch with torchrun (or accelerate launch)")
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    # Trainer resumes by loading the checkpoint's whole tensors (model.load_state_dict, peft's load_adapter)
    model.register_load_state_dict_pre_hook(_whole_to_shards)
    if callable(getattr(model, "generate", None)):  # a peft wrapper's generate bypasses the root's forward
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")
    # transformers' mark for a model that owns its placement and gradient reduction (see module doc); a
    # peft wrapper reads it from the transformers model inside
    for m in model.modules():
        if hasattr(type(m), "is_distributed_loading_by_transformers"):
            m._is_distributed_loading_by_transformers = True
    return model


def _whole_to_shards(module, state_dict, prefix, *args) -> None:
    """Load-state-dict pre-hook of the sharded root: each whole tensor meant for a sharded (DTensor)
    parameter or buffer becomes this rank's shard of it, so loading a gathered checkpoint works (FSDP2
    alone refuses to copy a plain tensor into a DTensor). Every rank holds the whole tensor, so each
    takes its own slice (``src_data_rank=None``: no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    targets = {f"{prefix}{n}": t for n, t in [*module.named_parameters(), *module.named_buffers()]}
    for key, value in list(state_dict.items()):
        t = targets.get(key)
        if isinstance(t, DTensor) and isinstance(value, torch.Tensor) and not isinstance(value, DTensor):
            state_dict[key] = distribute_tensor(value.to(t.device), t.device_mesh, t.placements, src_data_rank=None)


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


@contextmanager
def full_parameters(model: nn.Module):
    """Inside: a sharded model's parameters are whole on every rank, and ``model.state_dict()`` gives
    whole tensors, so saving code (``save_pretrained``, peft's, PaCA's and PEQA's exports) runs
    unchanged on rank 0. Every rank must enter (it gathers). Not sharded: nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not units:
        yield model
        return
    for m in units:
        m.unshard()
    # FSDP2's state_dict pre-hook reshards first and hands out the shards; while inside, the model's
    # state_dict() is read from the gathered modules as they are now (so exports that swap modules,
    # like PEQA's, see their result), without gathering again
    model.state_dict = lambda *a, **k: _state_dict_of(model)
    try:
        yield model
    finally:
        del model.state_dict
        for m in units:
            m.reshard()


def _state_dict_of(module: nn.Module, prefix: str = "", out: dict | None = None) -> dict:
    """``module.state_dict()`` without its hooks: each module's own ``_save_to_state_dict`` (custom
    layouts such as QuantLinear's bitsandbytes keys included), children in registration order."""
    out = {} if out is None else out
    module._save_to_state_dict(out, prefix, False)
    for name, child in module._modules.items():
        if child is not None:
            _state_dict_of(child, f"{prefix}{name}.", out)
    return out


def _inner(optimizer):
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (what callbacks are given)."""
    return getattr(optimizer, "optimizer", optimizer)


def _rng_states() -> dict:
    """This process's RNG states in the layout of Trainer's ``rng_state_{rank}.pth`` (Trainer reads them
    back itself on resume, at the point of the data where it saved them)."""
    import random

    import numpy as np

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.random.get_rng_state_all()
    return states


def save_training_state(ckpt: Path, model: nn.Module, optimizer, lr_scheduler, args) -> None:
    """What transformers leaves out of an FSDP checkpoint (every rank calls it; it returns when all are
    done): the optimizer state, one DCP file of shards per rank; the scheduler (rank 0); each rank's RNG."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    ckpt.mkdir(parents=True, exist_ok=True)
    dcp.save({"optimizer": get_optimizer_state_dict(model, _inner(optimizer))}, checkpoint_id=str(ckpt / STATE_DIR))
    if args.should_save and lr_scheduler is not None:
        torch.save(lr_scheduler.state_dict(), ckpt / "scheduler.pt")
    torch.save(_rng_states(), ckpt / f"rng_state_{args.process_index}.pth")
    dist.barrier()


def load_training_state(ckpt: Path, model: nn.Module, optimizer, lr_scheduler) -> None:
    """The inverse of :func:`save_training_state` for the sharded model and its optimizer (every rank).
    The RNG files are Trainer's to read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    opt = _inner(optimizer)
    # an empty optimizer is given its state first (torch steps it once with lr 0 and zero gradients), so
    # that DCP has shards of the right shapes to read into
    sd = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=str(ckpt / STATE_DIR))
    set_optimizer_state_dict(model, opt, sd["optimizer"])
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))


def resumed_checkpoint(args, state, given: str | None) -> Path:
    """The checkpoint a resumed Trainer started from: the one given to ``train()`` when efft knows it
    (``EfftPlugin.last_checkpoint``, ``efft train``), else ``output_dir/checkpoint-<step>``; it must be
    at the resumed step and hold the FSDP state."""
    import json

    step = state.global_step
    for c in [Path(given)] if given else [Path(args.output_dir) / f"checkpoint-{step}"]:
        ts = c / "trainer_state.json"
        if ts.is_file() and json.loads(ts.read_text()).get("global_step") == step:
            if not (c / STATE_DIR / ".metadata").is_file():
                raise RuntimeError(f"resuming an FSDP run from {c}: it holds no optimizer state ({STATE_DIR}/); it was "
                                   "written by a run whose checkpoints held the model only. Start anew, or resume "
                                   "from a checkpoint written with this efft")
            return c
    raise RuntimeError(f"resuming an FSDP run at step {step}: cannot tell which checkpoint Trainer loaded (looked at "
                       f"{given or Path(args.output_dir) / f'checkpoint-{step}'}); pass "
                       "plugin.last_checkpoint(output_dir) to trainer.train(resume_from_checkpoint=...)")


def fsdp_checkpoints(resume_from: Callable[[], str | None] = lambda: None):
    """The Trainer callback that makes FSDP checkpoints resumable. Around each save the parameters are
    whole (transformers' ``save_pretrained`` writes the tensors it is given; DTensor shards cannot be
    written); then every rank writes its training state (:func:`save_training_state`), before the
    completion marker, which is why it must come before :class:`EfftCallback` in Trainer's callbacks.
    At train begin of a resumed run it loads the optimizer and scheduler state back (Trainer has
    loaded the gathered model weights, through :func:`_whole_to_shards`).

    ``resume_from()`` gives the checkpoint passed to ``trainer.train`` when efft knows it."""
    from transformers import TrainerCallback

    class FsdpCheckpoints(TrainerCallback):
        def __init__(self):
            self._ctx = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            if state.global_step > 0:  # Trainer restored its state from a checkpoint
                if args.fp16:
                    from efft.config import FSDP_FP16_RESUME

                    raise RuntimeError(f"resuming with fp16 under FSDP: {FSDP_FP16_RESUME}")
                load_training_state(resumed_checkpoint(args, state, resume_from()), model, optimizer, lr_scheduler)

        def on_step_end(self, args, state, control, model=None, **kw):
            if control.should_save and model is not None and self._ctx is None:
                self._ctx = full_parameters(model)
                self._ctx.__enter__()

        def on_save(self, args, state, control, model=None, optimizer=None, lr_scheduler=None, **kw):
            if self._ctx is not None:
                ctx, self._ctx = self._ctx, None
                ctx.__exit__(None, None, None)  # the optimizer's state dict maps the sharded parameters
            save_training_state(Path(args.output_dir) / f"checkpoint-{state.global_step}", model, optimizer,
                                lr_scheduler, args)

    return FsdpCheckpoints()
