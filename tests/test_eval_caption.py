"""Captioning evaluation: the COCO metrics on oracle captions, the job end to end on the synthetic
world (with the tiny untrained model and a few fine-tune steps), and its bad-input errors."""
import contextlib
import copy
import io
import json
import shutil

import pytest
from test_eval_support import progress_lines, tiny_eval_model, train_world_tokenizer

from vlp.pipeline.cli import main as vlp
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.configs import CaptionConfig
from vlp.pipeline.eval.caption.job import evaluate_caption
from vlp.pipeline.eval.caption.metric import METRICS, CaptionScorer

FAST = {"steps": 2, "batch_size": 8, "max_length": 6}


def test_a_perfect_captioner_scores_the_maxima_and_an_empty_one_zero():
    references = {7: ["a big red circle in the centre"] * 5,
                  9: ["two shapes: a small blue square on the left and a green cross"] * 5,
                  12: ["a grey triangle at the top"] * 5}
    with CaptionScorer(references) as scorer:
        perfect = scorer.score({i: refs[0] for i, refs in references.items()})
        empty = scorer.score({i: "" for i in references})
        assert scorer.spice_status.startswith("unavailable: Stanford CoreNLP 3.6.0")
    assert list(perfect) == list(METRICS)  # no SPICE without its models
    for name in METRICS:
        expected = 10.0 if name == "CIDEr" else 1.0  # CIDEr-D: 10 x the mean n-gram cosine
        assert perfect[name] == pytest.approx(expected, abs=1e-6), name
    assert empty["CIDEr"] == 0 and empty["Bleu_4"] < 1e-6
    with pytest.raises(ValueError, match="same images"):
        CaptionScorer(references).score({7: "a circle"})


