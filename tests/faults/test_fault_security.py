"""Hostile inputs: shard URLs that run commands, pickles, URL lists that point inside the network
or at local files, and paths in shards or annotation files that climb out of their directory.
Related tests elsewhere: tests/test_loader.py (pipe: URLs and pickle members refused by the
loader), tests/test_data_urls.py (every address form), tests/test_data_download.py (file://
refused even with --allow-private-hosts)."""
from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from fault_helpers import _RunsCommand
from train_helpers import REPO, SHARDS, make_tag, refresh_state, single_rank_env

from vlp.data_prep.reshard import reshard
from vlp.data_prep.server import QuietHandler, serve_directory
from vlp.pipeline.data.checkpoints import CheckpointError, resolve_resume, validate_tag
from vlp.pipeline.data.errors import UserError
from vlp.pipeline.data.model_loading import _consolidate_zero, load_model
from vlp.pipeline.eval.nightly.suite import load_suite
from vlp.pipeline.eval.retrieval.data import load_karpathy
from vlp.pipeline.eval.vqa.data import load_vqa_split

# Code that ships (the packages and the launch scripts). Tests are not scanned: they load only
# files they wrote themselves.
SCANNED = ("data_prep", "models", "pipeline", "launch_scripts")


# ----------------------------------------------------------------------- pipe: and pickles

def test_training_refuses_a_pipe_url_before_running_anything(tokenizer_dir, tmp_path):
    """The training script itself (one rank, no launcher): exit 2, and the command never ran."""
    marker = tmp_path / "PIPE_RAN"
    env = single_rank_env(OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "-m", "vlp.pipeline.train", "--set", f"run_dir={tmp_path / 'run'}",
         f"data.shards=pipe:touch {marker}", f"data.tokenizer={tokenizer_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "error: refusing shard URL 'pipe:touch" in done.stderr
    assert "pipe: URLs run shell commands" in done.stderr
    assert not marker.exists()


class _Calls(ast.NodeVisitor):
    """Calls that unpickle (or may): (file, line, what)."""

    UNPICKLERS = {"pickle.load", "pickle.loads", "pickle.Unpickler", "cPickle.load", "dill.load",
                  "dill.loads", "joblib.load", "pd.read_pickle", "pandas.read_pickle",
                  "torch.serialization.load", "yaml.unsafe_load"}

    def __init__(self, path: Path):
        self.path, self.found = path, []

    def visit_Call(self, node: ast.Call) -> None:
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}

        def is_true(key):
            return isinstance(keywords.get(key), ast.Constant) and keywords[key].value is True

        where = f"{self.path.relative_to(REPO)}:{node.lineno}"
        if name == "torch.load" and not is_true("weights_only"):
            self.found.append(f"{where}: torch.load without weights_only=True")
        elif name in self.UNPICKLERS:
            self.found.append(f"{where}: {name}")
        elif name in ("np.load", "numpy.load") and "allow_pickle" in keywords:
            if not (isinstance(keywords["allow_pickle"], ast.Constant)
                    and keywords["allow_pickle"].value is False):
                self.found.append(f"{where}: {name} with allow_pickle")
        elif name == "yaml.load" and "SafeLoader" not in ast.unparse(node):
            self.found.append(f"{where}: yaml.load without SafeLoader")
        self.generic_visit(node)


def test_no_project_code_unpickles_data():
    files = [p for top in SCANNED for p in sorted((REPO / top).rglob("*.py"))]
    assert len(files) > 40
    found = []
    for path in files:
        calls = _Calls(path)
        calls.visit(ast.parse(path.read_text(), str(path)))
        found += calls.found
        # Spelled differently (a getattr, an alias) the call would escape the parser: grep too.
        text = path.read_text()
        for needle in ("allow_pickle=True", "weights_only=False", "pickle.load"):
            if needle in text:
                found.append(f"{path.relative_to(REPO)}: contains {needle!r}")
    assert found == []


def test_the_scan_finds_what_it_looks_for():
    probe = REPO / "pipeline" / "probe.py"  # only names the findings; the source is below
    source = ("import pickle, torch, numpy as np, yaml\n"
              "torch.load(f)\ntorch.load(f, weights_only=False)\ntorch.load(f, weights_only=True)\n"
              "pickle.loads(b)\nnp.load(f, allow_pickle=True)\nnp.load(f)\nyaml.load(s)\n"
              "yaml.load(s, Loader=yaml.SafeLoader)\n")
    calls = _Calls(probe)
    calls.visit(ast.parse(source))
    assert [f.split(": ", 1)[1] for f in calls.found] == [
        "torch.load without weights_only=True", "torch.load without weights_only=True",
        "pickle.loads", "np.load with allow_pickle", "yaml.load without SafeLoader"]


