"""Worker of test_layerwise_ddp.py, launched by torchrun (2 processes, gloo): layer-wise optimizers
under DDP through a plain loop and through transformers.Trainer with the EfftPlugin. Each case
writes, per rank, the losses, the final parameters and what DDP's reducer holds; the test compares
them with one process on the same global batch (``run_plain`` / ``run_trainer`` with world 1).

    python -m torch.distributed.run --nproc_per_node 2 -m tests.optim.layerwise_ddp_worker OUT_DIR
"""
from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist

STEPS, ACCUM, CLIP, MICRO = 4, 2, 0.3, 4  # MICRO: rows of one global micro-batch (split across ranks)
PLAIN = ["galore", "apollo_mini", "frugal"]
TRAINER = ["galore", "apollo_mini"]
INT8_STEPS, INT8_OPTIM = 2, "galore"  # stochastic-rounding flips compound step after step; compare early


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def local_rows(mb: dict) -> dict:
    rank, world = rank_world()
    n = MICRO // world
    return {k: v[rank * n:(rank + 1) * n] for k, v in mb.items()}


def watch_gradients(params: list) -> dict:
    """Peak of full-size gradients alive among ``params``, seen from each gradient's arrival (a tensor
    hook registered before the optimizer's: the arriving gradient plus every ``.grad`` still set)."""
    peak = {"count": 0, "bytes": 0}

    def probe(grad):
        alive = [p.grad for p in params if p.grad is not None] + [grad]
        peak["count"] = max(peak["count"], len(alive))
        peak["bytes"] = max(peak["bytes"], sum(g.numel() * g.element_size() for g in alive))

    for p in params:
        p.register_hook(probe)
    return peak


def reducer_bytes(ddp) -> int:
    """Bytes of the parameters DDP's reducer all-reduces (its buckets hold a copy of each gradient)."""
    return int(ddp._get_ddp_logging_data()["total_parameter_size_bytes"])


