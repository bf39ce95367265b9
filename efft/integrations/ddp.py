"""DDP glue for optimizers that update inside backward (efft.optim's ``LayerwiseOptimizer`` and
efft.quant's ``Int8LayerwiseOptimizer``): both keep their parameters out of DDP's reducer and
average the gradients themselves, in the hook that consumes them.

Why it looks like this:

* DDP's reducer copies every gradient it holds into buckets and all-reduces them after the hooks
  that would consume them; the consumed parameters are named in the model's
  ``_ddp_params_and_buffers_to_ignore`` (:func:`ignore_in_ddp`; DDP reads it when it wraps the
  model, also when Trainer/accelerate wrap it) so the reducer never sees them.
* DDP refuses a model in which it would reduce no parameter, so parameters with fewer than two
  dimensions (norms, biases: tiny, and DDP all-reduces them in buckets) stay with it
  (:func:`split_for_ddp`); the optimizer updates them at the end of the backward that completes a
  step, after DDP's own end-of-backward reduction (:class:`BackwardAllReduce`).
* One all-reduce is in flight at a time: it is launched asynchronously in a parameter's hook and
  waited for when the next gradient arrives (or at the end of backward), so communication
  overlaps the next gradient's computation for the price of one more gradient alive.
* The collectives match across ranks because every rank differentiates the same graph: the
  autograd engine runs one backward's nodes in an order fixed by the forward (nodes created later
  first), so the gradient hooks fire in the same order on every rank. Graphs that skip a parameter
  on some ranks only (data-dependent routing) are not supported.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def queue_callback(fn: Callable[[], None]) -> None:
    """Run ``fn`` when the current backward ends (callbacks queued by callbacks run after the rest)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def split_for_ddp(params: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters updated in the optimizer's hooks, parameters left to DDP): DDP keeps those with
    fewer than two dimensions or, when there are none, the smallest one (it needs at least one)."""
    small = [p for p in params if p.dim() < 2]
    if not small and params:
        small = [min(params, key=lambda p: p.numel())]
    kept = {id(p) for p in small}
    return [p for p in params if id(p) not in kept], small


def broadcast_from_rank0(params: list[torch.Tensor]) -> None:
    """Rank 0's values, as DDP does for the parameters it holds. Stride-0 tensors (int8 grad
    carriers: the weight is in buffers, which DDP broadcasts) hold no values of their own."""
    with torch.no_grad():
        for p in params:
            if 0 not in p.stride():
                dist.broadcast(p.data, src=0)


def ignore_in_ddp(model: torch.nn.Module, params: list[torch.Tensor], who: str) -> list[str]:
    """Add ``params``' names to ``model``'s DDP ignore list (call before wrapping); returns them."""
    mine = {id(p) for p in params}
    names = [n for n, p in model.named_parameters() if id(p) in mine]
    if len(names) != len(mine):
        raise ValueError(f"{who}.keep_out_of_ddp: {len(mine) - len(names)} of the optimizer's layer-wise parameters "
                         "are not parameters of this model; pass the model the optimizer was built over")
    old = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, old + [n for n in names if n not in old])
    return names


def hook_reduction(params: list[torch.Tensor], apply: Callable[[torch.Tensor, torch.Tensor, Any], None],
                   update_ddp: Callable[[torch.Tensor], None], who: str):
    """For an optimizer built now that consumes ``params``' gradients in their hooks: (the parameters
    it updates in its hooks, those left to DDP, the :class:`BackwardAllReduce` averaging the former
    or None in one process). Under several processes rank 0's values of the former are broadcast."""
    world = world_size()
    if world == 1:
        return params, [], None
    mine, left = split_for_ddp(params)
    reducer = BackwardAllReduce(world, mine, left, apply, update_ddp, who)
    broadcast_from_rank0(mine)
    return mine, left, reducer


def require_one_process(who: str) -> None:
    """An optimizer built without a reducer (one process) refuses to run under several."""
    if world_size() != 1:
        raise RuntimeError(f"{who}: the optimizer was built for one process, training runs with {world_size()}; "
                           "build it after torch.distributed.init_process_group")


def check_trainer_world(trainer_world: int, built_for: int, who: str) -> None:
    """At train begin: the optimizer was built for the processes Trainer runs (else refuse)."""
    if trainer_world != built_for:
        raise ValueError(f"{who}: Trainer runs {trainer_world} process(es), the optimizer was built for {built_for}; "
                         "build it after the process group exists (after TrainingArguments)")


