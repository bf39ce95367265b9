"""Token elimination (after LeMo, Wang et al. 2025): less informative tokens skip whole decoder layers.

APPROXIMATE. From ``start_layer`` on, each decoder layer scores its input tokens, keeps
``keep_ratio`` of them, and runs on the kept tokens only (gathered into a shorter sequence, in
order, with their own positions and the matching rows/columns of the attention mask). The
eliminated tokens skip the layer, so it neither computes nor saves activations for them, and they
rejoin the residual stream unchanged: their output is their input. Kept tokens attend only to kept
tokens in that layer, and eliminated ones get no gradient through the layer's branch (identity
only), which is what LeMo's published code does; the result is not the dense model's.

Saved for backward by an eliminated layer: its activations at the kept tokens, one (B*K,) int64
index (the gather in and the write back keep only that), the per-row rotary cos/sin of the kept
positions (dense layers share one table), and with ``unbiased`` the (B, K) update weights.

Never eliminated: every position whose hidden state feeds the loss (shifted label != -100), and
position 0 (the attention sink most models rely on).

Score (per layer, per token, computed without gradient): the distance of the token's hidden state
from the sequence mean, ||h_i - mean_j h_j||. Tokens near the mean repeat what the context already
holds; LeMo learns a predictor for its attention-based informativeness instead, which this cheap,
attention-free score stands in for.

``unbiased``: instead of the top-scoring tokens, keep a uniform random subset of the eliminable
tokens (each kept with probability p = slots / eliminable, the same for every token of a row) and
scale the kept tokens' layer update (output - input) by 1/p. Over the draw, each token's expected
update equals its update with the layer run on it; the context it attends to is still the sampled
subset, so this removes the selection bias of top-k, not the context approximation.

Active only in training with labels and grad enabled and for sequences of at least
``min_seq_length`` tokens; evaluation and generation run the dense layers.
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .loss_tokens import IGNORE_INDEX, _shift_labels, decoder_layers, find_causal_lm
from .per_forward import PerForward

_ATTN_OK = ("eager", "sdpa")


class EliminationState:
    """Shared by the wrapped layers: which rows feed the loss in the current forward."""

    def __init__(self, keep: Sequence[Optional[float]], unbiased: bool, min_seq_length: int):
        self.keep = list(keep)
        self.unbiased = unbiased
        self.min_seq_length = min_seq_length
        self.loss_rows: Optional[torch.Tensor] = None  # the last forward's (B, S) bool, None: inactive (inspection)
        self.per_forward = PerForward()  # each forward's loss rows, found again by a checkpointed layer's recompute
        self.last_kept: dict[int, torch.Tensor] = {}  # layer index -> (B, K) kept positions (inspection, tests)

    def activate(self, labels, shift_labels, seq: int) -> Optional[torch.Tensor]:
        if shift_labels is None:
            shift_labels = _shift_labels(labels)
        self.loss_rows = (shift_labels != IGNORE_INDEX) if seq >= self.min_seq_length else None
        return self.loss_rows


def informativeness(h: torch.Tensor) -> torch.Tensor:
    """(B, S, H) -> (B, S): distance of each token's hidden state from its sequence's mean."""
    hf = h.detach().float()
    return (hf - hf.mean(dim=1, keepdim=True)).norm(dim=-1)


def choose_tokens(score: torch.Tensor, forced: torch.Tensor, ratio: float, unbiased: bool):
    """Per row, the kept positions (B, K) in increasing order and their update weights (B, K).

    K = max(ceil(ratio * S), forced tokens of the fullest row). Forced tokens are always kept
    (weight 1). Top-k fills the rest by score; ``unbiased`` fills it uniformly at random and gives
    each drawn token weight 1/p, p = (K - forced_b) / (S - forced_b).
    """
    b, s = score.shape
    n_forced = forced.sum(1)
    k = min(s, max(int(math.ceil(ratio * s)), int(n_forced.max())))
    key = torch.rand(b, s, device=score.device) if unbiased else score.float()
    key = key.masked_fill(forced, float("inf"))
    idx = torch.topk(key, k, dim=1, sorted=False).indices.sort(dim=1).values
    weight = torch.ones(b, k, device=score.device)
    if unbiased:
        free = (s - n_forced).clamp_min(1).float()
        p = ((k - n_forced).float() / free).clamp(min=1e-12, max=1.0)
        drawn = ~forced.gather(1, idx)
        weight = torch.where(drawn, 1.0 / p[:, None], weight)
    return idx, weight


def _gather_seq(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather positions ``idx`` (B, K) along ``dim`` of ``t`` (batch dim 0, possibly broadcast 1).

    For tensors without gradient (masks): ``gather`` saves its whole source for backward, so
    tensors that need a gradient go through ``_take`` instead."""
    b, k = idx.shape
    if t.shape[0] != b:
        t = t.expand(b, *t.shape[1:])
    shape = [1] * t.dim()
    shape[0], shape[dim] = b, k
    view = idx.view(shape)
    expand = list(t.shape)
    expand[dim] = k
    return t.gather(dim, view.expand(expand))


