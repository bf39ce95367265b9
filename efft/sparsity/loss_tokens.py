"""Loss-token skipping: the LM head and cross entropy run only on rows that have a label.

In supervised fine-tuning most positions (prompt, padding) carry label -100, yet a plain causal-LM
forward projects every position onto the vocabulary and keeps batch x seq x vocab logits (and their
float copy, and the softmax) alive for backward. Here the CausalLM's forward is wrapped: the decoder
runs to hidden states, the rows whose shifted label is not -100 are gathered, and a fused
head + cross-entropy walks them in chunks of ``chunk_size`` rows. As in Liger-Kernel's fused linear
cross entropy, each chunk's gradient is formed right away, so what stays for backward is the
(rows x hidden) input gradient (and the head's weight gradient when the head trains), never logits.

Exactness: the loss and every gradient equal the dense computation up to float summation order.
The loss is ``sum / num_items_in_batch`` when transformers.Trainer passes ``num_items_in_batch``
(label tokens of the whole optimizer step, all micro-batches and ranks), otherwise the mean over this
micro-batch's label tokens, as transformers' ``ForCausalLMLoss``.

No host sync: the label rows' positions come with the batch. ``LabelRowsCollator`` (installed on
Trainer's training loader by ``EfftPlugin.trainer_kwargs``, so ``efft train`` has it too) computes
them on the host from the collated labels and adds a :class:`~efft.sparsity.label_rows.LabelRows`
under ``efft_label_rows``; the wrapped forward pops it (the model never sees it) and their count is a
Python int, so the gathers need no device->host read. Fallback, when the batch carries no index (or
one for another shape): the rows are found on the device, one read of their count per forward
(``state.host_reads`` counts these forwards).

In the last decoder block, positions without a label only feed later positions through the keys and
values their attention computed; nothing else they do there reaches the loss. So the last block's
attention computes the label rows' queries only (through the model's own eager/sdpa attention
function, keys and values of every position), and the modules after it (output projection, norms,
MLP) run on the label rows only (exact; see :mod:`efft.sparsity.last_block`, which also lists what
it leaves unrestricted, with the reason kept in ``state.last_block.reason``). The apply-time check
below runs this path too. The query projection and rotary embedding still run on every row, as do
the block's residual additions (inside the model's forward).

Generic over transformers causal LMs that compute ``logits = lm_head(base_model(...).last_hidden_state)``
and optionally ``logit_scale`` / ``final_logit_softcapping``; at apply time the wrapped path is checked
against the model's own forward on a short input and refused with a clear error if they differ.
Outside training (``model.eval()``, no labels, or no grad) the original forward runs unchanged.
"""
from __future__ import annotations

import inspect
import logging
import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .instance_forward import InstanceForward, remove_wrapper
from .label_rows import IGNORE_INDEX, LABEL_ROWS_KEY, LabelRows, shift_labels as _shift_labels
from .last_block import LastBlock, install_last_block

log = logging.getLogger(__name__)
_HEAD_ARGS = ("labels", "num_items_in_batch", "shift_labels", "logits_to_keep", "return_dict", "ignore_index")
_UNSUPPORTED_CONFIG = {
    "output_router_logits": "mixture-of-experts auxiliary losses are added to the loss by the model's own forward",
}


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(softcap(scale * (h @ W^T + b)), target) / denom, chunked over rows.

    Gradients are computed chunk by chunk in forward and scaled by grad_output in backward: the
    loss is linear in that scalar, so this is exact and no chunk's logits outlive its loop step.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, denom, chunk_size: int, scale: Optional[float], softcap: Optional[float]):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        need_any = need_h or need_w or need_b
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, n, chunk_size):
            h = hidden[start:start + chunk_size]
            t = targets[start:start + chunk_size]
            z = F.linear(h, weight, bias).float()
            if scale is not None:
                z = z * scale
            if softcap is not None:
                th = torch.tanh(z / softcap)
                z = th * softcap
            lse = torch.logsumexp(z, dim=-1)
            total = total + (lse - z.gather(1, t[:, None]).squeeze(1)).sum()
            if not need_any:
                continue
            g = torch.exp(z - lse[:, None])  # softmax, then minus one-hot: dCE/dz
            g.scatter_add_(1, t[:, None], torch.full_like(lse[:, None], -1.0))
            if softcap is not None:
                g.mul_(1.0 - th * th)
            if scale is not None:
                g.mul_(scale)
            if need_b:
                grad_b += g.sum(0)
            g = g.to(hidden.dtype)
            if need_h:
                grad_h[start:start + chunk_size] = g @ weight
            if need_w:
                grad_w.addmm_(g.t().float(), h.float())
        loss = total / denom
        ctx.save_for_backward(grad_h, grad_w, grad_b, denom)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b, denom = ctx.saved_tensors
        s = grad_out / denom
        gh = None if grad_h is None else grad_h * s.to(grad_h.dtype)
        gw = None if grad_w is None else (grad_w * s).to(ctx.dtypes[0])
        gb = None if grad_b is None else (grad_b * s).to(ctx.dtypes[1])
        return gh, gw, gb, None, None, None, None, None


