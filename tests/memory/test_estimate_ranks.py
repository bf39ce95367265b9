"""The planner per rank (``estimate(..., nproc_per_node=N)``) against what 2 gloo processes hold.

One torchrun launch (efft.memory.ranks) runs every case, since process start-up dominates:
FSDP2 through efft's own ``shard_model`` and DDP as Trainer builds it. Measured per rank: the local
bytes of parameters (shards), gradients and optimizer state, the full parameters FSDP2 gathers for
each unit, and DDP's gradient buckets. Shapes are odd (vocab 255, intermediate 97, LoRA r 3) so that
FSDP2's dim-0 shards are uneven: rank 0 gets ceil(rows / 2) rows, rank 1 the rest, and both store
and receive gradients padded to rank 0's rows; the AdamW moments follow the unpadded shard."""
import copy
import json

import pytest

from efft.memory import estimate as est
from efft.memory import ranks
from tests.launch import launch, torchrun
from tests.memory.harness import recipe

ODD = ranks.SHARDED["full FT AdamW"]["model"]["config"]  # vocab 255, intermediate 97: uneven shards
FSDP = ranks.SHARDED  # case -> recipe (train.fsdp is added for the planner; the worker shards with shard_model)
DDP = {  # case -> (recipe, gradient_as_bucket_view)
    "full": (recipe(ODD, batch=1, seq=8), False),  # as Trainer (accelerate) wraps the model
    "full_bucket_view": (recipe(ODD, batch=1, seq=8), True),
    "layerwise": (recipe(ODD, batch=1, seq=8, optim={"name": "apollo_mini", "layerwise": True}), False),
}


def _fsdp(rd: dict) -> dict:
    rd = copy.deepcopy(rd)
    rd["train"]["fsdp"] = True
    return rd


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    cases = {f"fsdp-{k}": {"mode": "fsdp", "recipe": rd} for k, rd in FSDP.items()}
    cases.update({f"ddp-{k}": {"mode": "ddp", "recipe": rd, "bucket_view": view} for k, (rd, view) in DDP.items()})
    (root / "cases.json").write_text(json.dumps(cases))
    launch(torchrun("-m", "efft.memory.ranks", str(root / "cases.json"), str(root)))
    return [json.loads((root / f"rank{k}.json").read_text()) for k in (0, 1)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(FSDP))
def test_fsdp_per_rank_bytes_equal_measured(case, ranks):
    e = est.estimate(_fsdp(FSDP[case]), nproc_per_node=2)
    units = e.details["fsdp_units"]
    for k in (0, 1):
        got, want = ranks[k][f"fsdp-{case}"], e.details["per_rank"][k]
        assert want["weights"] + want["adapters"] == got["weights"]
        assert want["gradients"] == got["gradients"]
        assert want["optimizer_state"] == got["optimizer_state"]
        # the full parameters each unit gathers: every decoder layer, and the root (embeddings, norm, head)
        assert units["layers"] == got["gathered_layers"]
        assert units["root"] == got["gathered_root"]
        assert got["gathered_at_once"] <= e.communication  # the CPU forward gathers root + one layer
    one, two = ranks[0][f"fsdp-{case}"], ranks[1][f"fsdp-{case}"]
    assert one["optimizer_state"] >= two["optimizer_state"]  # rank 0 holds the most ...
    assert e.optimizer_state == one["optimizer_state"]  # ... and is the rank the estimate shows
    if case != "PEQA (NF4)":  # odd rows (PEQA's scales are even): the state shards really are uneven
        assert one["optimizer_state"] > two["optimizer_state"]
    single = est.estimate(FSDP[case])
    assert e.gradients < single.gradients and e.optimizer_state < single.optimizer_state


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(DDP))
def test_ddp_rank_holds_one_process_plus_its_buckets(case, ranks):
    rd, view = DDP[case]
    single, e = est.estimate(rd), est.estimate(rd, nproc_per_node=2)
    for k in (0, 1):
        got = ranks[k][f"ddp-{case}"]
        assert got["weights"] == single.weights + single.adapters == e.weights + e.adapters
        assert got["optimizer_state"] == single.optimizer_state == e.optimizer_state
        if case != "layerwise":  # layer-wise frees each gradient in its hook; the peak is tested in test_estimate_exact
            assert got["gradients"] == single.gradients == e.gradients
        # DDP's buckets: a copy of every gradient the reducer holds unless they are the gradients' storage
        assert got["buckets_all"] == e.communication
        assert got["buckets_separate"] == (0 if view else e.communication)
    assert e.total == single.total + e.communication


