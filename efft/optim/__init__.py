"""Projected optimizers (GaLore, APOLLO / APOLLO-Mini, FRUGAL), layer-wise mode and the factory
that builds them from a recipe's ``optim`` section."""
from .apollo import APOLLOAdamW
from .frugal import FRUGAL
from .galore import GaLoreAdamW

__all__ = ["APOLLOAdamW", "FRUGAL", "GaLoreAdamW"]
