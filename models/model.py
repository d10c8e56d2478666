"""The unified multiway transformer (VLMo-style) with its pretraining and VQA objectives.

    images (B, 3, S, S) -> patch embed + CLS + pos (learned | 2D sin-cos) -> bottom blocks
                           (V-FFN) -> image states
    text ids (B, T)     -> token + pos             -> bottom blocks (L-FFN) -> text states
    dual encoder: states -> top blocks (V-FFN | L-FFN) -> LN -> CLS -> projection -> L2 norm
    fused:        [image CLS; text states] + type attend over [image patch memory; themselves]
                  in the top blocks (shared attention, VL-FFN) -> LN -> image CLS or text
                  [CLS] (config.fused_pooling: ITM, VQA) | text (MLM)
    captioning:   text -> bottom blocks, causal -> the fused pass under the sequence-to-sequence
                  mask -> LN -> tied MLM head predicts the next token

In the fused pass the image's patch tokens are only keys and values (each top block's "memory"
of the image, computed once per image), as in ALBEF's cross-attention but with the blocks' own
shared attention weights; the queries are the text tokens and the image CLS. The ITM and VQA
heads read the image CLS or the text [CLS] (ALBEF, BLIP), as `fused_pooling` says. An image is
fused with many texts (ITM's positive and negatives, every re-ranking candidate, every step of
generation) at the cost of its memory once.
The image and caption bottom states are computed once per step and reused by ITC, ITM and the
MLM fused pass (MLM adds one bottom pass over the masked caption, LM one causal bottom pass).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import seq2seq_mask
from .config import ModelConfig
from .losses import contrastive_loss, hard_negatives, token_cross_entropy, vqa_loss
from .multiway import KVCache, MultiwayBlock

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: temperature >= 0.01
VQA_FUSION = ("fused", "late")
# CLIP's pixel statistics; any fixed choice works as long as training and evaluation agree.
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
CLS = slice(0, 1)  # the pooled position, as a `queries` selection


class ImageMemory(NamedTuple):
    """An image batch as the fused pass sees it: the CLS state (B, 1, width), a query of the
    fused blocks, and per top block the keys and values of the patch tokens,
    [(B, heads, P, head_dim)] * 2."""

    cls: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    def select(self, index: torch.Tensor) -> ImageMemory:
        """The memory of images `index` (a gather, nothing recomputed)."""
        return ImageMemory(self.cls[index], [(k[index], v[index]) for k, v in self.kv])


class EditedCaptions(NamedTuple):
    """One edited caption per image of a batch (hard negatives): bottom states (B, Tt, width),
    mask (B, Tt) and which images have one (B,) bool."""

    states: torch.Tensor
    mask: torch.Tensor
    valid: torch.Tensor


@dataclass
class LossWeights:
    """Weight of each objective in the total; a zero weight skips the objective's compute."""

    itc: float = 1.0
    itm: float = 1.0
    mlm: float = 1.0
    vqa: float = 1.0  # used when forward() gets vqa_targets
    lm: float = 0.0  # captioning: next-token prediction under the seq2seq mask


def sincos_2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2D sine-cosine positions (MAE's table): (grid * grid, width), half of the channels
    for the row and half for the column, each sin and cos of the coordinate at geometrically
    spaced frequencies. Entries are in [-1, 1], RMS 1/sqrt(2): the same scale as patch content."""
    if width % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {width}")
    omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def encode(values: torch.Tensor) -> torch.Tensor:
        angles = values.reshape(-1, 1) * omega  # (grid * grid, width / 4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class ImageEmbedding(nn.Module):
    """Conv patch embedding + CLS + positions: (B, 3, S, S) -> (B, 1 + P, width).

    Positions are learned or a fixed 2D sin-cos table (the CLS position is zero). uint8 pixels
    are normalised here, on the model's device (the loader ships uint8: a quarter of fp32's
    bytes); float images are taken as already normalised.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.image_size = config.image_size
        self.patch = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, config.width))
        if config.position_embedding == "sincos":
            table = sincos_2d(config.image_size // config.patch_size, config.width)
            table = torch.cat([torch.zeros(1, config.width), table])[None]  # (1, 1 + P, width)
            self.register_buffer("pos", table, persistent=False)
        else:
            self.pos = nn.Parameter(torch.zeros(1, 1 + config.num_patches, config.width))
        self.register_buffer("mean", 255 * torch.tensor(IMAGE_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", 255 * torch.tensor(IMAGE_STD).view(3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"images are {tuple(images.shape[-2:])}, the model expects "
                             f"{self.image_size}x{self.image_size}")
        if images.dtype == torch.uint8:
            images = ((images.float() - self.mean) / self.std).to(self.patch.weight.dtype)
        x = self.patch(images).flatten(2).transpose(1, 2)  # (B, width, S/p, S/p) -> (B, P, width)
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], dim=1)  # (B, 1 + P, width)
        return x + self.pos.to(x.dtype)