def _softcap_scale(head: nn.Module, logits: torch.Tensor, scale, softcap) -> torch.Tensor:
    z = head(logits).float()
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = torch.tanh(z / softcap) * softcap
    return z


def _module_chunk_loss(head, h, t, scale, softcap):
    return F.cross_entropy(_softcap_scale(head, h, scale, softcap), t, reduction="sum")


def head_cross_entropy(hidden, targets, head: nn.Module, denom, chunk_size: int, scale=None, softcap=None):
    """Summed CE of ``head`` over the rows of ``hidden`` divided by ``denom``, without full logits.

    A plain ``nn.Linear`` head goes through the fused :class:`LinearCrossEntropy`; any other head
    (a peft-wrapped lm_head, a quantized one) runs per chunk under activation checkpointing, so
    only the chunk inputs are kept and the chunk's logits are recomputed in backward.
    """
    if type(head) is nn.Linear:
        return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, denom, chunk_size, scale, softcap)
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled():
            total = total + checkpoint(_module_chunk_loss, head, h, t, scale, softcap, use_reentrant=False)
        else:
            total = total + _module_chunk_loss(head, h, t, scale, softcap)
    return total / denom


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers PreTrainedModel with an output embedding, under peft wrappers if any
    (PeftModel.base_model -> LoraModel.model -> the causal LM)."""
    from transformers import PreTrainedModel

    m = model
    for _ in range(4):
        if isinstance(m, PreTrainedModel) and m.get_output_embeddings() is not None:
            return m
        inner = m.__dict__.get("_modules", {}).get("base_model") or m.__dict__.get("_modules", {}).get("model")
        if inner is None:
            break
        m = inner
    return m


def find_causal_lm(model: nn.Module) -> nn.Module:
    """The transformers causal LM (possibly under peft) whose forward the sparsity plugins wrap."""
    m = _unwrap(model)
    from transformers import PreTrainedModel

    if not (isinstance(m, PreTrainedModel) and m.get_output_embeddings() is not None):
        raise ValueError(f"efft.sparsity needs a transformers causal-LM (…ForCausalLM); got {type(model).__name__}")
    return m


def decoder_layers(lm: nn.Module) -> Optional[nn.ModuleList]:
    """The decoder's list of blocks: the ModuleList whose length is the config's number of layers."""
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    base = lm.base_model
    for _, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return mod
    return None


class LossTokenState:
    """What :func:`apply_loss_tokens` installed on a causal LM (kept as ``lm._efft_loss_tokens``)."""

    def __init__(self, lm, chunk_size, scale, softcap, last_block: LastBlock, orig_forward):
        self.lm, self.chunk_size, self.scale, self.softcap = lm, chunk_size, scale, softcap
        self.last_block, self.orig_forward = last_block, orig_forward
        self.last_block_skip = bool(last_block.modules) or last_block.restricts_attention
        self.host_reads = 0  # sparse forwards that had to read the label-row count from the device

    def sparse_forward(self, bound: dict[str, Any], label_rows: Optional[LabelRows] = None):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        labels = bound.pop("labels", None)
        shift = bound.pop("shift_labels", None)
        num_items = bound.pop("num_items_in_batch", None)
        ignore = bound.pop("ignore_index", IGNORE_INDEX)
        return_dict = bound.pop("return_dict", None)
        bound.pop("logits_to_keep", None)
        if shift is None:
            shift = _shift_labels(labels, ignore)
        if label_rows is not None and label_rows.shape == tuple(shift.shape) and ignore == IGNORE_INDEX:
            label_rows = label_rows.to(shift.device, non_blocking=True)  # counted on the host by the collator
        else:  # the fallback's one host read: the number of label rows
            if label_rows is not None:
                log.warning("loss_tokens: the batch's %s is for shape %s (ignore_index -100), this forward has %s "
                            "(ignore_index %s); finding the label rows on the device instead",
                            LABEL_ROWS_KEY, label_rows.shape, tuple(shift.shape), ignore)
            label_rows = LabelRows.from_shifted(shift, ignore, tight=False)
            self.host_reads += 1
        rows = label_rows.rows
        with self.last_block.per_forward.forward(label_rows if self.last_block_skip else None):
            out = self.lm.base_model(**bound)
        hidden = out[0] if not hasattr(out, "last_hidden_state") else out.last_hidden_state
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows)
        t = shift.reshape(-1).index_select(0, rows).to(h.device)
        if num_items is None:
            denom = torch.tensor(float(rows.numel()), device=h.device)  # count known from the gather
        elif torch.is_tensor(num_items):
            denom = num_items.to(device=h.device, dtype=torch.float32)
        else:
            denom = torch.tensor(float(num_items), device=h.device)
        head = self.lm.get_output_embeddings()
        loss = head_cross_entropy(h, t, head, denom, self.chunk_size, self.scale, self.softcap)
        if return_dict is False:
            return (loss,)
        return CausalLMOutputWithPast(
            loss=loss, logits=None, past_key_values=getattr(out, "past_key_values", None),
            hidden_states=getattr(out, "hidden_states", None), attentions=getattr(out, "attentions", None),
        )


def _logit_transforms(cfg) -> tuple[Optional[float], Optional[float]]:
    scale = getattr(cfg, "logit_scale", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    if getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):  # granite divides by it
        scale = (scale or 1.0) / cfg.logits_scaling
    return (float(scale) if scale not in (None, 1, 1.0) else None), (float(softcap) if softcap else None)


class _LossTokensForward(InstanceForward):
    """The causal LM's forward: in training with labels, the head and loss on label rows only
    (:meth:`LossTokenState.sparse_forward`); otherwise the model's own forward. Carries the wrapped
    forward's signature (Trainer inspects it for columns and loss kwargs)."""

    def __init__(self, lm: nn.Module, state: "LossTokenState", sig: inspect.Signature):
        super().__init__(lm)
        self.state, self.__signature__ = state, sig
        self.__wrapped__ = state.orig_forward
        self.__doc__ = getattr(state.orig_forward, "__doc__", None)

    def inner(self, *args, **kwargs):
        return self.state.orig_forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        label_rows = kwargs.pop(LABEL_ROWS_KEY, None)  # never reaches the model
        if label_rows is not None and not isinstance(label_rows, LabelRows):
            raise TypeError(f"{LABEL_ROWS_KEY} must be an efft.sparsity.LabelRows (from LabelRowsCollator), "
                            f"got {type(label_rows).__name__}")
        sig = self.__signature__
        arguments = dict(sig.bind_partial(*args, **kwargs).arguments)
        extra = arguments.pop("kwargs", {}) if "kwargs" in sig.parameters else {}
        arguments.update(extra)
        has_labels = arguments.get("labels") is not None or arguments.get("shift_labels") is not None
        if not (has_labels and self.module.training and torch.is_grad_enabled()):
            return self.inner(*args, **kwargs)
        return self.state.sparse_forward(arguments, label_rows)


