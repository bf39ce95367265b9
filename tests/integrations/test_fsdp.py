"""FSDP2 (``train.fsdp: true``: efft applies ``fully_shard`` per decoder layer) on 2 CPU processes over
gloo equals one process on the same global batch: losses and the saved final weights (full model,
peft adapter, PEQA's 4-bit layout) and the last checkpoint. A run resumed from its step-2 checkpoint
equals the uninterrupted 2-process run bit for bit (same processes, same shards, same order of
operations: nothing may differ). One torchrun launch trains every case, since process start-up
dominates. Sampled linears draw their rows per rank, so their reference is DDP on the same per-rank
batches. The combinations FSDP2 cannot carry are refused, all listed, before anything loads.

Tolerance: the sharded run reduce-scatters the mean of two half-batch gradients where one process
takes one full-batch mean, so fp32 rounding differs (seen: losses within 1e-6, weights within 3e-7
after 4 AdamW steps); losses are compared to 2e-5 and weights to 1e-5."""
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainingArguments

from efft import config
from efft.compose import check_recipe
from efft.config import RecipeError
from efft.integrations.transformers import EfftPlugin, check_training_arguments
from efft.train import train
from tests.integrations.test_ddp import data_path, recipe_dict  # noqa: F401 (data_path: fixture)
from tests.launch import free_port, launch, torchrun

NF4 = {"type": "nf4", "compute_dtype": "float32", "blocksize": 32}
GENERATE = {"prompts": ["Add 1 and 2.", "Add 3 and 4."], "max_new_tokens": 4}  # after training, on every rank
# case -> (sections, the single-process case it must equal, trainable tensors: 2 layers x 7 linears
# (+ 2 norms each) + embeddings, final norm, lm_head for full fine-tuning; 2 per LoRA linear; 1 per PEQA linear)
SAVE_2 = {"save_steps": 2}  # a checkpoint at step 2 (and 4) to resume from
CASES = {
    "full": ({"generate": GENERATE, "train": SAVE_2}, "full", 21),
    "lora_sparsity": ({"adapter": {"type": "lora", "r": 4, "lora_alpha": 8}, "train": SAVE_2,
                       "sparsity": {"loss_tokens": {"enabled": True, "chunk_size": 16},
                                    "token_elimination": {"enabled": True, "keep_ratio": 0.5, "start_layer": 1}}},
                      "lora_sparsity", 28),
    "qlora": ({"quant": NF4, "adapter": {"type": "lora", "r": 4, "lora_alpha": 8}, "generate": GENERATE,
               "train": {"gradient_checkpointing": True, **SAVE_2}}, "qlora", 28),
    "peqa": ({"quant": NF4, "adapter": {"type": "peqa"}, "train": SAVE_2}, "peqa", 14),
    # exact activation recompute (norms, gated MLP) under sharded parameters and checkpointing: equals dense
    "full_recompute": ({"generate": GENERATE, "sparsity": {"recompute": {"enabled": True}},
                        "train": {"gradient_checkpointing": True}}, "full", 21),
    # equals plain torch AdamW in one process
    "offload_optimizer": ({"offload": {"optimizer": True}, "generate": GENERATE, "train": SAVE_2}, "full", 21),
}
# resumed from checkpoint-2 of the uninterrupted FSDP run: with train.resume_from_checkpoint=true in an output_dir
# holding a copy of it, or (lora_sparsity) with the checkpoint's path
RESUMED = ("full", "lora_sparsity", "qlora", "peqa", "offload_optimizer")
SAMPLED = {"sparsity": {"sampled_linear": {"enabled": True, "keep": 0.5}}}


def _fsdp(recipe: dict) -> dict:
    recipe["train"]["fsdp"] = True
    return recipe


def _recipe_for(data_path, out, batch, sections) -> dict:
    """test_ddp's recipe; a ``train`` entry in ``sections`` adds to its train section."""
    sections = dict(sections)
    train_extra = sections.pop("train", {})
    recipe = recipe_dict(data_path, out, batch, sections)
    recipe["train"].update(train_extra)
    return recipe