def _budget_between(a: int, b: int) -> int:
    return (a + b) // 2


CHEAP_DONE = {"train": {"gradient_checkpointing": True, "per_device_train_batch_size": 1},
              "sparsity": {"loss_tokens": {"enabled": True}}}


def _tight(**sections):
    """A full fine-tune of smollm2 whose cheaper fixes are already on (so sharding is the next one)."""
    rd = {"model": {"architecture": "smollm2-135m-instruct"}, "data": {"path": "-", "max_seq_length": 512},
          **copy.deepcopy(CHEAP_DONE)}
    for k, v in sections.items():
        rd.setdefault(k, {}).update(v)
    return rd


def test_sharding_is_suggested_over_the_given_processes():
    from efft import config as C

    rd = _tight()
    alone, sharded = est.estimate(rd, nproc_per_node=2), est.estimate(_fsdp(rd), nproc_per_node=2)
    assert sharded.total < alone.total
    e = est.estimate(rd, gpu_memory=_budget_between(sharded.total, alone.total), nproc_per_node=2)
    assert e.fits is False and e.suggestion_changes == ["train.fsdp=true"]
    assert "over 2 GPUs" in e.suggestion
    again = est.estimate(C.apply_overrides(rd, e.suggestion_changes), gpu_memory=e.gpu_memory, nproc_per_node=2)
    assert again.fits is True and again.total == e.suggestion_total
    # one process: nothing to shard over
    e1 = est.estimate(rd, gpu_memory=_budget_between(sharded.total, alone.total))
    assert not any(c.startswith("train.fsdp") for c in e1.suggestion_changes)


@pytest.mark.parametrize("sections", [{"optim": {"name": "galore", "rank": 16}},
                                      {"optim": {"name": "adamw", "layerwise": True}},
                                      {"optim": {"state_bits": 8}}])
def test_sharding_is_not_suggested_where_fsdp_refuses_the_recipe(sections):
    """Under a budget that the sharded run would meet, a recipe efft's FSDP refuses (projected,
    layer-wise, 8-bit AdamW: efft.integrations.fsdp.fsdp_problems) gets another change or none."""
    from efft.integrations.fsdp import fsdp_problems

    rd = _tight(**sections)
    r = est._recipe_from(_fsdp(rd))
    assert fsdp_problems(r)
    sharded = est._estimate(r, est.resolve_config(r.model), 1.0, nproc=2)  # what it would take, refusal aside
    alone = est.estimate(rd, nproc_per_node=2)
    assert sharded.total < alone.total
    e = est.estimate(rd, gpu_memory=_budget_between(sharded.total, alone.total), nproc_per_node=2)
    assert e.fits is False
    assert not any(c.startswith("train.fsdp") for c in e.suggestion_changes)
    with pytest.raises(ValueError, match="train.fsdp: optim"):
        est.estimate(_fsdp(rd), nproc_per_node=2)


def test_fsdp_needs_processes_and_the_cli_takes_them(tmp_path, capsys):
    import yaml

    from efft import cli

    with pytest.raises(ValueError, match="nproc-per-node"):
        est.estimate(_fsdp(FSDP["full FT AdamW"]))
    with pytest.raises(ValueError, match="positive integer"):
        est.estimate(FSDP["full FT AdamW"], nproc_per_node=0)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    rd = _fsdp(FSDP["full FT AdamW"])
    rd["data"]["path"] = str(data)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(rd))
    assert cli.main(["estimate", str(tmp_path / "r.yaml"), "--nproc-per-node", "2"]) == 0
    out = capsys.readouterr().out
    assert "per rank of 2 (FSDP2)" in out and "FSDP gathered params" in out
    assert cli.main(["estimate", str(tmp_path / "r.yaml"), "train.fsdp=false", "--nproc_per_node", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["nproc_per_node"] == 2 and d["communication"] == d["gradients"]  # DDP: buckets copy the gradients
