"""Nightly evaluation over a runs folder: new checkpoints only, failures recorded, outputs written
(the report read as a reader sees it, captioning's generated captions in it too, the TensorBoard
events read back as TensorBoard reads them); the `vlp eval` command line; the cron script's
lock."""
import contextlib
import fcntl
import io
import json
import re
from html import escape as html_escape
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
from test_eval_support import (
    progress_lines,
    tiny_eval_model,
    train_world_tokenizer,
)
from faults.fault_helpers import bomb_png, jpeg
from nightly_helpers import Page

from vlp.pipeline.cli import main as vlp
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.eval.configs import RetrievalConfig, VQAConfig
from vlp.pipeline.eval.nightly.report import render_report
from vlp.pipeline.eval.nightly.runner import read_results, run_nightly
from vlp.pipeline.eval.nightly.suite import load_suite
from vlp.pipeline.train.metrics import MetricsLogger

SCRIPT = "launch_scripts/nightly_eval.sh"
R1 = "image_retrieval_recall@1"
RETRIEVAL_METRICS = 7
VQA_METRICS = 1 + 3 + 5  # overall, per answer type, per question type of the world
CLASSIFICATION = {"synth_shape_zeroshot": 3, "synth_colour_probe": 3}  # acc1, acc5, recall
CLASSIFICATION_METRICS = sum(CLASSIFICATION.values())


@pytest.fixture(scope="module")
def suite(world_dir):
    return {
        "synth_retrieval": {"task": "retrieval",
                            "karpathy_json": str(world_dir / "retrieval/dataset_synth.json"),
                            "image_root": str(world_dir / "retrieval")},
        "synth_vqa": {"task": "vqa", "vqa_dir": str(world_dir / "vqa"), "steps": 2,
                      "batch_size": 8, "min_answer_count": 3},
        "synth_shape_zeroshot": {"task": "zeroshot",
                                 "dataset": str(world_dir / "classification/shape/wds")},
        "synth_colour_probe": {"task": "linear_probe", "epochs": 2,
                               "dataset": str(world_dir / "classification/colour/imagefolder")},
    }


@pytest.fixture(scope="module")
def runs(eval_tokenizer, zero3_run, tmp_path_factory):
    """runs/tiny: ZeRO-3 tags at steps 1 and 2, a corrupt tag 3, an export directory, and its
    training curves (TensorBoard and metrics.jsonl, written as training writes them)."""
    from vlp.models.export import save_pretrained

    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(eval_tokenizer.parent, root / "tokenizer")
    tokenizer = root / "tokenizer" / eval_tokenizer.name
    shutil.copytree(zero3_run, root / "tiny")
    curves = MetricsLogger(root / "tiny", enabled=True)
    for step, loss in ((1, 9.5), (2, 9.0)):
        curves.log(step, {"loss/total": loss, "train/lr": 1e-3})
    curves.close()
    corrupt = clone_tag(root / "tiny/checkpoints", 2, 3)
    shard = next(corrupt.glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:64])
    export = tiny_eval_model(tokenizer).model
    save_pretrained(export, root / "tiny/export", tokenizer_path=tokenizer)
    return root


def clone_tag(checkpoints, step, new_step):
    """A copy of a published tag under another step (DeepSpeed's files do not name their tag)."""
    tag = checkpoints / f"global_step{new_step}"
    shutil.copytree(checkpoints / f"global_step{step}", tag)
    state = json.loads((tag / "vlp_state.json").read_text())
    (tag / "vlp_state.json").write_text(json.dumps({**state, "step": new_step, "tag": tag.name}))
    return tag


@pytest.fixture(scope="module")
def first_night_run(runs, suite, tmp_path_factory):
    """(summary, out folder, what the night printed on stderr)."""
    out, log = tmp_path_factory.mktemp("nightly"), io.StringIO()
    with contextlib.redirect_stderr(log):
        summary = run_nightly(runs, suite=suite, out_dir=out)
    return summary, out, log.getvalue()