def apply_loss_tokens(model: nn.Module, chunk_size: int = 1024, verify: bool = True, last_block: bool = True) -> nn.Module:
    """Wrap the causal LM's forward (under peft too) so training computes the head+loss on label rows only.

    Raises ValueError for a model the generic path cannot handle (no linear-compatible output
    embedding, no ``base_model`` decoder, MoE auxiliary loss, or a forward whose logits differ from
    ``head(base_model(...))`` on a check input when ``verify``).
    """
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"sparsity.loss_tokens.chunk_size must be a positive integer, got {chunk_size!r}")
    lm = find_causal_lm(model)
    if hasattr(lm, "_efft_loss_tokens"):
        lm._efft_loss_tokens.chunk_size = chunk_size
        return model
    name = type(lm).__name__
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for key, why in _UNSUPPORTED_CONFIG.items():
        if getattr(cfg, key, False):
            raise ValueError(f"sparsity.loss_tokens cannot wrap {name}: {key} is set ({why})")
    head = lm.get_output_embeddings()
    if head is None or lm.base_model is lm:
        raise ValueError(f"sparsity.loss_tokens cannot wrap {name}: no output embedding / decoder (base_model) found")
    scale, softcap = _logit_transforms(cfg)
    orig_forward = lm.forward
    sig = inspect.signature(orig_forward)
    if "labels" not in sig.parameters:
        raise ValueError(f"sparsity.loss_tokens cannot wrap {name}: its forward takes no labels")
    layers = decoder_layers(lm)
    if last_block and layers is not None and len(layers):
        block = install_last_block(layers[-1], cfg)
    else:
        block = LastBlock()
        block.reason = "last_block=False" if not last_block else "no decoder layers found"
    state = LossTokenState(lm, chunk_size, scale, softcap, block, orig_forward)
    _LossTokensForward(lm, state, sig).install()
    try:
        lm.accepts_loss_kwargs = True  # the wrapped forward honours num_items_in_batch (Trainer reads this)
    except AttributeError:  # a read-only property on some class: Trainer then inspects the signature
        pass
    lm._efft_loss_tokens = state
    if verify:
        try:
            checked = _verify(lm, state)
        except Exception:
            remove_loss_tokens(lm)
            raise
        if checked:
            block.prune()  # the check forward showed which last-block modules run after the attention
    return model


