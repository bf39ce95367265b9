"""Recipe schema: every problem reported at once, with path, value and what is allowed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from efft import config
from efft.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def data_file(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n")
    return p


def base(data_file) -> dict:
    return {
        "model": {"config": {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1}},
        "data": {"path": str(data_file)},
        "train": {"max_steps": 2},
    }


def write(tmp_path, d, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


def problems(d):
    with pytest.raises(config.RecipeError) as e:
        config.validate(d)
    return dict(e.value.problems)


def test_valid_recipe_fills_defaults(data_file):
    r = config.validate(base(data_file))
    assert r.train.max_steps == 2 and r.train.learning_rate == 2e-4
    assert r.optim.name == "adamw" and r.quant.type == "none"


def test_unknown_key_suggests_and_lists_allowed(data_file):
    d = base(data_file)
    d["train"]["learning_rat"] = 1e-3
    p = problems(d)
    assert "train.learning_rat" in p
    assert "did you mean 'learning_rate'" in p["train.learning_rat"]
    assert "per_device_train_batch_size" in p["train.learning_rat"]  # allowed keys listed


def test_unknown_section(data_file):
    d = base(data_file)
    d["optimiser"] = {"name": "galore"}
    p = problems(d)
    assert "did you mean 'optim'" in p["optimiser"]


def test_wrong_type_and_range_and_literal_all_at_once(data_file):
    d = base(data_file)
    d["train"]["learning_rate"] = "fast"
    d["train"]["per_device_train_batch_size"] = 0
    d["optim"] = {"name": "sgdd", "rank": -1}
    d["quant"] = {"blocksize": 100}
    p = problems(d)
    assert set(p) >= {"train.learning_rate", "train.per_device_train_batch_size", "optim.name", "optim.rank", "quant.blocksize"}
    assert "'fast'" in p["train.learning_rate"]
    assert "galore" in p["optim.name"] and "apollo_mini" in p["optim.name"]  # allowed values listed
    assert "greater than 0" in p["optim.rank"]
    assert "power of two" in p["quant.blocksize"]


def test_missing_file_reported_with_other_problems(tmp_path, data_file):
    d = base(data_file)
    d["data"]["path"] = str(tmp_path / "nope.jsonl")
    d["train"]["seed"] = "x"
    p = problems(d)
    assert "not found" in p["data.path"]
    assert "train.seed" in p


def test_missing_required_and_model_source(data_file):
    p = problems({"model": {}, "train": {}})
    assert p["data"] == "required key is missing"
    assert "exactly one of path, config, builtin" in p["model"]


def test_keep_ratio_out_of_range(data_file):
    d = base(data_file)
    d["sparsity"] = {"token_elimination": {"enabled": True, "keep_ratio": [0.5, 1.5, 0.0]}}
    p = problems(d)
    assert "(0, 1]" in p["sparsity.token_elimination.keep_ratio"]


def test_token_elimination_score(data_file):
    d = base(data_file)
    d["sparsity"] = {"token_elimination": {"enabled": True, "score": "attn", "score_queries": 0}}
    p = problems(d)
    assert "mean_distance" in p["sparsity.token_elimination.score"] and "attention" in p["sparsity.token_elimination.score"]
    assert "greater than or equal to 1" in p["sparsity.token_elimination.score_queries"]
    d["sparsity"] = {"token_elimination": {"enabled": True, "score": "attention", "unbiased": True}}
    assert "reads no score" in problems(d)["sparsity.token_elimination"]
    d["sparsity"] = {"token_elimination": {"enabled": True, "score": "attention", "score_queries": 64}}
    r = config.validate(d)
    assert r.sparsity.token_elimination.score == "attention" and r.sparsity.token_elimination.score_queries == 64


def test_cross_section_rules(data_file):
    d = base(data_file)
    d["quant"] = {"type": "int8", "trainable": True}
    d["adapter"] = {"type": "lora"}
    p = problems(d)
    assert "cannot sit on trainable int8" in p["adapter.type"]
    d = base(data_file)
    d["quant"] = {"type": "nf4"}
    assert "frozen" in problems(d)["quant.type"]


def test_overrides_dotted_typed_and_aliases(tmp_path, data_file):
    p = write(tmp_path, base(data_file))
    r = config.load_recipe(p, ["train.learning_rate=1e-3", "optim.name=apollo_mini", "optim.rank=1",
                               "max_steps=7", "sparsity.loss_tokens.enabled=true", "quant.skip=[lm_head, embed]"])
    assert r.train.learning_rate == 1e-3 and isinstance(r.train.learning_rate, float)
    assert r.optim.name == "apollo_mini" and r.optim.rank == 1
    assert r.train.max_steps == 7
    assert r.sparsity.loss_tokens.enabled is True
    assert r.quant.skip == ["lm_head", "embed"]


def test_bad_override_value_is_a_problem(tmp_path, data_file):
    p = write(tmp_path, base(data_file))
    with pytest.raises(config.RecipeError) as e:
        config.load_recipe(p, ["train.max_steps=ten", "train.bogus=1"])
    paths = dict(e.value.problems)
    assert "train.max_steps" in paths and "train.bogus" in paths


def test_every_bad_override_is_listed_with_the_recipes_problems(tmp_path, data_file, capsys):
    p = write(tmp_path, base(data_file))
    bad = ["foo", "bar=[", "train.max_steps.x=1", "adapter.r.x=3", "train.lerning_rate=1e-4"]
    with pytest.raises(config.RecipeError) as e:
        config.load_recipe(p, bad)
    paths = dict(e.value.problems)
    assert "key=value" in paths["foo"]
    assert "as YAML" in paths["bar"] and "\n" not in paths["bar"]
    assert "train.max_steps is a value" in paths["train.max_steps.x"]  # not silently replaced by a section
    assert "{'x': 3}" in paths["adapter.r"]  # the section written where a value belongs is shown
    assert "did you mean 'learning_rate'" in paths["train.lerning_rate"]
    assert main(["validate", str(p), *bad]) == 2
    err = capsys.readouterr().err
    assert "5 problems" in err and "Traceback" not in err


def test_cli_lists_cross_section_and_plugin_problems_in_one_round(tmp_path, data_file, capsys):
    d = base(data_file)
    d["quant"] = {"type": "int8", "trainable": True}
    d["adapter"] = {"type": "lora"}  # a cross-section problem (schema level)
    d["offload"] = {"weights": True}  # a plugin refusal: streaming needs optim.layerwise
    p = write(tmp_path, d)
    assert main(["validate", str(p)]) == 2
    err = capsys.readouterr().err
    assert "2 problems" in err and "  - adapter.type: " in err and "  - offload.weights: " in err


def test_model_config_typos_and_unknown_types_are_refused_before_loading(data_file):
    """transformers keeps unknown config keys and builds its defaults: hiden_size gave a 4096-wide model."""
    d = base(data_file)
    d["model"] = {"config": {"model_type": "llama", "hiden_size": 64, "num_hidden_layers": 2}}
    msg = problems(d)["model.config"]
    assert "'hiden_size'" in msg and "did you mean 'hidden_size'" in msg
    d["model"] = {"config": {"model_type": "lama"}}
    assert "did you mean 'llama'" in problems(d)["model.config"]
    d["model"] = {"config": {"hidden_size": 64}}
    assert "model_type" in problems(d)["model.config"]
    d["model"] = {"config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "rope_theta": 1e4}}  # known or not near
    config.validate(d)


def test_cli_validate_exit_2_no_traceback(tmp_path, data_file):
    d = base(data_file)
    d["train"]["learning_rat"] = 1
    d["optim"] = {"name": "nope"}
    p = write(tmp_path, d)
    proc = subprocess.run([sys.executable, "-m", "efft.cli", "validate", str(p)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "2 problems" in proc.stderr and "train.learning_rat" in proc.stderr and "optim.name" in proc.stderr


def test_cli_train_bad_recipe_exit_2(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "recipe not found" in capsys.readouterr().err


def test_cli_ls_cp_schema(tmp_path, capsys):
    assert main(["ls"]) == 0
    listed = capsys.readouterr().out
    names = [p.stem for p in config.list_recipes()]
    assert names and all(n in listed for n in names)
    assert main(["cp", names[0], str(tmp_path)]) == 0
    assert (tmp_path / f"{names[0]}.yaml").is_file()
    assert main(["cp", names[0], str(tmp_path)]) == 2  # refuses to overwrite
    capsys.readouterr()
    assert main(["config-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"model", "data", "train", "optim", "quant", "adapter", "sparsity", "offload"} <= set(schema["properties"])


@pytest.mark.parametrize("path", config.list_recipes(), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    config.load_recipe(path)


def test_help_is_useful(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("train", "validate", "estimate", "ls", "cp", "config-schema"):
        assert cmd in out


def test_plugin_refusals_come_with_validation(tmp_path, data_file, capsys):
    """Problems only a plugin knows (offload, int8 training) are listed by `efft validate` too."""
    d = base(data_file)
    d["offload"] = {"optimizer": True, "activations": True, "activation_mode": "checkpoint_inputs"}
    d["optim"] = {"name": "galore", "layerwise": True}
    assert main(["validate", str(write(tmp_path, d))]) == 2
    err = capsys.readouterr().err
    assert "offload.optimizer" in err and "offload.activation_mode" in err


def test_yaml_12_floats_in_overrides_and_files(tmp_path, data_file):
    d = base(data_file)
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d) + "\ntarget_gpu_memory: 4GB\n")
    r = config.load_recipe(p, ["model.config.rms_norm_eps=1e-5", "train.adam_epsilon=1e-6"])
    assert r.model.config["rms_norm_eps"] == 1e-5 and isinstance(r.model.config["rms_norm_eps"], float)
    assert r.train.adam_epsilon == 1e-6


def test_problems_that_used_to_surface_after_loading(tmp_path, data_file):
    d = base(data_file)
    (tmp_path / "notmodel").mkdir()
    d["model"] = {"path": str(tmp_path / "notmodel")}
    d["train"].update(logging_steps=2.5, eval_steps=10)
    d["target_gpu_memory"] = "lots"
    p = problems(d)
    assert "no config.json" in p["model.path"]
    assert "above 1" in p["train.logging_steps"]
    assert "24GB" in p["target_gpu_memory"]
    d = base(data_file)
    d["train"]["eval_steps"] = 10
    assert "eval_fraction" in problems(d)["train.eval_steps"]
    d = base(data_file)
    d["data"]["eval_fraction"] = 0.1
    assert "never evaluated" in problems(d)["data.eval_fraction"]


def test_a_recipe_name_beats_a_folder_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-smoke").mkdir()  # e.g. an output_dir named like the recipe
    assert config.load_recipe("tiny-smoke").model.config["model_type"] == "llama"


def test_cp_into_a_missing_folder_or_a_new_one(tmp_path, capsys):
    assert main(["cp", "tiny-smoke", str(tmp_path / "missing" / "x.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["cp", "tiny-smoke", str(tmp_path / "new") + "/"]) == 0
    assert (tmp_path / "new" / "tiny-smoke.yaml").is_file()


def test_schema_errors_and_the_other_checks_in_one_round(data_file):
    """A schema error does not hold back what the cross-section rules and the plugins refuse
    elsewhere in the recipe: one round lists them all."""
    d = base(data_file)
    d["train"]["learning_rate"] = "fast"  # schema
    d["optim"] = {"name": "bogus"}  # schema
    d["quant"] = {"type": "nf4"}  # cross-section: PaCA needs an unquantized base
    d["sparsity"] = {"partial": {"enabled": True, "fraction": 0.1, "r": 4},  # plugin: both given
                     "loss_tokens": {"enabled": True, "chunk_size": 0}}  # schema
    p = problems(d)
    assert {"train.learning_rate", "optim.name", "sparsity.loss_tokens.chunk_size"} <= set(p)
    assert "not both" in p["sparsity.partial"]
    assert "unquantized" in p["sparsity.partial.enabled"]


def test_a_default_standing_in_for_a_bad_value_raises_nothing_of_its_own(data_file):
    """data.eval_fraction is refused by the schema; its default (0) must not add a cross-section
    problem about it (train.eval_steps 'needs held-out data')."""
    d = base(data_file)
    d["data"]["eval_fraction"] = "some"
    d["train"]["eval_steps"] = 10
    assert set(problems(d)) == {"data.eval_fraction"}


def test_cli_estimate_with_a_config_transformers_rejects_exit_2_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "efft.cli", "estimate", "recipes/tiny-smoke.yaml",
                           "model.config={model_type: llama, hidden_size: 63, num_attention_heads: 4, "
                           "num_key_value_heads: 2, intermediate_size: 128, num_hidden_layers: 2, vocab_size: 320}"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "model.config" in proc.stderr and "63" in proc.stderr


def test_cli_output_piped_into_a_reader_that_leaves_prints_no_traceback(monkeypatch):
    """`efft config-schema | head`: the reader is gone before the output is written; main returns
    instead of raising BrokenPipeError."""
    import os

    r, w = os.pipe()
    os.close(r)  # the reader left
    out = os.fdopen(w, "w")
    monkeypatch.setattr(sys, "stdout", out)
    try:
        assert main(["config-schema"]) == 1
    finally:
        monkeypatch.undo()
        try:
            out.close()
        except OSError:
            pass
