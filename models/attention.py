"""Multi-head attention core with two interchangeable backends.

`sdpa` calls torch's fused kernel (flash / memory-efficient on CUDA, the fused kernel on CPU);
`reference` is the textbook matmul-softmax, kept to check the fused path in tests.

On CPU, torch's fused kernel is 2-4x slower for bf16/fp16 inputs than for fp32 ones at our
sequence lengths (forward + backward, 65-577 tokens; `vlp bench attention`), while it
accumulates in fp32 either way. So half-precision CPU inputs are attended in fp32 and the result
cast back: faster and at least as accurate. fp32 inputs and CUDA are untouched.

Masks are boolean, True = may be attended: a key-padding mask (B, Tk) for bidirectional
sequences, or a general mask (B, Tq, Tk), such as the sequence-to-sequence mask of captioning
(`seq2seq_mask`). Purely causal attention takes `is_causal` instead of a mask: on CUDA, SDPA's
flash kernel accepts no mask tensor, so any mask sends it to a slower kernel.
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
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim)) v over the keys each query may attend.

    q: (B, heads, Tq, head_dim); k, v: (B, heads, Tk, head_dim); key_padding_mask: bool (B, Tk),
    True = real token; attn_mask: bool (B, Tq, Tk), True = query may attend key. With both, a key
    must pass both. is_causal: query t attends keys 0..t (Tq == Tk, no mask). Every query must
    keep at least one key. Returns (B, heads, Tq, head_dim).
    """
    # (B, Tk) -> (B, 1, 1, Tk) and (B, Tq, Tk) -> (B, 1, Tq, Tk): broadcast over heads.
    mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
    if attn_mask is not None:
        mask = attn_mask[:, None] if mask is None else mask & attn_mask[:, None]
    if is_causal and (mask is not None or q.size(2) != k.size(2)):
        raise ValueError("is_causal takes no mask and as many queries as keys")
    if backend == "sdpa":
        if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
            # Outside autocast, which would cast the fp32 inputs straight back to half precision.
            with torch.autocast("cpu", enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                     attn_mask=mask, is_causal=is_causal)
            return out.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    if backend == "reference":
        scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, heads, Tq, Tk)
        if is_causal:
            mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.float().softmax(dim=-1).to(v.dtype) @ v
    raise ValueError(f"unknown attention backend {backend!r}; use 'sdpa' or 'reference'")


def causal_mask(text_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool, True = real token -> (B, T, T): token t attends the real tokens 0..t."""
    T = text_mask.size(1)
    before = torch.ones(T, T, dtype=torch.bool, device=text_mask.device).tril()
    return before & text_mask.bool()[:, None, :]


def seq2seq_mask(num_image: int, text_mask: torch.Tensor) -> torch.Tensor:
    """The captioning mask over [image; text]: (B, Ti + Tt, Ti + Tt), True = may attend.

    Image tokens attend all image tokens and no text, so the image side never depends on the
    caption; text token t attends every image token and the real text tokens 0..t (UniLM, BEiT-3).
    """
    B, Tt = text_mask.shape
    T = num_image + Tt
    mask = torch.zeros(B, T, T, dtype=torch.bool, device=text_mask.device)
    mask[:, :, :num_image] = True
    mask[:, num_image:, num_image:] = causal_mask(text_mask)
    return mask