@contextlib.contextmanager
def count_all_reduces(sizes: list):
    """Appends the element count of every asynchronous all-reduce (the layer-wise hooks' ones)."""
    real = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        if kwargs.get("async_op"):
            sizes.append(tensor.numel())
        return real(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        yield
    finally:
        dist.all_reduce = real


def run_plain(name: str, watch: bool = False, accum: int = ACCUM, steps: int = STEPS, int8: bool = False) -> dict:
    """The plain loop: DDP around the model when several processes run (layer-wise params ignored).
    ``watch``: record the peak of full-size gradients alive (run with ``accum=1``: with accumulation,
    gradients that cannot be projected are kept across micro-batches by design). ``int8``: trainable
    int8 weights (the factory's layer-wise optimizer drives their grad carriers)."""
    from .test_layerwise import build, micro_batches
    from .helpers import model

    if int8:
        from tests.quantized_ft.helpers import int8_model, int8_state

        m = int8_model(hidden=32)
    else:
        m = model()
    peak = watch_gradients([p for p in m.parameters() if p.dim() == 2]) if watch else None  # before the optimizer's hooks
    opt = build(m, name, True, accum=accum, clip=CLIP)
    fwd, out = m, {}
    if rank_world()[1] > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(m)
        out["reducer_bytes"] = reducer_bytes(fwd)
    losses, norms, sent = [], [], []  # sent: elements all-reduced by the hooks, per step
    for s in range(steps):
        sizes = []
        with count_all_reduces(sizes):
            for i, mb in enumerate(micro_batches(s, micro=MICRO, n=accum)):
                sync = fwd.no_sync() if fwd is not m and i < accum - 1 else contextlib.nullcontext()
                with sync:
                    loss = fwd(**local_rows(mb)).loss
                    (loss / accum).backward()
                losses.append(loss.item())
            opt.step()
        opt.zero_grad()
        norms.append(opt.last_grad_norm)
        sent.append(sum(sizes))
    out.update(losses=losses, norms=norms, sent=sent, params=[p.detach().clone() for p in m.parameters() if 0 not in p.stride()])
    if int8:
        out["int8"] = int8_state(m)
    if peak is not None:
        out["peak"] = dict(peak)
    return out


def _first_backward_error(m, opt) -> str:
    """The RuntimeError one backward of ``m`` on this rank's rows raises ("" if none); unhooks ``opt``."""
    from .test_layerwise import micro_batches

    try:
        m(**local_rows(micro_batches(0, micro=MICRO, n=1)[0])).loss.backward()
    except RuntimeError as e:
        return str(e)
    finally:
        opt.remove_hooks()
    return ""


def unwrapped_error() -> str:
    """A model left unwrapped under several processes: the 1-D gradients are not reduced by anyone."""
    from .helpers import model
    from .test_layerwise import build

    m = model()
    return _first_backward_error(m, build(m, "galore", True, accum=1, clip=CLIP))


def not_excluded_error() -> str:
    """Int8LayerwiseOptimizer built without keep_out_of_ddp(model): refused at its first all-reduce."""
    from efft.quant.trainable import Int8LayerwiseOptimizer

    from .helpers import model

    m = model()
    return _first_backward_error(m, Int8LayerwiseOptimizer(torch.optim.AdamW([p for p in m.parameters() if p.requires_grad])))


def run_int8_driver(steps: int = INT8_STEPS) -> dict:
    """efft.quant's own Int8LayerwiseOptimizer (per-parameter clipping) around GaLore, int8 weights."""
    from efft.optim import GaLoreAdamW
    from efft.quant.trainable import Int8LayerwiseOptimizer
    from tests.quantized_ft.helpers import int8_model, int8_state

    from .test_layerwise import micro_batches

    m = int8_model(hidden=32)
    low = [p for p in m.parameters() if p.requires_grad and p.dim() == 2]
    rest = [p for p in m.parameters() if p.requires_grad and p.dim() < 2]
    inner = GaLoreAdamW([{"params": rest}, {"params": low, "rank": 4, "update_proj_gap": 3}], lr=2e-3, weight_decay=0.01)
    opt = Int8LayerwiseOptimizer(inner, gradient_accumulation_steps=ACCUM, max_grad_norm=CLIP)
    fwd, out = m, {}
    if rank_world()[1] > 1:
        opt.keep_out_of_ddp(m)
        fwd = torch.nn.parallel.DistributedDataParallel(m)
        out["reducer_bytes"] = reducer_bytes(fwd)
    losses = []
    for s in range(steps):
        for i, mb in enumerate(micro_batches(s, micro=MICRO, n=ACCUM)):
            with fwd.no_sync() if fwd is not m and i < ACCUM - 1 else contextlib.nullcontext():
                loss = fwd(**local_rows(mb)).loss
                (loss / ACCUM).backward()
            losses.append(loss.item())
        opt.step()
        opt.zero_grad()
    return {**out, "losses": losses, "int8": int8_state(m),
            "params": [p.detach().clone() for p in m.parameters() if 0 not in p.stride()]}


def run_trainer(name: str, out_dir: str) -> dict:
    """transformers.Trainer with the EfftPlugin (Trainer/accelerate wrap the model in DDP)."""
    from transformers import Trainer

    from efft import EfftPlugin

    from .helpers import model
    from .test_layerwise import micro_batches

    rows = [{k: v[i] for k, v in mb.items()} for s in range(STEPS) for mb in micro_batches(s, micro=MICRO, n=ACCUM)
            for i in range(MICRO)]
    _, world = rank_world()
    plugin = EfftPlugin({"optim": {"name": name, "rank": 4, "update_proj_gap": 3, "layerwise": True}})
    m = plugin.prepare_model(model())
    args = plugin.training_arguments(
        output_dir=out_dir, use_cpu=True, report_to=[], max_steps=STEPS, per_device_train_batch_size=MICRO // world,
        gradient_accumulation_steps=ACCUM, learning_rate=2e-3, lr_scheduler_type="linear", warmup_steps=2,
        max_grad_norm=CLIP, weight_decay=0.01, logging_steps=1, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0)
    trainer = Trainer(model=m, args=args, train_dataset=rows, **plugin.trainer_kwargs(m, args))
    trainer.train()
    out = {"losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
           "norms": [h["grad_norm"] for h in trainer.state.log_history if "loss" in h],
           "params": [p.detach().clone() for p in m.parameters()]}
    if world > 1:
        wrapped = trainer.model_wrapped
        assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel), type(wrapped)
        out["reducer_bytes"] = reducer_bytes(wrapped)
    return out


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, _ = rank_world()
    try:
        for name in PLAIN:
            torch.save(run_plain(name), os.path.join(out_dir, f"plain-{name}-{rank}.pt"))
        torch.save(run_plain(INT8_OPTIM, int8=True, steps=INT8_STEPS), os.path.join(out_dir, f"int8-{INT8_OPTIM}-{rank}.pt"))
        torch.save(run_plain("galore", watch=True, accum=1, steps=2), os.path.join(out_dir, f"peak-galore-{rank}.pt"))
        torch.save({"error": unwrapped_error(), "not_excluded": not_excluded_error()},
                   os.path.join(out_dir, f"unwrapped-{rank}.pt"))
        torch.save(run_int8_driver(), os.path.join(out_dir, f"int8-driver-{rank}.pt"))
        for name in TRAINER:
            torch.save(run_trainer(name, os.path.join(out_dir, f"trainer-{name}")),
                       os.path.join(out_dir, f"trainer-{name}-{rank}.pt"))
        dist.barrier()  # no rank tears gloo down while the other still talks to it (an abort in gloo's threads)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
