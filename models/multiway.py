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
                queries: slice | None = None,
                memory: tuple[torch.Tensor, torch.Tensor] | None = None,
                attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, is_causal: bool = False) -> torch.Tensor:
        """(B, T, C) -> (B, T, C); with `queries`, only those positions attend (all T positions
        stay keys and values): (B, Tq, C).

        The keys are [memory; cached; x]: with `memory`, the (keys, values) of other tokens from
        `keys_values` come first; with `cache`, x continues the cached positions (its keys and
        values are appended). `key_padding_mask` (B, Tk) and `attn_mask` (B, T, Tk) cover all
        keys; `is_causal` stands for a causal mask (models.attention)."""
        B, T, C = x.shape
        q, k, v = self._split(self.qkv(x))  # each (B, heads, T, head_dim)
        if cache is not None:
            k, v = cache.append(k, v)  # (B, heads, cached + T, head_dim)
        if memory is not None:
            k, v = torch.cat([memory[0], k], dim=2), torch.cat([memory[1], v], dim=2)
        if queries is not None:
            q = q[:, :, queries]
            attn_mask = None if attn_mask is None else attn_mask[:, queries]
        y = attention(q, k, v, key_padding_mask, self.backend, attn_mask,
                      is_causal)  # (B, heads, Tq, head_dim)
        return self.proj(y.transpose(1, 2).reshape(B, q.size(2), C))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of x (B, T, C), each (B, heads, T, head_dim), to attend to as memory."""
        _, k, v = self._split(self.qkv(x))
        return k, v

    def _split(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, T, 3C) -> (3, B, heads, T, head_dim)."""
        B, T, C3 = qkv.shape
        return qkv.view(B, T, 3, self.heads, C3 // 3 // self.heads).permute(2, 0, 3, 1, 4)


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
    `vl_ffn=True` also runs the fused pass (`fused`): text tokens attend over the image tokens and
    the text with the same shared attention, then go through the VL-FFN.
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
        cache: KVCache | None = None, is_causal: bool = False,
    ) -> torch.Tensor:
        """x: (B, T, width); key_padding_mask: bool (B, T) or None; attn_mask: bool (B, T, T) or
        None; is_causal: causal attention without a mask (see models.attention). Returns
        (B, T, width).

        With `queries`, only those positions are computed and returned, (B, Tq, width), all T
        still serving as keys: the last block needs no more when its output is pooled at CLS.
        Experts are chosen as for the whole sequence. With `cache`, x continues the cached
        positions of a text sequence (incremental decoding of the captioning pass).
        """
        attended = self.attn(self.norm(x), key_padding_mask, queries, attn_mask=attn_mask,
                             cache=cache, is_causal=is_causal)
        if queries is not None:
            # queries are plain slices (CLS, the text); slice.indices would fix a traced length
            start = queries.start or 0
            x = x[:, queries]
            split = min(max(split - start, 0), x.size(1))  # the image/text boundary within x
        x = x + self.dropout(attended)
        return x + self.dropout(self.experts(x, split))

    def memory(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of image patch tokens (B, P, width) for `fused`. Patch tokens are not
        updated by the fused pass, so this is computed once per image and shared by every text
        the image is fused with (ITM negatives, re-ranking candidates, generation steps)."""
        return self.attn.keys_values(self.norm(patches))

    def fused(self, x: torch.Tensor, memory: tuple[torch.Tensor, torch.Tensor],
              key_padding_mask: torch.Tensor | None, queries: slice | None = None,
              attn_mask: torch.Tensor | None = None, cache: KVCache | None = None
              ) -> torch.Tensor:
        """The fused tokens x (B, T, width), image CLS and text, attend over [patch memory; x]
        with the shared attention, then go through the VL-FFN: (B, T, width), or (B, Tq, width)
        for `queries`. `key_padding_mask` (B, P + T) marks the real keys; `attn_mask`
        (B, T, P + T) is the captioning pass's; `cache` holds the fused tokens before x."""
        attended = self.attn(self.norm(x), key_padding_mask, queries, memory, attn_mask, cache)
        if queries is not None:
            x = x[:, queries]
        x = x + self.dropout(attended)
        return x + self.dropout(self.ffn_vl(x))

    def experts(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """Image tokens `[:split]` to the V-FFN, text tokens `[split:]` to the L-FFN."""
        if split >= x.size(1):
            return self.ffn_v(x)
        if split <= 0:
            return self.ffn_l(x)
        return torch.cat([self.ffn_v(x[:, :split]), self.ffn_l(x[:, split:])], dim=1)