@pytest.fixture(scope="module")
def first_night(first_night_run):
    return first_night_run[:2]


def test_first_night_evaluates_everything_and_records_the_corrupt_tag(first_night):
    summary, out = first_night
    assert summary["checkpoints_evaluated"] == 4
    results = pd.read_parquet(out / "results.parquet")
    ok = results[results["status"] == "ok"]
    assert sorted(ok["tag"].unique()) == ["export", "global_step1", "global_step2"]
    for tag, rows in ok.groupby("tag"):
        assert (rows["benchmark"] == "synth_retrieval").sum() == RETRIEVAL_METRICS
        assert (rows["benchmark"] == "synth_vqa").sum() == VQA_METRICS
        for benchmark, metrics in CLASSIFICATION.items():
            assert (rows["benchmark"] == benchmark).sum() == metrics
    assert ok[ok["tag"] == "global_step2"]["step"].unique().tolist() == [2]
    assert ok[ok["tag"] == "export"]["step"].isna().all()
    chance = ok[(ok["metric"] == "image_retrieval_recall@1")]["baseline"]
    assert chance.tolist() == pytest.approx([1 / 32] * 3)
    assert set(ok[ok["task"] == "vqa"]["baseline_name"]) == {"majority"}
    assert ok["baseline"].notna().all()  # yes/no too (it was looked up as "no")
    chance = ok[ok["benchmark"] == "synth_colour_probe"].set_index(["tag", "metric"])["baseline"]
    assert chance[("export", "acc1")] == pytest.approx(1 / 7)  # 7 colours
    assert chance[("export", "acc5")] == pytest.approx(5 / 7)
    failed = results[results["status"] == "failed"]
    assert sorted(failed["benchmark"]) == sorted(["synth_retrieval", "synth_vqa", *CLASSIFICATION])
    assert (failed["tag"] == "global_step3").all()
    assert failed["error"].str.contains("truncated").all()
    assert [f["tag"] for f in summary["failures"]] == ["global_step3"] * 4


def test_the_night_reports_each_checkpoint_and_benchmark_as_it_goes(first_night_run):
    log = re.sub(r"\d+(\.\d+)?(m\d+)?s\b", "T", first_night_run[2])  # durations vary
    lines = [line for line in log.splitlines() if line.startswith("nightly: ")]
    step1 = "nightly: checkpoint 1/4 tiny/global_step1"
    assert lines[:4] == [f"{step1}: loading, 4 benchmark(s) to run",
                         f"{step1}: synth_retrieval (1/4) started",
                         f"{step1}: synth_retrieval (1/4) finished in T",
                         f"{step1}: synth_vqa (2/4) started"]
    assert re.fullmatch(r"nightly: 1/4 \(25%\) \| .+/.+ \| elapsed T \| ETA T", lines[9])
    assert "nightly: checkpoint 3/4 tiny/global_step3: does not load:" in lines
    assert lines[-1].startswith("nightly: 4/4 (100%) | ") and lines[-1].endswith("| ETA T")
    # between them, the benchmarks' own progress lines
    assert "vqa fine-tune: 2/2 (100%)" in log and "linear probe fits: 16/16 (100%)" in log


def test_per_checkpoint_json_results_follow_the_design_layout(first_night, runs):
    result = json.loads((runs / "tiny/eval/global_step2/synth_retrieval.json").read_text())
    assert result["step"] == 2 and "image_retrieval_recall@1" in result["metrics"]
    assert (runs / "tiny/eval/export/synth_vqa.results.json").exists()


def ok_value(results: pd.DataFrame, benchmark: str, metric: str, tag: str) -> float:
    rows = results[(results["benchmark"] == benchmark) & (results["metric"] == metric)
                   & (results["tag"] == tag) & (results["status"] == "ok")]
    return rows["value"].item()