# ------------------------------------------------------- checkpoints whose pickles run code

def planted_tag(ckpt_dir: Path, marker: Path) -> Path:
    """A tag whose model-states file runs `touch marker` when unpickled, with vlp_state.json
    rewritten to match (whoever can write the file can write that too)."""
    tag = make_tag(ckpt_dir, 6)
    torch.save({"buffer_names": [], "hook": _RunsCommand(f"touch {marker}")}, tag / SHARDS[0])
    for name in ("config.json", "tokenizer.json"):
        (tag / name).write_text("{}")
    refresh_state(tag)
    return tag


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_and_nothing_runs(tmp_path):
    """Evaluation, the nightly job and export consolidated ZeRO checkpoints with DeepSpeed's
    torch.load(weights_only=False): a planted file ran code as the nightly user. Now the pickle
    is scanned (nothing runs) and refused in one line naming the global it needs; past that
    check, DeepSpeed's own loads are forced weights-only as well."""
    marker = tmp_path / "PICKLE_RAN"
    tag = planted_tag(tmp_path / "checkpoints", marker)
    assert validate_tag(tag) == [
        f"{tag / SHARDS[0]} is refused: its pickle needs posix.system, which is not among the "
        "types DeepSpeed checkpoints hold, and loading it would run that code"]
    with pytest.raises(CheckpointError) as raised:
        load_model(tag)
    assert "posix.system" in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        resolve_resume(tmp_path / "checkpoints", "latest-valid")
    with pytest.raises(CheckpointError, match=r"cannot consolidate .*posix.system"):
        _consolidate_zero(tag)  # the second line of defence, without the scan
    assert not marker.exists()
    # The oracle: loaded the way DeepSpeed loads it, the same file does run the command.
    probe = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", probe, str(tag / SHARDS[0])], check=True,
                   capture_output=True)
    assert marker.exists()


