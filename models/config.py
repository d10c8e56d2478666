"""Model configuration: a typed dataclass and the named sizes in `models/configs/*.json`."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
ATTENTION_BACKENDS = ("sdpa", "reference")
POSITION_EMBEDDINGS = ("learned", "sincos")
FUSED_POOLINGS = ("image_cls", "text_cls")
_POSITIVE_INTS = ("image_size", "patch_size", "width", "depth", "heads", "fusion_layers",
                  "max_text_len", "embed_dim", "vqa_hidden_mult")
# Upper bounds, far beyond any model this code trains, so a typo (image_size 262144: 10^9 patch
# tokens) is one line before the launch instead of an allocation failure on every rank. The
# largest published ViTs take ~1-4k px inputs and LLMs reach width ~20k, depth ~130 and 256k
# vocabularies; heads, patch_size and fusion_layers are bounded through width, image_size, depth.
_MAX_SIZES = {"image_size": 8192, "width": 65536, "depth": 1024, "max_text_len": 65536,
              "embed_dim": 65536, "vqa_hidden_mult": 64, "vocab_size": 1 << 22}


@dataclass
class ModelConfig:
    """Sizes of the unified multiway transformer.

    The bottom `depth - fusion_layers` blocks run each modality alone; the top `fusion_layers`
    blocks also hold a VL-FFN and run the fused image+text sequence.
    `vocab_size` may be None in a named config; set it from the tokenizer before building a model.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    fusion_layers: int = 2
    vocab_size: int | None = 30522
    max_text_len: int = 40
    embed_dim: int = 256  # ITC projection size
    vqa_hidden_mult: int = 2  # VQA head MLP hidden size = vqa_hidden_mult * width
    dropout: float = 0.0  # on the attention and FFN residual branches
    layer_norm_eps: float = 1e-6
    # BERT/ViT's 0.02; at tiny's width 192 it left ITM stuck at chance, so tiny uses 0.06.
    init_std: float = 0.02
    attention_backend: str = "sdpa"
    # Image positions. learned: a table trained from a small init; sincos: fixed 2D sine-cosine
    # (MAE), as large as the patch content from step 0 (docs/fusion.md: where things are).
    position_embedding: str = "learned"
    # The fused pass's state that the ITM and VQA heads read: the image CLS query, or the text
    # [CLS] (ALBEF's and BLIP's choice: the caption's summary after attending to the image).
    fused_pooling: str = "image_cls"

    def __post_init__(self):
        self._check_types()
        checks = [
            (self.width % self.heads == 0,
             f"width {self.width} is not divisible by heads {self.heads}"),
            (self.image_size % self.patch_size == 0,
             f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"),
            (1 <= self.fusion_layers <= self.depth,
             f"fusion_layers {self.fusion_layers} must be in [1, depth={self.depth}]"),
            (self.attention_backend in ATTENTION_BACKENDS,
             f"attention_backend {self.attention_backend!r} is not one of {ATTENTION_BACKENDS}"),
            (self.fused_pooling in FUSED_POOLINGS,
             f"fused_pooling {self.fused_pooling!r} is not one of {FUSED_POOLINGS}"),
            (self.position_embedding in POSITION_EMBEDDINGS,
             f"position_embedding {self.position_embedding!r} is not one of "
             f"{POSITION_EMBEDDINGS}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _check_types(self) -> None:
        """Types, signs and upper bounds first, so a config.json with `"width": "768"` or a size
        no device holds is one clear line."""
        checks = [(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name,
                   "a positive integer") for name in _POSITIVE_INTS]
        checks += [
            (self.vocab_size is None or (_is_int(self.vocab_size) and self.vocab_size >= 1),
             "vocab_size", "a positive integer or null"),
            (_is_number(self.mlp_ratio) and self.mlp_ratio > 0, "mlp_ratio", "a number > 0"),
            (_is_number(self.dropout) and 0 <= self.dropout < 1, "dropout", "a number in [0, 1)"),
            (_is_number(self.layer_norm_eps) and self.layer_norm_eps > 0, "layer_norm_eps",
             "a number > 0"),
            (_is_number(self.init_std) and self.init_std > 0, "init_std", "a number > 0"),
        ]
        for ok, name, what in checks:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r:.40}")
        for name, most in _MAX_SIZES.items():
            if (getattr(self, name) or 0) > most:
                raise ValueError(f"{name} must be at most {most}, got {getattr(self, name)}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """Build from a dict; an unknown key is a ValueError naming it and the valid keys."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {valid}")
        return cls(**values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def available_configs() -> list[str]:
    return sorted(path.stem for path in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path, **overrides) -> ModelConfig:
    """Load a named size (`tiny`, `small`, `base`, `large`) or a JSON file, then apply overrides.

    >>> load_config("tiny", vocab_size=tokenizer.get_vocab_size())
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(
            f"no model config {str(name_or_path)!r}: "
            f"not a file and not one of {available_configs()}"
        )
    values = json.loads(path.read_text())
    values.update(overrides)
    return ModelConfig.from_dict(values)
