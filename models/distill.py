"""Knowledge distillation: a student UnifiedModel trained with a frozen teacher in its forward.

    teacher (frozen, no_grad): image/text states -> ITC embeddings [-> fused MLM logits]
    student: its own forward (every pretraining loss), its ITC embeddings and MLM logits read
             from that same pass through forward hooks (nothing is encoded twice)
    loss = student losses + itc_weight * KD(ITC) + mlm_weight * KD(MLM)

KD is T^2 * KL(softmax(teacher / T) || softmax(student / T)) (Hinton et al.), where the ITC logits
are each model's scale times its cosine similarities, rows of local queries against the whole
gathered batch in both directions (as the contrastive loss), and the MLM logits are those at the
masked positions. The teacher's logit scale is read once when it is attached: under ZeRO-3 a
parameter used outside its module's forward is an empty partition.

ZeRO-3: the teacher is a registered submodule, so DeepSpeed partitions it like the student and
gathers each of its modules inside forward, in the same order every step; its parameters are
frozen (no optimizer state) and checkpoints leave them out (`exclude_frozen_parameters`), so a
checkpoint of a distillation run is a plain student checkpoint.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .losses import gather_with_grad
from .model import MAX_LOGIT_SCALE, LossWeights, UnifiedModel


@dataclass
class DistillWeights:
    """Weights of the distillation terms and the softening temperature."""

    itc: float = 1.0
    mlm: float = 0.0  # 0 skips the teacher's fused MLM pass
    temperature: float = 1.0


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over rows (N, C)."""
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def itc_distillation(student_image: torch.Tensor, student_text: torch.Tensor,
                     student_scale: torch.Tensor, teacher_image: torch.Tensor,
                     teacher_text: torch.Tensor, teacher_scale: float,
                     temperature: float) -> torch.Tensor:
    """Soft KL between the two models' ITC logits, image->text and text->image averaged.

    Embeddings (B, E_s) / (B, E_t) are L2-normalised; local rows against the columns of every
    rank (the student's gathered with gradient), so the targets are the global batch's.
    """
    all_student_text, _ = gather_with_grad(student_text)
    all_student_image, _ = gather_with_grad(student_image)
    all_teacher_text, _ = gather_with_grad(teacher_text)
    all_teacher_image, _ = gather_with_grad(teacher_image)
    s_i2t = student_scale * student_image.float() @ all_student_text.float().T  # (B, world*B)
    s_t2i = student_scale * student_text.float() @ all_student_image.float().T
    t_i2t = teacher_scale * teacher_image.float() @ all_teacher_text.float().T
    t_t2i = teacher_scale * teacher_text.float() @ all_teacher_image.float().T
    return (soft_kl(s_i2t, t_i2t, temperature) + soft_kl(s_t2i, t_t2i, temperature)) / 2


