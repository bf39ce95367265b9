"""Host-resident input embedding and LM head: their float32 weights live in host memory (pinned when
CUDA is present) and the accelerator never holds them whole.

* :class:`HostEmbedding`: the token ids go to the host, the rows they name are gathered there and
  copied to the device (asynchronously on CUDA, through a pinned staging buffer). Backward copies
  the rows' gradient to the host and accumulates it into a host gradient with ``index_add_``
  (rows of ``padding_idx`` get none, as in ``nn.Embedding``).
* :class:`HostLMHead`: logits are computed chunk by chunk over the vocabulary; each chunk of the
  host weight is copied to the device, the next one prefetched on the side stream while this one
  is multiplied, so at most two chunks sit on the device. Backward streams the chunks again: dX is
  accumulated on the device, each chunk's dW is copied back into the host gradient.
* The gradient of each host weight is one float32 host buffer from the residency's pool
  (:class:`HostGrad`: allocated at the first backward, counted and bounded by the pool, reused by
  every step and released by :meth:`HostResidency.release_grads`). The Functions write into it
  directly and hand autograd an empty sparse gradient, so autograd allocates nothing of the
  vocabulary's size. Tied weights (SmolLM2) are one host Parameter used by both modules, with one
  buffer.

Both modules keep their weight on the host through ``model.to(device)`` / ``.to(dtype)``: a cast
changes the dtype they compute and return in (``compute_dtype``), never the float32 master weight.
The update of these weights runs on the CPU (``efft.offload.host_optimizer``). On a CPU-only
machine host and device are the same memory and the same code paths run, copies synchronous.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .pinned import HostBufferPool, register_host_bytes_provider
from .transfer import Mover, wait_cpu

__all__ = ["HostEmbedding", "HostLMHead", "HostResidency", "HostGrad", "make_host_resident", "host_resident_parameters",
           "is_host_resident", "zero_host_grad"]


def is_host_resident(p: torch.Tensor) -> bool:
    return bool(getattr(p, "_efft_host_resident", False))


def host_resident_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable host-resident parameters of ``model`` (each once, tied ones included once)."""
    seen, out = set(), []
    for p in model.parameters():
        if is_host_resident(p) and p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class HostResidency:
    """What the host-resident modules of one model share: the host buffer pool, one Mover per device,
    and the record of every weight transfer (``stats``) that tests and reports read."""

    def __init__(self, pin_memory: bool = True, max_pinned_bytes: int = 8 << 30):
        self.pool = HostBufferPool(pin_memory=pin_memory, max_pinned_bytes=max_pinned_bytes, name="host embeddings")
        self._movers: dict[torch.device, Mover] = {}
        self._lock = threading.Lock()
        self.weights: list[torch.Tensor] = []
        self.reset_stats()
        register_host_bytes_provider(self.host_bytes)

    def reset_stats(self) -> None:
        #: (phase, first row, rows, bytes) for each weight chunk copied to the device
        self.chunk_transfers: list[tuple[str, int, int, int]] = []
        #: largest number of LM-head weight rows resident on the device at one moment
        self.peak_head_rows_on_device = 0
        self.embedding_rows_to_device = 0
        self.embedding_rows_to_host = 0
        self.head_grad_bytes_to_host = 0

    def mover(self, device: torch.device) -> Mover:
        device = torch.device(device)
        with self._lock:
            if device not in self._movers:
                self._movers[device] = Mover(device)
            return self._movers[device]

    def host_weight(self, w: torch.Tensor) -> nn.Parameter:
        """A float32 copy of ``w`` in host memory from the pool (pinned when CUDA is present)."""
        buf, _ = self.pool.alloc_persistent(torch.empty(w.shape, dtype=torch.float32, device="meta"),
                                            what=f"host-resident weight {tuple(w.shape)}")
        with torch.no_grad():
            buf.copy_(w.detach())
        p = nn.Parameter(buf, requires_grad=w.requires_grad)
        p._efft_host_resident = True
        self.weights.append(p)
        if p.requires_grad:
            self.grad_of(p)  # its hooks first, before any optimizer's
        return p

    def host_bytes(self) -> int:
        """The host weights' bytes (their gradient buffers are counted by the pool, which holds them)."""
        return sum(p.numel() * p.element_size() for p in {id(p): p for p in self.weights}.values())

    def grad_of(self, p: nn.Parameter) -> "HostGrad":
        """The gradient accumulator of host weight ``p`` (made at its first use)."""
        with self._lock:
            acc = getattr(p, "_efft_host_grad", None)
            if acc is None:
                acc = p._efft_host_grad = HostGrad(p, self.pool)
            return acc

    def release_grads(self) -> None:
        """Give the gradient buffers back to the host (the weights' ``.grad`` becomes None); a later
        backward allocates them again."""
        for p in {id(p): p for p in self.weights}.values():
            acc = getattr(p, "_efft_host_grad", None)
            if acc is not None:
                acc.release()


