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

Score (per layer, per token, computed without gradient; ``score``):

- ``mean_distance`` (default): the distance of the token's hidden state from the sequence mean,
  ||h_i - mean_j h_j||. Tokens near the mean repeat what the context already holds. Cheap and
  attention-free; a stand-in for LeMo's attention-based informativeness, not that quantity.
- ``attention``: LeMo's informativeness, computed from the layer's own queries and keys.

LeMo's definition (Wang et al., arXiv 2501.09767; read in its USENIX ATC '25 version, titled
"Jenga", Section 4.2 "Information-driven Token Elimination", Eq. 1 and 2, Figure 6): the attention score
S_ij = Q_i K_j (pre-softmax) measures how token i interacts with token j, and the informativeness
of token j is the sum of the scores it receives from the other tokens, I(T_j) = sum_{i != j} S_ij
(Eq. 1). Eq. 2 aggregates over heads keeping only the positive scores (negative ones barely matter
after the softmax but would offset the positive ones), divided by the number of heads; LeMo then
takes the maximum over blocks of the score matrix and sums the block scores along the key
dimension, comparing the sum with a layer-specific threshold (Algorithm 1). At token granularity
(block size 1), which is what is implemented here:

    I(T_j) = sum_{i != j, i may attend to j} (1 / H) sum_h max(0, s^h_ij),
    s^h_ij = scaling * <q^h_i, k^h_j>

with q, k the layer's own query and key states on the layer input (input norm, q_proj / k_proj as
modules, per-head q/k norms where the model has them, the model's own rotary embedding from the
layer call's ``position_embeddings``, attention logit softcapping where configured), pairs outside
the layer's attention mask (causal, sliding window, padding) excluded. LeMo's trained predictors
(Section 4.3) only approximate this quantity to avoid computing it; the keep_ratio top-k here
replaces LeMo's layer-specific thresholds, and LeMo's separate MLP-block elimination is not done
(an eliminated token skips the whole layer).

Estimator and cost (``score_queries`` = n): the sum over i runs over a sample Q of n query rows
per sequence, not all T: every loss row when there are at most n (a uniform random n of them
otherwise: they are the queries whose outputs the loss reads), topped up to n with uniform random
other rows. With n >= T, Q is every row and the score is I(T_j) exactly; otherwise it is LeMo's sum
restricted to Q (all keys of a sequence are scored by the same queries, and tokens are ranked only
within their sequence). Per layer and sequence: the input norm and k_proj on all T rows, q_proj on
n rows, and n x T scores per head (O(n T H d_head) multiply-adds, in chunks of query rows of about
2^24 scores, at least one row, at a time), under no_grad: nothing is saved for backward. The random rows come from
torch's global generator, so gradient checkpointing (which restores it) recomputes the same choice.

``unbiased``: instead of the top-scoring tokens, keep a uniform random subset of the eliminable
tokens (each kept with probability p = slots / eliminable, the same for every token of a row) and
scale the kept tokens' layer update (output - input) by 1/p. Over the draw, each token's expected
update equals its update with the layer run on it; the context it attends to is still the sampled
subset, so this removes the selection bias of top-k, not the context approximation.