def test_report_leads_with_the_headline_in_percent_and_stands_alone(first_night, runs):
    """The report opened on every metric in alphabetical order, in mixed units, with a yes/no
    baseline of "nan" and plots as files beside it. Now: one headline metric per benchmark
    first, in percent, then every metric; the plots inline."""
    out = first_night[1]
    results = pd.read_parquet(out / "results.parquet")
    page = Page((out / "report.html").read_text())
    (section, headline), (_, table), (_, failures) = page.tables
    assert section == "headline" and [row[:3] for row in headline] == [
        ["run", "benchmark", "metric"], ["tiny", "synth_retrieval", "text→image R@1"],
        ["tiny", "synth_vqa", "accuracy"], ["tiny", "synth_shape_zeroshot", "top-1 accuracy"],
        ["tiny", "synth_colour_probe", "top-1 accuracy"]]
    r1 = [ok_value(results, "synth_retrieval", R1, tag)
          for tag in ("global_step1", "global_step2", "export")]  # the export ranks last
    assert headline[1][3:5] == [f"{100 * r1[-1]:.1f} (export)", f"{100 / 32:.1f} (chance)"]
    assert headline[1][7] == " → ".join(f"{100 * v:.1f}" for v in r1)
    vqa = ok_value(results, "synth_vqa", "overall", "export")
    assert headline[2][3] == f"{vqa:.1f} (export)"  # the VQA evaluator's percent, as it is
    acc1 = ok_value(results, "synth_colour_probe", "acc1", "export")
    assert headline[4][3:5] == [f"{100 * acc1:.1f} (export)", f"{100 / 7:.1f} (chance)"]

    assert len(table) == 1 + RETRIEVAL_METRICS + VQA_METRICS + CLASSIFICATION_METRICS
    majority = json.loads((runs / "tiny/eval/export/synth_vqa.json").read_text())["baselines"][
        "majority"]
    (yes_no,) = [row for row in table if row[1:3] == ["synth_vqa", "yes/no"]]
    assert yes_no[4] == f"{majority['yes/no']:.1f} (majority)"
    assert "nan" not in "".join(page.text).lower()
    assert [row[:3] for row in failures[1:]] == [["tiny", "global_step3", b] for b in (
        "synth_retrieval", "synth_vqa", *CLASSIFICATION)]
    assert all("truncated" in row[4] for row in failures[1:])

    # One file: the headline metrics and the training curves inline, nothing beside it
    assert [link for link in page.links if not link.startswith("data:")] == ["#failures"]
    assert sum(link.startswith("data:image/png;base64,") for link in page.links) == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "nightly.lock", "report.html", "results.parquet", "summary.md"]
    summary = (out / "summary.md").read_text().splitlines()  # leads with the same headline
    assert summary[2] == "| " + " | ".join(headline[0]) + " |"
    assert summary[4:8] == ["| " + " | ".join(row) + " |" for row in headline[1:]]


