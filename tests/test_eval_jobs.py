"""Retrieval and VQA evaluation end to end on the synthetic world with an untrained tiny model."""
import io
import json
import math
import shutil
import tarfile

import pytest
import torch
from test_eval_support import tiny_eval_model, train_world_tokenizer

from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.configs import RetrievalConfig, VQAConfig
from vlp.pipeline.eval.retrieval.data import load_karpathy
from vlp.pipeline.eval.retrieval.job import evaluate_retrieval
from vlp.pipeline.eval.vqa.job import evaluate_vqa
from vlp.pipeline.eval.vqa.metric import score_predictions

RECALL_KEYS = [f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)]


@pytest.fixture(scope="module")
def tiny(world_dir, tmp_path_factory):
    return tiny_eval_model(train_world_tokenizer(world_dir, tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def karpathy(world_dir):
    return {"karpathy_json": world_dir / "retrieval/dataset_synth.json",
            "image_root": world_dir / "retrieval"}


@pytest.fixture(scope="module")
def retrieval_result(tiny, karpathy, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval") / "result.json"
    return evaluate_retrieval(tiny, RetrievalConfig(**karpathy), out=out), out


def test_retrieval_result_has_clip_benchmark_keys_and_chance(retrieval_result):
    result, out = retrieval_result
    assert json.loads(out.read_text()) == result
    assert (result["num_images"], result["num_texts"]) == (32, 160)  # 5 captions per image
    assert list(result["metrics"]) == RECALL_KEYS + ["mean_recall"]
    assert all(0 <= v <= 1 for v in result["metrics"].values())
    chance = result["baselines"]["chance"]
    assert chance["image_retrieval_recall@1"] == pytest.approx(1 / 32)
    assert chance["text_retrieval_recall@1"] == pytest.approx(5 / 160)


def test_rerank_scores_each_top_k_pair_once_and_keeps_recall_beyond_k(
    tiny, karpathy, retrieval_result, monkeypatch
):
    pairs, memories = [], []
    itm_scores, image_memory = tiny.model.itm_scores, tiny.model.image_memory

    def counting_pairs(memory, states, mask):
        pairs.append(len(states))
        return itm_scores(memory, states, mask)

    def counting_memories(image_states):
        memories.append(len(image_states))
        return image_memory(image_states)

    monkeypatch.setattr(tiny.model, "itm_scores", counting_pairs)
    monkeypatch.setattr(tiny.model, "image_memory", counting_memories)
    metrics = evaluate_retrieval(tiny, RetrievalConfig(**karpathy, rerank_k=3))["metrics"]
    # the top 3 of 160 text queries and of 32 image queries: distinct pairs, each scored once
    assert (160 + 32) * 3 - 32 * 3 <= sum(pairs) <= (160 + 32) * 3
    assert sum(memories) <= 32  # each candidate image's fused-layer memory computed once
    plain = retrieval_result[0]["metrics"]
    for key in RECALL_KEYS:
        assert metrics[key] == pytest.approx(plain[key]), key  # the ITC recalls, unchanged
        if not key.endswith("@1"):  # reordering inside the top 3 cannot change recall@5/@10
            assert metrics[f"reranked_{key}"] == pytest.approx(plain[key]), key


def test_each_caption_points_at_its_own_image(karpathy):
    data = json.loads(karpathy["karpathy_json"].read_text())
    dataset = load_karpathy(karpathy["karpathy_json"], karpathy["image_root"])
    test_images = [image for image in data["images"] if image["split"] == "test"]
    for caption, image in zip(dataset.captions, dataset.text_to_image):
        assert caption in [s["raw"] for s in test_images[image]["sentences"]]
        assert dataset.images[image].path.endswith(test_images[image]["filename"])


def write_retrieval_shard(world_dir, shard) -> list[tarfile.TarInfo]:
    """The world's retrieval test set as one CLIP_benchmark-style shard; its members."""
    karpathy = json.loads((world_dir / "retrieval/dataset_synth.json").read_text())
    with tarfile.open(shard, "w") as tar:
        for i, image in enumerate(karpathy["images"]):
            image_path = world_dir / "retrieval" / image["filepath"] / image["filename"]
            tar.add(image_path, f"{i:06d}.jpg")
            text = "\n".join(s["raw"] for s in image["sentences"]).encode()
            info = tarfile.TarInfo(f"{i:06d}.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def test_retrieval_shards_give_the_same_result_as_the_json(
    tiny, world_dir, tmp_path, retrieval_result
):
    write_retrieval_shard(world_dir, tmp_path / "retrieval-000000.tar")
    result = evaluate_retrieval(
        tiny, RetrievalConfig(shards=str(tmp_path / "retrieval-{000000..000000}.tar"))
    )
    assert result["metrics"] == pytest.approx(retrieval_result[0]["metrics"])


def test_a_retrieval_shard_cut_at_a_member_boundary_is_refused(tiny, world_dir, tmp_path):
    """tarfile reads a tar cut between two samples as a complete, smaller one: 2 of 4 images
    were once evaluated without an error."""
    shard = tmp_path / "retrieval.tar"
    members = write_retrieval_shard(world_dir, shard)
    shard.write_bytes(shard.read_bytes()[:members[4].offset])  # samples 0 and 1, whole
    with tarfile.open(shard) as tar:
        assert len(tar.getmembers()) == 4  # what tarfile makes of it
    with pytest.raises(UserError, match=r"evaluation shard .*retrieval.tar is unreadable "
                                        r"\(corrupt_tar\): truncated: ends at byte \d+ without "
                                        r"the end-of-archive marker"):
        evaluate_retrieval(tiny, RetrievalConfig(shards=str(shard)))


def test_retrieval_bad_input_names_the_problem(tiny, world_dir, tmp_path):
    root = tmp_path / "retrieval"
    shutil.copytree(world_dir / "retrieval", root)
    data = json.loads((root / "dataset_synth.json").read_text())
    (root / "images" / data["images"][3]["filename"]).unlink()
    out = tmp_path / "result.json"
    with pytest.raises(UserError, match=data["images"][3]["filename"]):
        evaluate_retrieval(
            tiny,
            RetrievalConfig(karpathy_json=root / "dataset_synth.json", image_root=root),
            out=out,
        )
    with pytest.raises(UserError, match=r"split 'val' has no images; splits present: \['tes"):
        evaluate_retrieval(
            tiny,
            RetrievalConfig(
                karpathy_json=root / "dataset_synth.json", image_root=root, split="val"
            ),
            out=out,
        )
    del data["images"][0]["sentences"][1]["raw"]
    (root / "bad.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"images\[0\]\.sentences\[1\]: missing field 'raw'"):
        evaluate_retrieval(
            tiny, RetrievalConfig(karpathy_json=root / "bad.json", image_root=root), out=out
        )
    (root / "broken.json").write_text('{"images": [')
    with pytest.raises(UserError, match="broken.json is not valid JSON"):
        evaluate_retrieval(
            tiny, RetrievalConfig(karpathy_json=root / "broken.json", image_root=root), out=out
        )
    assert not out.exists() and not list(tmp_path.glob(".result.json*"))


@pytest.fixture(scope="module")
def vqa_result(tiny, world_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vqa") / "vqa.json"
    result = evaluate_vqa(
        tiny,
        VQAConfig(vqa_dir=world_dir / "vqa", min_answer_count=3, steps=20, batch_size=16),
        out=out,
    )
    return result, out


def test_vqa_end_to_end(vqa_result, tiny, world_dir):
    result, out = vqa_result
    assert json.loads(out.read_text()) == result
    question_types = ("is there a", "how many", "what color is the", "what shape is",
                      "where is the")
    assert list(result["metrics"]) == ["overall", "yes/no", "number", "other"] + [
        f"question_type/{kind}" for kind in sorted(question_types)]
    assert all(0 <= v <= 100 for v in result["metrics"].values())
    assert result["finetune"]["steps"] == 20
    # The head starts at the answer prior, far below a zero-bias head's num_answers * ln 2.
    assert result["finetune"]["first_loss"] < 0.25 * result["num_answers"] * math.log(2)
    predictions = json.loads((out.parent / "vqa.results.json").read_text())
    questions = json.loads((world_dir / "vqa/v2_OpenEnded_synth_val_questions.json").read_text())
    assert sorted(p["question_id"] for p in predictions) == sorted(
        q["question_id"] for q in questions["questions"])
    assert tiny.model.vqa_head is None  # fine-tuning used a copy


def test_vqa_majority_baselines_are_scored_like_predictions(vqa_result, world_dir):
    result = vqa_result[0]
    annotations = json.loads((world_dir / "vqa/v2_synth_val_annotations.json").read_text())
    answers = {a["question_id"]: [x["answer"] for x in a["answers"]]
               for a in annotations["annotations"]}
    types = {a["question_id"]: a["answer_type"] for a in annotations["annotations"]}
    question_types = {a["question_id"]: a["question_type"] for a in annotations["annotations"]}
    majority = result["baseline_answers"]["majority"]
    assert majority in ("yes", "no")  # a third of the synthetic questions are yes/no
    assert result["baselines"]["majority"] == pytest.approx(
        score_predictions({q: majority for q in answers}, answers, types, question_types))
    # "how many" never has a yes/no answer; "is there a" always does
    assert result["baselines"]["majority"]["question_type/how many"] == 0
    assert result["baselines"]["majority"]["question_type/is there a"] > 0
    per_type = result["baseline_answers"]["type_prior"]
    assert per_type["yes/no"] in ("yes", "no") and per_type["number"].isdigit()
    assert result["baselines"]["type_prior"]["yes/no"] == result["baselines"]["majority"]["yes/no"]


def test_vqa_bad_input_names_the_problem(tiny, world_dir, tmp_path):
    vqa = tmp_path / "vqa"
    shutil.copytree(world_dir / "vqa", vqa)
    annotations_path = vqa / "v2_synth_val_annotations.json"
    annotations = json.loads(annotations_path.read_text())
    dropped = annotations["annotations"].pop(0)["question_id"]
    annotations_path.write_text(json.dumps(annotations))
    with pytest.raises(UserError, match=rf"1 question\(s\) .* have no annotation .*{dropped}"):
        evaluate_vqa(tiny, VQAConfig(vqa_dir=vqa, steps=1))
    with pytest.raises(UserError, match=r"expected one \*_test_questions.json"):
        evaluate_vqa(tiny, VQAConfig(vqa_dir=vqa, eval_split="test", steps=1))
    questions_path = vqa / "v2_OpenEnded_synth_train_questions.json"
    questions = json.loads(questions_path.read_text())
    (vqa / "empty_questions.json").write_text(json.dumps({**questions, "questions": []}))
    with pytest.raises(UserError, match="no questions"):
        evaluate_vqa(
            tiny, VQAConfig(vqa_dir=vqa, train_questions=vqa / "empty_questions.json", steps=1)
        )
    shutil.rmtree(vqa / "images" / "train")
    with pytest.raises(UserError, match="no image for question 0"):
        evaluate_vqa(tiny, VQAConfig(vqa_dir=vqa, steps=1))


def test_vqa_question_types_are_read_when_present_and_checked(world_dir, tmp_path):
    from vlp.pipeline.eval.vqa.data import find_split_files, load_vqa_split

    questions, annotations_path = find_split_files(world_dir / "vqa", "val")
    examples = load_vqa_split(questions, annotations_path, world_dir / "vqa")
    annotations = json.loads(annotations_path.read_text())
    expected = {a["question_id"]: a["question_type"] for a in annotations["annotations"]}
    assert {e.question_id: e.question_type for e in examples} == expected
    first, second = annotations["annotations"][:2]
    del first["question_type"]  # optional: that question has no per-type score
    second["question_type"] = 3
    edited = tmp_path / "annotations.json"
    edited.write_text(json.dumps(annotations))
    with pytest.raises(UserError, match=r"annotations\[1\]: field 'question_type' should be str"):
        load_vqa_split(questions, edited, world_dir / "vqa")
    second["question_type"] = "how many"
    edited.write_text(json.dumps(annotations))
    types = {e.question_id: e.question_type
             for e in load_vqa_split(questions, edited, world_dir / "vqa")}
    assert types[first["question_id"]] is None and types[second["question_id"]] == "how many"


def test_vqa_uses_the_soft_score_targets(tiny, world_dir):
    from vlp.pipeline.eval.vqa.data import find_split_files, load_vqa_split
    from vlp.pipeline.eval.vqa.finetune import AnswerVocab

    files = find_split_files(world_dir / "vqa", "train")
    train = load_vqa_split(*files, world_dir / "vqa")
    vocab = AnswerVocab.build(train, min_count=3)
    assert "two" not in vocab.answers and "2" in vocab.answers  # normalised like predictions
    example = next(e for e in train if len(set(e.answers)) > 1)
    targets = vocab.dense_targets([vocab.targets(example)])
    assert targets.shape == (1, len(vocab.answers)) and 0 < targets.max() <= 1
    assert torch.count_nonzero(targets) == len(vocab.targets(example))


@pytest.mark.parametrize("backbone", [False, True])
def test_finetune_trains_the_head_and_the_backbone_only_when_asked(tiny, world_dir, backbone):
    import copy

    from vlp.pipeline.eval.vqa.data import find_split_files, load_vqa_split
    from vlp.pipeline.eval.vqa.finetune import AnswerVocab, FinetuneConfig, finetune_vqa

    train = load_vqa_split(*find_split_files(world_dir / "vqa", "train"), world_dir / "vqa")
    vocab = AnswerVocab.build(train, min_count=3)
    model = copy.deepcopy(tiny.model)
    stats = finetune_vqa(model, tiny.tokenizer, train, vocab,
                         FinetuneConfig(steps=2, batch_size=4, finetune_backbone=backbone))
    assert stats["steps"] == 2 and stats["lr"] == (1e-4 if backbone else 1e-3)
    assert model.num_answers == len(vocab.answers) and not model.training
    moved = not torch.equal(model.image_embed.patch.weight, tiny.model.image_embed.patch.weight)
    assert moved == backbone


def test_answer_prior_is_the_mean_soft_score():
    from vlp.pipeline.eval.vqa.finetune import AnswerVocab

    vocab = AnswerVocab(("yes", "no", "2"))
    sparse = [{0: 1.0}, {1: 0.6, 2: 0.3}, {}]
    torch.testing.assert_close(vocab.prior(sparse), vocab.dense_targets(sparse).mean(dim=0))
