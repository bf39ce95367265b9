"""The last decoder block on label rows only, keys and values still on every position (exact).

After the last block, a position's hidden state reaches the loss only if its shifted label is not
-100 (the final norm is per row and the head runs on label rows). Inside the last block a position
without a label still matters through one thing: the keys and values its attention computes for
the label positions after it. Everything else it does there is wasted, so, for the last block:

- attention: the model's own attention function (its ``attn_implementation``: eager or sdpa)
  gets the queries of the label rows only, with the matching rows of the mask; keys and values are
  those of all positions. Installed through transformers' attention-function registry: the last
  block's attention module gets a copy of the config naming :data:`ATTENTION_NAME`, whose function
  calls the implementation the model's own config names at call time. When sdpa gets no mask (no
  padding, no packing, no short sliding window: transformers then relies on ``is_causal``), label
  rows as queries would need a queries x seq mask the dense call never builds; instead the queries
  of the label span [first, last] of the batch are computed against the keys [0, last] with the
  causal mask aligned to the lower right (``torch.nn.attention.bias.causal_lower_right``: CUDA's flash
  and memory-efficient kernels take it without a materialized mask; GQA without repeated k/v). This
  needs the span as host ints, which the collator's label rows carry; without them (rows found on
  the device) that call stays whole. On CPU the lower-right mask is materialized, which at small
  hidden sizes outweighs the rows it saves, so there the call stays whole unless
  :data:`UNMASKED_SDPA_ON_CPU` is set (the tests set it to check the path exactly).
- every module that runs after the attention scores inside the block (the output projection, the
  post-attention norms, the MLP, dropouts) runs on the label rows only: found at run time as the
  children of the attention module and of the block that are called after the attention function
  (pruned to those after the apply-time check forward). The output projection reads the attention's
  compact output (one row per query it computed), a view of what the attention keeps for backward,
  rather than a gathered copy.

- the query projection (a plain ``nn.Linear`` ``q_proj``) runs on the label rows only, the other
  rows zeros, when this forward's attention takes the label-row path: decided once, in a pre-hook of
  the attention module, from what the attention function checks (implementation, row shape, mask
  shape, no cached keys); the function raises if it then cannot restrict, rather than use zero
  queries. A custom autograd function saves the projection's full input (the tensor the key/value
  projections keep anyway) and the index and gathers the rows again in backward, so no gathered copy
  is kept for the weight gradient (measured: the attention module's saved bytes unchanged). Left on
  every row: peft LoRA or quantized q_proj (their own forwards would keep a gathered copy of the
  rows), q_proj under autocast (the key/value projections then keep cast copies, not the input
  itself), GPT-2's fused ``c_attn`` (queries, keys and values in one matmul), a q_proj with a forward
  of its own (PaCA, WTA-CRS: the label-row matmul would replace it), the span path and the whole
  calls (their queries are used).

Which rows: the block's class is swapped for a subclass (same name) whose ``forward`` first takes
the label rows of the forward that produced the block's input (:class:`~.per_forward.PerForward`)
and resets the per-computation state. The class's forward, because that is what gradient
checkpointing re-runs in backward; so a second forward before the first one's backward (a
DPO-style loss over separately run halves) cannot hand its rows to the first one's recompute.

Still on every row: the input norm and the key/value projections (their keys and values are
needed), the rotary embedding and q/k norms (elementwise on the full tensors, cheap).

The outputs of the rows without labels are zeros. They must be finite, not merely unused: the
block's residual additions (inside the model's own forward, not reachable generically) and the
final norm still run on every row, and their backward multiplies the zero gradient of those rows by
values computed from them (0 * inf would be nan). Dropout inside the block draws its mask for the
label rows only, so with dropout on the result equals the dense one in distribution, not bitwise.

Left out, the reason kept in ``LastBlock.reason``: routed experts (an expert's capacity can depend
on every row: the block runs unchanged); GPT-2's ``reorder_and_upcast_attn`` and a modeling file
without ``eager_attention_forward`` / ``ALL_ATTENTION_FUNCTIONS`` (the queries stay whole, the
modules after the attention module still run on label rows); no single self-attention module in
the block (its ``mlp`` alone runs on the label rows, as before). Attention implementations other
than eager and sdpa (flash, flex: their masks are not per-query rows) run whole at call time; the
modules after them still run on the label rows.
"""
from __future__ import annotations

