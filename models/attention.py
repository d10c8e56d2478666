"""Multi-head attention core with two interchangeable backends.

`sdpa` calls torch's fused kernel (flash / memory-efficient on CUDA, the fused kernel on CPU);
`reference` is the textbook matmul-softmax, kept to check the fused path in tests.

On CPU, torch's fused kernel is 2-4x slower for bf16/fp16 inputs than for fp32 ones at our
sequence lengths (forward + backward, 65-577 tokens; `vlp bench attention`), while it
accumulates in fp32 either way. So half-precision CPU inputs are attended in fp32 and the result
cast back: faster and at least as accurate. fp32 inputs and CUDA are untouched.
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
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # Outside autocast, which would cast the fp32 inputs straight back to half precision.
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     attn_mask=mask)
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if backend == "reference":
        scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, heads, T, T)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.float().softmax(dim=-1).to(v.dtype) @ v
    raise ValueError(f"unknown attention backend {backend!r}; use 'sdpa' or 'reference'")
