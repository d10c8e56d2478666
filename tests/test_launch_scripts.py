"""The launch scripts: executable as git stores them, their documented lines usable as shown, and
`vlp scripts` printing and copying the copies the package ships."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from train_helpers import REPO

from vlp.pipeline.cli import main as vlp

SCRIPTS = sorted(p.name for p in (REPO / "launch_scripts").iterdir()
                 if p.suffix in (".sh", ".sbatch"))


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None,
                    reason="needs the git checkout")
def test_every_launch_script_is_executable_in_git():
    """git's mode is what a clone gets: `./train_local.sh` must run without `bash` in front."""
    listed = subprocess.run(["git", "ls-files", "-s", "launch_scripts"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    modes = {line.split("\t")[1].rsplit("/", 1)[1]: line.split()[0]
             for line in listed.splitlines()}
    assert {name: modes.get(name) for name in SCRIPTS} == dict.fromkeys(SCRIPTS, "100755")


def test_the_crontab_line_of_the_nightly_script_is_one_line():
    header = (REPO / "launch_scripts/nightly_eval.sh").read_text().splitlines()
    at = next(i for i, line in enumerate(header) if line.startswith("# crontab line"))
    entry = header[at + 1].removeprefix("# ")
    assert re.fullmatch(r"(\S+ ){5}PYTHON=\S+ \S+/nightly_eval\.sh --runs .* 2>&1", entry), entry
    assert not header[at + 2].startswith("#")  # nothing continues it


def test_scripts_list_names_every_script_with_what_it_does(capsys):
    assert vlp(["scripts", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SCRIPTS
    slurm = next(line for line in lines if line.startswith("train_slurm.sbatch"))
    assert "SLURM: one task per GPU" in slurm and "checkout" not in slurm
    assert next(line for line in lines if line.startswith("test.sh")).endswith(
        "(runs from a checkout)")


def test_scripts_show_prints_the_shipped_text(capsys):
    assert vlp(["scripts", "show", "train_slurm.sbatch"]) == 0
    assert capsys.readouterr().out == (REPO / "launch_scripts/train_slurm.sbatch").read_text()
    assert vlp(["scripts", "show", "train.sh"]) == 2
    assert capsys.readouterr().err.startswith(
        "vlp scripts show: error: no launch script 'train.sh'; shipped: gpu_check.sh, ")


def test_scripts_copy_writes_executables_and_keeps_an_edited_copy(tmp_path, capsys):
    assert vlp(["scripts", "copy", str(tmp_path / "jobs")]) == 0
    assert sorted(p.name for p in (tmp_path / "jobs").iterdir()) == SCRIPTS
    assert all(os.access(tmp_path / "jobs" / name, os.X_OK) for name in SCRIPTS)
    edited = tmp_path / "jobs/train_slurm.sbatch"
    edited.write_text(edited.read_text() + "# my partition\n")
    assert vlp(["scripts", "copy", str(tmp_path / "jobs")]) == 2
    assert "other versions of train_slurm.sbatch; --force replaces them" in (
        capsys.readouterr().err)
    assert edited.read_text().endswith("# my partition\n")
    assert vlp(["scripts", "copy", str(tmp_path / "jobs"), "train_slurm.sbatch", "--force"]) == 0
    assert edited.read_text() == (REPO / "launch_scripts/train_slurm.sbatch").read_text()
