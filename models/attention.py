"""Multi-head attention core with two interchangeable backends.

`sdpa` calls torch's fused kernel (flash / memory-efficient on CUDA, the fused kernel on CPU);
`reference` is the textbook matmul-softmax, kept to check the fused path in tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over keys where `key_padding_mask` is True.

    q, k, v: (B, heads, T, head_dim); key_padding_mask: bool (B, T), True = real token.
    Returns (B, heads, T, head_dim).
    """
    # (B, T) -> (B, 1, 1, T): broadcast over heads and queries; True = may be attended to.
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "reference":
        scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, heads, T, T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.float().softmax(dim=-1).to(v.dtype) @ v
    raise ValueError(f"unknown attention backend {backend!r}; use 'sdpa' or 'reference'")