class TextEmbedding(nn.Module):
    """Token + learned position embeddings: (B, T) -> (B, T, width), T <= max_text_len."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Parameter(torch.zeros(1, config.max_text_len, config.width))

    def forward(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Positions start..start + T - 1 (start > 0: a continuation, in incremental decoding)."""
        end = start + ids.size(1)
        if end > self.pos.size(1):
            raise ValueError(f"text length {end} exceeds max_text_len {self.pos.size(1)}")
        return self.token(ids) + self.pos[:, start:end]


class MLMHead(nn.Module):
    """BERT's prediction head: dense + GELU + LayerNorm, then a decoder tied to the token embedding.

    The tie shares one Parameter between two modules (as HF BERT does), so ZeRO-3 gathers it for
    the decoder's own forward like any other weight.
    """

    def __init__(self, config: ModelConfig, token_embedding: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(config.width, config.width)
        self.norm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.width, config.vocab_size)
        self.decoder.weight = token_embedding.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(x))))  # (N, width) -> (N, vocab)


class UnifiedModel(nn.Module):
    """Image/text dual encoder and fusion encoder in one multiway transformer.

    Under DeepSpeed ZeRO-3 train only through `forward` (it computes every loss) and attach the
    VQA head before `deepspeed.initialize`.
    """

    def __init__(self, config: ModelConfig, loss_weights: LossWeights | None = None,
                 itm_uniform_negatives: float = 0.0):
        """`itm_uniform_negatives`: the share of ITM negatives drawn uniformly from the batch
        instead of by ITC similarity (hard_negatives)."""
        super().__init__()
        if not 0 <= itm_uniform_negatives <= 1:
            raise ValueError(f"itm_uniform_negatives must be in [0, 1], got "
                             f"{itm_uniform_negatives}")
        if config.vocab_size is None:
            raise ValueError("config.vocab_size is unset: "
                             "load_config(name, vocab_size=tokenizer.get_vocab_size())")
        self.config = config
        self.loss_weights = loss_weights or LossWeights()
        W = config.width
        self.image_embed = ImageEmbedding(config)
        self.text_embed = TextEmbedding(config)
        self.type_embed = nn.Embedding(2, W)  # 0 = image, 1 = text; added when fusing
        self.register_buffer("type_ids", torch.arange(2), persistent=False)
        self.blocks = nn.ModuleList(
            MultiwayBlock(config, vl_ffn=i >= self.num_bottom) for i in range(config.depth))
        self.norm = nn.LayerNorm(W, eps=config.layer_norm_eps)
        self.image_proj = nn.Linear(W, config.embed_dim, bias=False)
        self.text_proj = nn.Linear(W, config.embed_dim, bias=False)
        # Shape (1,), not a scalar: DeepSpeed's initial broadcast cannot view a 0-d tensor as bytes.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1 / 0.07)))
        self.itm_head = nn.Linear(W, 2)
        self.mlm_head = MLMHead(config, self.text_embed.token)
        self.vqa_head: nn.Sequential | None = None
        self.vqa_fusion = "fused"
        self.itm_uniform_negatives = itm_uniform_negatives
        # Under deepspeed.zero.Init, DeepSpeed wraps Module.apply to gather each module's
        # partitioned parameters around the init function, so this init is not lost.
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module):
        std = self.config.init_std
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, (ImageEmbedding, TextEmbedding)):
            for param in module.parameters(recurse=False):
                nn.init.trunc_normal_(param, std=std, a=-2 * std, b=2 * std)

    def attach_vqa_head(self, num_answers: int, answer_prior: torch.Tensor | None = None,
                        fusion: str = "fused") -> None:
        """Add the VQA classifier: an MLP over the question -> (B, num_answers) logits.

        fusion="fused": over the text CLS of the fused pass (the question attends to the image).
        fusion="late": over the unimodal CLS states of image and question, concatenated, with no
        fused layer: the baseline that shows what fusion buys.
        `answer_prior` (num_answers,), each answer's mean soft score on the training set, sets the
        output bias to its logit, so the head starts at the prior (as RetinaNet initialises its
        classifier) instead of spending the first steps of a short fine-tune pushing every
        sigmoid from 0.5 down.
        """
        if fusion not in VQA_FUSION:
            raise ValueError(f"VQA fusion {fusion!r} is not one of {VQA_FUSION}")
        W, hidden = self.config.width, self.config.vqa_hidden_mult * self.config.width
        head = nn.Sequential(
            nn.Linear(W if fusion == "fused" else 2 * W, hidden),
            nn.LayerNorm(hidden, eps=self.config.layer_norm_eps),
            nn.GELU(), nn.Linear(hidden, num_answers),
        )
        head.apply(self._init_weights)
        if answer_prior is not None:
            if answer_prior.shape != (num_answers,):
                raise ValueError(f"answer_prior has shape {tuple(answer_prior.shape)}, "
                                 f"expected ({num_answers},)")
            with torch.no_grad():
                head[-1].bias.copy_(torch.logit(answer_prior.float().clamp(1e-4, 1 - 1e-4)))
        self.vqa_head = head.to(self.itm_head.weight.device, self.itm_head.weight.dtype)
        self.vqa_fusion = fusion

    @property
    def num_bottom(self) -> int:
        """Blocks that run each modality alone; the rest are the top (fusion) blocks."""
        return self.config.depth - self.config.fusion_layers

    @property
    def bottom(self) -> nn.ModuleList:
        return self.blocks[: self.num_bottom]

    @property
    def top(self) -> nn.ModuleList:
        return self.blocks[self.num_bottom :]

    @property
    def pooled(self) -> slice:
        """The fused pass's position the ITM and VQA heads read (config.fused_pooling): 0 the
        image CLS, 1 the text [CLS]."""
        return CLS if self.config.fused_pooling == "image_cls" else slice(1, 2)

    @property
    def num_answers(self) -> int | None:
        return None if self.vqa_head is None else self.vqa_head[-1].out_features

    # ---- unimodal bottom layers ------------------------------------------------------------

    def image_states(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> bottom-layer image states (B, 1 + P, width)."""
        x = self.image_embed(images)
        for block in self.bottom:
            x = block(x, split=x.size(1))
        return x

    def text_states(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, bool mask (True = real token) -> bottom-layer text states (B, T, width)."""
        x = self.text_embed(text_ids)
        for block in self.bottom:
            x = block(x, split=0, key_padding_mask=text_mask.bool())
        return x

    # ---- dual encoder ----------------------------------------------------------------------

    def _embed(self, states: torch.Tensor, split: int, mask: torch.Tensor | None,
               proj: nn.Linear) -> torch.Tensor:
        """Top blocks for one modality, then the projected, L2-normalised CLS: (B, embed_dim).

        Only the CLS output is pooled, so the last block computes position 0 alone (every
        position is still a key): same result, about (1 - 1/T) of that block's FLOPs saved.
        Normalised in fp32 (the embedding is fp32 whatever the weights' dtype): bf16 unit
        vectors put up to 0.7 of error into ITC logits scaled by 100.
        """
        cls = self._top(states, split, mask, queries=CLS)[:, 0]  # (B, width)
        return F.normalize(proj(cls).float(), dim=-1)

    def image_embedding(self, image_states: torch.Tensor) -> torch.Tensor:
        return self._embed(image_states, image_states.size(1), None, self.image_proj)

    def text_embedding(self, text_states: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        return self._embed(text_states, 0, text_mask.bool(), self.text_proj)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> L2-normalised retrieval embedding (B, embed_dim)."""
        return self.image_embedding(self.image_states(images))

    def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> L2-normalised retrieval embedding (B, embed_dim)."""
        return self.text_embedding(self.text_states(text_ids, text_mask), text_mask)

    def itc_logit_scale(self) -> torch.Tensor:
        """The ITC logits' scale, 1 / temperature, clamped as CLIP's (0-dim, fp32 whatever the
        weights' dtype: exp in bf16 would round a scale of 100 by up to 0.4)."""
        return self.logit_scale.float().clamp(max=MAX_LOGIT_SCALE).exp().squeeze(0)

    # ---- fusion encoder --------------------------------------------------------------------

    def image_memory(self, image_states: torch.Tensor) -> ImageMemory:
        """What the fused pass needs of these images (B, Ti, width): the CLS state, and per top
        block the keys and values of the patch tokens (type embedding added)."""
        x = image_states + self.type_embed(self.type_ids[:1])  # (B, Ti, width)
        return ImageMemory(x[:, :1], [block.memory(x[:, 1:]) for block in self.top])

    def fuse(self, memory: ImageMemory, text_states: torch.Tensor, text_mask: torch.Tensor,
             queries: slice | None = None, causal: bool = False,
             caches: list[KVCache] | None = None) -> torch.Tensor:
        """The fused pass: [image CLS; text] attend over [image patches; image CLS; text] in the
        top blocks (VL-FFN).

        memory from `image_memory` (B images), text_states (B, Tt, width), text_mask (B, Tt) ->
        final-LN states (B, 1 + Tt, width), or only the positions in `queries` (the last block
        computes no others): position 0 is the image CLS, slice(1, None) the text states (MLM),
        `self.pooled` the one the ITM and VQA heads read.

        causal=True is the captioning pass: the image CLS attends the image only, text token t the
        image and the real text tokens 0..t (the sequence-to-sequence mask of UniLM and BEiT-3).
        With `caches` (one per top block), the fused tokens' keys and values are kept for
        `lm_step`.
        """
        x = torch.cat([memory.cls, text_states + self.type_embed(self.type_ids[1:])], dim=1)
        patches = memory.kv[0][0].size(2)
        padding, attn_mask = None, None
        if causal:
            attn_mask = seq2seq_mask(patches + 1, text_mask.bool())[:, patches:]
        else:
            padding = torch.cat([text_mask.new_ones(text_mask.size(0), patches + 1), text_mask],
                                dim=1).bool()
        caches = caches or [None] * len(self.top)
        *body, last = range(len(self.top))
        for i in body:
            x = self.top[i].fused(x, memory.kv[i], padding, attn_mask=attn_mask, cache=caches[i])
        return self.norm(self.top[last].fused(x, memory.kv[last], padding, queries, attn_mask,
                                              caches[last]))

    def _top(self, x: torch.Tensor, split: int, mask: torch.Tensor | None,
             queries: slice | None) -> torch.Tensor:
        """The top blocks for one modality, the last computing only `queries` (None: all), then
        the final LN."""
        *body, last = self.top
        for block in body:
            x = block(x, split, mask)
        return self.norm(last(x, split, mask, queries))

    def itm_logits(self, images: torch.Tensor, text_ids: torch.Tensor,
                   text_mask: torch.Tensor) -> torch.Tensor:
        """Image-text match logits (B, 2), class 1 = match, for pairs (images[b], texts[b])."""
        memory = self.image_memory(self.image_states(images))
        return self.itm_scores(memory, self.text_states(text_ids, text_mask), text_mask)

    def itm_scores(self, memory: ImageMemory, text_states: torch.Tensor,
                   text_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits (B, 2) from precomputed image memory and text states (re-ranking reuses
        both across candidates)."""
        return self.itm_head(self.fuse(memory, text_states, text_mask, queries=self.pooled)[:, 0])

    def vqa_logits(self, images: torch.Tensor, q_ids: torch.Tensor,
                   q_mask: torch.Tensor) -> torch.Tensor:
        """Answer logits (B, num_answers); needs `attach_vqa_head` first."""
        return self._vqa_logits(self.image_states(images), self.text_states(q_ids, q_mask), q_mask)

    def _vqa_logits(self, image_states, text_states, text_mask) -> torch.Tensor:
        if self.vqa_head is None:
            raise RuntimeError("no VQA head: call model.attach_vqa_head(num_answers) first")
        if self.vqa_fusion == "late":
            image_cls = self._top(image_states, image_states.size(1), None, CLS)[:, 0]
            text_cls = self._top(text_states, 0, text_mask.bool(), CLS)[:, 0]
            return self.vqa_head(torch.cat([image_cls, text_cls], dim=-1))
        pooled = self.fuse(self.image_memory(image_states), text_states, text_mask,
                           queries=self.pooled)
        return self.vqa_head(pooled[:, 0])

    # ---- training --------------------------------------------------------------------------

    def forward(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        mlm_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        vqa_targets: torch.Tensor | None = None,
        neg_ids: torch.Tensor | None = None,
        neg_mask: torch.Tensor | None = None,
        has_neg: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """One training step's losses: {"loss": weighted total, "<name>_loss", diagnostics}.

        images (B, 3, S, S); text_ids, text_mask (B, T); mlm_ids/mlm_labels (B, T) from
        `pipeline.data.transforms.mask_tokens` (labels -100 = no prediction), needed when the MLM
        weight is nonzero; vqa_targets (B, num_answers) soft scores, for VQA fine-tuning (then
        usually with `LossWeights(itc=0, itm=0, mlm=0)`). The LM (captioning) loss reads
        text_ids and text_mask. neg_ids/neg_mask (B, T) and has_neg (B,): an edited caption per
        image (`vlp.pipeline.data.negatives`), an extra negative of ITC and ITM. Diagnostics are
        detached.
        """
        weights = self.loss_weights
        if weights.mlm and (mlm_ids is None or mlm_labels is None):
            raise ValueError("the MLM weight is nonzero: pass mlm_ids and mlm_labels, "
                             "or build the model with LossWeights(mlm=0)")
        image_states = self.image_states(images)  # (B, Ti, width)
        text_states = self.text_states(text_ids, text_mask)  # (B, Tt, width)
        edited = None
        if neg_ids is not None and (weights.itc or weights.itm):
            edited = EditedCaptions(self.text_states(neg_ids, neg_mask), neg_mask, has_neg.bool())
        losses, out = {}, {}
        sim = None
        if weights.itc:
            scale = self.itc_logit_scale()
            image_emb = self.image_embedding(image_states)  # (B, embed_dim)
            text_emb = self.text_embedding(text_states, text_mask)
            edited_emb = (None if edited is None
                          else self.text_embedding(edited.states, edited.mask))
            losses["itc"], out["itc_acc"], sim = contrastive_loss(
                image_emb, text_emb, scale, edited_emb, None if edited is None else edited.valid)
            if edited is not None:  # how often ITC prefers the caption to its edit
                prefer = ((image_emb * text_emb).sum(-1) > (image_emb * edited_emb).sum(-1))
                out["itc_edited_acc"] = ((prefer & edited.valid).sum()
                                         / edited.valid.sum().clamp(min=1)).detach()
            out["temperature"] = 1.0 / scale.detach()
        if weights.itm or weights.mlm or weights.lm:
            memory = self.image_memory(image_states)  # once, for every fused pass below
        if weights.itm:
            losses["itm"], itm_out = self._itm_loss(
                memory, text_states, text_ids, text_mask, sim, edited)
            out.update(itm_out)
        if weights.mlm:
            losses["mlm"], out["mlm_acc"] = self._mlm_loss(memory, mlm_ids, text_mask, mlm_labels)
        if weights.lm:
            losses["lm"], out["lm_acc"] = self._lm_loss(memory, text_ids, text_mask)
        if weights.vqa and vqa_targets is not None:
            logits = self._vqa_logits(image_states, text_states, text_mask)
            losses["vqa"] = vqa_loss(logits, vqa_targets)
        if not losses:
            raise ValueError(f"no objective enabled by {weights} for these inputs")
        out["loss"] = sum(getattr(weights, name) * loss for name, loss in losses.items())
        out.update({f"{name}_loss": loss for name, loss in losses.items()})
        return out

    def _itm_loss(self, memory, text_states, text_ids, text_mask, sim, edited=None):
        """Match/no-match over B positives, B hard-negative texts and B hard-negative images
        (ALBEF), and with `edited` captions B more negatives: each image with its own caption's
        edit, false only in how attributes bind (an image without an edit adds no loss).

        Negatives are sampled from the ITC similarities `sim` (B, B); a caption identical to the
        positive's (duplicate captions of look-alike scenes) is never a negative. The negative
        images' memory is taken from the batch's, not recomputed. A batch of one has no sampled
        negative.
        """
        B = text_states.size(0)
        own = torch.arange(B, device=text_states.device)
        index, texts, masks = [own], [text_states], [text_mask]
        labels = [torch.ones_like(own)]
        if B > 1:
            sim = text_states.new_zeros(B, B) if sim is None else sim  # uniform without ITC
            same_text = (text_ids[:, None] == text_ids[None, :]).all(dim=-1)  # (B, B)
            neg_text, neg_image = hard_negatives(sim, same_text, self.itm_uniform_negatives)
            # (image, negative text), (negative image, text)
            index += [own, neg_image]
            texts += [text_states[neg_text], text_states]
            masks += [text_mask[neg_text], text_mask]
            labels += [torch.zeros_like(own)] * 2
        if edited is not None:  # (image, its edited caption); -100: no edit, no loss
            index, texts, masks = index + [own], texts + [edited.states], masks + [edited.mask]
            labels.append(torch.where(edited.valid, 0, -100))
        labels = torch.cat(labels)
        logits = self.itm_scores(memory.select(torch.cat(index)), torch.cat(texts),
                                 torch.cat(masks)).float()  # (3B [+ B], 2)
        correct = (logits.argmax(1) == labels) & (labels != -100)
        out = {"itm_acc": (correct.sum() / (labels != -100).sum().clamp(min=1)).detach()}
        loss = F.cross_entropy(logits, labels, ignore_index=-100)
        if edited is not None:
            # The caption against its own edit, ranked: -log sigmoid(log-odds(caption) -
            # log-odds(edit)). Its gradient does not vanish while both are called "no match".
            odds = logits[:, 1] - logits[:, 0]
            margin = odds[:B] - odds[-B:]
            valid = edited.valid.float()
            loss = loss + (F.softplus(-margin) * valid).sum() / valid.sum().clamp(min=1)
            out["itm_edited_acc"] = (((margin > 0) & edited.valid).sum()
                                     / edited.valid.sum().clamp(min=1)).detach()
        return loss, out

    def _mlm_loss(self, memory, mlm_ids, text_mask, mlm_labels):
        """Predict the masked caption tokens from the caption fused with its image (the head runs
        on every text position, unmasked ones ignored: `token_cross_entropy`)."""
        fused_text = self.fuse(memory, self.text_states(mlm_ids, text_mask), text_mask,
                               queries=slice(1, None))  # (B, Tt, width)
        logits = self.mlm_head(fused_text).float().flatten(0, 1)  # (B * Tt, vocab)
        return token_cross_entropy(logits, mlm_labels.flatten())

    # ---- captioning (LM) ---------------------------------------------------------------------

    def _lm_loss(self, memory, text_ids, text_mask):
        """Predict each caption token from the image and the caption before it."""
        states = self.lm_text_states(memory, text_ids, text_mask)  # (B, Tt, width)
        logits = self.mlm_head(states[:, :-1]).float().flatten(0, 1)  # state t -> token t + 1
        targets = text_ids[:, 1:].masked_fill(~text_mask[:, 1:].bool(), -100)
        return token_cross_entropy(logits, targets.flatten())

    def lm_text_states(self, memory: ImageMemory, text_ids: torch.Tensor,
                       text_mask: torch.Tensor, caches: list[KVCache] | None = None
                       ) -> torch.Tensor:
        """Final-LN text states for captioning: memory of B images, (B, Tt) -> (B, Tt, width).

        State t predicts token t + 1 and depends on the image and tokens 0..t only: the bottom
        blocks run the text causally (its unimodal states are bidirectional, so they cannot be
        reused) and the fused pass uses the sequence-to-sequence mask. With `caches` (empty, one
        per block), every block's keys and values are kept for `lm_step`.

        The bottom blocks take `is_causal` rather than a causal mask AND padding (SDPA's flash
        kernel takes no mask): padding follows the real tokens, so a real token t never reaches
        it causally. Only the states at padding positions change, and nothing reads them: the
        fused pass masks them as keys and the loss ignores their predictions.
        """
        caches = caches or [None] * len(self.blocks)
        text_mask = text_mask.bool()
        x = self.text_embed(text_ids)
        for block, cache in zip(self.bottom, caches):
            x = block(x, split=0, cache=cache, is_causal=True)
        return self.fuse(memory, x, text_mask, queries=slice(1, None), causal=True,
                         caches=caches[self.num_bottom :])

    def lm_step(self, memory: ImageMemory, token_ids: torch.Tensor,
                caches: list[KVCache]) -> torch.Tensor:
        """One decoding step: the next token (N,) of each sequence after the cached positions
        (`lm_text_states` filled the caches) -> its final-LN state (N, width)."""
        x = self.text_embed(token_ids[:, None], start=caches[0].length)  # (N, 1, width)
        for block, cache in zip(self.bottom, caches):
            x = block(x, split=0, cache=cache)
        x = x + self.type_embed(self.type_ids[1:])
        for block, kv, cache in zip(self.top, memory.kv, caches[self.num_bottom :]):
            x = block.fused(x, kv, None, cache=cache)
        return self.norm(x)[:, 0]
