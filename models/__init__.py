"""The unified multiway vision-language transformer."""
from .config import ModelConfig, load_config
from .export import from_pretrained, load_state_dict_checked, save_pretrained
from .flops import flops_per_sample
from .decoding import DecodingConfig, generate
from .model import LossWeights, UnifiedModel

__all__ = [
    "ModelConfig", "load_config", "LossWeights", "UnifiedModel", "flops_per_sample",
    "save_pretrained", "from_pretrained", "load_state_dict_checked", "DecodingConfig", "generate",
]