import copy
import functools
import sys
from typing import Any, Callable, Optional

import torch
from torch import nn

from .instance_forward import InstanceForward
from .label_rows import LabelRows
from .per_forward import PerForward

ATTENTION_NAME = "efft_label_rows"
# sdpa without a mask: restrict it to the label span on CPU too (off: on CPU the span's causal mask is
# materialized, and at small hidden sizes it outweighs the rows it saves; tests switch it on)
UNMASKED_SDPA_ON_CPU = False
_SPAN_KWARGS = frozenset({"dropout", "scaling", "is_causal", "sliding_window", "position_ids", "output_attentions",
                          "use_cache", "cache_position", "past_key_values", "past_key_value"})
_RESTRICTABLE = ("eager", "sdpa")
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


class LastBlock:
    """What runs on label rows in the last block, and the label rows of the current forward."""

    def __init__(self):
        self.rows: Optional[LabelRows] = None  # this (re)computation's, on the model's device; None: every module runs on all rows
        self.per_forward = PerForward()  # the rows of each forward, found again by a checkpointed block's recompute
        self.after_attention = False  # set once the block's attention has run in this (re)computation
        self.stash: Optional[tuple] = None  # (scattered, compact, label rows among compact's) attention output
        self.attention: Optional[nn.Module] = None  # the attention module whose queries are restricted
        self.modules: list[str] = []  # names (under the block) of the modules run on label rows
        self.ran: set[str] = set()  # of those, the ones that did so since the last prune()
        self.reason: Optional[str] = None  # why the attention is not restricted
        self.query_rows: Optional[int] = None  # query rows the attention function computed last (inspection)
        self.query_projection: Optional[str] = None  # name of the query projection run on label rows (None: every row)
        self.restrict_queries = False  # this forward: the attention takes the label-row path (decided before q_proj)
        self._undo: list[Callable[[], None]] = []
        self._unwrap: dict[str, Callable[[], None]] = {}

    def __getstate__(self):  # a copy or pickle of the model starts between forwards: no rows, no stashed output
        state = dict(self.__dict__)
        state.update(rows=None, stash=None, after_attention=False, restrict_queries=False)
        return state

    @property
    def restricts_attention(self) -> bool:
        return self.attention is not None

    def prune(self) -> None:
        """Unwrap the modules that have not run on label rows (those called before the attention, or
        not at all) in the forwards since install: after one forward the order is known."""
        for name in [n for n in self.modules if n not in self.ran]:
            self._unwrap[name]()
        self.ran.clear()

    def remove(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.attention, self.modules, self.rows = None, [], None
        self.query_projection, self.restrict_queries = None, False


def _gather_rows(t: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` at ``positions`` (B, K) along ``dim`` (batch dim 0, possibly broadcast from 1); for tensors
    without gradient (gather keeps its input for backward)."""
    b, k = positions.shape
    if t.shape[0] != b:
        t = t.expand(b, *t.shape[1:])
    view = [1] * t.dim()
    view[0], view[dim] = b, k
    size = list(t.shape)
    size[dim] = k
    return t.gather(dim, positions.view(view).expand(size))


def _implementation(module: nn.Module) -> tuple[str, Callable]:
    """The attention function the model's own config names, looked up as the model's forward does."""
    impl = module._efft_model_config._attn_implementation
    ns = sys.modules[type(module).__module__]
    return impl, ns.ALL_ATTENTION_FUNCTIONS.get_interface(impl, ns.eager_attention_forward)


def label_rows_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """Registered as :data:`ATTENTION_NAME`: the model's attention on the label rows' queries only."""
    block: LastBlock = module._efft_last_block
    impl, fn = _implementation(module)
    rows = block.rows
    b, _, q_len, _ = query.shape
    mask = attention_mask
    causal_kernel = (mask is None and impl == "sdpa"
                     and (kwargs.get("is_causal") if kwargs.get("is_causal") is not None else getattr(module, "is_causal", True)))
    usable = (rows is not None and impl in _RESTRICTABLE and rows.shape == (b, q_len) and key.shape[2] == q_len
              and not causal_kernel and (mask is None or (mask.dim() == 4 and mask.shape[2] in (1, q_len))))
    block.stash = None
    if block.restrict_queries and not usable:  # q_proj left the other rows zero: running whole would be wrong
        raise RuntimeError(f"efft last block: the query projection ran on label rows only but the attention call "
                           f"cannot restrict (implementation {impl!r}, query {tuple(query.shape)}, key {tuple(key.shape)}, "
                           f"mask {None if mask is None else tuple(mask.shape)})")
    if (causal_kernel and rows is not None and rows.span is not None and rows.shape == (b, q_len) and key.shape[2] == q_len
            and (query.device.type != "cpu" or UNMASKED_SDPA_ON_CPU) and set(kwargs) <= _SPAN_KWARGS
            and (kwargs.get("sliding_window") or q_len) >= q_len):
        out = _span_attention(module, block, rows, query, key, value, kwargs)
        if out is not None:
            return out
    if not usable:
        block.query_rows = b * q_len
        out = fn(module, query, key, value, attention_mask, **kwargs)
        block.after_attention = True
        return out
    pos = rows.positions
    k = pos.shape[1]
    if mask is not None and mask.shape[2] == q_len:
        mask = _gather_rows(mask, pos, 2)
    block.query_rows = b * k
    # index_select keeps only the index for backward (gather would keep all of ``query``)
    flat = (pos + torch.arange(b, device=pos.device)[:, None] * q_len).reshape(-1)
    heads, dim = query.shape[1], query.shape[3]
    q = query.transpose(1, 2).reshape(b * q_len, heads, dim).index_select(0, flat).view(b, k, heads, dim).transpose(1, 2)
    out, _ = fn(module, q, key, value, mask, **kwargs)  # (B, K, heads, head_dim)
    compact = out.reshape(b * k, -1)  # a view of what the attention keeps for backward (sdpa: its output)
    pick = None if b * k == rows.count else rows.slots
    return _scatter(block, rows, compact, pick, b, q_len, out.shape[2:])


def _scatter(block: LastBlock, rows: LabelRows, compact: torch.Tensor, pick: Optional[torch.Tensor], b: int, q_len: int, tail):
    """The attention output on every row (zeros off the label rows) from ``compact`` (one row per
    query computed; ``pick``: where the label rows are among them, None when they are all of them)."""
    picked = compact if pick is None else compact.index_select(0, pick)
    full = picked.new_zeros(b * q_len, picked.shape[1]).index_put((rows.rows,), picked)  # keeps only the index
    block.stash = (full, compact, pick)  # the output projection reads ``compact`` when it gets ``full``
    block.after_attention = True
    return full.view(b, q_len, *tail), None


def _span_kernel(q, k, v, dropout: float, groups: int) -> Optional[bool]:
    """``enable_gqa`` for a fused sdpa kernel (flash or memory-efficient) that takes the span's
    lower-right causal mask unmaterialized, None when neither does (dtypes, head sizes, GQA on the
    efficient kernel): then the caller keeps the dense call."""
    from torch.backends.cuda import SDPAParams, can_use_efficient_attention, can_use_flash_attention

    if not (q.dtype == k.dtype == v.dtype):
        return None
    params = SDPAParams(q, k, v, None, dropout, False, groups > 1)
    return groups > 1 if can_use_flash_attention(params) or can_use_efficient_attention(params) else None


def _span_attention(module: nn.Module, block: LastBlock, rows: LabelRows, query, key, value, kwargs):
    """sdpa without a mask (is_causal) on the queries of the label span [a, e) only, against the keys
    and values [0, e): the causal mask aligned to the lower right (``causal_lower_right``), which CUDA's
    flash and memory-efficient kernels take without a materialized mask. Same call as transformers'
    sdpa function (its dropout and scaling, GQA without repeated k/v); the span's q and k/v are copied
    when they are slices, so sdpa keeps only the span's rows for backward. Under autocast they are cast
    as sdpa's autocast would (CausalBias takes the call before it). On CUDA only where a fused kernel
    takes the mask (None otherwise: the caller runs the dense call)."""
    from torch.nn.attention.bias import causal_lower_right

    b, _, q_len, _ = query.shape
    a, e = rows.span
    q = query[:, :, a:e]
    k, v = (key, value) if e == q_len else (key[:, :, :e], value[:, :, :e])
    dev = query.device.type
    if torch.is_autocast_enabled(dev):  # CausalBias dispatches before autocast would cast q, k, v
        dt = torch.get_autocast_dtype(dev)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    # copies of the span's rows (a no-op where .to() already copied), so sdpa keeps only those for backward
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask = causal_lower_right(e - a, e)
    dropout, scale = kwargs.get("dropout", 0.0), kwargs.get("scaling")
    groups = getattr(module, "num_key_value_groups", 1)
    if dev == "cpu":  # the switch is on: the mask is materialized (tests)
        gqa = groups > 1
    else:  # only where a fused kernel takes the lower-right mask; otherwise the dense call (no materialized mask)
        gqa = _span_kernel(q, k, v, dropout, groups)
        if gqa is None:
            return None
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)  # (B, H, L, D)
    span = e - a
    block.query_rows = b * span
    out = out.transpose(1, 2).contiguous()  # (B, L, H, D), as transformers' sdpa function returns it
    compact = out.view(b * span, -1)
    # label row r = i * q_len + p sits at compact row i * span + (p - a)
    pick = None if b * span == rows.count else rows.rows - (rows.rows // q_len) * (q_len - span) - a
    return _scatter(block, rows, compact, pick, b, q_len, out.shape[2:])


class _QueryRows(torch.autograd.Function):
    """``linear(x, weight, bias)`` on the rows ``index`` of ``x`` (N, X), zeros elsewhere. Saves ``x``
    itself (the tensor the key/value projections keep anyway, so no new bytes) and the index, and
    gathers the rows again in backward: a gathered copy kept for the weight gradient would cost
    K x hidden more than the dense call."""

    @staticmethod
    def forward(ctx, x, index, weight, bias):
        y = nn.functional.linear(x.index_select(0, index), weight, bias)
        ctx.save_for_backward(x if weight.requires_grad else None, index, weight)
        ctx.has_bias = bias is not None
        return y.new_zeros(x.shape[0], y.shape[1]).index_put((index,), y)

    @staticmethod
    def backward(ctx, grad):
        x, index, weight = ctx.saved_tensors
        g = grad.index_select(0, index)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad.new_zeros(grad.shape[0], weight.shape[1]).index_put((index,), g @ weight.to(g.dtype))
        if ctx.needs_input_grad[2]:
            gw = g.t() @ x.index_select(0, index).to(g.dtype)
        if ctx.has_bias and ctx.needs_input_grad[3]:
            gb = g.sum(0)
        return gx, None, gw, gb


def _decide(attn: nn.Module, block: LastBlock, args, kwargs) -> None:
    """Forward pre-hook of the attention module: whether its attention function will take the
    label-row path, decided once from what that function will check (implementation, row shape,
    mask shape), so the query projection zeroes the other rows only when their queries go unused."""
    block.restrict_queries = False
    rows = block.rows
    x = kwargs.get("hidden_states", args[0] if args else None)
    if rows is None or block.query_projection is None or not torch.is_tensor(x) or x.dim() != 3 or tuple(x.shape[:2]) != rows.shape:
        return
    impl = attn._efft_model_config._attn_implementation
    mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
    cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
    if impl not in _RESTRICTABLE or (cache is not None and (not callable(getattr(cache, "get_seq_length", None))
                                                            or cache.get_seq_length(attn.layer_idx))):
        return  # earlier keys cached: the attention function sees more keys than queries and runs whole
    if mask is None:
        block.restrict_queries = impl == "eager"  # sdpa without a mask: the span path or the whole call
    else:
        block.restrict_queries = torch.is_tensor(mask) and mask.dim() == 4 and mask.shape[2] in (1, x.shape[1])


class _QueryProjection(InstanceForward):
    """``q_proj`` on the label rows only when this forward's attention restricts (see
    :func:`_wrap_query_projection`)."""

    def __init__(self, q: nn.Linear, block: LastBlock):
        super().__init__(q)
        self.block = block

    def forward(self, x, *args, **kwargs):
        q, block = self.module, self.block
        rows = block.rows
        if not (block.restrict_queries and not args and not kwargs and torch.is_tensor(x) and x.dim() == 3
                and rows is not None and tuple(x.shape[:2]) == rows.shape and not torch.is_autocast_enabled(x.device.type)):
            # under autocast the dense call keeps a cast copy, not ``x``: saving ``x`` here would add bytes
            return self.inner(x, *args, **kwargs)
        y = _QueryRows.apply(x.reshape(-1, x.shape[-1]), rows.rows, q.weight, q.bias)
        return y.view(*x.shape[:2], -1)


def _wrap_query_projection(attn: nn.Module, block: LastBlock) -> Optional[str]:
    """Run the attention's ``q_proj`` (a plain ``nn.Linear``) on label rows only when this forward's
    attention restricts; None (left on every row) for other projections (peft LoRA, quantized: their
    own forwards would keep a gathered copy of the rows for backward)."""
    q = getattr(attn, "q_proj", None)
    if type(q) is not nn.Linear or q.__dict__.get("forward") is not None:
        # a forward of its own (PaCA's trained columns, WTA-CRS's sampled gradient): the label-row
        # matmul below would replace it, not call it
        return None
    block._undo.append(_QueryProjection(q, block).install().restore)
    return "q_proj"


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, label_rows_attention)


class _RowWise(InstanceForward):
    """A per-row map of (B, S, X) run on the label rows only (see :func:`_wrap_rowwise`)."""

    def __init__(self, module: nn.Module, name: str, block: LastBlock, mode: str):
        super().__init__(module)
        self.name, self.block, self.mode = name, block, mode

    def forward(self, x, *args, **kwargs):
        block, mode = self.block, self.mode
        rows = block.rows
        if (rows is None or args or kwargs or not torch.is_tensor(x) or x.dim() != 3 or tuple(x.shape[:2]) != rows.shape
                or (mode == "after" and not block.after_attention)):
            return self.inner(x, *args, **kwargs)
        pick = None
        if mode == "output":
            full, compact, pick = block.stash if block.stash is not None else (None, None, None)
            if full is None or x.data_ptr() != full.data_ptr() or x.numel() != full.numel() or not x.is_contiguous():
                return self.inner(x)
            block.stash = None
            inp = compact  # (B*K, X): one row per query the attention computed
        else:
            inp = x.reshape(-1, x.shape[-1]).index_select(0, rows.rows)
        y = self.inner(inp)
        if not (torch.is_tensor(y) and y.dim() == 2 and y.shape[0] == inp.shape[0]):
            self.unwrap()
            return self.inner(x)
        if pick is not None:  # padded query slots or the rest of a span: keep the label rows' ones
            y = y.index_select(0, pick)
        block.ran.add(self.name)
        out = y.new_zeros((x.shape[0] * x.shape[1], y.shape[-1])).index_put((rows.rows,), y)  # index_copy would keep y
        return out.view(*x.shape[:2], y.shape[-1])

    def unwrap(self) -> None:
        self.restore()
        if self.name in self.block.modules:
            self.block.modules.remove(self.name)


def _wrap_rowwise(module: nn.Module, name: str, block: LastBlock, mode: str) -> None:
    """``module`` (a per-row map of (B, S, X)) runs on the label rows only.

    ``mode``: ``after`` once the block's attention has run, ``always`` from the start (the MLP when
    no attention module is known), ``output`` only on the attention function's compact output (the
    attention's own output projection: it then reads a view of what the attention keeps for
    backward instead of a gathered copy). A module that turns out to return something else than
    rows is unwrapped and runs on every row from then on.
    """
    wrapper = _RowWise(module, name, block, mode).install()
    block._undo.append(wrapper.unwrap)
    block._unwrap[name] = wrapper.unwrap


def _attention_module(layer: nn.Module) -> tuple[Optional[str], Optional[nn.Module]]:
    found = [(n, m) for n, m in layer.named_modules() if m is not layer and "layer_idx" in m.__dict__
             and hasattr(m, "is_causal") and hasattr(getattr(m, "config", None), "_attn_implementation")]
    return found[0] if len(found) == 1 else (None, None)


_LAYER_CLASSES: dict[type, type] = {}


def _layer_class(cls: type) -> type:
    """A subclass of the decoder layer class (same name) whose forward first sets the block's rows
    and resets its per-computation state. It is the class's forward, not a hook or an instance
    wrapper, because that is what gradient checkpointing runs again in backward (transformers
    checkpoints ``forward``, keeping module hooks outside)."""
    if cls not in _LAYER_CLASSES:
        base_forward = cls.forward

        @functools.wraps(base_forward)
        def forward(self, *args, **kwargs):
            block = self.__dict__.get("_efft_last_block")
            if block is not None:
                block.rows = block.per_forward.resolve(args[0] if args else kwargs.get("hidden_states"))
                block.after_attention, block.stash = False, None
            try:
                return base_forward(self, *args, **kwargs)
            finally:
                if block is not None:  # an output projection that did not read it (wrapped by another forward)
                    block.stash = None

        _LAYER_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                                          "_efft_base_class": cls, "__reduce_ex__": _reduce_layer})
    return _LAYER_CLASSES[cls]


def _new_layer(cls: type) -> nn.Module:
    """Unpickling: an empty instance of the swapped class of ``cls`` (its state is set after)."""
    return object.__new__(_layer_class(cls))


def _reduce_layer(self, protocol):
    # the swapped class shares its base's name, so pickle cannot find it by reference: rebuild it
    base = type(self).__dict__.get("_efft_base_class")
    if base is None:  # a subclass made later (FSDP2's): its own protocol
        return object.__reduce_ex__(self, protocol)
    return _new_layer, (base,), self.__getstate__()


def _swap_layer_class(layer: nn.Module, block: LastBlock) -> None:
    cls = type(layer)
    layer.__class__ = _layer_class(cls)
    layer._efft_last_block = block

    block._undo.append(functools.partial(_unswap_layer_class, layer, cls))


def _unswap_layer_class(layer: nn.Module, cls: type) -> None:
    layer.__dict__.pop("_efft_last_block", None)
    if type(layer) is _LAYER_CLASSES.get(cls):
        layer.__class__ = cls


# hooks and undo steps are module-level functions bound with functools.partial (not closures), so a
# deepcopy or pickle of the model carries them over to the copy's objects (see instance_forward.py)
def _decide_hook(block: LastBlock, attn: nn.Module, args, kwargs) -> None:
    _decide(attn, block, args, kwargs)


def _attended(block: LastBlock, *_) -> None:
    block.after_attention = True


def _restore_attention(attn: nn.Module, shared: Any) -> None:
    attn.config = shared
    for a in ("_efft_model_config", "_efft_last_block"):
        attn.__dict__.pop(a, None)


def install_last_block(layer: nn.Module, cfg: Any) -> LastBlock:
    """Restrict the last decoder block ``layer`` to label rows as far as it can be done generically."""
    block = LastBlock()
    if any(getattr(cfg, k, None) for k in _MOE_KEYS):
        block.reason = "routed experts: an expert's capacity can depend on every row"
        return block
    _swap_layer_class(layer, block)
    name, attn = _attention_module(layer)
    if attn is None:
        block.reason = "no single self-attention module (one with layer_idx, is_causal and a config) in the last block"
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module):
            block.modules.append("mlp")
            _wrap_rowwise(mlp, "mlp", block, "always")
        return block
    ns = sys.modules.get(type(attn).__module__)
    if getattr(attn, "reorder_and_upcast_attn", False):
        block.reason = "reorder_and_upcast_attn: the model's eager path bypasses the attention function"
    elif ns is None or not callable(getattr(ns, "eager_attention_forward", None)) or not hasattr(ns, "ALL_ATTENTION_FUNCTIONS"):
        block.reason = f"{type(attn).__module__} has no eager_attention_forward / ALL_ATTENTION_FUNCTIONS to call"
    else:
        _register()
        shared = attn.config
        own = copy.copy(shared)
        own._attn_implementation_internal = ATTENTION_NAME  # this module only; the setter would touch sub-configs
        attn._efft_model_config, attn._efft_last_block, attn.config = shared, block, own
        block.attention = attn

        block._undo.append(functools.partial(_restore_attention, attn, shared))
        block.query_projection = _wrap_query_projection(attn, block)
        h = attn.register_forward_pre_hook(functools.partial(_decide_hook, block), with_kwargs=True)
        block._undo.append(h.remove)

    block._undo.append(attn.register_forward_hook(functools.partial(_attended, block)).remove)
    candidates = ([(f"{name}.{n}", m, "output") for n, m in attn.named_children() if n != block.query_projection]
                  if block.restricts_attention else [])
    candidates += [(n, m, "after") for n, m in layer.named_children() if not any(sub is attn for sub in m.modules())]
    for n, m, mode in candidates:
        block.modules.append(n)
        _wrap_rowwise(m, n, block, mode)
    return block
