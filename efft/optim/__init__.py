"""Projected optimizers (GaLore, APOLLO / APOLLO-Mini, FRUGAL), layer-wise mode and the factory
that builds them from a recipe's ``optim`` section."""
from .adamw import AdamW
from .apollo import APOLLOAdamW
from .factory import build_optimizer
from .frugal import FRUGAL
from .galore import GaLoreAdamW
from .layerwise import LayerwiseOptimizer

__all__ = ["AdamW", "APOLLOAdamW", "FRUGAL", "GaLoreAdamW", "LayerwiseOptimizer", "build_optimizer"]