@pytest.fixture(scope="module")
def runs(data_path, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("fsdp")
    for ref in sorted({ref for _, ref, _ in CASES.values()}):
        train(config.validate(_recipe_for(data_path, root / f"single-{ref}", 4, CASES[ref][0])))
    recipes = {f"fsdp-{name}": _fsdp(_recipe_for(data_path, root / f"fsdp-{name}", 2, sections))
               for name, (sections, _, _) in CASES.items()}
    for name in RESUMED:
        recipe = json.loads(json.dumps(recipes[f"fsdp-{name}"]))
        out = root / f"fsdp-{name}-resumed"
        recipe["train"]["output_dir"] = str(out)
        if name == "lora_sparsity":
            recipe["train"]["resume_from_checkpoint"] = str(root / f"fsdp-{name}" / "checkpoint-2")
        else:
            recipes[f"copy-{name}"] = {"copy": [str(root / f"fsdp-{name}" / "checkpoint-2"), str(out / "checkpoint-2")]}
            recipe["train"]["resume_from_checkpoint"] = True
        recipes[f"fsdp-{name}-resumed"] = recipe
    recipes["fsdp-sampled"] = _fsdp(recipe_dict(data_path, root / "fsdp-sampled", 2, SAMPLED))
    recipes["ddp-sampled"] = recipe_dict(data_path, root / "ddp-sampled", 2, SAMPLED)
    (root / "launch.json").write_text(json.dumps(recipes))
    launch(torchrun(str(Path(__file__).with_name("fsdp_worker.py")), str(root / "launch.json")))
    return root


def _losses(run: Path) -> list[float]:
    return [l for _, l in json.loads((run / "card.json").read_text())["loss_curve"]]


def _assert_same_weights(want_dir: Path, got_dir: Path, atol: float = 1e-5) -> None:
    files = sorted(p.name for p in want_dir.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in got_dir.glob("*.safetensors"))
    for name in files:
        want, got = load_file(want_dir / name), load_file(got_dir / name)
        assert want.keys() == got.keys()
        for k in want:
            a, b = want[k], got[k]
            if k.endswith(".quant_state.bitsandbytes__nf4"):  # JSON bytes: compare the values, floats approximately
                a, b = json.loads(bytes(a.tolist())), json.loads(bytes(b.tolist()))
                assert b.keys() == a.keys(), k
                for field in a:
                    if isinstance(a[field], float):  # nested_offset: the mean of trained absmax values
                        assert b[field] == pytest.approx(a[field], rel=1e-5 if atol else 0, abs=0), (k, field)
                    else:
                        assert b[field] == a[field], (k, field)
            elif a.is_floating_point():
                torch.testing.assert_close(b, a, atol=atol, rtol=0, msg=k)
            else:  # packed codes, int8 absmax codes: bit for bit
                assert torch.equal(a, b), k


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fsdp_two_processes_equal_one_process(case, runs):
    ref = CASES[case][1]
    got, want = _losses(runs / f"fsdp-{case}"), _losses(runs / f"single-{ref}")
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=0, abs=2e-5)
    _assert_same_weights(runs / f"single-{ref}" / "final", runs / f"fsdp-{case}" / "final")
    # greedy answers after training (a peft model's generate goes through the sharded root too)
    assert _card(runs / f"fsdp-{case}")["generations"] == _card(runs / f"single-{ref}")["generations"]
    # the end-of-training checkpoint Trainer writes (whole tensors gathered around the save)
    _assert_same_weights(runs / f"single-{ref}" / "checkpoint-4", runs / f"fsdp-{case}" / "checkpoint-4")
    # measured on rank 0: it holds half of every trainable parameter and of its AdamW moments; buffers
    # (the packed quantized base) stay whole on each rank
    one, two = _memory(runs / f"single-{ref}"), _memory(runs / f"fsdp-{case}")
    assert two["weights_trainable_bytes"] * 2 == one["weights_trainable_bytes"]  # 0 for PEQA: exported by then
    assert two["buffers_bytes"] == one["buffers_bytes"]
    step_bytes = 4 * CASES[case][2]  # AdamW's step count, one fp32 scalar per parameter, is not sharded
    assert (two["optimizer_state_bytes"] - step_bytes) * 2 == one["optimizer_state_bytes"] - step_bytes


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", RESUMED)
def test_fsdp_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(case, runs):
    whole, resumed = runs / f"fsdp-{case}", runs / f"fsdp-{case}-resumed"
    card = _card(resumed)
    assert Path(card["resumed_from"]) == (whole if case == "lora_sparsity" else resumed) / "checkpoint-2"
    assert card["steps_this_run"] == 2 and card["global_step"] == 4
    # the steps after the checkpoint and the results, bit for bit: optimizer moments and step counts, the
    # scheduler's position, the data order and the weights all came back
    after = [(s, l) for s, l in _card(whole)["loss_curve"] if s > 2]
    assert len(after) == 2 and [(s, l) for s, l in card["loss_curve"] if s > 2] == after
    _assert_same_weights(whole / "final", resumed / "final", atol=0)
    _assert_same_weights(whole / "checkpoint-4", resumed / "checkpoint-4", atol=0)
    # what the resumed run wrote is itself resumable: each rank's optimizer shards and RNG state, then the marker
    ckpt = resumed / "checkpoint-4"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in (ckpt / "efft_fsdp_state").iterdir()}
    assert all((ckpt / f).is_file() for f in ("scheduler.pt", "rng_state_0.pth", "rng_state_1.pth",
                                              "efft_complete.json"))