@pytest.fixture(scope="module")
def tiny(world_dir, tmp_path_factory):
    return tiny_eval_model(train_world_tokenizer(world_dir, tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def karpathy(world_dir):
    return {"karpathy_json": world_dir / "dataset_synth.json", "image_root": world_dir}


@pytest.fixture(scope="module")
def caption_run(tiny, karpathy, tmp_path_factory):
    """(result, its file, what the job printed on stderr)."""
    out, log = tmp_path_factory.mktemp("caption") / "caption.json", io.StringIO()
    with contextlib.redirect_stderr(log):
        result = evaluate_caption(tiny, CaptionConfig(**karpathy, **FAST), out=out)
    return result, out, log.getvalue()


@pytest.fixture(scope="module")
def caption_result(caption_run):
    return caption_run[:2]


def test_each_long_step_of_the_job_shows_its_progress(caption_run):
    log = caption_run[2]
    assert progress_lines(log, "caption fine-tune") == ["caption fine-tune: 1/2 (50%)",
                                                        "caption fine-tune: 2/2 (100%)"]
    assert "\ncaption fine-tune: 2/2 (100%) | loss " in log
    assert progress_lines(log, "caption decoding")[-1] == "caption decoding: 32/32 (100%)"
    assert progress_lines(log, "caption retrieval baseline")[-1] == (
        "caption retrieval baseline: 32/32 (100%)")


def test_caption_job_end_to_end(caption_result, tiny, world_dir, capfd):
    result, out = caption_result
    assert json.loads(out.read_text()) == result
    data = json.loads((world_dir / "dataset_synth.json").read_text())
    test = [image for image in data["images"] if image["split"] == "test"]
    train_captions = [s["raw"] for image in data["images"] if image["split"] == "train"
                      for s in image["sentences"]]
    assert (result["num_images"], result["num_references"]) == (32, 160)  # 5 references each
    assert result["skipped_images"] == 0 and result["num_train_pairs"] == 160
    assert list(result["metrics"]) == list(METRICS)
    assert list(result["baselines"]) == ["retrieval", "most_frequent"]
    assert result["finetune"]["steps"] == 2 and result["spice"].startswith("unavailable")
    # COCO's results format, one caption per test image, keyed by the JSON's image ids.
    results = json.loads((out.parent / "caption.results.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(image["imgid"] for image in test)
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str)
               for r in results)
    assert len(result["examples"]) == 8
    for example in result["examples"]:
        assert example["retrieval"] in train_captions and len(example["references"]) == 5
    assert result["most_frequent_caption"] in train_captions
    assert tiny.model.loss_weights.lm == 0  # the fine-tune used a copy


def test_baselines_are_scored_like_the_model(caption_result, world_dir):
    result = caption_result[0]
    data = json.loads((world_dir / "dataset_synth.json").read_text())
    references = {image["imgid"]: [s["raw"] for s in image["sentences"]]
                  for image in data["images"] if image["split"] == "test"}
    with CaptionScorer(references) as scorer:
        frequent = scorer.score({i: result["most_frequent_caption"] for i in references})
    assert frequent == pytest.approx(result["baselines"]["most_frequent"])


def test_a_checkpoint_without_a_trained_lm_head_needs_a_finetune(tiny, karpathy):
    with pytest.raises(UserError, match=r"without the captioning \(LM\) objective.*--steps N"):
        evaluate_caption(tiny, CaptionConfig(**karpathy, steps=0))
    trained = copy.deepcopy(tiny)
    trained.model.loss_weights.lm = 0.5  # as if pretrained with model.lm_weight=0.5
    config = CaptionConfig(**karpathy, steps=0, max_length=4, spice=False)
    result = evaluate_caption(trained, config)
    assert result["finetune"] is None and result["spice"] == "not requested"
    assert result["num_images"] == 32


def test_undecodable_test_images_are_skipped_and_counted(tiny, karpathy, world_dir, tmp_path):
    world = tmp_path / "world"
    shutil.copytree(world_dir / "retrieval", world / "retrieval")
    shutil.copytree(world_dir / "train", world / "train")
    shutil.copy(world_dir / "dataset_synth.json", world)
    (world / "retrieval/images/000003.jpg").write_bytes(b"not a jpeg")
    (world / "train/images/000001.jpg").write_bytes(b"\xff\xd8 truncated")
    result = evaluate_caption(
        tiny,
        CaptionConfig(
            karpathy_json=world / "dataset_synth.json", image_root=world, **FAST, spice=False
        ),
    )
    assert (result["num_images"], result["skipped_images"]) == (31, 1)
    assert 163 not in [e["image_id"] for e in result["examples"]]  # imgid 160 + 3 is skipped
    assert result["finetune"]["skipped_images"] >= 0


def test_caption_bad_input_names_the_problem(tiny, world_dir, tmp_path, capsys):
    data = json.loads((world_dir / "dataset_synth.json").read_text())
    for image in data["images"]:
        if image["split"] == "test":
            image["sentences"] = []
    (tmp_path / "no_refs.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"32 of the 32 images of split 'test' have no reference"):
        evaluate_caption(
            tiny,
            CaptionConfig(karpathy_json=tmp_path / "no_refs.json", image_root=world_dir, **FAST),
        )
    for image in data["images"]:
        image["split"] = "val" if image["split"] == "test" else "restval"
    (tmp_path / "no_test.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"split 'test' has no images; splits present: \['res"):
        evaluate_caption(
            tiny,
            CaptionConfig(karpathy_json=tmp_path / "no_test.json", image_root=world_dir, **FAST),
        )
    with pytest.raises(UserError, match="beam_size must be >= 1"):
        evaluate_caption(
            tiny,
            CaptionConfig(
                karpathy_json=world_dir / "dataset_synth.json", image_root=world_dir, beam_size=0
            ),
        )
    capsys.readouterr()
    for split, error in (("val", "split 'val' has no images"),  # the data is checked first
                         ("test", "checkpoint not found")):
        code = vlp(["eval", "caption", "--checkpoint", str(tmp_path / "missing"),
                    "--karpathy-json", str(world_dir / "dataset_synth.json"), "--image-root",
                    str(world_dir), "--split", split])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("vlp eval caption: error: ") and error in err

