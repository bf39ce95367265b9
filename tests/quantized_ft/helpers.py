"""Shared builders for the int8 training tests."""
import torch

from efft.config import QuantConfig
from efft.quant.trainable import Int8TrainableLinear, prepare_int8_training
from tests.tiny import tiny_batch, tiny_model


def int8_cfg(**kw):
    return QuantConfig(type="int8", trainable=True, compute_dtype="float32", **kw)


def int8_model(seed=0, embeddings="frozen", rounding="stochastic", **kw):
    return prepare_int8_training(tiny_model("llama", seed=seed, **kw), int8_cfg(), embeddings=embeddings,
                                 rounding=rounding)


def apollo_mini_groups(model, lr=1e-3):
    """APOLLO-Mini (rank 1, tensor scale 128) on the 2-D weights, AdamW on the rest."""
    low = [p for p in model.parameters() if p.requires_grad and p.dim() == 2 and
           min(p.shape) > 1 and p.shape[0] != model.config.vocab_size]
    ids = {id(p) for p in low}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": low, "rank": 1, "scale_type": "tensor", "scale": 128.0, "proj": "random",
               "update_proj_gap": 200, "proj_type": "std"}]
    if rest:
        groups.append({"params": rest})
    return groups


def batches(n, vocab=256, batch=2, seq=16, seed=0):
    return [tiny_batch(vocab, batch=batch, seq=seq, seed=seed + i) for i in range(n)]


def int8_state(model):
    return {n: (m.weight_codes.clone(), m.weight_scale.clone(), m.sr_state.clone())
            for n, m in model.named_modules() if isinstance(m, Int8TrainableLinear)}


def float_params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if not isinstance(model.get_submodule(n.rpartition(".")[0]), Int8TrainableLinear) or not n.endswith("weight")}


def assert_same_state(a, b):
    sa, sb = int8_state(a), int8_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        for x, y in zip(sa[k], sb[k]):
            assert torch.equal(x, y), k
    fa, fb = float_params(a), float_params(b)
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k


def assert_codes_within_one(sa, sb, updates=None):
    """Two runs whose gradients agree to float32 rounding: a stochastic-rounding decision can flip only
    where the weight sits within that rounding of a threshold, so allow 0.1% of codes to differ by one.
    ``updates``: the number of write-backs each layer must have counted."""
    diff = total = 0
    for k in sa:
        d = (sa[k][0].int() - sb[k][0].int()).abs()
        assert d.max() <= 1, k
        diff += int((d > 0).sum())
        total += d.numel()
        if updates is not None:
            assert sa[k][2][1] == sb[k][2][1] == updates, k
    assert diff <= 1e-3 * total, (diff, total)


def train_steps(model, opt, data, accumulate=1):
    """``opt.step()`` after every ``accumulate`` micro-batches of ``data`` (losses scaled by 1/accumulate);
    returns each micro-batch's loss."""
    losses = []
    for i in range(0, len(data), accumulate):
        for b in data[i:i + accumulate]:
            out = model(**b)
            (out.loss / accumulate).backward()
            losses.append(out.loss.item())
        opt.step()
        opt.zero_grad()
    return losses
