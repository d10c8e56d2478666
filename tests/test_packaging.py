"""The design card's folders install as one import namespace, `vlp`, with their data files, and a
plain (non-editable) install works from any directory."""
from __future__ import annotations

import configparser
import os
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from train_helpers import REPO


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def test_setup_cfg_lists_every_package_of_the_tree():
    cfg = _setup_cfg()
    mapping = dict(line.split(" = ") for line in cfg["options"]["package_dir"].strip().splitlines())
    listed = set(cfg["options"]["packages"].split())
    on_disk = set()
    for package, folder in mapping.items():
        for init in (REPO / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(REPO / folder).parts
            on_disk.add(".".join((package, *relative)))
    assert listed == on_disk


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The project built as a wheel (a few seconds), without a warning."""
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", str(REPO), "-w", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    assert "warning" not in (build.stdout + build.stderr).lower(), build.stdout + build.stderr
    (built,) = out.glob("vlp-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_ships_every_launch_script_executable(wheel):
    scripts = sorted(p.name for p in (REPO / "launch_scripts").iterdir()
                     if p.suffix in (".sh", ".sbatch"))
    with zipfile.ZipFile(wheel) as archive:
        modes = {Path(info.filename).name: info.external_attr >> 16 for info in archive.infolist()
                 if info.filename.startswith("vlp/launch_scripts/")}
    assert sorted(name for name in modes if name != "__init__.py") == scripts
    assert [name for name in scripts if not modes[name] & 0o111] == []


@pytest.mark.slow
def test_a_plain_install_works_from_any_directory(tmp_path, wheel):
    env_dir = tmp_path / "venv"  # the dependencies come from this interpreter's site-packages
    venv.create(env_dir, system_site_packages=True, with_pip=False)
    python = env_dir / "bin" / "python"
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore", "PYTHONWARNINGS": "ignore"}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                              "-q", "--no-deps", str(wheel)], capture_output=True, text=True,
                             timeout=300, env=env)
    assert install.returncode == 0, install.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def vlp(*args: str, code: int = 0) -> subprocess.CompletedProcess:
        done = subprocess.run([str(env_dir / "bin" / "vlp"), *args], cwd=elsewhere,
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == code, done.stderr[-3000:]
        return done

    assert vlp("--version").stdout.strip() == f"vlp {_setup_cfg()['metadata']['version']}"
    assert "--n-train" in vlp("quickstart", "--help").stdout
    # The shipped recipe is found and read: the dry run's checks get to the data it names.
    dry_run = vlp("train", "--dry-run", "--recipe", "tiny_synth.yaml", code=2)
    assert "data.tokenizer: no tokenizer at quickstart_out/data/tokenizer" in dry_run.stderr
    where = subprocess.run([str(python), "-c", "import vlp.models, vlp.pipeline.train.config as c;"
                            "print(vlp.models.__file__); print(c.find_ds_config('zero3_bf16.json'))"],
                           cwd=elsewhere, capture_output=True, text=True, timeout=60, env=env)
    module_file, ds_config = where.stdout.split()
    assert module_file.startswith(str(env_dir)) and Path(ds_config).is_file()
    assert str(env_dir) in ds_config  # shipped as package data, not read from the checkout
    assert "train_slurm.sbatch" in vlp("scripts", "list").stdout
    vlp("scripts", "copy", "jobs", "train_multinode.sh")
    copied = elsewhere / "jobs/train_multinode.sh"
    assert copied.read_text() == (REPO / "launch_scripts/train_multinode.sh").read_text()
    assert os.access(copied, os.X_OK)