def test_eval_scalars_sit_beside_the_runs_training_curves_in_tensorboard(first_night, runs):
    """TensorBoard showed a run's training (runs/NAME/tensorboard) and its evaluation
    (OUT/tensorboard/NAME) as two unrelated runs; `synth_vqa/yes/no` made a group "yes", and the
    baseline `synth_shape_zeroshot/chance/acc1` read like a metric."""
    summary, out = first_night
    assert summary["tensorboard"] == str(runs) and not (out / "tensorboard").exists()
    board = EventMultiplexer().AddRunsFromDirectory(str(runs))  # `tensorboard --logdir runs`
    board.Reload()
    assert sorted(board.Runs()) == ["tiny/tensorboard", "tiny/tensorboard/eval"]
    assert sorted(board.Runs()["tiny/tensorboard"]["scalars"]) == ["loss/total", "train/lr"]

    results = pd.read_parquet(out / "results.parquet")
    stepped = results[(results["status"] == "ok") & results["step"].notna()]
    expected = {f"{r.benchmark}/{r.metric.replace('/', '_')}" for r in stepped.itertuples()}
    expected |= {f"{r.benchmark}/baseline_{r.baseline_name}/{r.metric.replace('/', '_')}"
                 for r in stepped.itertuples()}
    tags = board.Runs()["tiny/tensorboard/eval"]["scalars"]
    assert set(tags) == expected and len(tags) == len(expected)
    assert {"synth_vqa/yes_no", "synth_vqa/baseline_majority/yes_no"} <= set(tags)

    def curve(tag: str) -> list[tuple[int, float]]:
        return [(s.step, pytest.approx(s.value)) for s in board.Scalars("tiny/tensorboard/eval",
                                                                        tag)]

    assert curve("synth_retrieval/mean_recall") == [
        (step, ok_value(results, "synth_retrieval", "mean_recall", f"global_step{step}"))
        for step in (1, 2)]
    assert curve("synth_shape_zeroshot/baseline_chance/acc1") == [(1, 1 / 5), (2, 1 / 5)]
    majority = json.loads((runs / "tiny/eval/global_step2/synth_vqa.json").read_text())[
        "baselines"]["majority"]
    assert curve("synth_vqa/baseline_majority/yes_no")[-1] == (2, majority["yes/no"])


def test_second_night_does_no_duplicate_work_and_picks_up_new_tags(first_night, runs, suite):
    summary, out = first_night
    before = pd.read_parquet(out / "results.parquet")
    again = run_nightly(runs, suite=suite, out_dir=out)
    assert again["checkpoints_evaluated"] == 0 and again["failures"] == []
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), before)

    clone_tag(runs / "tiny/checkpoints", 2, 4)
    incomplete = runs / "tiny/checkpoints/global_step5"
    shutil.copytree(runs / "tiny/checkpoints/global_step2", incomplete)
    (incomplete / "vlp_state.json").unlink()  # still being saved: not a checkpoint yet
    third = run_nightly(runs, suite=suite, out_dir=out)
    assert third["checkpoints_evaluated"] == 1
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == len(before) + RETRIEVAL_METRICS + VQA_METRICS + CLASSIFICATION_METRICS
    assert set(results["tag"]) == {"export", "global_step1", "global_step2", "global_step3",
                                   "global_step4"}

    retried = run_nightly(runs, suite=suite, out_dir=out, retry_failed=True)
    assert retried["checkpoints_evaluated"] == 1 and len(retried["failures"]) == 4
    assert len(pd.read_parquet(out / "results.parquet")) == len(results)  # failures replaced


def test_suite_file_paths_and_unknown_keys(tmp_path):
    (tmp_path / "suite.yaml").write_text(
        "synth:\n  task: retrieval\n  karpathy_json: world/r.json\n"
        "  image_root: world\n  rerank_k: 4\n")
    (benchmark,) = load_suite(tmp_path / "suite.yaml")
    assert benchmark.config == RetrievalConfig(karpathy_json=tmp_path / "world/r.json",
                                               image_root=tmp_path / "world", rerank_k=4)
    (shards,) = load_suite({"s": {"task": "retrieval", "shards": ["a.tar", "s3://b/c.tar"]}})
    assert shards.config.shards == (str(Path.cwd() / "a.tar"), "s3://b/c.tar")
    with pytest.raises(UserError, match=r"unknown key\(s\) \['rerank'\]; valid keys: .*k"):
        load_suite({"synth": {"task": "retrieval", "rerank": 4}})
    with pytest.raises(UserError, match="needs 'task: retrieval | vqa'"):
        load_suite({"synth": {"karpathy_json": "x"}})
    # Wrong types are bad input, refused before any run (they were retried as transient failures)
    for key, value in (("rerank_k", "16"), ("batch_size", 2.5), ("rerank_k", True)):
        with pytest.raises(UserError, match=rf"'synth': {key} must be int, got"):
            load_suite({"synth": {"task": "retrieval", key: value}})
    (vqa,) = load_suite({"synth": {"task": "vqa", "steps": 10, "lr": 1}})  # an int is a float
    assert vqa.config == VQAConfig(steps=10, lr=1.0) and isinstance(vqa.config.lr, float)
    with pytest.raises(UserError,
                       match=r"'synth': missing key\(s\) \['karpathy_json', 'image_root'\]"):
        load_suite({"synth": {"task": "caption"}})


