"""Label rows carried by the batch: no host read on the training hot path, one in the fallback.

The host reads are observed as the aten ops that produce a data-dependent size or a Python scalar
(``nonzero``, ``_local_scalar_dense`` behind ``.item()``/``int()``/``bool()``, ...): on a GPU each
one waits for the device. They are recorded with a TorchDispatchMode over a training
forward + backward (eager attention: transformers' sdpa mask code makes a read of its own when an
attention mask is passed).
"""
import collections
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from efft.integrations.transformers import EfftPlugin, LabelRowsCallback
from efft.sparsity import LABEL_ROWS_KEY, LabelRows, LabelRowsCollator, apply_loss_tokens
from efft.sparsity.label_rows import shift_labels, with_label_rows
from tests.sparsity.test_loss_tokens import _rel
from tests.tiny import tiny_batch, tiny_model

HOST_READS = ("nonzero", "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose", "masked_select", "unique")


class HostReads(TorchDispatchMode):
    """Counts the aten ops whose result size or value must come back to the host."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.lstrip("_") in HOST_READS or name in HOST_READS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def test_collator_index_equals_a_plain_scan_of_the_labels():
    def collate(features):
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    batch = tiny_batch(batch=3, seq=10, label_fraction=0.4, seed=3)
    features = [{k: v[i] for k, v in batch.items()} for i in range(3)]
    out = LabelRowsCollator(collate)(features)
    want = [b * 10 + s for b in range(3) for s in range(9) if int(batch["labels"][b, s + 1]) != -100]
    rows = out[LABEL_ROWS_KEY]
    assert isinstance(rows, LabelRows) and rows.shape == (3, 10) and rows.count == len(want)
    assert rows.rows.tolist() == want
    assert torch.equal(out["labels"], batch["labels"])
    no_labels = {"input_ids": batch["input_ids"]}
    assert with_label_rows(no_labels) is no_labels  # nothing to index: unchanged


@pytest.mark.parametrize("tight", [True, False], ids=["collator", "fallback"])
def test_per_row_positions_and_slots_against_a_plain_scan(tight):
    labels = tiny_batch(batch=3, seq=10, label_fraction=0.4, seed=3)["labels"]
    labels[2] = -100  # a row without labels
    shifted = shift_labels(labels)
    per_row = [[s for s in range(10) if int(shifted[b, s]) != -100] for b in range(3)]
    n = sum(len(p) for p in per_row)
    got = LabelRows.from_shifted(shifted, tight=tight)
    k = max(len(p) for p in per_row) if tight else min(n, 10)
    assert got.positions.shape == (3, k) and got.count == n
    for b, want in enumerate(per_row):
        row = got.positions[b].tolist()
        assert row[: len(want)] == want
        assert all(p == (want[-1] if want else 9) for p in row[len(want):])  # padding repeats a valid position
    flat = (got.positions + torch.arange(3)[:, None] * 10).reshape(-1)
    assert flat[got.slots].tolist() == got.rows.tolist()  # slot i holds label row i


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_host_read_in_training_forward_backward_with_the_index(family):
    model = tiny_model(family, **({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0} if family == "gpt2" else {}))
    dense = copy.deepcopy(model).train()
    apply_loss_tokens(model, chunk_size=5)
    model.train()
    batch = tiny_batch(seq=24, batch=2, label_fraction=0.5, seed=4)
    with HostReads() as own:
        dense(**batch).loss.backward()
    assert not own.ops, f"the dense model itself reads back {dict(own.ops)}; the test needs a model that does not"

    indexed = with_label_rows(batch)  # built by the collator, before the batch would go to the device
    with HostReads() as fast:
        out = model(**indexed)
        out.loss.backward()
    assert not fast.ops, f"host reads on the hot path: {dict(fast.ops)}"
    fast_loss = out.loss.detach()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    with HostReads() as fallback:
        out = model(**batch)
        out.loss.backward()
    assert fallback.ops == {"nonzero": 1}, f"the fallback should read the label rows once, got {dict(fallback.ops)}"
    assert model._efft_loss_tokens.host_reads == 1
    # the two paths pad the last block's queries differently (per-row max vs min(count, seq)): float order only
    assert _rel(out.loss.detach(), fast_loss) <= 1e-5
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert _rel(p.grad, fast_grads[n]) <= 1e-5, n


def test_key_never_reaches_the_model_and_mismatch_falls_back():
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    apply_loss_tokens(model)
    batch = tiny_batch(seq=12, label_fraction=0.5, seed=5)
    indexed = with_label_rows(batch)
    model.eval()
    dense.eval()
    with torch.no_grad():  # evaluation: dense path, the key is dropped before the model's own forward
        assert torch.equal(model(**indexed).logits, dense(**batch).logits)
    model.train()
    stale = dict(batch, **{LABEL_ROWS_KEY: with_label_rows({k: v[:1] for k, v in batch.items()})[LABEL_ROWS_KEY]})
    ref = model(**batch).loss
    reads = model._efft_loss_tokens.host_reads
    assert torch.equal(model(**stale).loss, ref)  # rows for another shape: found on the device instead
    assert model._efft_loss_tokens.host_reads == reads + 1
    with pytest.raises(TypeError, match="LabelRows"):
        model(**dict(batch, **{LABEL_ROWS_KEY: torch.arange(3)}))


def test_plugin_trainer_kwargs_bring_the_callback_only_with_loss_tokens(tmp_path):
    import transformers

    args = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    on = EfftPlugin({"sparsity": {"loss_tokens": {"enabled": True}}})
    off = EfftPlugin({"sparsity": {"loss_tokens": {"enabled": False}}})
    assert any(isinstance(c, LabelRowsCallback) for c in on.trainer_kwargs(tiny_model("llama"), args)["callbacks"])
    assert not any(isinstance(c, LabelRowsCallback) for c in off.trainer_kwargs(tiny_model("llama"), args)["callbacks"])


def test_callback_wraps_the_training_loader_once():
    def collate(features):
        return {k: torch.stack([f[k] for f in features]) for k in features[0]}

    batch = tiny_batch(batch=4, seq=8, label_fraction=0.5, seed=6)
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=collate)
    cb = LabelRowsCallback()
    cb.on_train_begin(None, None, None, train_dataloader=loader)
    cb.on_train_begin(None, None, None, train_dataloader=loader)
    assert isinstance(loader.collate_fn, LabelRowsCollator) and loader.collate_fn.collate_fn is collate
    first = next(iter(loader))
    assert first[LABEL_ROWS_KEY].rows.tolist() == LabelRows.from_labels(batch["labels"][:2]).rows.tolist()
