"""The vlp dual encoder for `transformers`: image and text retrieval embeddings.

    pixel_values (B, 3, S, S), normalised -> patch embed + CLS + positions -> blocks (V-FFN)
    input_ids, attention_mask (B, T)       -> token + positions           -> blocks (L-FFN)
    each: final LN -> CLS -> projection -> L2 norm (B, embed_dim)

The unimodal path of vlp's UnifiedModel (pre-LN blocks, one self-attention shared by both
modalities, a feed-forward expert per modality) with its parameter names, so the export's
model.safetensors loads unchanged; its fusion layers and heads are not used here.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_vlp import VlpConfig


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2D sine-cosine positions (MAE): (grid * grid, width), half of the channels for the
    row, half for the column."""
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(values):
        angles = values.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class ImageEmbedding(nn.Module):
    """(B, 3, S, S) -> (B, 1 + P, width): conv patches, CLS, learned or 2D sin-cos positions."""

    def __init__(self, config: VlpConfig):
        super().__init__()
        self.grid = config.image_size // config.patch_size
        self.patch = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.width))
        self.pos = (nn.Parameter(torch.zeros(1, 1 + self.grid ** 2, config.width))
                    if config.position_embedding == "learned" else None)

    def positions(self, width: int, device: torch.device) -> torch.Tensor:
        if self.pos is not None:
            return self.pos
        table = sincos_2d(self.grid, width).to(device)
        return torch.cat([table.new_zeros(1, width), table])[None]  # the CLS position is zero

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, P, width)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1)
        return x + self.positions(x.size(-1), x.device).to(x.dtype)


class TextEmbedding(nn.Module):
    """(B, T) -> (B, T, width): token + learned positions."""

    def __init__(self, config: VlpConfig):
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Parameter(torch.zeros(1, config.max_text_len, config.width))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token(input_ids) + self.pos[:, : input_ids.size(1)]


class SelfAttention(nn.Module):
    def __init__(self, config: VlpConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x (B, T, C), mask (B, T) bool (True = real token) or None."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if mask is None else mask[:, None, None, :]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, T, head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, config: VlpConfig):
        super().__init__()
        hidden = int(config.width * config.mlp_ratio)
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.width, hidden)
        self.fc2 = nn.Linear(hidden, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class Block(nn.Module):
    """Pre-LN: x + Attn(LN(x)), then x + FFN(x) with the image (ffn_v) or text (ffn_l) expert."""

    def __init__(self, config: VlpConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ffn_v = FeedForward(config)
        self.ffn_l = FeedForward(config)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, image: bool) -> torch.Tensor:
        x = x + self.attn(self.norm(x), mask)
        return x + (self.ffn_v if image else self.ffn_l)(x)


@dataclass
class VlpDualEncoderOutput(ModelOutput):
    """L2-normalised embeddings (B, embed_dim) and, with both inputs, their cosine similarities
    times the learned scale (1 / the ITC temperature, clamped at 100 as in training)."""

    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None


class VlpDualEncoder(PreTrainedModel):
    config_class = VlpConfig
    base_model_prefix = "vlp"
    # The export also holds the fusion layers and heads of the full model.
    _keys_to_ignore_on_load_unexpected = [r"^type_embed\.", r"\.ffn_vl\.", r"^itm_head\.",
                                          r"^mlm_head\.", r"^vqa_head\."]

    def __init__(self, config: VlpConfig):
        super().__init__(config)
        self.image_embed = ImageEmbedding(config)
        self.text_embed = TextEmbedding(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.image_proj = nn.Linear(config.width, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(config.width, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.zeros(1))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """UnifiedModel's initialisation, repeated: this file ships inside exports and runs
        where vlp is not installed (transformers calls it for weights a checkpoint lacks)."""
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def _encode(self, x: torch.Tensor, mask: torch.Tensor | None, image: bool,
                proj: nn.Linear) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask, image)
        return F.normalize(proj(self.norm(x[:, 0])), dim=-1)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised pixels (B, 3, S, S) -> L2-normalised embeddings (B, embed_dim)."""
        return self._encode(self.image_embed(pixel_values), None, True, self.image_proj)

    def get_text_features(self, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T), [CLS] first, and their mask (1 = real token) -> L2-normalised
        embeddings (B, embed_dim)."""
        mask = None if attention_mask is None else attention_mask.bool()
        return self._encode(self.text_embed(input_ids), mask, False, self.text_proj)

    def forward(self, input_ids: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> VlpDualEncoderOutput:
        images = None if pixel_values is None else self.get_image_features(pixel_values)
        texts = (None if input_ids is None
                 else self.get_text_features(input_ids, attention_mask))
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()
        logits = None if images is None or texts is None else scale * images @ texts.T
        return VlpDualEncoderOutput(image_embeds=images, text_embeds=texts,
                                    logits_per_image=logits)