class _GradBuffer:
    """A float32 buffer from the pool, and which of its rows may be nonzero (so that zeroing it after
    an embedding-only step touches only the rows that step wrote)."""

    def __init__(self, pool: HostBufferPool, shape, what: str):
        self.pool = pool
        self.raw = pool.acquire(int(shape[0]) * int(shape[1]) * 4, what=what)
        self.t = self.raw.view(torch.float32).view(shape)
        self.rows = torch.zeros(shape[0], dtype=torch.bool)
        self.all_rows = True  # fresh memory: anything may be in it
        self.zero = False  # its contents count as zeros (not yet written since begin())
        self.version: Optional[int] = None  # t._version when this object last knew every nonzero row

    def begin(self) -> None:
        """A new sum starts here: the contents count as zeros from now on (zeroed at the first write)."""
        self.zero = True

    def _prepare(self) -> bool:
        """Before a write: if the sum just began, make the buffer really zero; True if it did."""
        if not self.zero:
            return False
        if self.all_rows or (self.version is not None and self.t._version != self.version):
            self.t.zero_()  # a whole-vocabulary write, or someone else wrote into it: all rows
        else:
            idx = self.rows.nonzero().flatten()
            if idx.numel():
                self.t.index_fill_(0, idx, 0.0)
        self.rows.zero_()
        self.all_rows, self.zero = False, False
        return True

    def add_rows(self, flat: torch.Tensor, src: torch.Tensor) -> None:
        """``self[flat[i]] += src[i]``, each row's contributions first summed from zero in index order
        (as ``nn.Embedding``'s backward builds its gradient), then added once: the same floats as the
        dense gradient autograd would add in."""
        if self._prepare():
            self.rows[flat] = True
            self.t.index_add_(0, flat, src)
            return
        uniq, inv = torch.unique(flat, return_inverse=True)
        part = torch.zeros(uniq.numel(), src.shape[1], dtype=src.dtype)
        part.index_add_(0, inv, src)
        self.rows[uniq] = True
        self.t.index_add_(0, uniq, part)

    def begin_dense(self) -> bool:
        """Before a write of every row (the LM head): True if the rows are to be overwritten (the sum
        just began), False if added to."""
        overwrite = self.zero
        self.zero, self.all_rows = False, True
        return overwrite

    def add_buffer(self, other: "_GradBuffer") -> None:
        """``self += other``, over the rows ``other`` wrote only."""
        if other.zero:
            return
        self._prepare()
        if other.all_rows:
            self.t.add_(other.t)
            self.all_rows = True
            return
        idx = other.rows.nonzero().flatten()
        if idx.numel():
            self.rows[idx] = True
            self.t.index_add_(0, idx, other.t.index_select(0, idx))

    def free(self) -> None:
        self.pool.free(self.raw)
        self.raw = self.t = None


def _empty_grad(shape) -> torch.Tensor:
    """What the Functions return as the weight's gradient: an empty sparse tensor (4 bytes of nothing);
    the real gradient is already in the weight's buffer. autograd adds it in for free and still runs
    the weight's hooks (the host optimizer steps from them)."""
    return torch.sparse_coo_tensor(torch.empty((1, 0), dtype=torch.long), torch.empty((0, shape[1])), tuple(shape),
                                   is_coalesced=True, check_invariants=False)


