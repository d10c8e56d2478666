"""The multiway transformer block: shared self-attention, modality-expert feed-forward networks,
and the key/value cache of a block for incremental decoding."""
from __future__ import annotations

import torch
import torch.nn as nn

from .attention import attention
from .config import ModelConfig


class KVCache:
    """One block's keys and values of the positions computed so far (incremental decoding).

    Storage for `capacity` positions is allocated at the first `append`, so a decoding step
    writes its one position in place instead of concatenating the whole past again.
    """

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add (B, heads, T, head_dim) keys and values; returns all of them so far."""
        end = self.length + k.size(2)
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions, {end} were asked for")
        if self.k is None:
            B, heads, _, head_dim = k.shape
            self.k = k.new_empty(B, heads, self.capacity, head_dim)
            self.v = v.new_empty(B, heads, self.capacity, head_dim)
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and repeat) the batch rows `rows`: beam reordering, dropping finished rows."""
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, shared by all modalities."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads = config.heads
        self.backend = config.attention_backend
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.proj = nn.Linear(config.width, config.width)

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None,
                queries: slice | None = None, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `queries`, only those positions attend (all T positions
        stay keys and values): (B, Tq, C). With `cache`, x continues the cached positions: its
        keys and values are appended and it attends the cached ones too (masks then cover all
        keys, cached first)."""
        B, T, C = x.shape
        # (B, T, 3C) -> (3, B, heads, T, head_dim)
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, heads, cached + T, head_dim)
        if queries is not None:
            q = q[:, :, queries]
            attn_mask = None if attn_mask is None else attn_mask[:, queries]
        y = attention(q, k, v, key_padding_mask, self.backend, attn_mask)  # (B, heads, Tq, hd)
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
        queries: slice | None = None, attn_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: (B, T, width); key_padding_mask: bool (B, T) or None; attn_mask: bool (B, T, T) or
        None (see models.attention). Returns (B, T, width).

        With `queries`, only those positions are computed and returned, (B, Tq, width), all T
        still serving as keys: the last block needs no more when its output is pooled at CLS
        (ITC, ITM, VQA) or read at the text positions (MLM). Experts are chosen as for the whole
        sequence. With `cache`, x holds the positions after the cached ones of a sequence whose
        first `split` positions are image tokens (incremental decoding).
        """
        past = 0 if cache is None else cache.length
        fused = 0 < split < past + x.size(1)
        attended = self.attn(self.norm(x), key_padding_mask, queries, attn_mask, cache)
        start = past
        if queries is not None:
            start += queries.indices(x.size(1))[0]
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
