"""efft: memory-efficient fine-tuning of large language models.

Heavy pieces import lazily so that ``efft.ops`` and ``efft.quant`` work without the CLI's
dependencies (datasets, pydantic).
"""
__version__ = "0.1.0"
