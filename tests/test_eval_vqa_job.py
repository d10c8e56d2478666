"""The VQA job's wiring on hand-written VQAv2 splits with the tiny untrained model: its predictions
equal a fine-tune and prediction made directly with the settings it was given, its metrics score
the predictions it writes, the majority baselines are worked out by hand, the late-fusion run is
reported beside, and the split files are found or named. The job on the synthetic world is in
tests/test_eval_jobs.py."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_eval_support import spy_loading_and_autocast, tiny_model_on

from vlp.pipeline.data.checkpoints import CheckpointError
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval import finetune
from vlp.pipeline.eval.configs import VQAConfig
from vlp.pipeline.eval.finetune import FinetuneConfig
from vlp.pipeline.eval.vqa import finetune as vqa_finetune
from vlp.pipeline.eval.vqa import job
from vlp.pipeline.eval.vqa.data import load_vqa_split
from vlp.pipeline.eval.vqa.finetune import AnswerVocab, finetune_vqa, predict_vqa
from vlp.pipeline.eval.vqa.job import evaluate_vqa
from vlp.pipeline.eval.vqa.metric import score_predictions

# (question id, image id, question, ten answers, answer type, question type)
TRAIN = [(1, 1, "is there a red square?", ["yes"] * 10, "yes/no", "is there a"),
         (2, 1, "how many shapes?", ["2"] * 7 + ["two"] * 3, "number", "how many"),
         (3, 2, "is there a circle?", ["no"] * 10, "yes/no", "is there a"),
         (4, 2, "what colour is the circle?", ["blue"] * 10, "other", "what color is the"),
         (5, 3, "is there a cross?", ["yes"] * 10, "yes/no", "is there a"),
         (6, 3, "how many shapes?", ["1"] * 10, "number", "how many")]
EVAL = [(11, 4, "is there a square?", ["no"] * 10, "yes/no", "is there a"),
        (12, 4, "how many shapes?", ["2"] * 10, "number", "how many"),
        (13, 5, "what colour is the cross?", ["blue"] * 4 + ["green"] * 6, "other",
         "what color is the"),
        (14, 5, "is there a cross?", ["yes"] * 10, "yes/no", None)]


def write_split(root: Path, split: str, rows) -> tuple[Path, Path]:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    for image_id in {row[1] for row in rows}:
        Image.new("RGB", (32, 32), (40 * image_id, 30, 200 - 30 * image_id)).save(
            root / "images" / split / f"{image_id:012d}.jpg")
    questions = {"data_subtype": split, "questions": [
        {"question_id": q, "image_id": i, "question": text} for q, i, text, *_ in rows]}
    annotations = {"annotations": [
        {"question_id": q, "image_id": i, "answers": [{"answer": a} for a in answers],
         "answer_type": kind, **({"question_type": qtype} if qtype else {})}
        for q, i, _, answers, kind, qtype in rows]}
    paths = (root / f"v2_OpenEnded_synth_{split}_questions.json",
             root / f"v2_synth_{split}_annotations.json")
    for path, doc in zip(paths, (questions, annotations)):
        path.write_text(json.dumps(doc))
    return paths


@pytest.fixture(scope="module")
def vqa_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vqa")
    write_split(root, "train", TRAIN)
    write_split(root, "val", EVAL)
    return root


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    texts = [row[2] for row in TRAIN + EVAL] * 20
    return tiny_model_on(texts, tmp_path_factory.mktemp("tok"), vocab_size=40)


def config(vqa_dir: Path | None, **settings) -> VQAConfig:
    return VQAConfig(**{"vqa_dir": vqa_dir, "min_answer_count": 1, "steps": 3, "batch_size": 4,
                        "lr": 1e-3, "seed": 5, **settings})


def test_predictions_are_a_fine_tune_with_the_settings_given_and_the_metrics_score_them(
        vqa_dir, loaded, tmp_path):
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    out = tmp_path / "vqa.json"
    result = evaluate_vqa(loaded, config(vqa_dir, finetune_backbone=True), out=out)
    predictions = {r["question_id"]: r["answer"]
                   for r in json.loads((tmp_path / "vqa.results.json").read_text())}
    train = load_vqa_split(*(vqa_dir / f for f in ("v2_OpenEnded_synth_train_questions.json",
                                                  "v2_synth_train_annotations.json")), vqa_dir)
    evaluation = load_vqa_split(*(vqa_dir / f for f in ("v2_OpenEnded_synth_val_questions.json",
                                                       "v2_synth_val_annotations.json")), vqa_dir)
    vocab = AnswerVocab.build(train, 1)
    model = copy.deepcopy(loaded.model)
    cfg = FinetuneConfig(steps=3, epochs=1.0, lr=1e-3, batch_size=4, finetune_backbone=True,
                         seed=5)
    stats = finetune_vqa(model, loaded.tokenizer, train, vocab, cfg)
    assert predictions == predict_vqa(model, loaded.tokenizer, evaluation, vocab, 8)
    assert {k: result["finetune"][k] for k in ("steps", "lr", "batch_size", "first_loss")} == {
        k: stats[k] for k in ("steps", "lr", "batch_size", "first_loss")}
    assert result["metrics"] == score_predictions(
        predictions, {q: a for q, _, _, a, _, _ in EVAL}, {q: t for q, *_, t, _ in EVAL},
        {q: qt for q, *_, qt in EVAL if qt})
    assert {k: result[k] for k in ("task", "model", "step", "num_train_questions",
                                   "num_eval_questions", "num_answers")} == {
        "task": "vqa", "model": "memory", "step": None, "num_train_questions": 6,
        "num_eval_questions": 4, "num_answers": len(vocab.answers)}
    assert result["dataset"] == {
        "train": [str(vqa_dir / "v2_OpenEnded_synth_train_questions.json"),
                  str(vqa_dir / "v2_synth_train_annotations.json")],
        "eval": [str(vqa_dir / "v2_OpenEnded_synth_val_questions.json"),
                 str(vqa_dir / "v2_synth_val_annotations.json")]}
    assert json.loads(out.read_text()) == result
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in before.items())
    assert not any(k.startswith("late_fusion/") for k in result["metrics"])


def test_the_majority_baselines_worked_out_by_hand(vqa_dir, loaded):
    result = evaluate_vqa(loaded, config(vqa_dir))
    # training answers: yes 20, no 10, 2 10 (two -> 2), blue 10, 1 10: "yes" overall;
    # per type: yes/no "yes", number "2" (first of the tie with "1"), other "blue"
    assert result["baseline_answers"] == {"majority": "yes", "type_prior": {
        "number": "2", "other": "blue", "yes/no": "yes"}}
    majority, prior = result["baselines"]["majority"], result["baselines"]["type_prior"]
    assert majority["overall"] == pytest.approx(25.0)  # only question 14
    assert majority["yes/no"] == pytest.approx(50.0) and majority["number"] == 0
    # type prior: 11 "yes" 0, 12 "2" 100, 13 "blue" min(1, 4/3) = 100, 14 "yes" 100
    assert prior["overall"] == pytest.approx(75.0) and prior["other"] == pytest.approx(100.0)
    assert prior["question_type/how many"] == pytest.approx(100.0)
    assert "question_type/is there a" in prior and len(
        [k for k in prior if k.startswith("question_type/")]) == 3


def test_late_fusion_is_reported_beside_the_fused_result(vqa_dir, loaded, monkeypatch):
    fusions = []
    real_finetune = job.finetune_vqa
    monkeypatch.setattr(job, "finetune_vqa",
                        lambda *args: fusions.append(args[-1]) or real_finetune(*args))
    result = evaluate_vqa(loaded, config(vqa_dir, late_fusion_baseline=True))
    assert fusions == ["fused", "late"]
    fused = {k: v for k, v in result["metrics"].items() if not k.startswith("late_fusion/")}
    late = {k[len("late_fusion/"):]: v for k, v in result["metrics"].items()
            if k.startswith("late_fusion/")}
    assert set(late) == set(fused) and "overall" in late


@pytest.mark.parametrize("bf16", [False, True])
def test_bf16_and_the_device_reach_the_fine_tune_and_the_predictions(vqa_dir, loaded, bf16,
                                                                     monkeypatch):
    loads, _ = spy_loading_and_autocast(monkeypatch, job, loaded)
    casts = {"train": [], "predict": []}
    for module, name in ((finetune, "train"), (vqa_finetune, "predict")):
        autocast = module.autocast
        monkeypatch.setattr(module, "autocast", lambda device, flag, name=name, autocast=autocast:
                            casts[name].append(flag) or autocast(device, flag))
    evaluate_vqa("a/checkpoint", config(vqa_dir, bf16=bf16), device="cpu")
    assert loads == [("a/checkpoint", "cpu")]
    assert casts == {"train": [bf16] * 3, "predict": [bf16]}


def test_explicit_files_win_over_the_folder_and_a_missing_pair_is_named(vqa_dir, loaded,
                                                                         tmp_path):
    other = tmp_path / "other"
    questions, annotations = write_split(other, "val", EVAL[:2])
    result = evaluate_vqa(loaded, config(vqa_dir, eval_questions=questions,
                                         eval_annotations=annotations))
    assert result["num_eval_questions"] == 2
    assert result["dataset"]["eval"] == [str(questions), str(annotations)]
    assert result["num_train_questions"] == 6
    train_q, train_a = (vqa_dir / "v2_OpenEnded_synth_train_questions.json",
                        vqa_dir / "v2_synth_train_annotations.json")
    alone = VQAConfig(train_questions=train_q, train_annotations=train_a, eval_questions=questions,
                      eval_annotations=annotations, min_answer_count=1, steps=1)
    assert evaluate_vqa(loaded, alone)["num_eval_questions"] == 2  # no folder needed
    for name, settings in (("train", {"eval_questions": questions, "eval_annotations": annotations,
                                      "train_questions": train_q}),
                           ("eval", {"train_questions": train_q, "train_annotations": train_a,
                                     "eval_annotations": annotations})):
        with pytest.raises(UserError) as refused:
            evaluate_vqa(loaded, VQAConfig(min_answer_count=1, steps=1, **settings))
        assert str(refused.value) == (f"give --vqa-dir, or both --{name}-questions and "
                                      f"--{name}-annotations")
    split_named = config(vqa_dir, eval_split="train")
    assert evaluate_vqa(loaded, split_named)["num_eval_questions"] == 6


def test_a_checkpoint_path_is_loaded_on_the_device_given_by_default_the_cpu(vqa_dir, loaded,
                                                                          monkeypatch):
    loads, _ = spy_loading_and_autocast(monkeypatch, job, loaded)
    evaluate_vqa("a/checkpoint", config(vqa_dir, steps=1))
    evaluate_vqa("b/checkpoint", config(vqa_dir, steps=1), device="cuda:1")
    assert loads == [("a/checkpoint", "cpu"), ("b/checkpoint", "cuda:1")]


def test_an_onnx_export_is_refused_naming_what_vqa_needs(vqa_dir, loaded):
    onnx = loaded._replace(info=dataclasses.replace(loaded.info, kind="onnx", path="x/onnx"))
    with pytest.raises(CheckpointError) as refused:
        evaluate_vqa(onnx, config(vqa_dir))
    assert str(refused.value) == (
        "x/onnx is an ONNX export of the image and text encoders only; VQA (a fine-tuned head "
        "on the fused encoder) needs the fusion layers and heads: use the export it was made "
        "from")


def test_without_steps_the_epochs_set_the_budget_and_the_backbone_its_learning_rate(vqa_dir,
                                                                                     loaded):
    """6 training questions in batches of 4 make 2 steps an epoch; without a learning rate the
    fine-tune takes 1e-4 with the backbone and 1e-3 for the head alone."""
    budgets = []
    for settings in ({"epochs": 2.0, "finetune_backbone": True}, {}):
        result = evaluate_vqa(loaded, config(vqa_dir, steps=None, lr=None, **settings))
        budgets.append((result["finetune"]["steps"], result["finetune"]["lr"]))
    assert budgets == [(4, 1e-4), (2, 1e-3)]


def test_images_are_found_with_the_pattern_given_under_each_questions_files_folder(loaded,
                                                                                  tmp_path):
    """Explicit files, annotations in another folder, images in a layout no default pattern
    matches: both splits find theirs under their questions file's folder with the pattern."""
    files = {}
    for split, rows in (("train", TRAIN), ("val", EVAL)):
        questions, annotations = write_split(tmp_path / split, split, rows)
        (tmp_path / split / "images").rename(tmp_path / split / "pictures")
        moved = tmp_path / "annotations" / annotations.name
        moved.parent.mkdir(exist_ok=True)
        files[split] = (questions, annotations.rename(moved))
    result = evaluate_vqa(loaded, config(
        None, train_questions=files["train"][0], train_annotations=files["train"][1],
        eval_questions=files["val"][0], eval_annotations=files["val"][1],
        image_pattern="pictures/{split}/{image_id:012d}.jpg"))
    assert (result["num_train_questions"], result["num_eval_questions"]) == (6, 4)


