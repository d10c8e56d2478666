"""Knowledge distillation: the KD terms on inputs with known answers, the wrapper's forward, and
a student trained with a frozen teacher through the real deepspeed launcher under ZeRO-3."""
import json
import math

import pytest
import torch
from deploy_helpers import data_overrides, write_tiny_export
from test_eval_support import TINY
from train_helpers import metrics_by_step

from vlp.models.config import load_config
from vlp.models.distill import DistilledModel, DistillWeights, mlm_distillation, soft_kl
from vlp.models.model import UnifiedModel
from vlp.pipeline.cli import main as vlp
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import load_model
from vlp.pipeline.distributed import free_port
from vlp.pipeline.train.config import load_train_config


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_soft_kl_is_the_tempered_kl_divergence(temperature):
    student, teacher = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    p = torch.softmax(teacher / temperature, dim=-1)[0]  # [0.75, 0.25] at T = 1
    expected = temperature**2 * float((p * torch.log(p / 0.5)).sum())
    assert soft_kl(student, teacher, temperature).item() == pytest.approx(expected, rel=1e-6)
    assert soft_kl(teacher, teacher, temperature).item() == pytest.approx(0, abs=1e-7)


def test_mlm_distillation_counts_only_masked_positions():
    teacher = torch.tensor([[[math.log(3.0), 0.0], [5.0, -5.0]]])  # (B=1, T=2, V=2)
    student = torch.zeros(1, 2, 2)
    labels = torch.tensor([[1, -100]])  # position 1 differs far more but is not masked
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert mlm_distillation(student, teacher, labels, 1.0).item() == pytest.approx(expected, 1e-6)
    assert mlm_distillation(student, teacher, torch.full((1, 2), -100), 1.0).item() == 0


def _batch(config, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (B, 3, config.image_size, config.image_size),
                           dtype=torch.uint8, generator=g)
    ids = torch.randint(5, config.vocab_size, (B, config.max_text_len), generator=g)
    mask = torch.ones_like(ids, dtype=torch.bool)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    mlm_ids = ids.clone()
    mlm_ids[:, 3] = 4
    return images, ids, mask, mlm_ids, labels


def test_a_teacher_equal_to_the_student_adds_nothing_and_gets_no_gradient():
    config = load_config("tiny", vocab_size=300, **TINY)
    torch.manual_seed(0)
    student = DistilledModel(config, distill=DistillWeights(itc=1.0, mlm=1.0))
    torch.manual_seed(0)
    student.attach_teacher(UnifiedModel(config))  # the same initial weights
    torch.manual_seed(0)
    plain = UnifiedModel(config)
    batch = _batch(config)
    torch.manual_seed(1)  # the same ITM negatives in both forwards
    out = student(*batch)
    torch.manual_seed(1)
    reference = plain(*batch)
    assert out["distill_itc_loss"].item() == pytest.approx(0, abs=1e-6)
    assert out["distill_mlm_loss"].item() == pytest.approx(0, abs=1e-6)
    assert out["loss"].item() == pytest.approx(reference["loss"].item(), abs=1e-5)
    out["loss"].backward()
    assert all(p.grad is None for p in student.teacher.parameters())
    assert student.image_proj.weight.grad is not None
    assert not student.train().teacher.training


def test_distill_keys_are_checked_before_any_work():
    with pytest.raises(UserError, match="model.itc_weight is 0"):
        load_train_config(None, ["distill.teacher=t", "model.itc_weight=0"])
    with pytest.raises(UserError, match="temperature must be > 0"):
        load_train_config(None, ["distill.temperature=0"])


def test_a_teacher_with_other_images_is_refused():
    student = DistilledModel(load_config("tiny", vocab_size=300, **TINY))
    teacher = UnifiedModel(load_config("tiny", vocab_size=300, **(TINY | {"image_size": 32})))
    with pytest.raises(ValueError, match="image_size"):
        student.attach_teacher(teacher)


@pytest.mark.slow
def test_distill_command_trains_a_half_width_student_under_zero3(tmp_path, world_dir, shard_dir):
    teacher = write_tiny_export(world_dir, tmp_path / "teacher")
    out = tmp_path / "student"
    overrides = data_overrides(shard_dir)
    student_model = dict(TINY, width=TINY["width"] // 2)
    code = vlp(["deploy", "distill", "--teacher", str(teacher), "--out", str(out),
                "--nproc", "2", "--master-port", str(free_port()), "--set", *overrides,
                f"model.overrides={json.dumps(student_model)}", "optim.max_steps=3",
                "distill.temperature=2"])
    assert code == 0
    records = metrics_by_step(tmp_path / "student.run")
    assert sorted(records) == [1, 2, 3]
    for record in records.values():  # every term in the total, weights 1
        parts = ("itc", "itm", "mlm", "distill_itc")
        assert record["loss/total"] == pytest.approx(sum(record[f"loss/{p}"] for p in parts),
                                                     rel=1e-5)
        assert record["loss/distill_itc"] > 0  # a different model: the KL is not zero
    student = load_model(out)  # a plain student export: the teacher is in no checkpoint
    assert student.model.config.width == TINY["width"] // 2
    assert not any(k.startswith("teacher.") for k in student.model.state_dict())

    # The same command with a longer budget resumes the run from its step-3 checkpoint.
    code = vlp(["deploy", "distill", "--teacher", str(teacher), "--out", str(out),
                "--nproc", "2", "--master-port", str(free_port()), "--set", *overrides,
                f"model.overrides={json.dumps(student_model)}", "optim.max_steps=4"])
    assert code == 0
    assert sorted(metrics_by_step(tmp_path / "student.run")) == [1, 2, 3, 4]
    assert load_model(out).info.step is None  # an export, now of step 4
    assert (tmp_path / "student.run/checkpoints/latest").read_text() == "global_step4"