class HostGrad:
    """The gradient of one host-resident weight, kept in buffers the residency's pool allocates once.

    Each backward pass's contributions (LM head, embedding, both for tied weights, several for a
    head called per row chunk) are written into a buffer, in the order autograd would have summed
    them. When the weight has no gradient (``zero_grad(set_to_none=True)``) or its gradient was
    zeroed through :func:`zero_host_grad`, the pass writes straight into the main buffer, which
    becomes ``.grad``; zeroing it means the rows of the last step only when only the embedding wrote.
    Within an accumulation (``.grad`` holds earlier micro-batches) the pass sums into a second
    buffer, added to ``.grad`` once complete: ``grad + (c1 + c2)`` as autograd computes it, not
    ``(grad + c1) + c2``. The end of a pass is the weight's gradient pre-hook, which runs once
    every contribution of that pass is in.

    Gradients reach ``.grad`` only (``backward()``): ``torch.autograd.grad`` with respect to a host
    weight returns an empty sparse tensor."""

    def __init__(self, param: nn.Parameter, pool: HostBufferPool):
        self._param = weakref.ref(param)
        self.pool = pool
        self.shape = tuple(param.shape)
        self.main: Optional[_GradBuffer] = None
        self.pass_buf: Optional[_GradBuffer] = None
        self.clean = False  # main is .grad and zeroed by zero_grad(set_to_none=False)
        self._target: Optional[_GradBuffer] = None
        self._task: Optional[int] = None
        self._lock = threading.RLock()
        self._hooks = [param.register_hook(self._finish_pass),
                       param.register_post_accumulate_grad_hook(self._settled)]

    @property
    def param(self) -> nn.Parameter:
        return self._param()

    @property
    def nbytes(self) -> int:
        return sum(b.t.numel() * 4 for b in (self.main, self.pass_buf) if b is not None)

    def holds(self, grad: Optional[torch.Tensor]) -> bool:
        return grad is not None and self.main is not None and grad is self.main.t

    def target(self) -> _GradBuffer:
        """The buffer this backward pass writes into (chosen at its first contribution)."""
        task = torch._C._current_graph_task_id()
        with self._lock:
            if self._target is not None and self._task == task:
                return self._target
            if self.main is None:
                self.main = _GradBuffer(self.pool, self.shape, f"host-resident weight gradient {self.shape}")
            g = self.param.grad
            if g is None or (self.holds(g) and self.clean and g._version == self.main.version):
                buf = self.main  # a new sum: straight into the buffer that becomes .grad
            else:
                if self.pass_buf is None:
                    self.pass_buf = _GradBuffer(self.pool, self.shape,
                                                f"host-resident weight gradient, accumulation pass {self.shape}")
                buf = self.pass_buf
            buf.begin()
            self.clean = False
            self._target, self._task = buf, task
            return buf

    def _finish_pass(self, grad: torch.Tensor) -> None:
        """Every contribution of this pass is in (autograd calls this just before accumulating)."""
        with self._lock:
            buf, task, self._target, self._task = self._target, self._task, None, None
            if buf is None or task != torch._C._current_graph_task_id():
                return None  # no host module wrote in this pass (a target left by a failed pass is dropped)
            p = self.param
            if buf is self.main:
                p.grad = buf.t
                return None
            main, g = self.main, p.grad
            if g is not None and not self.holds(g):  # a gradient set from outside: the sum goes on from it
                main.begin_dense()
                main.t.copy_(g if g.layout == torch.strided else g.to_dense())
                p.grad = main.t
            main.add_buffer(buf)
        return None

    def _settled(self, p: torch.Tensor) -> None:
        """After autograd's own (empty) accumulation: every nonzero row of .grad is known again."""
        if self.holds(p.grad):
            self.main.version = self.main.t._version

    def zero_(self) -> None:
        """``zero_grad(set_to_none=False)``: zero the rows written since the last zeroing."""
        with self._lock:
            main = self.main
            main.begin()
            main._prepare()
            main.version = main.t._version
            self.clean = True

    def release(self) -> None:
        with self._lock:
            p = self.param
            if p is not None and self.holds(p.grad):
                p.grad = None
            for b in (self.main, self.pass_buf):
                if b is not None:
                    b.free()
            self.main = self.pass_buf = self._target = None
            self.clean = False