def _card(run: Path) -> dict:
    return json.loads((run / "card.json").read_text())


def _memory(run: Path) -> dict:
    return _card(run)["memory"]


@pytest.mark.timeout(600)
def test_fsdp_sampled_linear_equals_ddp_on_the_same_per_rank_batches(runs):
    got, want = _losses(runs / "fsdp-sampled"), _losses(runs / "ddp-sampled")
    assert len(got) == 4
    assert got == pytest.approx(want, rel=0, abs=2e-5)
    _assert_same_weights(runs / "ddp-sampled" / "final", runs / "fsdp-sampled" / "final")


@pytest.mark.timeout(600)
def test_accelerate_launch_of_efft_train_equals_torchrun(runs, tmp_path):
    """``accelerate launch`` (its torchrun-based launcher; on CPU TrainingArguments picks gloo) runs the
    same DDP training as torchrun: the sampled-linear recipe, whose per-rank draws would differ if the
    processes or their batches did."""
    recipe = json.loads((runs / "launch.json").read_text())["ddp-sampled"]
    recipe["train"]["output_dir"] = str(tmp_path / "accelerate")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    launch([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
             "--main_process_port", str(free_port()), "-m", "efft.cli", "train", str(tmp_path / "r.yaml")])
    got, want = _losses(tmp_path / "accelerate"), _losses(runs / "ddp-sampled")
    assert len(got) == 4 and got == want
    _assert_same_weights(runs / "ddp-sampled" / "final", tmp_path / "accelerate" / "final")


def _recipe(**sections) -> dict:
    return {"model": {"config": {"model_type": "llama"}}, "data": {"path": "data/quickstart.jsonl"},
            "train": {"fsdp": True}, **sections}


@pytest.mark.parametrize("sections, paths", [
    ({"optim": {"name": "galore", "layerwise": True}, "offload": {"activations": True}},
     ["optim.name", "optim.layerwise", "offload.activations"]),
    ({"optim": {"name": "adamw", "state_bits": 8}, "sparsity": {"partial": {"enabled": True}}},
     ["optim.state_bits", "sparsity.partial.enabled"]),
    ({"optim": {"name": "adamw8bit"}, "quant": {"type": "int8", "trainable": True}},
     ["optim.name", "quant.trainable"]),
])
def test_refused_combinations_are_all_listed_before_loading(sections, paths):
    recipe = config.validate(_recipe(**sections))  # the schema allows each; FSDP does not
    with pytest.raises(RecipeError) as e:
        check_recipe(recipe)  # what efft validate, efft train and EfftPlugin run before any weight loads
    assert [p for p, _ in e.value.problems] == paths
    with pytest.raises(RecipeError) as e:
        EfftPlugin(_recipe(**sections))
    assert [p for p, _ in e.value.problems] == paths
    recipe.train.fsdp = False
    check_recipe(recipe)  # the same recipe without FSDP is accepted


def test_fsdp_settings_are_validated():
    with pytest.raises(RecipeError) as e:
        config.validate(_recipe(train={"fsdp_config": {"version": 1, "reshard_after_forwrd": False},
                                       "resume_from_checkpoint": True}))
    msgs = dict(e.value.problems)
    assert "train.fsdp_config.version" in msgs
    assert "did you mean 'reshard_after_forward'" in msgs["train.fsdp_config.reshard_after_forwrd"]
    with pytest.raises(RecipeError) as e:
        config.validate(_recipe(train={"fsdp": False, "fsdp_config": {"reshard_after_forward": False}}))
    assert [p for p, _ in e.value.problems] == ["train.fsdp_config"]
    config.validate(_recipe(train={"fsdp": True, "resume_from_checkpoint": True}))  # resumable (see the resume test)
    with pytest.raises(RecipeError) as e:  # but not the fp16 loss scaler's state
        config.validate(_recipe(train={"fsdp": True, "fp16": True, "resume_from_checkpoint": True}))
    assert [p for p, _ in e.value.problems] == ["train.resume_from_checkpoint"]
    assert "loss scale" in e.value.problems[0][1]
    r = config.validate(_recipe(train={"fsdp": True, "fsdp_config": {"reshard_after_forward": False}}))
    assert r.train.fsdp and r.train.fsdp_config.reshard_after_forward is False