def remove_loss_tokens(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_loss_tokens` (restores the original forwards)."""
    lm = find_causal_lm(model)
    state = lm.__dict__.pop("_efft_loss_tokens", None)
    if state is None:
        return model
    remove_wrapper(lm, _LossTokensForward)  # token elimination's wrapper over it, if any, stays
    lm.__dict__.pop("accepts_loss_kwargs", None)
    state.last_block.remove()
    return model


def _verify(lm: nn.Module, state: LossTokenState) -> bool:
    """Compare the wrapped loss with the model's own on a short input (eval mode, no grad); False
    when there are no weights to run (meta device)."""
    # the device the model computes on (a host-resident embedding's weight stays in host memory)
    p = next((q for q in lm.parameters() if not getattr(q, "_efft_host_resident", False)), None)
    if p is None or p.device.type == "meta":
        return False
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    vocab = int(getattr(cfg, "vocab_size"))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=g).to(p.device)
    labels = ids.clone()
    labels[0, :3] = IGNORE_INDEX
    labels[1, :5] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[0, -1] = 0  # a padded position: the attention gets an explicit mask (its rows are gathered)
    labels[0, -1] = IGNORE_INDEX
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            ref = state.orig_forward(input_ids=ids, attention_mask=mask, labels=labels).loss
            got = state.sparse_forward(dict(input_ids=ids, attention_mask=mask, labels=labels))[0]
    finally:
        state.last_block.rows = None
        state.host_reads = 0  # the check input carries no label rows; count training forwards only
        lm.train(was_training)
    tol = 1e-3 if p.dtype == torch.float32 else 3e-2
    if not (math.isfinite(float(ref)) and abs(float(got) - float(ref)) <= tol * max(1.0, abs(float(ref)))):
        raise ValueError(
            f"sparsity.loss_tokens cannot wrap {type(lm).__name__}: its forward does more than "
            f"lm_head(base_model(...)) (check loss {float(got):.6f} vs the model's own {float(ref):.6f}); "
            "disable sparsity.loss_tokens for this model family"
        )
    return True