def zero_host_grad(p: torch.Tensor, set_to_none: bool = True) -> None:
    """``zero_grad`` for one host weight: with ``set_to_none=False`` a gradient in its pooled buffer is
    zeroed over the rows written since the last zeroing (and the next pass writes straight into it)."""
    g = p.grad
    if g is None:
        return
    if set_to_none:
        p.grad = None
        return
    acc = getattr(p, "_efft_host_grad", None)
    if acc is not None and acc.holds(g):
        acc.zero_()
        return
    if g.grad_fn is not None:
        g.detach_()
    else:
        g.requires_grad_(False)
    g.zero_()


def _anchor(dtype: torch.dtype, device) -> torch.Tensor:
    """Empty tensor whose dtype/device say where outputs go; moved and cast with the model."""
    return torch.empty(0, dtype=dtype, device=device)


class _HostResidentModule(nn.Module):
    """Keeps ``weight`` on the host through ``_apply``; the ``_anchor`` buffer follows the model."""

    def _apply(self, fn, recurse=True):
        w = self._parameters.pop("weight")
        try:
            super()._apply(fn, recurse)
        finally:
            self._parameters["weight"] = w
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        return self._anchor.device


# ------------------------------------------------------------------------------------------ embedding
class _HostEmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, module):
        res, device, cd = module.residency, module.device, module.compute_dtype
        ids_host = ids.to("cpu")
        flat = ids_host.reshape(-1)
        rows = weight.detach().index_select(0, flat)
        if rows.dtype != cd:
            rows = rows.to(cd)
        mover = res.mover(device)
        out = torch.empty(rows.shape, dtype=cd, device=device)
        staging = res.pool.acquire(rows.numel() * rows.element_size(), what="embedding rows")
        staged = staging.view(cd).view(rows.shape)
        staged.copy_(rows)
        ev = mover.to_device(out, staged, tag=("embedding", "forward"))
        mover.wait_here(ev)
        res.pool.release(staging, ev)
        res.embedding_rows_to_device += rows.shape[0]
        ctx.save_for_backward(ids_host)
        ctx.module = module
        return out.view(*ids.shape, weight.shape[1])

    @staticmethod
    def backward(ctx, grad_out):
        (ids_host,) = ctx.saved_tensors
        module = ctx.module
        if not ctx.needs_input_grad[1]:
            return None, None, None
        res = module.residency
        g = grad_out.reshape(-1, grad_out.shape[-1])
        staging = res.pool.acquire(g.numel() * g.element_size(), what="embedding gradient rows")
        host_g = staging.view(g.dtype).view(g.shape)
        wait_cpu(res.mover(g.device).to_host(host_g, g, tag=("embedding", "backward")))
        host_g = host_g.float() if host_g.dtype != torch.float32 else host_g.clone()
        res.pool.release(staging)
        flat = ids_host.reshape(-1)
        if module.padding_idx is not None:
            host_g[flat == module.padding_idx] = 0  # nn.Embedding gives the padding row no gradient
        res.embedding_rows_to_host += host_g.shape[0]
        acc = res.grad_of(module.weight)
        with acc._lock:
            acc.target().add_rows(flat, host_g)
        return None, _empty_grad(module.weight.shape), None


class HostEmbedding(_HostResidentModule):
    """``nn.Embedding`` whose float32 weight stays in host memory; returns rows on the model's device."""

    def __init__(self, weight: nn.Parameter, residency: HostResidency, *, padding_idx: Optional[int],
                 compute_dtype: torch.dtype, device):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx = padding_idx
        self.weight = weight
        self.residency = residency
        self.register_buffer("_anchor", _anchor(compute_dtype, device), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _HostEmbeddingFn.apply(input_ids, self.weight, self)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, weight on host "
                f"(float32), compute_dtype={self.compute_dtype}")


