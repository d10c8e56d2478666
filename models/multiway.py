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
                queries: slice | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `queries`, only those positions attend (all T positions
        stay keys and values): (B, Tq, C)."""
        B, T, C = x.shape
        # (B, T, 3C) -> (3, B, heads, T, head_dim)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if queries is not None:
            q = q[:, :, queries]
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
        queries: slice | None = None,
    ) -> torch.Tensor:
        """x: (B, T, width); key_padding_mask: bool (B, T) or None. Returns (B, T, width).

        With `queries`, only those positions are computed and returned, (B, Tq, width), all T
        still serving as keys: the last block needs no more when its output is pooled at CLS
        (ITC, ITM, VQA) or read at the text positions (MLM). Experts are chosen as for the whole
        sequence.
        """
        fused = 0 < split < x.size(1)
        attended = self.attn(self.norm(x), key_padding_mask, queries)
        if queries is not None:
            start = queries.indices(x.size(1))[0]
            x = x[:, queries]
            split = min(max(split - start, 0), x.size(1))  # the image/text boundary within x
        x = x + self.dropout(attended)
        return x + self.dropout(self.experts(x, split, fused))

    def experts(self, x: torch.Tensor, split: int, fused: bool) -> torch.Tensor:
        """Image tokens `[:split]` to the V-FFN, text to the L-FFN; a fused sequence in a top
        block wholly to the VL-FFN."""
        if fused and self.ffn_vl is not None:
            return self.ffn_vl(x)
        if split >= x.size(1):
            return self.ffn_v(x)
        if split <= 0:
            return self.ffn_l(x)
        return torch.cat([self.ffn_v(x[:, :split]), self.ffn_l(x[:, split:])], dim=1)