def _flat_index(idx: torch.Tensor, seq: int) -> torch.Tensor:
    """(B, K) positions -> (B*K,) row numbers in the (B*S, ...) flattening of a (B, S, ...) tensor."""
    return (idx + torch.arange(idx.shape[0], device=idx.device)[:, None] * seq).reshape(-1)


def _take(t: torch.Tensor, idx: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Positions ``idx`` (B, K) along dim 1 of ``t`` (batch dim 0, possibly broadcast 1).

    ``index_select`` on a flattened view: its backward keeps only the (B*K,) index, where
    ``gather`` would keep the whole full-length source alive for backward."""
    b, k = idx.shape
    if t.shape[0] != b:  # broadcast batch: every row picks from the one shared row
        return t[0].index_select(0, idx.reshape(-1)).view(b, k, *t.shape[2:])
    return t.reshape(b * t.shape[1], *t.shape[2:]).index_select(0, flat).view(b, k, *t.shape[2:])


def _gather_args(args: dict, idx: torch.Tensor, flat: torch.Tensor, seq: int, layer_name: str) -> dict:
    out = {}
    for name, v in args.items():
        if name == "hidden_states":
            continue
        if name in ("past_key_values", "past_key_value", "layer_past"):
            out[name] = None  # training: no cache of the shortened sequence
        elif name == "use_cache":
            out[name] = False
        elif name == "attention_mask" and torch.is_tensor(v):
            if v.dim() != 4 or v.shape[-1] != seq or v.shape[-2] != seq:
                raise ValueError(f"token elimination: {layer_name} got an attention mask of shape {tuple(v.shape)}; "
                                 "it handles 4-D (batch, heads, seq, seq) masks (attn_implementation eager or sdpa)")
            out[name] = _gather_seq(_gather_seq(v, idx, 2), idx, 3)  # no gradient: nothing saved
        elif name == "position_embeddings" and isinstance(v, (tuple, list)):
            out[name] = type(v)(_take(t, idx, flat) for t in v)
        elif name == "position_ids" and torch.is_tensor(v) and v.dim() == 2 and v.shape[-1] == seq:
            out[name] = _take(v, idx, flat)
        elif name == "cache_position" and torch.is_tensor(v):
            out[name] = None if v.dim() == 1 else v
        elif torch.is_tensor(v) and v.dim() >= 2 and seq in v.shape[1:] and v.shape[0] in (1, idx.shape[0]):
            raise ValueError(f"token elimination: {layer_name} takes a per-token argument {name!r} "
                             f"{tuple(v.shape)} it does not know how to shorten")
        else:
            out[name] = v
    return out


def _wrap_layer(layer: nn.Module, index: int, state: EliminationState) -> None:
    own = layer.__dict__.get("forward")  # an instance-level wrapper installed before this one
    sig = inspect.signature(layer.forward)
    first = next(iter(sig.parameters))

    def orig(*args, **kwargs):  # the class's forward looked up per call: loss_tokens may swap the last layer's class later
        return own(*args, **kwargs) if own is not None else type(layer).forward(layer, *args, **kwargs)

    @functools.wraps(layer.forward)
    def forward(*args, **kwargs):
        ratio = state.keep[index]
        if ratio is None or ratio >= 1.0:
            return orig(*args, **kwargs)
        rows = state.per_forward.resolve(args[0] if args else kwargs.get(first))
        if rows is None:
            return orig(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        a = dict(bound.arguments)
        a.update(a.pop("kwargs", {}) if "kwargs" in sig.parameters and isinstance(a.get("kwargs"), dict) else {})
        h = a[first]
        if not torch.is_tensor(h) or h.dim() != 3 or tuple(h.shape[:2]) != tuple(rows.shape):
            return orig(*args, **kwargs)
        b, s, _ = h.shape
        with torch.no_grad():
            forced = rows.to(h.device).clone()
            forced[:, 0] = True
            score = None if state.unbiased else informativeness(h)
            idx, weight = choose_tokens(score if score is not None else h.new_zeros(b, s), forced, ratio, state.unbiased)
        if idx.shape[1] >= s:
            return orig(*args, **kwargs)
        state.last_kept[index] = idx
        # one (B*K,) index serves the gather and the scatter back, and it is all that their backward
        # keeps: index_select / index_put save only the index (gather would save the full-length h)
        flat = _flat_index(idx, s)
        hg = _take(h, idx, flat)
        rest = _gather_args({k: v for k, v in a.items() if k != first}, idx, flat, s, type(layer).__name__)
        out = orig(hg, **rest)
        tail = None
        if isinstance(out, tuple):
            out, tail = out[0], out[1:]
        d = h.shape[-1]
        if state.unbiased:  # input + update / p for the drawn tokens (weight 1 for the forced ones)
            upd = (out - hg) * weight[..., None].to(out.dtype)
            full = h.reshape(b * s, d).index_put((flat,), upd.reshape(-1, d), accumulate=True)
        else:  # the kept rows take the layer's output as is; the others pass through
            full = h.reshape(b * s, d).index_put((flat,), out.reshape(-1, d))
        full = full.view(b, s, d)
        return full if tail is None else (full, *tail)

    layer._efft_orig_forward = orig
    layer.forward = forward


def _per_layer(keep_ratio: Union[float, Sequence[float]], n_layers: int, start_layer: int) -> list[Optional[float]]:
    vals = list(keep_ratio) if isinstance(keep_ratio, (list, tuple)) else [keep_ratio] * n_layers
    if len(vals) != n_layers:
        raise ValueError(f"sparsity.token_elimination.keep_ratio has {len(vals)} values; the model has {n_layers} "
                         "decoder layers (give one value, or one per layer)")
    bad = [v for v in vals if not (isinstance(v, (int, float)) and 0 < v <= 1)]
    if bad:
        raise ValueError(f"sparsity.token_elimination.keep_ratio must be in (0, 1], got {bad}")
    return [None if i < start_layer else float(v) for i, v in enumerate(vals)]


def apply_token_elimination(model: nn.Module, keep_ratio: Union[float, Sequence[float]] = 0.5, start_layer: int = 1,
                            unbiased: bool = False, min_seq_length: int = 0) -> nn.Module:
    """Install token elimination on the decoder layers of a transformers causal LM (under peft too).

    Raises ValueError for keep ratios outside (0, 1], a per-layer list of the wrong length, a
    start_layer beyond the model, an attention implementation other than eager/sdpa, or a model
    whose decoder layers cannot be found.
    """
    lm = find_causal_lm(model)
    if hasattr(lm, "_efft_token_elimination"):
        raise ValueError("sparsity.token_elimination is already applied to this model")
    layers = decoder_layers(lm)
    if layers is None or len(layers) == 0:
        raise ValueError(f"sparsity.token_elimination: cannot find the decoder layers of {type(lm).__name__}")
    if not isinstance(start_layer, int) or not 0 <= start_layer < len(layers):
        raise ValueError(f"sparsity.token_elimination.start_layer must be in [0, {len(layers) - 1}], got {start_layer!r}")
    if not isinstance(min_seq_length, int) or min_seq_length < 0:
        raise ValueError(f"sparsity.token_elimination.min_seq_length must be >= 0, got {min_seq_length!r}")
    impl = getattr(lm.config, "_attn_implementation", None) or "eager"
    if impl not in _ATTN_OK:
        raise ValueError(f"sparsity.token_elimination needs attn_implementation eager or sdpa (it shortens the "
                         f"sequence and its 4-D mask per layer); the model uses {impl!r}")
    state = EliminationState(_per_layer(keep_ratio, len(layers), start_layer), bool(unbiased), min_seq_length)
    for i, layer in enumerate(layers):
        if state.keep[i] is not None:
            _wrap_layer(layer, i, state)

    inner = lm.forward  # may already be wrapped by loss-token skipping; chain onto it
    sig = inspect.signature(inner)

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        bound = sig.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs") if isinstance(bound.get("kwargs"), dict) else {}
        labels = bound.get("labels")
        shift = bound.get("shift_labels", extra.get("shift_labels"))
        ids = bound.get("input_ids")
        if ids is None:
            ids = bound.get("inputs_embeds")
        state.loss_rows = rows = None
        if (labels is not None or shift is not None) and lm.training and torch.is_grad_enabled() and ids is not None:
            rows = state.activate(labels, shift, ids.shape[1])
        with state.per_forward.forward(rows):
            return inner(*args, **kwargs)

    lm.forward = forward
    lm._efft_token_elimination = state
    return model