# ------------------------------------------------------------------------------------------- LM head
class _ChunkStream:
    """Copies consecutive row chunks of a host weight to the device, the next one prefetched on the
    side stream while the current one is used; records each transfer and the rows resident."""

    def __init__(self, module: "HostLMHead", phase: str, device: torch.device):
        self.m, self.phase, self.device = module, phase, device
        self.res = module.residency
        self.mover = self.res.mover(device)
        w = module.weight
        n = module.chunk_rows
        self.bounds = [(v, min(v + n, w.shape[0])) for v in range(0, w.shape[0], n)]
        # a ring of two device buffers (one when the vocabulary fits one chunk)
        self.ring = [torch.empty(min(n, w.shape[0]), w.shape[1], dtype=torch.float32, device=device)
                     for _ in range(min(2, len(self.bounds)))]
        self.resident: dict[int, int] = {}  # chunk index -> rows resident on the device
        self.events: dict[int, Any] = {}

    def _fetch(self, i: int) -> None:
        v0, v1 = self.bounds[i]
        buf = self.ring[i % len(self.ring)][: v1 - v0]
        nbytes = (v1 - v0) * buf.shape[1] * 4
        self.events[i] = self.mover.to_device(buf, self.m.weight.detach()[v0:v1], tag=("lm_head", self.phase, v0))
        self.res.chunk_transfers.append((self.phase, v0, v1 - v0, nbytes))
        self.resident[i] = v1 - v0
        self.res.peak_head_rows_on_device = max(self.res.peak_head_rows_on_device, sum(self.resident.values()))

    def __iter__(self):
        cd = self.m.compute_dtype
        if self.bounds:
            self._fetch(0)
        for i, (v0, v1) in enumerate(self.bounds):
            self.mover.wait_here(self.events.pop(i))
            w = self.ring[i % len(self.ring)][: v1 - v0]
            w = w if w.dtype == cd else w.to(cd)
            if i + 1 < len(self.bounds):
                # the next chunk is copied while this one is used; its copy is ordered after the
                # work already issued on the buffer it reuses (the Mover waits for the compute stream)
                self._fetch(i + 1)
            yield v0, v1, w
            del self.resident[i]


class _HostHeadFn(torch.autograd.Function):
    """logits = x W^T with W streamed from the host in vocabulary chunks (forward and backward)."""

    @staticmethod
    def forward(ctx, x, weight, module):
        cd = module.compute_dtype
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        out = torch.empty(x2.shape[0], weight.shape[0], dtype=cd, device=x.device)
        for v0, v1, w in _ChunkStream(module, "forward", x.device):
            out[:, v0:v1] = x2 @ w.t()
        ctx.save_for_backward(x)
        ctx.module = module
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        module = ctx.module
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_w):
            return None, None, None
        cd, res = module.compute_dtype, module.residency
        x2 = x.reshape(-1, x.shape[-1]).to(cd)
        g2 = grad_out.reshape(-1, grad_out.shape[-1]).to(cd)
        gx = None
        acc = res.grad_of(module.weight) if need_w else None
        if acc is not None:
            acc._lock.acquire()  # held through the chunks: one writer of the buffer at a time
        try:
            if acc is not None:
                grad_w = acc.target()
                overwrite = grad_w.begin_dense()  # a new sum: each chunk's dW is copied in, else added
            mover, events, staged = res.mover(x.device), [], []
            for v0, v1, w in _ChunkStream(module, "backward", x.device):
                gc = g2[:, v0:v1]
                if need_x:
                    part = gc @ w
                    if cd != torch.float32:
                        part = part.float()  # the chunks' sum in float32 (bf16 partial sums would lose bits)
                    gx = part if gx is None else gx.add_(part)
                if need_w:
                    dw = (gc.t() @ x2).float()
                    dst = grad_w.t[v0:v1]
                    if overwrite:
                        events.append(mover.to_host(dst, dw, tag=("lm_head_grad", v0)))
                    elif dw.device.type == "cpu":
                        dst.add_(dw)
                    else:  # through a pooled staging chunk; at most two in flight
                        buf = res.pool.acquire(dw.numel() * 4, what="LM head gradient chunk")
                        host = buf.view(torch.float32).view(dw.shape)
                        staged.append((dst, host, buf, mover.to_host(host, dw, tag=("lm_head_grad", v0))))
                        if len(staged) > 1:
                            _add_staged(res.pool, staged.pop(0))
                    res.head_grad_bytes_to_host += dw.numel() * 4
            for item in staged:
                _add_staged(res.pool, item)
            for ev in events:
                wait_cpu(ev)
        finally:
            if acc is not None:
                acc._lock.release()
        if gx is not None:
            gx = gx.to(x.dtype).view(x.shape)
        return gx, (_empty_grad(module.weight.shape) if need_w else None), None


