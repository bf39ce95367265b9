"""Layer-wise optimizers under DDP: one torchrun launch (2 CPU processes, gloo) runs GaLore,
APOLLO-Mini and FRUGAL layer-wise with gradient accumulation and clipping, through a plain loop and
through transformers.Trainer with the EfftPlugin, and GaLore on trainable int8 weights. Losses and
final weights equal one process on the same global batch (fp32, atol 1e-5), the ranks are bitwise
equal, and DDP's reducer holds none of the layer-wise gradients."""
import pytest
import torch

from tests.launch import launch, torchrun

from . import layerwise_ddp_worker as w
from .helpers import model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("lwddp")
    launch(torchrun("-m", "tests.optim.layerwise_ddp_worker", str(out)))
    return out


def _load(out, kind, name):
    return [torch.load(out / f"{kind}-{name}-{r}.pt", weights_only=True) for r in (0, 1)]


def _check(r0, r1, single, mean_losses):
    for a, b, c in zip(r0["params"], r1["params"], single["params"]):
        assert torch.equal(a, b)  # the ranks take identical steps
        assert torch.allclose(a, c, atol=1e-5, rtol=0)  # == one process on the global batch
    assert max((a - i).abs().max().item() for a, i in zip(r0["params"], model().parameters())) > 1e-3  # trained
    assert r0["norms"] == r1["norms"]  # the clip uses the global (averaged) gradient norm on every rank
    assert r0["norms"] == pytest.approx(single["norms"], rel=1e-5)
    assert min(single["norms"]) > w.CLIP  # clipping was active
    assert mean_losses == pytest.approx(single["losses"], rel=1e-5, abs=1e-6)


def _small_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params if p.dim() < 2)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", w.PLAIN)
def test_plain_loop_equals_single_process(runs, name):
    r0, r1 = _load(runs, "plain", name)
    single = w.run_plain(name)
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]  # each rank saw half of each micro-batch
    _check(r0, r1, single, mean)
    # DDP's reducer holds (and buckets) only the 1-D parameters, which stay with it
    assert r0["reducer_bytes"] == _small_bytes(single["params"])
    # what the hooks all-reduce each step: every 2-D gradient once (not per micro-batch); GaLore
    # sends the r x n projection of a matrix off its refresh steps (each matrix refreshes on step 0,
    # then once in three steps, staggered), APOLLO-Mini and FRUGAL the full gradient
    full = sum(p.numel() for p in single["params"] if p.dim() == 2)
    assert r0["sent"] == r1["sent"] and single["sent"] == [0] * w.STEPS
    if name == "galore":
        assert r0["sent"][0] == full and all(n < full for n in r0["sent"][1:])
    else:
        assert r0["sent"] == [full] * w.STEPS


def test_reducer_holds_no_layerwise_gradient(runs):
    """Peak of full-size gradients alive (hooks, as in test_layerwise.py): in one process the one
    being consumed; under DDP also the one whose all-reduce is in flight; never all of them."""
    r0, r1 = _load(runs, "peak", "galore")
    single = w.run_plain("galore", watch=True, accum=1, steps=2)
    biggest = max(p.numel() * p.element_size() for p in single["params"])
    matrices = sum(p.dim() == 2 for p in single["params"])
    assert single["peak"]["count"] == 1
    for r in (r0, r1):
        assert r["peak"]["count"] == 2 < matrices and r["peak"]["bytes"] <= 2 * biggest
        assert r["reducer_bytes"] == _small_bytes(single["params"])



@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", w.TRAINER)
def test_trainer_with_plugin_equals_single_process(runs, name, tmp_path):
    r0, r1 = _load(runs, "trainer", name)
    single = w.run_trainer(name, str(tmp_path))
    assert len(single["losses"]) == w.STEPS
    _check(r0, r1, single, r0["losses"])  # Trainer logs the loss averaged over the ranks
    assert r0["losses"] == r1["losses"]
    assert r0["reducer_bytes"] == _small_bytes(single["params"])  # Trainer's DDP ignores the layer-wise ones


def test_unwrapped_model_is_refused(runs):
    """A model left unwrapped (the 1-D gradients reduced by no one), and parameters that were never
    excluded from DDP (their gradients would be averaged twice): clear errors, not wrong steps."""
    for r in (0, 1):
        err = torch.load(runs / f"unwrapped-{r}.pt", weights_only=True)["error"]
        assert "differ between ranks" in err and "DistributedDataParallel" in err
        err = torch.load(runs / f"unwrapped-{r}.pt", weights_only=True)["not_excluded"]
        assert "not excluded from DDP" in err and "keep_out_of_ddp(model)" in err


def test_int8_trainable_weights_equal_single_process(runs):
    """Trainable int8 weights (grad carriers) driven by the factory's layer-wise GaLore: the ranks hold
    bitwise equal codes; against one process the gradients agree to fp32 rounding, so a
    stochastic-rounding decision may flip where a weight sits on a threshold (codes within one).
    (GaLore, not APOLLO-Mini: Adam's first step on a rank-1 projection divides near-zero entries by
    themselves plus eps, which turns rounding-level differences into 1e-6 ones and SR into flips.)"""
    from tests.quantized_ft.helpers import assert_codes_within_one

    r0, r1 = _load(runs, "int8", w.INT8_OPTIM)
    single = w.run_plain(w.INT8_OPTIM, int8=True, steps=w.INT8_STEPS)
    for k in r0["int8"]:
        assert all(torch.equal(a, b) for a, b in zip(r0["int8"][k], r1["int8"][k])), k
    assert_codes_within_one(single["int8"], r0["int8"], updates=w.INT8_STEPS)  # one write-back a step
    for a, b, c in zip(r0["params"], r1["params"], single["params"]):
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-5, rtol=0)
    assert r0["norms"] == r1["norms"] and r0["norms"] == pytest.approx(single["norms"], rel=1e-4)
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean == pytest.approx(single["losses"], rel=1e-4)



def test_int8_layerwise_optimizer_equals_single_process(runs):
    """efft.quant's Int8LayerwiseOptimizer (its own hooks, per-parameter clipping) under DDP."""
    from tests.quantized_ft.helpers import assert_codes_within_one

    r0, r1 = _load(runs, "int8", "driver")
    single = w.run_int8_driver()
    assert r0["reducer_bytes"] == _small_bytes(single["params"])  # DDP holds the norms only
    for k in r0["int8"]:
        assert all(torch.equal(a, b) for a, b in zip(r0["int8"][k], r1["int8"][k])), k
    assert_codes_within_one(single["int8"], r0["int8"], updates=w.INT8_STEPS)
    for a, b, c in zip(r0["params"], r1["params"], single["params"]):
        assert torch.equal(a, b) and torch.allclose(a, c, atol=1e-5, rtol=0)
    mean = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
    assert mean == pytest.approx(single["losses"], rel=1e-4)
