"""`vlp doctor`: each check on this machine, the verdict and the exit status."""
import json
import shutil

import torch

from vlp.pipeline.cli import main as vlp
from vlp.pipeline.doctor import Check, check_free_space, verdict


def test_free_space_below_the_minimum_fails_when_required_and_warns_otherwise(tmp_path):
    free_gib = shutil.disk_usage(tmp_path).free / 1024**3
    assert check_free_space("disk", tmp_path, 0, True, "x").status == "ok"
    low = check_free_space("disk", tmp_path, free_gib * 2, True, "checkpoints")
    assert low.status == "fail" and f"below {free_gib * 2:g} GiB (checkpoints)" in low.detail
    assert check_free_space("shm", tmp_path, free_gib * 2, False, "x").status == "warn"
    assert check_free_space("disk", tmp_path / "missing", 0, True, "x").status == "fail"


def test_verdict_names_the_failed_checks():
    ok, warn = Check("torch", "ok", ""), Check("java", "warn", "")
    assert verdict([ok]) == "ready"
    assert verdict([ok, warn]) == "ready (1 warning(s))"
    assert verdict([ok, warn, Check("disk", "fail", ""), Check("packages", "fail", "")]) == (
        "not ready (2 required check(s) failed: disk, packages)")


def test_doctor_reports_this_machine_and_exits_1_when_something_required_is_missing(
        tmp_path, capsys):
    assert vlp(["doctor", "--json", "--path", str(tmp_path), "--min-free-gb", "1e9"]) == 1
    report = json.loads(capsys.readouterr().out)  # only JSON on stdout
    checks = {c["name"]: c for c in report["checks"]}
    assert list(checks) == ["python", "packages", "torch", "accelerator", "deepspeed ops", "disk",
                            "/dev/shm", "java"]
    assert checks["torch"]["detail"].startswith(torch.__version__)
    assert checks["packages"]["status"] == "ok"
    assert checks["accelerator"]["status"] == ("ok" if torch.cuda.is_available() else "warn")
    assert "deepspeed_shm_comm" in checks["deepspeed ops"]["detail"]
    assert checks["disk"]["status"] == "fail"
    assert checks["java"]["status"] == ("ok" if shutil.which("java") else "warn")
    assert report["verdict"] == "not ready (1 required check(s) failed: disk)"

    assert vlp(["doctor", "--path", str(tmp_path / "missing")]) == 2
    assert "vlp doctor: error: --path" in capsys.readouterr().err
