"""The planner's interface: sizes, shipped configs, verdicts and the suggested fix."""
import json

import pytest

from efft.memory import estimate as est


def test_parse_size():
    assert est.parse_size("24GB") == 24 * 10**9
    assert est.parse_size("24GiB") == 24 * 2**30
    assert est.parse_size("80G") == 80 * 2**30
    assert est.parse_size("1.5 gb") == 1_500_000_000
    assert est.parse_size("512MiB") == 512 * 2**20
    assert est.parse_size(1000) == 1000
    for bad in ("", "abc", "-1GB", "24XB", "GB", 0, -5, True):
        with pytest.raises(ValueError):
            est.parse_size(bad)


PARAMS = {  # parameter counts of the public checkpoints
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "qwen2.5-7b": 7_615_616_512,
    "mistral-7b-v0.3": 7_248_023_552,
    "gemma-2-9b": 9_241_705_984,
    "smollm2-135m-instruct": 134_515_008,
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_shipped_configs_have_the_public_parameter_counts(name):
    attn = "eager" if name.startswith("gemma-2") else "sdpa"
    model = est.build_meta_model(est.load_shipped_config(name), attn_implementation=attn)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_llama3_8b_bf16_weights():
    e = est.estimate({"model": {"architecture": "llama-3-8b", "dtype": "bfloat16"}})
    assert e.weights == pytest.approx(2 * 8.03e9, rel=0.01)
    assert e.gradients == pytest.approx(2 * 8.03e9, rel=0.01)


def test_qlora_8b_weights_are_about_4_bits():
    e = est.estimate({"model": {"architecture": "llama-3-8b", "dtype": "bfloat16"}, "quant": {"type": "nf4"},
                      "adapter": {"type": "lora", "r": 16}})
    # 6.98B quantized params at 4 bits + ~0.127 bits of double-quant statistics, 1.05B in bf16
    quantized = 8_030_261_248 - 2 * 128256 * 4096 - 65 * 4096
    assert e.weights == pytest.approx(quantized * (4 + 0.127) / 8 + 2 * (2 * 128256 * 4096 + 65 * 4096), rel=0.01)
    # LoRA r16 on all 7 linears of 32 layers: r * (in + out)
    per_layer = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2 + 2 * (4096 + 14336) + (14336 + 4096))
    assert e.adapters == 4 * 32 * per_layer


def test_unknown_architecture_and_family_errors():
    with pytest.raises(ValueError, match="set model.attn_implementation: eager"):
        est.estimate({"model": {"architecture": "gemma-2-9b", "attn_implementation": "sdpa"}})
    with pytest.raises(ValueError, match="did you mean 'llama-3-8b'"):
        est.load_shipped_config("llama-3-8")
    with pytest.raises(ValueError, match="no activation model for model_type 'gpt2'"):
        est.estimate({"model": {"config": {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2}}})


QLORA_8B = {"model": {"architecture": "llama-3-8b", "dtype": "bfloat16"}, "data": {"path": "-", "max_seq_length": 2048},
            "train": {"per_device_train_batch_size": 1, "gradient_checkpointing": True},
            "quant": {"type": "nf4"}, "adapter": {"type": "lora", "r": 16}}
FULL_8B = {"model": {"architecture": "llama-3-8b", "dtype": "bfloat16"}, "data": {"path": "-", "max_seq_length": 2048},
           "train": {"per_device_train_batch_size": 4}}


def test_fits_verdict():
    e = est.estimate(QLORA_8B, gpu_memory="24GB")
    assert e.fits is True and e.verdict.startswith("fits")
    assert e.suggestion is None
    assert e.total < 24e9


def test_does_not_fit_gives_a_change_that_fits():
    from efft import config as C

    e = est.estimate(FULL_8B, gpu_memory="24GB")
    assert e.fits is False and e.verdict.startswith("does not fit")
    assert e.suggestion and e.suggestion_changes
    # the suggested overrides really fit when applied to the recipe
    data = C.apply_overrides(FULL_8B, e.suggestion_changes)
    again = est.estimate(data, gpu_memory="24GB")
    assert again.fits is True
    assert again.total == e.suggestion_total
    table = e.format_table()
    for word in ("weights", "gradients", "optimizer state", "activations", "workspace", "does not fit", "overrides:"):
        assert word in table


def test_single_cheap_change_is_preferred():
    """A recipe that only needs checkpointing is told exactly that (not a pile of changes)."""
    r = {"model": {"architecture": "smollm2-135m-instruct", "dtype": "bfloat16"},
         "data": {"path": "-", "max_seq_length": 2048},
         "train": {"per_device_train_batch_size": 8}, "sparsity": {"loss_tokens": {"enabled": True}}}
    need = est.estimate(r)
    ck = est.estimate({**r, "train": {**r["train"], "gradient_checkpointing": True}})
    limit = (ck.total + need.total) // 2
    e = est.estimate(r, gpu_memory=limit)
    assert e.fits is False
    assert e.suggestion_changes == ["train.gradient_checkpointing=true"]


def test_impossible_recipe_says_so():
    e = est.estimate({"model": {"architecture": "llama-3-70b", "dtype": "bfloat16"}}, gpu_memory="4GB")
    assert e.fits is False
    assert e.suggestion_changes == [] and "smaller model or a larger GPU" in e.suggestion


def test_to_dict_is_json():
    d = est.estimate(QLORA_8B, gpu_memory="24GB").to_dict()
    json.dumps(d)
    assert d["fits"] is True and d["total"] > d["weights"] > 0


def test_callable_module_and_cli(tmp_path, capsys):
    import efft.memory
    from efft import cli

    assert efft.memory.estimate(QLORA_8B).total == est.estimate(QLORA_8B).total
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    import yaml

    rec = {**FULL_8B, "data": {"path": str(data), "max_seq_length": 2048}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    code = cli.main(["estimate", str(path), "--gpu-memory", "24GB"])
    out = capsys.readouterr().out
    assert code == 1 and "does not fit" in out and "overrides:" in out


def test_recompute_is_suggested_when_it_is_enough():
    """A recipe a little over the limit is told to recompute norms and the MLP activation (exact, a few
    percent of compute) before gradient checkpointing; the suggestion fits when applied."""
    r = {"model": {"architecture": "smollm2-135m-instruct", "dtype": "bfloat16"},
         "data": {"path": "-", "max_seq_length": 2048},
         "train": {"per_device_train_batch_size": 8}, "sparsity": {"loss_tokens": {"enabled": True}}}
    need = est.estimate(r)
    rc = est.estimate({**r, "sparsity": {**r["sparsity"], "recompute": {"enabled": True}}})
    assert rc.activations < need.activations
    e = est.estimate(r, gpu_memory=(rc.total + need.total) // 2)
    assert e.fits is False
    assert e.suggestion_changes == ["sparsity.recompute.enabled=true"]
    assert e.suggestion_total == rc.total
