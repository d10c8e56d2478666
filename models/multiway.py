"""The multiway transformer block: shared self-attention, modality-expert feed-forward networks."""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attention
from .config import ModelConfig


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, shared by all modalities."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.heads
        self.backend = config.attention_backend
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                queries: int | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `queries`, only the first `queries` positions attend (all
        T positions stay keys and values): (B, queries, C)."""
        B, T, C = x.shape
        # (B, T, 3C) -> (3, B, heads, T, head_dim)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if queries is not None:
            q = q[:, :, :queries]
        y = attention(q, k, v, key_padding_mask, self.backend)  # (B, heads, Tq, head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, q.size(2), C))


class FeedForward(nn.Module):
    """One modality expert: its own pre-LayerNorm and a GELU MLP."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.fc1 = nn.Linear(config.width, config.mlp_hidden)
        self.fc2 = nn.Linear(config.mlp_hidden, config.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class MultiwayBlock(nn.Module):
    """Pre-LN block: x + Attn(LN(x)), then x + Expert(x) with the expert chosen by modality.

    Tokens `[:split]` are image tokens (V-FFN), `[split:]` text tokens (L-FFN). A block built with
    `vl_ffn=True` sends a sequence holding both modalities (0 < split < T) wholly through the
    VL-FFN instead, as VLMo does in its top fusion layers.
    """

    def __init__(self, config: ModelConfig, vl_ffn: bool):
        super().__init__()
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.attn = SelfAttention(config)
        self.ffn_v = FeedForward(config)
        self.ffn_l = FeedForward(config)
        self.ffn_vl = FeedForward(config) if vl_ffn else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: torch.Tensor, split: int, key_padding_mask: torch.Tensor | None = None,
        queries: int | None = None,
    ) -> torch.Tensor:
        """x: (B, T, width); key_padding_mask: bool (B, T) or None. Returns (B, T, width).

        With `queries` (one modality only), just the first `queries` positions are computed and
        returned, (B, queries, width), the others still serving as keys: the last block of an
        encoder whose output is pooled at CLS needs nothing else.
        """
        if queries is None:
            x = x + self.dropout(self.attn(self.norm(x), key_padding_mask))
            return x + self.dropout(self.experts(x, split))
        if 0 < split < x.size(1):
            raise ValueError("queries= computes a prefix of a single-modality sequence; "
                             f"this one is fused (split {split} of {x.size(1)})")
        x = x[:, :queries] + self.dropout(self.attn(self.norm(x), key_padding_mask, queries))
        return x + self.dropout(self.experts(x, x.size(1) if split else 0))

    def experts(self, x: torch.Tensor, split: int) -> torch.Tensor:
        T = x.size(1)
        if split == T:  # image only
            return self.ffn_v(x)
        if split == 0:  # text only
            return self.ffn_l(x)
        if self.ffn_vl is not None:  # fused sequence in a top block
            return self.ffn_vl(x)
        return torch.cat([self.ffn_v(x[:, :split]), self.ffn_l(x[:, split:])], dim=1)
