"""Matmul FLOPs of one training sample, for MFU (the spirit of nanoGPT's `estimate_mfu`)."""
from __future__ import annotations

from .config import ModelConfig
from .model import LossWeights


def flops_per_sample(
    config: ModelConfig,
    text_len: int | None = None,
    global_batch: int = 1,
    weights: LossWeights | None = None,
    num_answers: int = 0,
    backward: bool = True,
) -> float:
    """FLOPs one sample costs in `UnifiedModel.forward` (x3 for forward + backward).

    Counts matmuls at 2 FLOPs per multiply-add; layer norms, GELU, softmax and embedding lookups
    are left out. With W = width, M = mlp_hidden, P = patches, Ti = P + 1, Tt = text_len,
    L = depth, F = fusion_layers, E = embed_dim, V = vocab_size, N = global ITC batch:

        last(T, Q) = 6 T W^2                    a block computing Q of its T positions: qkv
                   + 4 Q T W                    for all T (keys and values), attention scores
                   + Q (2 W^2 + 4 W M)          and values, out proj and FFN for the Q queries
        layer(T) = last(T, T)                   = T (8 W^2 + 4 W M) + 4 T^2 W
        top(T, Q)  = (F-1) layer(T) + last(T, Q)  the top blocks, pooled or read at Q positions
        image    = 2 P (3 p^2) W + U(Ti)        patch conv; U(T) = (L-F) layer(T) + top(T, 1)
        text     = U(Tt)                        with ITC, else (L-F) layer(T) (bottom only)
        ITC      = 4 W E + 4 E N                two projections; i2t and t2i logit rows
        ITM      = 3 (top(Ti + Tt, 1) + 4 W)    positive + 2 hard negatives; head
        MLM      = (L - F) layer(Tt)            masked caption, bottom blocks
                 + top(Ti + Tt, Tt)             fused with the image, read at the text
                 + Tt (2 W^2 + 2 W V)           head on every text position (masked ones count)
        LM       = (L - F) layer(Tt)            caption, bottom blocks (causal mask)
                 + top(Ti + Tt, Tt)             fused under the seq2seq mask, read at the text
                 + (Tt - 1) (2 W^2 + 2 W V)     head on every text position but the last
        VQA      = top(Ti + Tt, 1)              fused with the question
                 + 2 W H + 2 H A                MLP head (H hidden, A answers)

    Padded text positions are computed (masked, not skipped), so Tt is the padded length
    (default max_text_len); the MLM head too runs on all Tt (static shapes: no host sync), and
    masked attention scores (causal, seq2seq) are computed, then discarded, like the rest. An
    objective with zero weight is not counted; VQA is counted when num_answers > 0. ITM assumes
    a batch of at least 2.
    Backward costs twice the forward (a gradient for the input and for the weight of every
    matmul), hence the factor 3.
    """
    weights = weights or LossWeights()
    W, M, L, F = config.width, config.mlp_hidden, config.depth, config.fusion_layers
    P, Ti = config.num_patches, config.num_patches + 1
    Tt = config.max_text_len if text_len is None else text_len

    def last(T: int, Q: int) -> float:
        return 6 * T * W * W + 4 * Q * T * W + Q * (2 * W * W + 4 * W * M)

    def layer(T: int) -> float:
        return last(T, T)

    def top(T: int, Q: int) -> float:
        return (F - 1) * layer(T) + last(T, Q)

    def unimodal(T: int) -> float:
        return (L - F) * layer(T) + (top(T, 1) if weights.itc else 0)

    flops = 2 * P * 3 * config.patch_size**2 * W
    flops += unimodal(Ti) + unimodal(Tt)
    if weights.itc:
        flops += 2 * 2 * W * config.embed_dim + 2 * 2 * config.embed_dim * global_batch
    if weights.itm:
        flops += 3 * (top(Ti + Tt, 1) + 2 * W * 2)
    if weights.mlm:
        flops += (L - F) * layer(Tt) + top(Ti + Tt, Tt)
        flops += Tt * (2 * W * W + 2 * W * config.vocab_size)
    if weights.lm:
        flops += (L - F) * layer(Tt) + top(Ti + Tt, Tt)
        flops += (Tt - 1) * (2 * W * W + 2 * W * config.vocab_size)
    if weights.vqa and num_answers:
        hidden = config.vqa_hidden_mult * W
        flops += top(Ti + Tt, 1) + 2 * W * hidden + 2 * hidden * num_answers
    return 3 * flops if backward else flops
