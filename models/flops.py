"""Matmul FLOPs of one training sample, for MFU (the spirit of nanoGPT's `estimate_mfu`)."""
from __future__ import annotations

from .config import ModelConfig
from .model import LossWeights


def flops_per_sample(
    config: ModelConfig,
    text_len: int | None = None,
    global_batch: int = 1,
    local_batch: int = 1,
    weights: LossWeights | None = None,
    num_answers: int = 0,
    backward: bool = True,
    edited_negatives: bool = False,
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
        memory   = F 6 P W^2                    the patches' keys and values in each top block
                                                (once per image, with any fused objective)
        flast(Q) = 6 (1 + Tt) W^2               a fused block: qkv of image CLS + text, Q of
                 + 4 Q (Ti + Tt) W              them as queries over patches, CLS and text,
                 + Q (2 W^2 + 4 W M)            out proj + VL-FFN
        fused(Q) = (F-1) flast(1 + Tt) + flast(Q)
        ITM      = 3 (fused(1) + 4 W)           positive + 2 hard negatives; head
        MLM      = (L - F) layer(Tt)            masked caption, bottom blocks
                 + fused(Tt)                    fused with the image, read at every text position
                 + Tt (2 W^2 + 2 W V)           head on every text position (masked ones count)
        LM       = (L - F) layer(Tt)            caption, bottom blocks (causal mask)
                 + fused(Tt)                    fused under the seq2seq mask, read at the text
                 + (Tt - 1) (2 W^2 + 2 W V)     head on every text position but the last
        VQA      = fused(1) + 2 W H + 2 H A     fused question, MLP head (H hidden, A answers)
        edited   = U(Tt) + 2 W E + 2 E B        with edited-caption negatives: the edit through
                 + fused(1) + 4 W               the text tower, projected, B more i2t columns
                                                (local batch B), and one more ITM pair

    Padded text positions are computed (masked, not skipped), so Tt is the padded length
    (default max_text_len); the MLM head too runs on all Tt (static shapes: no host sync), and
    masked attention scores (causal, seq2seq) are computed, then discarded, like the rest. An
    objective with zero weight is not counted; VQA is counted when num_answers > 0. ITM assumes
    a batch of at least 2. Backward costs twice the forward (a gradient for the input and for the
    weight of every matmul), hence the factor 3.
    """
    weights = weights or LossWeights()
    c = _Blocks(config, config.max_text_len if text_len is None else text_len)
    W, Ti, Tt = config.width, c.Ti, c.Tt

    def unimodal(T: int) -> float:
        return c.bottom(T) + (c.top(T, 1) if weights.itc else 0)

    vqa = bool(weights.vqa and num_answers)
    flops = c.patch_embed() + unimodal(Ti) + unimodal(Tt)
    if weights.itc:
        flops += 2 * 2 * W * config.embed_dim + 2 * 2 * config.embed_dim * global_batch
    if edited_negatives and (weights.itc or weights.itm):
        flops += unimodal(Tt) + (2 * W * config.embed_dim + 2 * config.embed_dim * local_batch
                                 if weights.itc else 0)
        flops += c.fused(1) + 2 * W * 2 if weights.itm else 0
    if weights.itm or weights.mlm or weights.lm or vqa:
        flops += c.memory()
    if weights.itm:
        flops += 3 * (c.fused(1) + 2 * W * 2)
    if weights.mlm:
        flops += c.bottom(Tt) + c.fused(Tt) + Tt * (2 * W * W + 2 * W * config.vocab_size)
    if weights.lm:
        flops += c.bottom(Tt) + c.fused(Tt) + (Tt - 1) * (2 * W * W + 2 * W * config.vocab_size)
    if vqa:
        hidden = config.vqa_hidden_mult * W
        flops += c.fused(1) + 2 * W * hidden + 2 * hidden * num_answers
    return 3 * flops if backward else flops


def rerank_flops(config: ModelConfig, pairs: int, images: int, texts: int,
                 text_len: int | None = None) -> float:
    """Forward FLOPs of ITM re-ranking: the bottom states and fused-layer memory of each image,
    the bottom states of each caption, and one fused pass (pooled at CLS) + head per pair."""
    c = _Blocks(config, config.max_text_len if text_len is None else text_len)
    per_image = c.patch_embed() + c.bottom(c.Ti) + c.memory()
    per_pair = c.fused(1) + 2 * config.width * 2
    return images * per_image + texts * c.bottom(c.Tt) + pairs * per_pair


class _Blocks:
    """Matmul FLOPs of the model's pieces, as written out in `flops_per_sample`."""

    def __init__(self, config: ModelConfig, text_len: int):
        self.config = config
        self.W, self.M = config.width, config.mlp_hidden
        self.L, self.F = config.depth, config.fusion_layers
        self.Ti, self.Tt = config.num_patches + 1, text_len

    def last(self, T: int, Q: int) -> float:
        W, M = self.W, self.M
        return 6 * T * W * W + 4 * Q * T * W + Q * (2 * W * W + 4 * W * M)

    def layer(self, T: int) -> float:
        return self.last(T, T)

    def bottom(self, T: int) -> float:
        return (self.L - self.F) * self.layer(T)

    def top(self, T: int, Q: int) -> float:
        return (self.F - 1) * self.layer(T) + self.last(T, Q)

    def patch_embed(self) -> float:
        return 2 * self.config.num_patches * 3 * self.config.patch_size**2 * self.W

    def memory(self) -> float:
        return self.F * 6 * (self.Ti - 1) * self.W * self.W

    def fused_last(self, Q: int) -> float:
        W, M, Tt = self.W, self.M, self.Tt
        return 6 * (1 + Tt) * W * W + 4 * Q * (self.Ti + Tt) * W + Q * (2 * W * W + 4 * W * M)

    def fused(self, Q: int) -> float:
        return (self.F - 1) * self.fused_last(1 + self.Tt) + self.fused_last(Q)
