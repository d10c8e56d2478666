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
from vlp.models.model import LossWeights, UnifiedModel
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


def test_mlm_distillation_is_the_tempered_kl_averaged_over_the_masked_positions():
    """Temperature 2 over two masked positions of three: T^2 x the mean of each position's
    KL(softmax(teacher / T) || softmax(student / T)), written out with probabilities."""
    teacher = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [9.0, -9.0, 0.0]]])  # (1, 3, 3)
    student = torch.tensor([[[0.0, 1.0, 0.0], [1.0, 0.0, 2.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[4, 7, -100]])

    def kl(t_row, s_row):
        p, q = torch.softmax(t_row / 2.0, -1), torch.softmax(s_row / 2.0, -1)
        return float((p * (p / q).log()).sum())

    expected = 4.0 * (kl(teacher[0, 0], student[0, 0]) + kl(teacher[0, 1], student[0, 1])) / 2
    got = mlm_distillation(student, teacher, labels, 2.0).item()
    assert got == pytest.approx(expected, rel=1e-6)


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
    assert student.train().training and not student.teacher.training


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


def test_every_way_a_teacher_does_not_fit_is_named_and_a_longer_text_fits():
    student = DistilledModel(load_config("tiny", vocab_size=300, **TINY))
    short = student.config.max_text_len - 1
    teacher = UnifiedModel(load_config("tiny", vocab_size=200, **(
        TINY | {"image_size": 32, "max_text_len": short})))
    with pytest.raises(ValueError) as refused:
        student.attach_teacher(teacher)
    assert str(refused.value) == (
        "the teacher does not fit the student: image_size (32 vs the student's "
        f"{student.config.image_size}), vocab_size (200 vs the student's 300), max_text_len "
        f"({short} < {student.config.max_text_len})")
    longer = load_config("tiny", vocab_size=300, **(TINY | {"max_text_len": short + 5}))
    student.attach_teacher(UnifiedModel(longer))
    assert student.teacher.config.max_text_len == short + 5


@pytest.mark.parametrize("log_scale, expected", [(math.log(20.0), 20.0), (math.log(500.0), 100.0)])
def test_attaching_freezes_the_teacher_and_reads_its_clamped_scale_once(log_scale, expected):
    config = load_config("tiny", vocab_size=300, **TINY)
    student, teacher = DistilledModel(config), UnifiedModel(config)
    with torch.no_grad():
        teacher.logit_scale.fill_(log_scale)
    student.attach_teacher(teacher)
    assert student.teacher_scale == pytest.approx(expected, rel=1e-6)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        teacher.logit_scale.fill_(0.0)
    assert student.teacher_scale == pytest.approx(expected, rel=1e-6)  # read once


def test_forward_refuses_without_a_teacher_or_without_the_pass_a_term_reads():
    config = load_config("tiny", vocab_size=300, **TINY)
    batch = _batch(config)
    with pytest.raises(RuntimeError) as refused:
        DistilledModel(config)(*batch)
    assert str(refused.value) == "no teacher: call attach_teacher(teacher) first"
    for weights, distill, message in (
            (LossWeights(itc=0.0), DistillWeights(itc=1.0),
             "ITC distillation reads the student's ITC pass: its ITC weight is 0"),
            (LossWeights(mlm=0.0), DistillWeights(itc=0.0, mlm=1.0),
             "MLM distillation reads the student's MLM pass: its MLM weight is 0")):
        student = DistilledModel(config, weights, distill)
        student.attach_teacher(UnifiedModel(config))
        with pytest.raises(ValueError) as refused:
            student(*batch)
        assert str(refused.value) == message


def _outputs_of(model, modules, *batch):
    """The plain UnifiedModel forward of `model` on `batch`, and what each of `modules` returned
    in it."""
    seen = {m: [] for m in modules}
    handles = [m.register_forward_hook(lambda m, args, out: seen[m].append(out)) for m in modules]
    try:
        out = UnifiedModel.forward(model, *batch)
    finally:
        for handle in handles:
            handle.remove()
    return out, seen


def test_each_term_is_the_kd_of_the_two_models_own_passes_added_with_its_weight():
    """A teacher with other weights, temperature 2: the ITC term is the soft KL between the two
    models' scaled cosine logits both ways, the MLM term the one between their MLM logits on the
    masked caption, each as the plain forward of either model computes them."""
    config = load_config("tiny", vocab_size=300, **TINY)
    torch.manual_seed(0)
    student = DistilledModel(config, distill=DistillWeights(itc=0.3, mlm=0.7, temperature=2.0))
    torch.manual_seed(1)
    teacher = UnifiedModel(config)
    with torch.no_grad():
        teacher.logit_scale.fill_(math.log(30.0))
    student.attach_teacher(teacher)
    student.eval()
    batch = _batch(config)
    torch.manual_seed(2)
    out = student(*batch)
    torch.manual_seed(2)
    plain, mine = _outputs_of(student, (student.image_proj, student.text_proj, student.mlm_head),
                              *batch)
    with torch.no_grad():
        _, theirs = _outputs_of(teacher, (teacher.mlm_head,), *batch)
        images, ids, mask = batch[:3]
        t_image, t_text = teacher.encode_image(images), teacher.encode_text(ids, mask)
    s_image, s_text = (torch.nn.functional.normalize(mine[m][0].float(), dim=-1)
                       for m in (student.image_proj, student.text_proj))
    scale = student.logit_scale.exp()
    itc = (soft_kl(scale * s_image @ s_text.T, 30.0 * t_image @ t_text.T, 2.0)
           + soft_kl(scale * s_text @ s_image.T, 30.0 * t_text @ t_image.T, 2.0)) / 2
    mlm = mlm_distillation(mine[student.mlm_head][0], theirs[teacher.mlm_head][0], batch[4], 2.0)
    assert out["distill_itc_loss"].item() == pytest.approx(itc.item(), rel=1e-5)
    assert out["distill_mlm_loss"].item() == pytest.approx(mlm.item(), rel=1e-5)
    assert itc.item() > 1e-4 and mlm.item() > 1e-4
    assert out["loss"].item() == pytest.approx(
        plain["loss"].item() + 0.3 * itc.item() + 0.7 * mlm.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["image_proj", "text_proj", "mlm_head"])
def test_a_student_module_called_twice_in_one_forward_is_an_error(name, monkeypatch):
    config = load_config("tiny", vocab_size=300, **TINY)
    student = DistilledModel(config, distill=DistillWeights(itc=1.0, mlm=1.0))
    student.attach_teacher(UnifiedModel(config))
    plain = UnifiedModel.forward

    def forward_calling_it_twice(self, *batch):
        getattr(self, name)(torch.zeros(1, config.width))
        return plain(self, *batch)

    monkeypatch.setattr(UnifiedModel, "forward", forward_calling_it_twice)
    with pytest.raises(RuntimeError) as refused:
        student(*_batch(config))
    assert str(refused.value) == (f"distillation expects one call of the student's {name} per "
                                  "forward, saw 2")


def test_the_student_keeps_its_share_of_uniform_itm_negatives():
    student = DistilledModel(load_config("tiny", vocab_size=300, **TINY),
                             itm_uniform_negatives=0.25)
    assert student.itm_uniform_negatives == 0.25


def test_vqa_targets_reach_the_students_own_losses():
    config = load_config("tiny", vocab_size=300, **TINY)
    torch.manual_seed(0)
    student = DistilledModel(config)
    student.attach_teacher(UnifiedModel(config))
    student.attach_vqa_head(3)
    student.eval()
    batch, targets = _batch(config), torch.tensor([[1.0, 0.0, 0.0]] * 4)
    torch.manual_seed(1)
    out = student(*batch, vqa_targets=targets)
    torch.manual_seed(1)
    plain = UnifiedModel.forward(student, *batch, vqa_targets=targets)
    assert out["vqa_loss"].item() == pytest.approx(plain["vqa_loss"].item(), rel=1e-6)