def mlm_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     mlm_labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft KL over the vocabulary at the masked positions (labels != -100) of (B, T, V) logits;
    0 for a batch without masked tokens. Static shapes: every position is computed and the
    unmasked ones weighted 0 (no host sync)."""
    vocab = student_logits.size(-1)
    log_p_student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, -1)
    log_p_teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, -1)
    per_token = F.kl_div(log_p_student, log_p_teacher, log_target=True,
                         reduction="none").sum(-1)  # (B * T,)
    selected = (mlm_labels.reshape(-1) != -100).float()
    return (per_token * selected).sum() / selected.sum().clamp(min=1) * temperature**2


class DistilledModel(UnifiedModel):
    """A student UnifiedModel whose forward adds distillation terms from an attached teacher.

    Build it like a UnifiedModel (under deepspeed.zero.Init when training with ZeRO-3), then
    `attach_teacher` before `deepspeed.initialize`. Its parameters and checkpoints are the
    student's; `encode_*`, `fuse` and the heads are the student's own.
    """

    def __init__(self, config: ModelConfig, loss_weights: LossWeights | None = None,
                 distill: DistillWeights | None = None, itm_uniform_negatives: float = 0.0):
        super().__init__(config, loss_weights, itm_uniform_negatives)
        self.distill = distill or DistillWeights()
        self.teacher: UnifiedModel | None = None
        self.teacher_scale = 1.0

    def attach_teacher(self, teacher: UnifiedModel) -> None:
        """Freeze `teacher` (full weights, e.g. from `load_model`) and make it a submodule; it
        must see the same images and token ids as the student."""
        mine, theirs = self.config, teacher.config
        clashes = [f"{key} ({getattr(theirs, key)} vs the student's {getattr(mine, key)})"
                   for key in ("image_size", "vocab_size")
                   if getattr(theirs, key) != getattr(mine, key)]
        if theirs.max_text_len < mine.max_text_len:
            clashes.append(f"max_text_len ({theirs.max_text_len} < {mine.max_text_len})")
        if clashes:
            raise ValueError("the teacher does not fit the student: " + ", ".join(clashes))
        teacher.requires_grad_(False)
        with torch.no_grad():
            self.teacher_scale = float(teacher.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp())
        self.teacher = teacher.eval()

    def train(self, mode: bool = True) -> DistilledModel:
        """The teacher stays in eval mode (no dropout) whatever the student's mode."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def forward(self, images, text_ids, text_mask, mlm_ids=None, mlm_labels=None,
                vqa_targets=None) -> dict[str, torch.Tensor]:
        """The student's losses (UnifiedModel.forward) plus `distill_itc_loss` and
        `distill_mlm_loss`, weighted into `loss`."""
        if self.teacher is None:
            raise RuntimeError("no teacher: call attach_teacher(teacher) first")
        if self.distill.itc and not self.loss_weights.itc:
            raise ValueError("ITC distillation reads the student's ITC pass: its ITC weight is 0")
        if self.distill.mlm and not self.loss_weights.mlm:
            raise ValueError("MLM distillation reads the student's MLM pass: its MLM weight is 0")
        teacher = self._teacher_outputs(images, text_ids, text_mask, mlm_ids)
        with _recorded_outputs(self.image_proj, self.text_proj, self.mlm_head) as seen:
            out = super().forward(images, text_ids, text_mask, mlm_ids, mlm_labels, vqa_targets)
        terms = {}
        if self.distill.itc:
            scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().squeeze(0)
            terms["itc"] = itc_distillation(
                F.normalize(_only(seen, self.image_proj, "image_proj"), dim=-1),
                F.normalize(_only(seen, self.text_proj, "text_proj"), dim=-1), scale,
                teacher["image"], teacher["text"], self.teacher_scale, self.distill.temperature)
        if self.distill.mlm:
            terms["mlm"] = mlm_distillation(_only(seen, self.mlm_head, "mlm_head"),
                                            teacher["mlm"], mlm_labels, self.distill.temperature)
        for name, loss in terms.items():
            out["loss"] = out["loss"] + getattr(self.distill, name) * loss
            out[f"distill_{name}_loss"] = loss
        return out

    @torch.no_grad()
    def _teacher_outputs(self, images, text_ids, text_mask, mlm_ids) -> dict[str, torch.Tensor]:
        """The teacher's ITC embeddings and, for MLM distillation, its masked-caption logits."""
        teacher = self.teacher
        image_states = teacher.image_states(images)
        out = {"image": teacher.image_embedding(image_states),
               "text": teacher.encode_text(text_ids, text_mask)}
        if self.distill.mlm:
            masked = teacher.text_states(mlm_ids, text_mask)
            fused = teacher.fuse(teacher.image_memory(image_states), masked, text_mask,
                                 queries=slice(1, None))
            out["mlm"] = teacher.mlm_head(fused)  # (B, T, vocab)
        return out


@contextlib.contextmanager
def _recorded_outputs(*modules: nn.Module):
    """{module: [outputs of each call]} for the calls made inside the block."""
    seen: dict[nn.Module, list[torch.Tensor]] = {module: [] for module in modules}
    handles = [module.register_forward_hook(lambda m, args, output: seen[m].append(output))
               for module in modules]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def _only(seen: dict, module: nn.Module, name: str) -> torch.Tensor:
    if len(seen[module]) != 1:
        raise RuntimeError(f"distillation expects one call of the student's {name} per forward, "
                           f"saw {len(seen[module])}")
    return seen[module][0]