def test_the_majorities_count_every_answer_and_an_unseen_type_falls_back_to_the_overall_one(
        loaded, tmp_path):
    """The first training answer ("no") is not the most frequent ("yes", 20 of 30), and the
    eval split asks an "other" question, a type no training question has."""
    train = [(1, 1, "is there a square?", ["no"] * 10, "yes/no", None),
             (2, 2, "is there a circle?", ["yes"] * 10, "yes/no", None),
             (3, 3, "is there a cross?", ["yes"] * 10, "yes/no", None)]
    evaluation = [(11, 4, "is there a star?", ["yes"] * 10, "yes/no", None),
                  (12, 5, "what is it?", ["yes"] * 10, "other", None)]
    write_split(tmp_path, "train", train)
    write_split(tmp_path, "val", evaluation)
    result = evaluate_vqa(loaded, config(tmp_path, steps=1))
    assert result["baseline_answers"] == {"majority": "yes", "type_prior": {"yes/no": "yes"}}
    assert result["baselines"]["type_prior"]["overall"] == pytest.approx(100.0)
    assert result["baselines"]["type_prior"]["other"] == pytest.approx(100.0)


def test_the_predictions_go_where_asked_and_the_time_is_in_seconds(vqa_dir, loaded, tmp_path):
    out, predictions = tmp_path / "vqa.json", tmp_path / "elsewhere" / "answers.json"
    predictions.parent.mkdir()
    result = evaluate_vqa(loaded, config(vqa_dir, steps=1), out=out, results_out=predictions)
    assert result["results_file"] == str(predictions)
    assert sorted(r["question_id"] for r in json.loads(predictions.read_text())) == [11, 12, 13,
                                                                                     14]
    assert not (tmp_path / "vqa.results.json").exists()
    seconds = result["seconds"]
    assert isinstance(seconds, float) and 0 < seconds < 600 and seconds == round(seconds, 3)
