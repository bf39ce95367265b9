"""`efft train` under torchrun (2 CPU processes, gloo) gives the losses of one process with the same
global batch, for APOLLO, GaLore (also layer-wise), QLoRA and loss-token skipping."""
import json

import pytest
import yaml

from efft import config
from efft.train import train
from tests.launch import launch, torchrun

TINY = {"model_type": "llama", "vocab_size": 320, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
CASES = {
    "apollo": {"optim": {"name": "apollo", "rank": 4, "update_proj_gap": 3}},
    "galore": {"optim": {"name": "galore", "rank": 4, "update_proj_gap": 3, "projector": "svd"}},
    "qlora": {"quant": {"type": "nf4", "compute_dtype": "float32", "blocksize": 32},
              "adapter": {"type": "lora", "r": 4, "lora_alpha": 8}},
    # layer-wise: the hooks average the gradients DDP ignores (efft.integrations.ddp)
    "galore_layerwise": {"optim": {"name": "galore", "rank": 4, "update_proj_gap": 3, "layerwise": True}},
    # each rank's collator indexes its own batches' label rows (LabelRowsCallback)
    "loss_tokens": {"sparsity": {"loss_tokens": {"enabled": True, "chunk_size": 16}}},
}


@pytest.fixture(scope="module")
def data_path(tmp_path_factory):
    p = tmp_path_factory.mktemp("ddp") / "d.jsonl"
    # Equal lengths, so that per-rank padding cannot change the arithmetic.
    rows = [{"instruction": f"Add {a} and {b}.", "output": f"Answer: {a + b:02d}"} for a in range(1, 5) for b in range(1, 5)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return p


def recipe_dict(data_path, out, batch, extra):
    return {"model": {"config": TINY, "attn_implementation": "eager"},
            "data": {"path": str(data_path), "max_seq_length": 64},
            "train": {"output_dir": str(out), "max_steps": 4, "per_device_train_batch_size": batch,
                      "learning_rate": 3e-3, "logging_steps": 1, "save_steps": 100, "seed": 5},
            **extra}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_process_ddp_equals_single_process(case, data_path, tmp_path):
    single = train(config.validate(recipe_dict(data_path, tmp_path / "single", 4, CASES[case])))
    want = [l for _, l in single["loss_curve"]]

    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(data_path, tmp_path / "ddp", 2, CASES[case])))
    launch(torchrun("-m", "efft.cli", "train", str(path)))
    card = json.loads((tmp_path / "ddp" / "card.json").read_text())
    got = [l for _, l in card["loss_curve"]]
    assert len(got) == len(want) == 4
    assert got == pytest.approx(want, rel=2e-4, abs=2e-5)