def _add_staged(pool: HostBufferPool, item) -> None:
    """Add a staged device->host chunk of dW into the host gradient once its copy is done."""
    dst, host, buf, ev = item
    wait_cpu(ev)
    dst.add_(host)
    pool.release(buf)


class HostLMHead(_HostResidentModule):
    """A bias-free ``nn.Linear`` LM head whose float32 weight stays in host memory, streamed to the
    device ``chunk_rows`` vocabulary rows at a time (at most two chunks there at once)."""

    def __init__(self, weight: nn.Parameter, residency: HostResidency, *, chunk_rows: int, compute_dtype: torch.dtype,
                 device):
        super().__init__()
        if not isinstance(chunk_rows, int) or chunk_rows <= 0:
            raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
        self.out_features, self.in_features = weight.shape
        self.chunk_rows = chunk_rows
        self.weight = weight
        self.bias = None
        self.residency = residency
        self.register_buffer("_anchor", _anchor(compute_dtype, device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _HostHeadFn.apply(x, self.weight, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias=False, weight on host "
                f"(float32), chunk_rows={self.chunk_rows}, compute_dtype={self.compute_dtype}")


# ------------------------------------------------------------------------------------------- prepare
def make_host_resident(model: nn.Module, *, chunk_rows: int = 16384, cfg: Any = None) -> HostResidency:
    """Move ``model``'s input embedding and LM head (tied or not) to host memory, in place.

    ``cfg`` (duck-typed ``efft.config.OffloadConfig``): ``pin_memory``, ``max_pinned_bytes``. The
    weights become float32 host Parameters marked ``_efft_host_resident``; what they compute and
    return keeps the original weights' dtype and device. Returns the shared :class:`HostResidency`.
    """
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    emb = get_in() if callable(get_in) else None
    head = get_out() if callable(get_out) else None
    if type(emb) is not nn.Embedding:
        raise ValueError(f"host-resident embeddings need the model's input embedding to be an nn.Embedding, got "
                         f"{type(emb).__name__}")
    if type(head) is not nn.Linear:
        raise ValueError(f"host-resident embeddings need the LM head to be a plain nn.Linear (keep it out of "
                         f"quantization and adapters), got {type(head).__name__}")
    if head.bias is not None:
        raise ValueError("host-resident LM head: a head with a bias is not supported (no supported family has one)")
    if emb.max_norm is not None or emb.scale_grad_by_freq or emb.sparse:
        raise ValueError("host-resident embedding: max_norm, scale_grad_by_freq and sparse embeddings are not supported")
    tied = head.weight is emb.weight
    res = HostResidency(pin_memory=getattr(cfg, "pin_memory", True),
                        max_pinned_bytes=getattr(cfg, "max_pinned_bytes", 8 << 30))
    dev, cd = emb.weight.device, emb.weight.dtype
    w_in = res.host_weight(emb.weight)
    w_out = w_in if tied else res.host_weight(head.weight)
    new_emb = HostEmbedding(w_in, res, padding_idx=emb.padding_idx, compute_dtype=cd, device=dev)
    new_head = HostLMHead(w_out, res, chunk_rows=chunk_rows, compute_dtype=head.weight.dtype, device=head.weight.device)
    model.set_input_embeddings(new_emb)
    model.set_output_embeddings(new_head)
    model._efft_host_residency = res
    return res