Active only in training with labels and grad enabled and for sequences of at least
``min_seq_length`` tokens; evaluation and generation run the dense layers.
"""
from __future__ import annotations

import inspect
import math
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from .instance_forward import InstanceForward
from .loss_tokens import IGNORE_INDEX, _shift_labels, decoder_layers, find_causal_lm
from .per_forward import PerForward

_ATTN_OK = ("eager", "sdpa")


SCORES = ("mean_distance", "attention")
_SCORE_CHUNK = 1 << 24  # attention score: at most this many (batch x head x query x key) scores at a time
_ATTN_CHILDREN = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
_QK_CONFIG_FLAGS = ("use_qk_norm", "attn_temperature_tuning")  # change q or k beyond what the score reimplements


class EliminationState:
    """Shared by the wrapped layers: which rows feed the loss in the current forward."""

    def __init__(self, keep: Sequence[Optional[float]], unbiased: bool, min_seq_length: int,
                 score: str = "mean_distance", score_queries: int = 128):
        self.keep = list(keep)
        self.unbiased = unbiased
        self.min_seq_length = min_seq_length
        self.score = score
        self.score_queries = score_queries
        self.attention_parts: dict[int, AttentionParts] = {}  # layer index -> what the attention score calls
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


@dataclass
class AttentionParts:
    """What the attention score calls in one decoder layer (found by :func:`attention_parts`)."""

    norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    head_dim: int
    scaling: float
    rope: Callable  # the modeling file's own apply_rotary_pos_emb(q, k, cos, sin)
    q_norm: Optional[nn.Module] = None
    k_norm: Optional[nn.Module] = None
    softcap: Optional[float] = None


def attention_parts(layer: nn.Module) -> Union[AttentionParts, str]:
    """The modules and constants the attention score needs from ``layer``, or why it cannot be scored.

    Handled: an ``input_layernorm`` followed by a ``self_attn`` whose query and key states are
    ``q_proj`` / ``k_proj`` (any module: nn.Linear, peft LoRA, quantized), optionally per-head
    ``q_norm`` / ``k_norm``, then the modeling file's ``apply_rotary_pos_emb`` on the full head
    dimension, scaled by ``scaling`` (optionally softcapped). Anything else in the attention module
    (fused or differently named projections, other submodules, partial rotary, q/k temperature or
    norm options) is refused: the score would silently differ from what the layer computes.
    """
    name = type(layer).__name__
    norm, attn = getattr(layer, "input_layernorm", None), getattr(layer, "self_attn", None)
    if not isinstance(norm, nn.Module) or not isinstance(attn, nn.Module):
        return f"{name} has no input_layernorm and self_attn modules (the score reads the normed input's queries and keys)"
    q, k = getattr(attn, "q_proj", None), getattr(attn, "k_proj", None)
    if not isinstance(q, nn.Module) or not isinstance(k, nn.Module):
        return f"{type(attn).__name__} has no q_proj and k_proj modules (fused or differently named query/key projections)"
    extra = sorted(set(n for n, _ in attn.named_children()) - _ATTN_CHILDREN)
    if extra:
        return (f"{type(attn).__name__} has submodules {extra} besides {sorted(_ATTN_CHILDREN)}; the score reimplements "
                "only q_proj/k_proj, per-head q_norm/k_norm and the rotary embedding")
    hd = getattr(attn, "head_dim", None)
    if not isinstance(hd, int) or isinstance(hd, bool) or hd <= 0:
        return f"{type(attn).__name__} has no integer head_dim"
    scaling = getattr(attn, "scaling", hd ** -0.5)
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool) or not scaling > 0:
        return f"{type(attn).__name__}.scaling is {scaling!r}, not a positive number"
    cfg = getattr(attn, "config", None)
    rope_params = getattr(cfg, "rope_parameters", None)
    partial = getattr(cfg, "partial_rotary_factor", None)
    if partial is None and isinstance(rope_params, dict):
        partial = rope_params.get("partial_rotary_factor")
    if partial not in (None, 1, 1.0):
        return f"partial rotary embedding (partial_rotary_factor {partial})"
    flags = [f for f in _QK_CONFIG_FLAGS if getattr(cfg, f, None)]
    if flags:
        return f"the config sets {flags}, which change the queries or keys beyond what the score reimplements"
    norms = {}
    for n in ("q_norm", "k_norm"):
        m = getattr(attn, n, None)
        if m is None:
            continue
        w = getattr(m, "weight", None)
        if not isinstance(m, nn.Module) or not torch.is_tensor(w) or w.numel() != hd:
            return f"{type(attn).__name__}.{n} is not a per-head norm over head_dim {hd}"
        norms[n] = m
    rope = getattr(sys.modules.get(type(attn).__module__), "apply_rotary_pos_emb", None)
    if not callable(rope):
        return f"{type(attn).__module__} has no apply_rotary_pos_emb (the score applies the model's own rotary embedding)"
    softcap = getattr(attn, "attn_logit_softcapping", None)
    return AttentionParts(norm, q, k, hd, float(scaling), rope, norms.get("q_norm"), norms.get("k_norm"),
                          float(softcap) if softcap else None)


def score_queries(loss_rows: torch.Tensor, n: int) -> torch.Tensor:
    """(B, S) bool -> (B, min(n, S)) query positions in increasing order: every loss row when a
    sequence has at most n (a uniform random n of them otherwise), topped up with uniform random
    other rows. With n >= S, every row (and no random draw)."""
    b, s = loss_rows.shape
    if n >= s:
        return torch.arange(s, device=loss_rows.device).expand(b, s)
    key = torch.rand(b, s, device=loss_rows.device) + 2.0 * loss_rows.float()
    return torch.topk(key, n, dim=1, sorted=False).indices.sort(dim=1).values


def _allowed(mask: Optional[torch.Tensor], queries: torch.Tensor, s: int) -> torch.Tensor:
    """(B, 1 or heads, n, S) bool: query row i may attend to key j (the layer's mask), never j == i."""
    qpos = queries[:, None, :, None]
    kpos = torch.arange(s, device=queries.device)[None, None, None, :]
    if mask is None:  # sdpa without a mask: the layer's attention is plain causal (is_causal)
        ok = kpos <= qpos
    else:
        if mask.dim() != 4 or tuple(mask.shape[-2:]) != (s, s):
            raise ValueError(f"token elimination (score: attention): an attention mask of shape {tuple(mask.shape)}; "
                             "it handles 4-D (batch, heads, seq, seq) masks (attn_implementation eager or sdpa)")
        rows = _gather_seq(mask, queries, 2)
        ok = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
    return ok & (kpos != qpos)


def attention_informativeness(parts: AttentionParts, h: torch.Tensor, queries: torch.Tensor,
                              attention_mask: Optional[torch.Tensor] = None,
                              position_embeddings: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """(B, S, D) layer input -> (B, S) float32: LeMo's informativeness of every token as a key,
    summed over the query rows ``queries`` (B, n) (see the module docstring). Call under no_grad.

    The norm and projections are called as modules on 2-D (rows, D) inputs (LoRA, quantized or
    otherwise wrapped linears run their own forward, in eval mode: no dropout in the score)."""
    b, s, d = h.shape
    n, hd = queries.shape[1], parts.head_dim
    mods = [m for m in (parts.norm, parts.q_proj, parts.k_proj, parts.q_norm, parts.k_norm) if m is not None]
    modes = [(m, m.training) for top in mods for m in top.modules()]
    try:
        for m, _ in modes:
            m.training = False
        x = parts.norm(h.reshape(b * s, d))
        xq = x.reshape(b * s, -1).index_select(0, _flat_index(queries, s))
        q = parts.q_proj(xq)
        k = parts.k_proj(x)
        if q.shape[-1] % hd or k.shape[-1] % hd or (q.shape[-1] // hd) % (k.shape[-1] // hd):
            raise ValueError(f"token elimination (score: attention): q_proj/k_proj give {q.shape[-1]}/{k.shape[-1]} "
                             f"features, not whole heads of head_dim {hd} (query heads a multiple of key heads)")
        q, k = q.view(b, n, -1, hd), k.view(b, s, -1, hd)
        if parts.q_norm is not None:
            q = parts.q_norm(q)
        if parts.k_norm is not None:
            k = parts.k_norm(k)
    finally:
        for m, mode in modes:
            m.training = mode
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, n, hd), (B, KV, S, hd)
    if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2):
        raise ValueError("token elimination (score: attention): the layer call has no (cos, sin) position_embeddings "
                         "for the rotary embedding the model's attention applies")
    cos, sin = position_embeddings
    if cos.shape[-1] != hd or cos.dim() != 3 or cos.shape[1] != s:
        raise ValueError(f"token elimination (score: attention): rotary cos/sin of shape {tuple(cos.shape)}; "
                         f"expected (batch, {s}, {hd}) (full-head rotary)")
    q = parts.rope(q, q, _gather_seq(cos, queries, 1), _gather_seq(sin, queries, 1))[0]
    k = parts.rope(k, k, cos, sin)[1]
    heads, kv = q.shape[1], k.shape[1]
    groups = heads // kv
    q = q.float().reshape(b, kv, groups, n, hd)  # query head kv * groups + g reads key head kv (repeat_kv's order)
    kt = k.float().transpose(-1, -2)[:, :, None]  # (B, KV, 1, hd, S)
    out = torch.zeros(b, s, dtype=torch.float32, device=h.device)
    step = max(1, _SCORE_CHUNK // max(1, b * heads * s))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        sc = torch.matmul(q[:, :, :, lo:hi], kt) * parts.scaling  # (B, KV, G, c, S)
        if parts.softcap is not None:
            sc = torch.tanh(sc / parts.softcap) * parts.softcap
        sc = sc.clamp_min_(0).reshape(b, heads, hi - lo, s)
        ok = _allowed(attention_mask, queries[:, lo:hi], s)
        out += sc.masked_fill_(~ok, 0).sum(dim=(1, 2))
    return out / heads


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


class _EliminatedLayer(InstanceForward):
    """A decoder layer run on its kept tokens only; the others pass through (see the module docstring)."""

    def __init__(self, layer: nn.Module, index: int, state: EliminationState):
        super().__init__(layer)
        self.index, self.state = index, state
        self.sig = inspect.signature(layer.forward)
        self.first = next(iter(self.sig.parameters))
        self.__signature__, self.__wrapped__ = self.sig, layer.forward

    def forward(self, *args, **kwargs):
        state, index, sig, first, orig = self.state, self.index, self.sig, self.first, self.inner
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
            if state.unbiased:
                score = None
            elif state.score == "attention":
                score = attention_informativeness(state.attention_parts[index], h, score_queries(rows.to(h.device), state.score_queries),
                                                  a.get("attention_mask"), a.get("position_embeddings"))
            else:
                score = informativeness(h)
            idx, weight = choose_tokens(score if score is not None else h.new_zeros(b, s), forced, ratio, state.unbiased)
        if idx.shape[1] >= s:
            return orig(*args, **kwargs)
        state.last_kept[index] = idx
        # one (B*K,) index serves the gather and the scatter back, and it is all that their backward
        # keeps: index_select / index_put save only the index (gather would save the full-length h)
        flat = _flat_index(idx, s)
        hg = _take(h, idx, flat)
        rest = _gather_args({k: v for k, v in a.items() if k != first}, idx, flat, s, type(self.module).__name__)
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


def _wrap_layer(layer: nn.Module, index: int, state: EliminationState) -> None:
    wrapper = _EliminatedLayer(layer, index, state)
    layer._efft_orig_forward = wrapper.inner  # the forward it wraps, the class's looked up per call
    wrapper.install()


class _EliminationForward(InstanceForward):
    """The causal LM's forward: finds the loss rows of a training forward with labels and runs the
    wrapped forward with them as this forward's (see :class:`~.per_forward.PerForward`)."""

    def __init__(self, lm: nn.Module, state: EliminationState):
        super().__init__(lm)
        self.state = state
        self.sig = inspect.signature(lm.forward)  # may already be wrapped by loss-token skipping; chained
        self.__signature__, self.__wrapped__ = self.sig, lm.forward

    def forward(self, *args, **kwargs):
        state = self.state
        bound = self.sig.bind_partial(*args, **kwargs).arguments
        extra = bound.get("kwargs") if isinstance(bound.get("kwargs"), dict) else {}
        labels = bound.get("labels")
        shift = bound.get("shift_labels", extra.get("shift_labels"))
        ids = bound.get("input_ids")
        if ids is None:
            ids = bound.get("inputs_embeds")
        state.loss_rows = rows = None
        if (labels is not None or shift is not None) and self.module.training and torch.is_grad_enabled() and ids is not None:
            rows = state.activate(labels, shift, ids.shape[1])
        with state.per_forward.forward(rows):
            return self.inner(*args, **kwargs)


def _per_layer(keep_ratio: Union[float, Sequence[float]], n_layers: int, start_layer: int) -> list[Optional[float]]:
    vals = list(keep_ratio) if isinstance(keep_ratio, (list, tuple)) else [keep_ratio] * n_layers
    if len(vals) != n_layers:
        raise ValueError(f"sparsity.token_elimination.keep_ratio has {len(vals)} values; the model has {n_layers} "
                         "decoder layers (give one value, or one per layer)")
    bad = [v for v in vals if not (isinstance(v, (int, float)) and 0 < v <= 1)]
    if bad:
        raise ValueError(f"sparsity.token_elimination.keep_ratio must be in (0, 1], got {bad}")
    return [None if i < start_layer else float(v) for i, v in enumerate(vals)]


def score_problems(score: Any, score_queries: Any, unbiased: Any) -> list[tuple[str, str]]:
    """Problems with the score settings alone: ``(recipe key, message)`` pairs."""
    p = []
    if score not in SCORES:
        p.append(("sparsity.token_elimination.score", f"must be one of {', '.join(SCORES)}, got {score!r}"))
    if not (isinstance(score_queries, int) and not isinstance(score_queries, bool) and score_queries >= 1):
        p.append(("sparsity.token_elimination.score_queries", f"must be an integer >= 1, got {score_queries!r}"))
    if score == "attention" and unbiased:
        p.append(("sparsity.token_elimination.score", "attention with unbiased: true: the unbiased option draws the kept "
                  "tokens uniformly at random and reads no score (choose one)"))
    return p


def attention_score_problem(layers: Sequence[nn.Module], keep: Sequence[Optional[float]]) -> Optional[str]:
    """Why the attention score cannot run on the layers that eliminate tokens (None: it can)."""
    for i, layer in enumerate(layers):
        if keep[i] is not None and keep[i] < 1.0:
            parts = attention_parts(layer)
            if isinstance(parts, str):
                return f"sparsity.token_elimination.score: attention cannot score decoder layer {i}: {parts}"
    return None


def apply_token_elimination(model: nn.Module, keep_ratio: Union[float, Sequence[float]] = 0.5, start_layer: int = 1,
                            unbiased: bool = False, min_seq_length: int = 0, score: str = "mean_distance",
                            score_queries: int = 128) -> nn.Module:
    """Install token elimination on the decoder layers of a transformers causal LM (under peft too).

    ``score``: ``mean_distance`` or ``attention`` (LeMo's informativeness from the layer's own
    queries and keys over ``score_queries`` query rows per sequence; see the module docstring).

    Raises ValueError for keep ratios outside (0, 1], a per-layer list of the wrong length, a
    start_layer beyond the model, an attention implementation other than eager/sdpa, a model
    whose decoder layers cannot be found, an unknown score, ``attention`` with ``unbiased``, or
    (``attention``) an eliminating layer whose attention the score cannot reproduce (the reason named).
    """
    problems = score_problems(score, score_queries, unbiased)
    if problems:
        raise ValueError("; ".join(f"{k} {m}" for k, m in problems))
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
    state = EliminationState(_per_layer(keep_ratio, len(layers), start_layer), bool(unbiased), min_seq_length,
                             score, score_queries)
    if score == "attention":
        reason = attention_score_problem(layers, state.keep)
        if reason:
            raise ValueError(reason)
        state.attention_parts = {i: attention_parts(layer) for i, layer in enumerate(layers)
                                 if state.keep[i] is not None and state.keep[i] < 1.0}
    for i, layer in enumerate(layers):
        if state.keep[i] is not None:
            _wrap_layer(layer, i, state)

    _EliminationForward(lm, state).install()
    lm._efft_token_elimination = state
    return model