def test_training_refuses_to_resume_a_checkpoint_whose_pickle_would_run_code(tmp_path):
    """The training script itself (one rank, no launcher), resuming the planted tag: exit 2
    before any model is built, one error line, and the command never ran."""
    marker = tmp_path / "PICKLE_RAN"
    run_dir = tmp_path / "run"
    planted_tag(run_dir / "checkpoints", marker)
    done = subprocess.run(
        [sys.executable, "-m", "vlp.pipeline.train", "--resume", "latest", "--set",
         f"run_dir={run_dir}"],
        cwd=REPO, env=single_rank_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
        timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vlp train: error: the latest checkpoint ") and "posix.system" in last
    assert not marker.exists()


# --------------------------------------------------------------------------- URL lists

class LoggingHandler(QuietHandler):
    requests: list[str] = []

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


def test_url_list_pointing_inside_the_network_fetches_nothing(world_dir, tmp_path):
    """`vlp data download` as a command: local files, private, loopback (in several spellings)
    and link-local addresses are dropped before img2dataset starts, so the loopback server
    serving real images sees no request at all."""
    LoggingHandler.requests = []
    with serve_directory(world_dir, handler=LoggingHandler) as base:
        port = base.rsplit(":", 1)[1]
        urls = [f"file://{world_dir}/train/images/000000.jpg",
                f"{base}/train/images/000001.jpg",
                f"http://localhost:{port}/train/images/000002.jpg",
                f"http://[::1]:{port}/train/images/000003.jpg",
                f"http://2130706433:{port}/train/images/000004.jpg",  # 127.0.0.1 as a number
                "http://10.0.0.7/a.jpg", "http://192.168.1.20/b.jpg",
                "http://169.254.169.254/latest/meta-data/iam/security-credentials/"]
        url_list = tmp_path / "urls.parquet"
        pd.DataFrame({"url": urls, "caption": ["a red circle"] * len(urls)}).to_parquet(url_list)
        done = subprocess.run(
            [shutil.which("vlp") or "vlp", "data", "download", "--url-list", str(url_list),
             "--out", str(tmp_path / "shards")],
            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vlp data download: error: no URL in")
    assert "'bad_scheme': 1" in last and "'private_host': 7" in last
    assert LoggingHandler.requests == []
    assert not list(tmp_path.rglob("*.tar"))


# ------------------------------------------------------------------ paths that climb out

def test_karpathy_paths_outside_the_image_root_are_refused(world_dir, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(world_dir / "retrieval", root)
    data = json.loads((root / "dataset_synth.json").read_text())
    outside = tmp_path / "outside.jpg"  # a real image: the refusal is not just "missing"
    shutil.copy(root / data["images"][0]["filepath"] / data["images"][0]["filename"], outside)
    for filepath, filename in (("..", "outside.jpg"), ("images", "../../outside.jpg"),
                               ("", str(outside))):
        entry = {**data["images"][1], "filepath": filepath, "filename": filename}
        bad = {**data, "images": [data["images"][0], entry]}
        (root / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=r"images\[1\]: image path .* leads outside the "
                                                 r"image root"):
            load_karpathy(root / "bad.json", root)
    # Inside the root, `..` that stays inside and a symlinked folder are fine.
    (root / "linked").symlink_to(root / "images")
    entry = {**data["images"][1], "filepath": "linked/../linked"}
    (root / "ok.json").write_text(json.dumps({**data, "images": [entry]}))
    assert len(load_karpathy(root / "ok.json", root).images) == 1


def test_vqa_paths_outside_the_image_root_are_refused(world_dir, tmp_path):
    vqa = tmp_path / "root/vqa"
    shutil.copytree(world_dir / "vqa", vqa)
    questions_path = sorted(vqa.glob("*_val_questions.json"))[0]
    annotations_path = sorted(vqa.glob("*_val_annotations.json"))[0]
    questions = json.loads(questions_path.read_text())
    assert len(load_vqa_split(questions_path, annotations_path, vqa)) == len(
        questions["questions"])
    # The same images outside the root, where a climbing data_subtype would find them.
    shutil.copytree(vqa / "images" / questions["data_subtype"], tmp_path / "outside")
    bad = vqa / "v2_OpenEnded_evil_val_questions.json"
    bad.write_text(json.dumps({**questions, "data_subtype": "../../../outside"}))
    with pytest.raises(UserError, match="leads outside the image root"):
        load_vqa_split(bad, annotations_path, vqa)  # pattern detection
    with pytest.raises(UserError, match="leads outside the image root"):
        load_vqa_split(bad, annotations_path, vqa,
                       image_pattern="images/{split}/{image_id:012d}.jpg")
    # Image ids are integers by the format; a string id is refused before it becomes a path.
    first = {**questions["questions"][0], "image_id": "../../../outside/x"}
    bad.write_text(json.dumps({**questions, "questions": [first]}))
    with pytest.raises(UserError, match=r"field 'image_id' should be int"):
        load_vqa_split(bad, annotations_path, vqa)


def test_benchmark_names_cannot_place_results_outside_the_run(world_dir):
    spec = {"task": "retrieval", "karpathy_json": str(world_dir / "retrieval/dataset_synth.json"),
            "image_root": str(world_dir / "retrieval")}
    for name in ("../../../evil", "a/b", ".hidden", "/tmp/evil"):
        with pytest.raises(UserError, match="a benchmark name is a file name"):
            load_suite({name: spec})
    assert [b.name for b in load_suite({"synth_retrieval-v2.1": spec})] == ["synth_retrieval-v2.1"]


def test_shard_member_names_never_become_paths(fault_data, tmp_path):
    """Indexing and resharding the damaged shards (one sample is named ../../evil.*) write only
    into the output directory; the sample is not copied into the new tars (`tar -x` would write
    it outside a folder), and that is counted."""
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    before = {p for p in tmp_path.rglob("*")}
    summary = reshard(fault_data.root, work / "out", samples_per_shard=8)
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p == work / "out" or (work / "out") in p.parents for p in created)
    assert {c["shard"] for c in summary["corrupt_inputs"]} == {"00005.tar", "00006.tar"}
    names = [m.name for tar in sorted((work / "out").glob("*.tar"))
             for m in tarfile.open(tar)]
    assert names and not any(".." in name.split("/") for name in names)
    assert summary["unsafe_names_dropped"] == 1
    assert not list(tmp_path.rglob("evil.*"))
