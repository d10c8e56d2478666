"""Every command README.md shows runs, in README order, on a small synthetic world.

Commands come from the README's ```bash blocks and the `vlp ...` cells of its tables. SHORTENED
maps each one, exactly as shown, to the form run here (tiny sizes and steps, local paths), or to
Skip with the reason it cannot run here. A README command missing from the table fails the test,
so the README cannot drift from what works. The nightly suite is the README's ```yaml block.
The "Your own data, small" walkthrough runs in tests/test_readme_own_data.py.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from train_helpers import SMALL_MODEL

from vlp.pipeline.distributed import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
OWN_DATA = "## Your own data, small"  # its commands run in tests/test_readme_own_data.py


def readme_section(text: str, heading: str) -> tuple[str, str]:
    """(the section under `heading`, up to the next '## ' heading; the text without it)."""
    start = text.index(heading + "\n")
    end = text.find("\n## ", start) + 1 or len(text)
    return text[start:end], text[:start] + text[end:]


OWN_DATA_SECTION, README = readme_section((REPO / "README.md").read_text(), OWN_DATA)


@dataclass(frozen=True)
class Skip:
    reason: str


@dataclass(frozen=True)
class Background:
    """A server: started, waited for (until it serves `ready`), and stopped when the test ends."""
    command: str
    ready: str = "/world.json"


SHARDS = ("data.shards='shards/{00000..00003}.tar' data.tokenizer=tokenizer "
          "data.lexicon=world/lexicon.json")
SHORT_RUN = (f"{shlex.quote(SMALL_MODEL)} optim.batch_size=8 optim.max_steps=2 "
             "optim.warmup_steps=1 checkpoint.every_steps=2 data.num_workers=1 "
             "data.shuffle_buffer=16 logging.every_steps=1 dist_timeout_s=60")
CLUSTER = f"run_dir=runs/base {SHARDS} data.num_workers=1 optim.batch_size=8"

# README command -> what runs here ({repo}: the checkout, {port}: a free loopback port).
SHORTENED = {
    "bash launch_scripts/quickstart.sh": Skip("the full-size pipeline (12 min); "
                                              "tests/test_quickstart.py runs it shortened"),
    "bash launch_scripts/test.sh": Skip("the test suite itself"),
    "vlp data synth --out world --train 12000 --test 1000 --seed 0":
        "vlp data synth --out world --train 64 --test 8 --seed 0 "
        "--base-url http://127.0.0.1:{port}",
    "vlp data serve world": Background("vlp data serve world"),
    "vlp data download --url-list world/train/url_list.parquet --out shards --image-size 64 "
    "--allow-private-hosts":
        "vlp data download --url-list world/train/url_list.parquet --out shards --image-size 64 "
        "--allow-private-hosts --samples-per-shard 16 --threads 4",
    "vlp data index shards": "vlp data index shards",
    "vlp data tokenizer --shard-dir shards --out tokenizer --vocab-size 8000":
        "vlp data tokenizer --shard-dir shards --out tokenizer --vocab-size 300",
    "vlp data reshard --in shards --out shards_256 --samples-per-shard 256":
        "vlp data reshard --in shards --out shards_256 --samples-per-shard 8",
    "vlp train --recipe tiny_synth.yaml --set run_dir=runs/tiny "
    "data.shards='shards/{00000..00011}.tar' data.tokenizer=tokenizer "
    "data.lexicon=world/lexicon.json":
        f"vlp train --recipe tiny_synth.yaml --nproc 1 --set run_dir=runs/tiny {SHARDS} "
        f"{SHORT_RUN}",
    "vlp export --checkpoint runs/tiny/checkpoints --out export/tiny":
        "vlp export --checkpoint runs/tiny/checkpoints --out export/tiny",
    "vlp eval retrieval --checkpoint runs/tiny/checkpoints "
    "--karpathy-json world/retrieval/dataset_synth.json --image-root world/retrieval":
        "vlp eval retrieval --checkpoint runs/tiny/checkpoints "
        "--karpathy-json world/retrieval/dataset_synth.json --image-root world/retrieval",
    "vlp eval vqa --checkpoint runs/tiny/checkpoints --vqa-dir world/vqa --steps 400":
        "vlp eval vqa --checkpoint runs/tiny/checkpoints --vqa-dir world/vqa --steps 2 "
        "--min-answer-count 3",
    "vlp eval caption --checkpoint runs/tiny/checkpoints --karpathy-json world/dataset_synth.json "
    "--image-root world --steps 150":
        "vlp eval caption --checkpoint runs/tiny/checkpoints "
        "--karpathy-json world/dataset_synth.json --image-root world --steps 2 --batch-size 4 "
        "--max-length 5",
    "vlp eval compositionality --checkpoint runs/tiny/checkpoints --edits world/compositionality "
    "--image-root world":
        "vlp eval compositionality --checkpoint runs/tiny/checkpoints "
        "--edits world/compositionality --image-root world",
    "vlp deploy quantize --checkpoint runs/tiny/checkpoints --out export/tiny-int8":
        "vlp deploy quantize --checkpoint runs/tiny/checkpoints --out export/tiny-int8",
    "vlp eval zeroshot --checkpoint runs/tiny/checkpoints "
    "--dataset world/classification/shape/wds":
        "vlp eval zeroshot --checkpoint runs/tiny/checkpoints "
        "--dataset world/classification/shape/wds",
    "vlp eval linear-probe --checkpoint runs/tiny/checkpoints "
    "--dataset world/classification/colour/imagefolder":
        "vlp eval linear-probe --checkpoint runs/tiny/checkpoints "
        "--dataset world/classification/colour/imagefolder --epochs 1",
    "vlp eval nightly --runs runs --suite eval_suite.yaml":
        "vlp eval nightly --runs runs --suite eval_suite.yaml",
    "vlp bench loader --quick": "vlp bench loader --quick",
    "vlp scripts copy jobs": "vlp scripts copy jobs",
    "RECIPE=base_pretrain.yaml bash launch_scripts/train_local.sh run_dir=/shared/runs/base "
    "data.shards='/data/shards/{00000..41407}.tar'":
        "DRY_RUN=1 RECIPE=base_pretrain.yaml bash {repo}/launch_scripts/train_local.sh "
        f"{CLUSTER}",
    "DRY_RUN=1 RECIPE=base_pretrain.yaml bash launch_scripts/train_local.sh "
    "run_dir=/shared/runs/base":
        "DRY_RUN=1 RECIPE=base_pretrain.yaml bash {repo}/launch_scripts/train_local.sh "
        f"{CLUSTER}",
    "HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash launch_scripts/train_multinode.sh "
    "run_dir=/shared/runs/base":
        "DRY_RUN=1 HOSTFILE=hostfile MASTER_ADDR=127.0.0.1 MASTER_PORT={port} "
        f"bash {{repo}}/launch_scripts/train_multinode.sh {CLUSTER}",
    "NODE_RANK=1 HOSTFILE=hostfile MASTER_ADDR=10.0.0.1 bash launch_scripts/train_multinode.sh "
    "...":
        f"DRY_RUN=1 NODE_RANK=1 HOSTFILE=hostfile MASTER_ADDR=127.0.0.1 MASTER_PORT={{port}} "
        f"bash {{repo}}/launch_scripts/train_multinode.sh {CLUSTER}",
    "vlp eval compositionality --checkpoint runs/tiny/checkpoints --edits sugarcrepe/data "
    "--image-root coco/val2017":
        Skip("needs SugarCrepe's JSON and COCO val2017 (the world's edits run above)"),
    "sbatch --nodes=4 launch_scripts/train_slurm.sbatch run_dir=/shared/runs/base":
        Skip("needs SLURM (sbatch, srun, scontrol)"),
    "bash launch_scripts/nightly_eval.sh --runs runs --suite eval_suite.yaml":
        "bash {repo}/launch_scripts/nightly_eval.sh --runs runs --suite eval_suite.yaml",
}


def readme_commands(text: str) -> list[str]:
    """Commands in README order: ```bash lines (continuations joined, comments dropped) and the
    `vlp ...` code spans of table rows."""
    commands = []
    for match in re.finditer(r"```bash\n(.*?)```|^\|[^\n]*$", text, re.S | re.M):
        if match.group(1) is None:
            commands += re.findall(r"`(vlp [^`]+)`", match.group(0))
            continue
        for line in re.sub(r"\\\n\s*", "", match.group(1)).splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def suite_yaml(text: str) -> str:
    """The README's nightly suite, with a 2-step VQA fine-tune."""
    (block,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    assert "steps: 200" in block
    return block.replace("steps: 200", "steps: 2")


def test_every_readme_command_is_in_the_table():
    shown = readme_commands(README)
    assert len(shown) >= 15 and shown[:2] == ["bash launch_scripts/quickstart.sh",
                                              "bash launch_scripts/test.sh"]
    missing = [command for command in shown if command not in SHORTENED]
    assert not missing, f"README commands with no shortened form in SHORTENED: {missing}"
    stale = [command for command in SHORTENED if command not in shown]
    assert not stale, f"SHORTENED lists commands the README no longer shows: {stale}"


def wait_until_served(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "the server exited"
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"{url} was not served within 60 s")


def vlp_env(tmp_path: Path) -> dict[str, str]:
    """The environment README commands run in: `vlp` as this interpreter runs it, on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "vlp").write_text(f'#!/bin/sh\nexec {sys.executable} -m vlp.pipeline.cli "$@"\n')
    (bin_dir / "vlp").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "PYTHON": sys.executable}


def run_readme_commands(shown: list[str], shortened: dict, work: Path, env: dict[str, str],
                        port: int, log_dir: Path) -> dict[str, str]:
    """Run each README command, or its form in `shortened`, in `work`, in order, each to exit
    status 0; servers stay up until the last command is done. Returns the output of each."""
    servers, outputs = [], {}
    try:
        for command_shown in shown:
            step = shortened.get(command_shown, command_shown)
            if isinstance(step, Skip):
                continue
            command = (step.command if isinstance(step, Background) else step)
            command = command.replace("{repo}", str(REPO)).replace("{port}", str(port))
            log = log_dir / f"step{len(list(log_dir.glob('step*')))}.log"
            if isinstance(step, Background):
                servers.append(subprocess.Popen(command, shell=True, cwd=work, env=env,
                                                stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                                start_new_session=True))
                wait_until_served(f"http://127.0.0.1:{port}{step.ready}", servers[-1])
                continue
            started = time.perf_counter()
            done = subprocess.run(["bash", "-c", command], cwd=work, env=env, timeout=300,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            print(f"{time.perf_counter() - started:6.1f} s  {command[:90]}")
            assert done.returncode == 0, (f"README: {command_shown}\nran: {command}\n"
                                          f"{done.stdout[-3000:]}")
            outputs[command_shown] = done.stdout
    finally:
        for server in servers:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
    return outputs


def test_every_readme_command_runs_on_a_small_world(tmp_path):
    env = vlp_env(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "eval_suite.yaml").write_text(suite_yaml(README))
    (work / "hostfile").write_text("localhost slots=2\n")
    run_readme_commands(readme_commands(README), SHORTENED, work, env, free_port(), tmp_path)
    assert (work / "export/tiny/model.safetensors").is_file()
    assert (work / "runs/nightly/results.parquet").is_file()
