"""efft: memory-efficient fine-tuning of large language models.

Heavy pieces import lazily so that ``efft.ops`` and ``efft.quant`` work without the CLI's
dependencies (datasets, pydantic).

    import efft
    model = efft.prepare(model, "recipes/quickstart.yaml")   # quantize, adapters, sparsity, offload
    plugin = efft.EfftPlugin("recipes/quickstart.yaml")      # the same, plus Trainer's optimizer/callbacks
"""
__version__ = "0.1.0"


def prepare(model, recipe, overrides=None):
    """Apply a recipe's model-side plugins (quant, adapter, sparsity, activation offload) to ``model``."""
    from efft.integrations.transformers import EfftPlugin

    return EfftPlugin(recipe, overrides).prepare_model(model)


def __getattr__(name):
    if name == "EfftPlugin":
        from efft.integrations.transformers import EfftPlugin

        return EfftPlugin
    raise AttributeError(f"module 'efft' has no attribute {name!r}")