class BackwardAllReduce:
    """Averages gradients across ranks for an optimizer that consumes them inside backward.

    ``apply(p, grad, tag)`` consumes an averaged gradient; ``update_ddp(p)`` consumes the gradient
    DDP averaged for a parameter left to it. The owner calls :meth:`arrived` when any of its
    gradients arrives (before consuming anything: it finishes the update in flight) and
    :meth:`launch` with the accumulated gradient on a step's last micro-batch."""

    def __init__(self, world: int, params: list[torch.Tensor], ddp_params: list[torch.Tensor],
                 apply: Callable[[torch.Tensor, torch.Tensor, Any], None], update_ddp: Callable[[torch.Tensor], None],
                 who: str):
        self.world = world
        self.params = params  # averaged here; DDP must ignore them
        self.ddp_params = ddp_params
        self.apply = apply
        self.update_ddp = update_ddp
        self.who = who
        self._pending: tuple | None = None  # (param, gradient being all-reduced, tag, work)
        self._queued = False
        self._completed_step = False  # this backward finished a step for some parameter
        self._checked = False
        self._checked_ignored = False

    def arrived(self, grad: torch.Tensor | None = None) -> None:
        """A gradient arrived: finish the update waiting for its all-reduce (usable as a tensor hook)."""
        if not self._queued:
            self._queued = True
            queue_callback(self._end_of_backward)  # before the callbacks of any later hook of this backward
        self.complete()

    @torch.no_grad()
    def launch(self, p: torch.Tensor, grad: torch.Tensor, tag: Any = None) -> None:
        """Average ``grad`` (in place) across ranks, asynchronously; ``apply`` runs when it is done."""
        if world_size() != self.world:
            raise RuntimeError(f"{self.who}: the optimizer was built for {self.world} processes, training runs with "
                               f"{world_size()}; build it after torch.distributed.init_process_group")
        if not self._checked_ignored:
            held = sum(not getattr(q, "_ddp_ignored", False) for q in self.params)
            if held:
                raise RuntimeError(f"{self.who}: {held} of its parameters are not excluded from DDP, whose reducer would "
                                   "all-reduce their gradients a second time; call keep_out_of_ddp(model) before "
                                   "wrapping the model in DistributedDataParallel (or passing it to Trainer)")
            self._checked_ignored = True
        self._completed_step = True
        grad.div_(self.world)
        work = dist.all_reduce(grad, async_op=True)
        self.complete()
        self._pending = (p, grad, tag, work)

    @torch.no_grad()
    def complete(self) -> None:
        if self._pending is not None:
            p, grad, tag, work = self._pending
            self._pending = None
            work.wait()
            self.apply(p, grad, tag)

    def end_step(self) -> None:
        """Close the optimizer step (its ``step()``, which may have launched reductions outside
        backward): finish the update in flight, then consume the gradients DDP reduced for the
        parameters left to it (a short last cycle: DDP reduced them on its last micro-batch)."""
        self.complete()
        self.update_ddp_params()
        self._completed_step = False

    def _end_of_backward(self) -> None:
        self._queued = False
        self.complete()
        if self._completed_step and self.ddp_params:
            queue_callback(self.update_ddp_params)  # runs after DDP's own end-of-backward reduction
        self._completed_step = False

    @torch.no_grad()
    def update_ddp_params(self) -> None:
        """Consume the gradients DDP reduced (end of backward; ``step()`` after a short cycle)."""
        have = [p for p in self.ddp_params if p.grad is not None]
        if have and not self._checked:
            self._check_reduced(have)
        for p in have:
            self.update_ddp(p)

    def _check_reduced(self, params: list) -> None:
        """Once: the gradients left to DDP must be equal on every rank (else the model was not wrapped)."""
        total = sum(p.grad.double().sum() for p in params)
        both = torch.stack([total, -total])
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        if both[0].item() != -both[1].item():
            raise RuntimeError(f"{self.who}: the gradients of the parameters left to DDP (norms, biases: {len(params)} "
                               "tensors) differ between ranks; wrap the model in "
                               "torch.nn.parallel.DistributedDataParallel after building the optimizer")
        self._checked = True
