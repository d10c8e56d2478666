"""The unified multiway vision-language transformer."""
from .config import ModelConfig, load_config
from .flops import flops_per_sample
from .model import LossWeights, UnifiedModel

__all__ = ["ModelConfig", "load_config", "LossWeights", "UnifiedModel", "flops_per_sample"]