def test_cli_retrieval_and_vqa(runs, world_dir, tmp_path, capsys):
    export = str(runs / "tiny/export")
    code = vlp(["eval", "retrieval", "--checkpoint", export, "--karpathy-json",
                str(world_dir / "retrieval/dataset_synth.json"), "--image-root",
                str(world_dir / "retrieval"), "--bf16", "--out", str(tmp_path / "r.json")])
    assert code == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == json.loads((tmp_path / "r.json").read_text())
    assert progress_lines(err, "encode images") == ["encode images: 32/32 (100%)"]
    assert progress_lines(err, "encode texts") == ["encode texts: 160/160 (100%)"]
    code = vlp(["eval", "vqa", "--checkpoint", export, "--vqa-dir", str(world_dir / "vqa"),
                "--steps", "3", "--min-answer-count", "3", "--out", str(tmp_path / "v.json")])
    assert code == 0 and (tmp_path / "v.results.json").exists()
    out, err = capsys.readouterr()
    assert json.loads(out)["finetune"]["steps"] == 3  # stdout: the result alone
    # a log (not a terminal) gets whole lines: the first step, then the last (< 30 s apart)
    assert progress_lines(err, "vqa fine-tune") == ["vqa fine-tune: 1/3 (33%)",
                                                    "vqa fine-tune: 3/3 (100%)"]
    assert progress_lines(err, "vqa prediction") == ["vqa prediction: 64/64 (100%)"]
    code = vlp(["eval", "retrieval", "--checkpoint", export, "--karpathy-json",
                str(tmp_path / "missing.json"), "--image-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "Karpathy split JSON not found" in err and "missing.json" in err


def empty_runs(tmp_path):
    """A runs folder with a suite and no checkpoints yet (a night that evaluates nothing)."""
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "eval_suite.yaml").write_text("r:\n  task: retrieval\n  shards: none.tar\n")
    return runs


def test_nightly_script_runs_and_refuses_to_overlap(tmp_path):
    runs, out = empty_runs(tmp_path), tmp_path / "out"
    done = subprocess.run(["bash", SCRIPT, "--runs", str(runs), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout[done.stdout.index("{"):])["checkpoints_evaluated"] == 0
    assert (out / "report.html").exists()

    with open(out / "nightly.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a night still running
        held = subprocess.run(["bash", SCRIPT, "--runs", str(runs), "--out", str(out)],
                              capture_output=True, text=True, timeout=60)
    assert held.returncode == 2
    assert "another nightly run holds" in held.stderr and "{" not in held.stdout


def test_a_second_nightly_run_on_the_same_out_refuses_at_once(tmp_path, capsys):
    """Two runs on one --out each read results.parquet, evaluated, and wrote back their own
    rows: 14 of 28 rows were lost. The lock was the cron script's alone; `vlp eval nightly`
    now holds OUT/nightly.lock for the whole run."""
    runs, out = empty_runs(tmp_path), tmp_path / "out"
    out.mkdir()
    with open(out / "nightly.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the first run, still evaluating
        code = vlp(["eval", "nightly", "--runs", str(runs), "--out", str(out)])
    out_text, err = capsys.readouterr()
    assert code == 2 and out_text == "" and err.count("\n") == 1
    assert err.startswith("vlp eval nightly: error: another nightly run holds ")
    assert str(out / "nightly.lock") in err
    assert sorted(p.name for p in out.iterdir()) == ["nightly.lock"]  # nothing read or written
    assert vlp(["eval", "nightly", "--runs", str(runs), "--out", str(out)]) == 0  # released


def test_temp_files_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    """A SIGKILL in the middle of an atomic write left `.results.parquet.XXXXXXXX.tmp` in the
    output folder for good; the next run removes it while it holds the lock."""
    runs, out = empty_runs(tmp_path), tmp_path / "out"
    writer = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from vlp.pipeline.data.files import atomic_path\n"
         "with atomic_path(sys.argv[1]) as tmp:\n"
         "    tmp.write_bytes(b'PAR1 half a table')\n"
         "    print('writing', flush=True)\n"
         "    time.sleep(120)\n", str(out / "plots/synth__recall.png")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
    finally:
        writer.kill()
        writer.wait()
    (left,) = (out / "plots").glob(".synth__recall.png.*.tmp")
    keep = [out / "plots/.notes.tmp", out / "plots/synth__recall.png.tmp"]  # not atomic_path's
    for path in keep:
        path.write_text("mine")
    assert run_nightly(runs, out_dir=out)["checkpoints_evaluated"] == 0
    assert not left.exists() and all(path.exists() for path in keep)


def test_a_caption_example_whose_image_cannot_be_read_is_a_note_in_the_report(tmp_path):
    """A caption result naming a decompression bomb (a PNG header claiming 100000 x 100000
    pixels) crashed the report; a bad or missing image is now a note beside its caption."""
    images = tmp_path / "images"
    images.mkdir()
    (images / "bomb.png").write_bytes(bomb_png())
    (images / "good.jpg").write_bytes(jpeg(seed=0))
    examples = [{"image": str(images / name), "caption": f"caption of {name}",
                 "retrieval": "a retrieved caption", "references": [f"reference of {name}"]}
                for name in ("bomb.png", "missing.jpg", "good.jpg")]
    section = {"run": "tiny", "benchmark": "synth_caption", "tag": "global_step2",
               "examples": examples}
    html = render_report(read_results(tmp_path / "none.parquet"), tmp_path / "out",
                         captions=[section]).read_text()
    assert "caption of bomb.png" in html and "caption of missing.jpg" in html
    assert "(image skipped: decompression_bomb: Image size (10000000000 pixels) exceeds" in html
    assert f"(image skipped: cannot read {images / 'missing.jpg'}" in html
    assert html.count('<img src="data:image/jpeg;base64,') == 1  # good.jpg


def test_captioning_in_the_nightly_results_tensorboard_and_report(runs, world_dir, tmp_path):
    """One caption benchmark over a copy of the step-2 tag: its metrics are rows with the
    retrieval baseline and TensorBoard scalars, CIDEr heads the report x100, and the report shows
    its captions beside their images."""
    run = tmp_path / "runs/captioned"
    shutil.copytree(runs / "tiny/checkpoints/global_step2", run / "checkpoints/global_step2")
    suite = {"synth_caption": {"task": "caption", "karpathy_json": "world/dataset_synth.json",
                               "image_root": "world", "steps": 2, "batch_size": 8,
                               "max_length": 6, "spice": False}}
    shutil.copytree(world_dir / "retrieval", tmp_path / "runs/world/retrieval")
    shutil.copytree(world_dir / "train", tmp_path / "runs/world/train")
    shutil.copy(world_dir / "dataset_synth.json", tmp_path / "runs/world")
    (tmp_path / "runs/suite.yaml").write_text(json.dumps(suite))
    out = tmp_path / "nightly"
    summary = run_nightly(run, suite=tmp_path / "runs/suite.yaml", out_dir=out)
    assert summary["failures"] == [] and summary["checkpoints_evaluated"] == 1
    rows = pd.read_parquet(out / "results.parquet")
    assert sorted(rows["metric"]) == sorted(["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR",
                                             "ROUGE_L", "CIDEr"])
    assert set(rows["baseline_name"]) == {"retrieval"} and set(rows["task"]) == {"caption"}
    result = json.loads((run / "eval/global_step2/synth_caption.json").read_text())
    events = EventAccumulator(str(run / "tensorboard/eval"))
    events.Reload()
    assert [s.step for s in events.Scalars("synth_caption/CIDEr")] == [2]
    [baseline] = events.Scalars("synth_caption/baseline_retrieval/CIDEr")
    assert baseline.value == pytest.approx(result["baselines"]["retrieval"]["CIDEr"])
    html = (out / "report.html").read_text()
    headline = Page(html).tables[0][1]  # CIDEr x100, as papers quote it
    assert headline[1][:5] == ["captioned", "synth_caption", "CIDEr (x100)",
                               f"{100 * result['metrics']['CIDEr']:.1f} (global_step2)",
                               f"{100 * result['baselines']['retrieval']['CIDEr']:.1f} (retrieval)"]
    assert html.count('<img src="data:image/jpeg;base64,') == len(result["examples"]) == 8
    for example in result["examples"]:
        assert html_escape(example["caption"]) in html
        assert html_escape(example["references"][0]) in html


def test_a_tag_rewritten_after_a_rewind_is_evaluated_again(first_night, runs, suite):
    """Work was keyed by (run, tag, benchmark): a tag rewritten with other weights kept the old
    results for ever. Now it is keyed by the content's fingerprint too."""
    out = first_night[1]
    run_nightly(runs, suite=suite, out_dir=out)  # whatever earlier tests added is evaluated
    checkpoints = runs / "tiny/checkpoints"
    old = pd.read_parquet(out / "results.parquet")
    old_step2 = old[old["tag"] == "global_step2"]
    shutil.rmtree(checkpoints / "global_step2")
    clone_tag(checkpoints, 1, 2)  # the run rewound to step 1 and saved step 2 again
    again = run_nightly(runs, suite=suite, out_dir=out)
    assert again["checkpoints_evaluated"] == 1
    results = pd.read_parquet(out / "results.parquet")
    step2 = results[results["tag"] == "global_step2"]
    assert len(step2) == len(old_step2) and set(step2["benchmark"]) == set(suite)  # replaced
    assert step2["fingerprint"].nunique() == 1
    assert step2["fingerprint"].iloc[0] != old_step2["fingerprint"].iloc[0]
    assert run_nightly(runs, suite=suite, out_dir=out)["checkpoints_evaluated"] == 0


def test_transient_failures_are_retried_on_the_next_run(world_dir, tmp_path):
    """A failure that is not bad input (here the disk: a file where the results folder goes)
    used to stay failed until --retry-failed. It is tried again on the next run; a corrupt
    checkpoint (bad input) is not."""
    from vlp.models.export import save_pretrained

    runs = tmp_path / "runs"
    tokenizer = train_world_tokenizer(world_dir, tmp_path / "tokenizer")
    save_pretrained(tiny_eval_model(tokenizer).model, runs / "tiny/export",
                    tokenizer_path=tokenizer)
    (runs / "tiny/eval").write_text("not a directory")
    suite = {"r": {"task": "retrieval",
                   "karpathy_json": str(world_dir / "retrieval/dataset_synth.json"),
                   "image_root": str(world_dir / "retrieval")}}
    nights = [run_nightly(runs, suite=suite, out_dir=tmp_path / "out") for _ in range(2)]
    for night in nights:  # tried again on the second night
        assert [(f["tag"], f["transient"]) for f in night["failures"]] == [("export", True)]
        assert night["failures"][0]["error"].startswith("NotADirectoryError")
    (runs / "tiny/eval").unlink()
    third = run_nightly(runs, suite=suite, out_dir=tmp_path / "out")
    assert third["checkpoints_evaluated"] == 1 and third["failures"] == []
    results = pd.read_parquet(tmp_path / "out/results.parquet")
    assert set(results["status"]) == {"ok"} and len(results) == RETRIEVAL_METRICS
    assert results["attempts"].unique().tolist() == [3]