def test_resumed_fsdp_run_finds_its_checkpoint_or_says_why_not(tmp_path):
    """The FSDP callback reads the optimizer state from the checkpoint handed to trainer.train: the one
    EfftPlugin.last_checkpoint returned (remembered), else output_dir/checkpoint-<resumed step>."""
    from types import SimpleNamespace

    from efft.integrations.fsdp import STATE_DIR, resumed_checkpoint
    from efft.integrations.transformers import COMPLETE_MARKER

    def checkpoint(path: Path, step: int, state: bool = True) -> Path:
        (path / STATE_DIR).mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (path / COMPLETE_MARKER).write_text("{}")
        if state:
            (path / STATE_DIR / ".metadata").write_bytes(b"")
        return path

    args, at_2 = SimpleNamespace(output_dir=str(tmp_path / "out")), SimpleNamespace(global_step=2)
    elsewhere = checkpoint(tmp_path / "old" / "checkpoint-2", 2)
    assert resumed_checkpoint(args, at_2, str(elsewhere)) == elsewhere
    with pytest.raises(RuntimeError, match="plugin.last_checkpoint"):  # not told, and not in output_dir
        resumed_checkpoint(args, at_2, None)
    plugin = EfftPlugin({"train": {"fsdp": True}})
    assert plugin.last_checkpoint(tmp_path / "old") == str(elsewhere) == plugin.resume_from
    in_out = checkpoint(tmp_path / "out" / "checkpoint-2", 2)
    assert resumed_checkpoint(args, at_2, None) == in_out
    with pytest.raises(RuntimeError, match="plugin.last_checkpoint"):  # given, but of another step
        resumed_checkpoint(args, SimpleNamespace(global_step=4), str(elsewhere))
    model_only = checkpoint(tmp_path / "older" / "checkpoint-2", 2, state=False)
    with pytest.raises(RuntimeError, match="holds no optimizer state"):
        resumed_checkpoint(args, at_2, str(model_only))


def test_trainingarguments_fsdp_is_refused_with_the_recipe_problems(tmp_path):
    recipe = config.validate(_recipe(optim={"name": "apollo"}, train={}))
    args = TrainingArguments(output_dir=str(tmp_path), fsdp=True, use_cpu=True, report_to="none")
    with pytest.raises(RecipeError) as e:
        check_training_arguments(recipe, args)
    assert [p for p, _ in e.value.problems] == ["TrainingArguments.fsdp", "optim.name"]
    assert "train.fsdp: true" in e.value.problems[0][1]


def test_plugin_refuses_checkpoints_transformers_cannot_write_for_fsdp(tmp_path):
    recipe = config.validate(_recipe(train={"fsdp": True}))
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", save_strategy="steps")
    with pytest.raises(RecipeError) as e:
        check_training_arguments(recipe, args)
    assert [p for p, _ in e.value.problems] == ["TrainingArguments.save_only_model"]
    check_training_arguments(recipe, TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                                                       save_only_model=True))


def test_fsdp_in_one_process_says_to_launch_with_torchrun(tmp_path, data_path):  # noqa: F811
    from tests.tiny import tiny_model

    plugin = EfftPlugin({"train": {"fsdp": True, "output_dir": str(tmp_path)}})
    args = plugin.training_arguments(use_cpu=True)
    with pytest.raises(RecipeError, match="torchrun"):
        plugin.trainer_kwargs(tiny_model(), args)
    with pytest.raises(RecipeError, match="torchrun"):  # efft train: before the model loads
        train(config.validate(_fsdp(recipe_dict(data_path, tmp_path / "out", 2, {}))))
    assert not (tmp_path / "out").exists()


def test_efft_validate_lists_every_fsdp_refusal(tmp_path, capsys):
    from efft.cli import main

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(optim={"name": "apollo_mini"}, sparsity={"partial": {"enabled": True}},
                                           offload={"activations": True})))
    assert main(["validate", str(path)]) == 2
    out = capsys.readouterr()
    text = out.out + out.err
    for p in ("optim.name", "sparsity.partial.enabled", "offload.activations"):
        assert f"- {p}: " in text
    assert "3 problems" in text
