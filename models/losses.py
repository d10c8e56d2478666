"""Pretraining objectives that need more than a one-line cross-entropy: ITC, ITM negatives, VQA,
and the token cross-entropy that MLM and LM share."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather


_gather = all_gather  # set_gather swaps in a timed one


def set_gather(gather=None) -> None:
    """Run the ITC gathers through `gather` (torch.distributed.nn's all_gather signature; None:
    that all_gather itself). They bypass deepspeed.comm, so DeepSpeed's comms logger never sees
    them; the training comms log (vlp.pipeline.train.comms) times them through this."""
    global _gather
    _gather = gather or all_gather


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate `x` (B, ...) from all ranks -> ((world*B, ...), this rank), keeping gradients.

    The backward pass sums each rank's gradient for a slice back onto the rank that owns it
    (a reduce-scatter on NCCL). Every rank must pass the same B. (torch 2.13 marks this
    `all_gather` deprecated in favour of the functional collectives; it is kept because it also
    runs on gloo and oneCCL.)
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(_gather(x), dim=0), dist.get_rank()


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
    negative_emb: torch.Tensor | None = None, has_negative: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE, local-loss form (open_clip): local rows against all gathered columns.

    image_emb, text_emb: (B, E), L2-normalised; pair i is the positive. Returns (loss, accuracy,
    local similarity logits (B, B) detached), the last for sampling ITM negatives. With gradients
    averaged over ranks (DDP / DeepSpeed) this equals the loss over the concatenated global batch.
    negative_emb (B, E): edited captions, extra text columns of the image->text rows (NegCLIP),
    this rank's only (each image meets its own edit); has_negative (B,) masks the missing ones.
    """
    all_image, rank = gather_with_grad(image_emb)  # (world*B, E)
    all_text, _ = gather_with_grad(text_emb)
    B = image_emb.size(0)
    # fp32 logits: a temperature of up to 100 amplifies bf16 rounding.
    logits_i2t = logit_scale * image_emb.float() @ all_text.float().T  # (B, world*B)
    logits_t2i = logit_scale * text_emb.float() @ all_image.float().T  # (B, world*B)
    local_sim = logits_i2t[:, rank * B:(rank + 1) * B].detach()  # (B, B): image i vs text j
    if negative_emb is not None:
        edited = logit_scale * image_emb.float() @ negative_emb.float().T  # (B, B)
        edited = edited.masked_fill(~has_negative.bool()[None, :], float("-inf"))
        logits_i2t = torch.cat([logits_i2t, edited], dim=1)  # (B, world*B + B)
    labels = torch.arange(B, device=image_emb.device) + rank * B
    loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
    accuracy = ((logits_i2t.argmax(1) == labels).float().mean()
                + (logits_t2i.argmax(1) == labels).float().mean()) / 2
    return loss, accuracy.detach(), local_sim


def hard_negatives(sim: torch.Tensor, same: torch.Tensor | None = None,
                   uniform_share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one negative per row and per column of `sim` (B, B), B >= 2, as in ALBEF.

    Image i gets text j != i with probability softmax_j(sim[i]) renormalised without the positive;
    text j gets image i != j likewise from sim[:, j]. Masking with -inf makes the positive's
    probability exactly zero. Pairs marked in `same` (B, B) (e.g. identical captions: false
    negatives) are only drawn when a row has nothing else. Each image and each text draws
    uniformly instead with probability `uniform_share`: a fusion encoder trained from scratch on
    hard negatives alone can stay at the constant prediction for hundreds of steps, and easier
    negatives give it a signal to start from. Sampling is Gumbel-max, argmax(logits + Gumbel
    noise), which draws from the same distribution as torch.multinomial without its host-syncing
    validity checks.
    Returns (negative text per image (B,), negative image per text (B,)).
    """
    B = sim.size(0)
    positive = torch.eye(B, dtype=torch.bool, device=sim.device)
    uniform = torch.rand(2, B, device=sim.device) < uniform_share  # (images, texts) drawing so

    def candidates(logits: torch.Tensor) -> torch.Tensor:
        if same is not None:
            logits = logits.masked_fill(same, -1e9)
        return logits.masked_fill(positive, float("-inf"))

    sim = sim.float()
    text_for_image = gumbel_argmax(candidates(sim.masked_fill(uniform[0][:, None], 0.0)))
    image_for_text = gumbel_argmax(candidates(sim.masked_fill(uniform[1][None, :], 0.0)).T)
    return text_for_image, image_for_text


def gumbel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """One sample per row of softmax(logits) (B, N) -> (B,), on the logits' device."""
    uniform = torch.rand_like(logits).clamp_(min=torch.finfo(logits.dtype).tiny)
    return (logits - torch.log(-torch.log(uniform))).argmax(dim=1)


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Soft-score BCE (ViLT/VLMo): summed over answers, averaged over questions.

    logits, targets: (B, num_answers); targets are VQA soft scores in [0, 1].
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum")
    return bce / logits.size(0)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy and accuracy over the tokens with a target (MLM, LM).

    logits (N, vocab); targets (N,), -100 = no prediction. The head runs on every position and the
    rest are ignored: static shapes, so no host sync to count the targets (a boolean index would
    need one). A batch without targets gives 0, not NaN. Returns (loss, accuracy detached).
    """
    selected = targets != -100
    count = selected.sum().clamp(min=1)
    loss = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / count
    accuracy = ((logits.argmax(1) == targets) & selected).sum() / count
    return loss, accuracy.detach()
