"""The recipe path (efft.compose): offload.optimizer / offload.activations on top of the recipe's
optimizer give bitwise the same training as the same recipe without offload."""
import pytest

from tests.offload.helpers import model, same_params, train

compose = pytest.importorskip("efft.compose")
pytest.importorskip("efft.optim.factory")
config = pytest.importorskip("efft.config")


def recipe(optim, offload):
    return config.Recipe.model_validate({
        "model": {"config": {"model_type": "llama"}}, "data": {"path": "x.jsonl"},
        "train": {"learning_rate": 1e-2, "weight_decay": 0.1},
        "optim": optim,
        "offload": {"min_offload_bytes": 0, "keep_small_params_on_device_bytes": 4096, **offload},
    })


@pytest.mark.parametrize("optim", [{"name": "adamw"}, {"name": "galore", "rank": 4, "update_proj_gap": 2}])
def test_recipe_offload_equals_recipe_without(optim):
    runs = []
    for offload in ({}, {"optimizer": True, "activations": True}):
        r = recipe(optim, offload)
        m = compose.prepare_model(model(layers=3), r)
        opt = compose.build_optimizer(m, r)
        train(m, opt, 2)
        runs.append((m, opt))
    (plain, _), (off, opt) = runs
    assert type(opt).__name__ == "OffloadOptimizer" and "host" in opt.placement().values()
    assert _activations_offloaded(off) and same_params(plain, off)
    opt.close()


def _activations_offloaded(m) -> bool:
    h = getattr(m, "_efft_activation_offload", None)
    return h is not None and h.stats["offloaded"] > 0
