"""Configuration of the vlp dual encoder for `transformers` (the export's config.json)."""
from transformers import PretrainedConfig


class VlpConfig(PretrainedConfig):
    """The sizes the dual encoder reads; the export's other keys (fusion layers, loss weights,
    format version) are kept as attributes."""

    model_type = "vlp"

    def __init__(self, image_size=224, patch_size=16, width=768, depth=12, heads=12,
                 mlp_ratio=4.0, vocab_size=30522, max_text_len=40, embed_dim=256,
                 layer_norm_eps=1e-6, init_std=0.02, position_embedding="learned", **kwargs):
        self.image_size, self.patch_size = image_size, patch_size
        self.width, self.depth, self.heads, self.mlp_ratio = width, depth, heads, mlp_ratio
        self.vocab_size, self.max_text_len, self.embed_dim = vocab_size, max_text_len, embed_dim
        self.layer_norm_eps, self.init_std = layer_norm_eps, init_std
        self.position_embedding = position_embedding
        super().__init__(**kwargs)
