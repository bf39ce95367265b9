"""The training loop end to end on a tiny model: card, safetensors, exact resume, atomic checkpoints."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from efft import config
from efft.integrations.transformers import COMPLETE_MARKER, last_checkpoint
from efft.train import train

TINY = {"model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def recipe(data_path, out, **train):
    t = {"output_dir": str(out), "max_steps": 8, "per_device_train_batch_size": 4, "learning_rate": 3e-3,
         "logging_steps": 1, "save_steps": 4, "seed": 3, "lr_scheduler_type": "cosine", "warmup_steps": 2}
    t.update(train)
    return config.validate({"model": {"config": TINY}, "data": {"path": str(data_path), "max_seq_length": 64},
                            "train": t})


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.step:
            control.should_training_stop = True


def losses(card):
    return [l for _, l in card["loss_curve"]]


def test_train_writes_card_weights_and_resumes_exactly(data_path, tmp_path):
    full = train(recipe(data_path, tmp_path / "full"))
    assert full["global_step"] == 8
    assert full["last_loss"] < full["first_loss"]
    out = tmp_path / "full"
    for f in ("card.json", "card.md", "loss.png", "final/model.safetensors", "final/config.json"):
        assert (out / f).is_file(), f
    assert full["memory"], "the memory report is part of the card"

    # Interrupted after 4 steps (checkpoint-4 written), then resumed to 8.
    part = tmp_path / "part"
    first = train(recipe(data_path, part), trainer_hook=lambda tr: tr.add_callback(StopAt(4)))
    assert first["global_step"] == 4
    assert last_checkpoint(part) == str(part / "checkpoint-4")
    second = train(recipe(data_path, part, resume_from_checkpoint=True))
    assert second["resumed_from"] == str(part / "checkpoint-4")
    assert second["global_step"] == 8 and second["steps_this_run"] == 4

    assert losses(first) == losses(full)[:4]
    assert losses(second) == losses(full)  # the resumed run's history carries steps 1-4 from the checkpoint
    a = load_file(out / "final/model.safetensors")
    b = load_file(part / "final/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_incomplete_checkpoint_is_not_resumed(tmp_path):
    good = tmp_path / "checkpoint-4"
    good.mkdir()
    (good / COMPLETE_MARKER).write_text("{}")
    (tmp_path / "checkpoint-8").mkdir()  # interrupted while writing: no marker
    assert last_checkpoint(tmp_path) == str(good)


def test_resume_from_a_non_checkpoint_is_refused(data_path, tmp_path):
    r = recipe(data_path, tmp_path / "x", resume_from_checkpoint=str(tmp_path))
    with pytest.raises(config.RecipeError, match="trainer_state.json"):
        train(r)


def test_qlora_from_a_local_checkpoint_quantizes_while_loading(data_path, tmp_path):
    """model.path + nf4: efft.model builds the 4-bit model layer by layer from the safetensors files."""
    from transformers import AutoModelForCausalLM, AutoConfig

    from efft.model import load_model
    from efft.quant import QuantLinear
    from efft.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    src = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY))
    src.save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    r = config.validate({"model": {"path": str(tmp_path / "model")}, "data": {"path": str(data_path), "max_seq_length": 64},
                         "train": {"output_dir": str(tmp_path / "out"), "max_steps": 2, "per_device_train_batch_size": 2},
                         "quant": {"type": "nf4", "compute_dtype": "float32", "blocksize": 32},
                         "adapter": {"type": "lora", "r": 4}})
    model, _ = load_model(r.model, quant=r.quant)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 2 * 7  # q k v o gate up down in each of 2 layers; lm_head skipped
    w = src.model.layers[0].self_attn.q_proj.weight
    assert (layers[0].dequantize().float() - w).abs().max() < 0.2 * w.abs().max()
    card = train(r)
    assert card["global_step"] == 2
    assert (tmp_path / "out" / "final" / "adapter_model.safetensors").is_file()


def test_a_recipe_that_cannot_fit_is_refused_before_loading(data_path, tmp_path, monkeypatch):
    import efft.model

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded for a recipe that cannot fit")

    monkeypatch.setattr(efft.model, "load_model", no_loading)
    r = config.validate({"model": {"config": TINY}, "data": {"path": str(data_path)},
                         "train": {"output_dir": str(tmp_path / "x"), "max_steps": 2}, "target_gpu_memory": "12MB"})
    with pytest.raises(config.RecipeError) as e:
        train(r)
    (path, msg), = e.value.problems
    assert path == "target_gpu_memory" and "does not fit" in msg and "overrides:" in msg
    assert not (tmp_path / "x").exists()


def test_an_earlier_runs_checkpoints_are_not_overwritten(data_path, tmp_path):
    (tmp_path / "out" / "checkpoint-6").mkdir(parents=True)
    with pytest.raises(config.RecipeError, match="earlier run"):
        train(recipe(data_path, tmp_path / "out"))


@pytest.mark.parametrize("override, path, says", [
    ("model.config={model_type: lama}", "model.config", "did you mean 'llama'"),
    ("model.config={model_type: llama, hidden_size: 63, num_attention_heads: 4}", "model.config", "multiple"),
    ("model.tokenizer=.", "model.tokenizer", "cannot load a tokenizer"),
    ("train.report_to=[tensorbord]", "train.report_to", "unknown reporter 'tensorbord'"),
])
def test_cli_train_reports_what_fails_at_load_time_without_traceback(override, path, says, data_path, tmp_path, capsys,
                                                                     monkeypatch):
    from efft.cli import main

    monkeypatch.chdir(tmp_path)  # model.tokenizer=. is a folder without a tokenizer
    assert main(["train", "tiny-smoke", f"data.path={data_path}", f"train.output_dir={tmp_path / 'out'}", override]) == 2
    err = capsys.readouterr().err
    assert f"  - {path}: " in err and says in err


def test_a_reporter_that_is_not_installed_is_refused_before_loading(data_path, tmp_path, monkeypatch):
    import transformers.integrations

    import efft.model

    def no_loading(*a, **k):
        raise AssertionError("weights were loaded for a run whose reporter is missing")

    monkeypatch.setattr(efft.model, "load_model", no_loading)
    monkeypatch.setattr(transformers.integrations, "get_available_reporting_integrations", lambda: [])
    with pytest.raises(config.RecipeError) as e:
        train(recipe(data_path, tmp_path / "x", report_to="wandb"))
    (where, msg), = e.value.problems
    assert where == "train.report_to" and "not installed" in msg and "pip install wandb" in msg
