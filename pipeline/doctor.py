"""`vlp doctor`: what a user needs to know before a long job, with a verdict.

    [ ok ] python        3.11.7
    [ ok ] torch         2.13.0, CPU build
    [warn] accelerator   no CUDA device: training runs on CPU ranks (gloo), bf16 falls back to fp32
    [ ok ] deepspeed ops 8 of 9 can build here: cpu_adam, ...; not: async_io
    [FAIL] disk          /data: 3.1 GiB free, below --min-free-gb 10
    verdict: not ready (1 required check failed)

Each check is `ok`, `warn` (works, with a limit worth knowing) or `fail` (a job would fail);
the exit status is 1 when any check fails. `--json` prints the same as JSON.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REQUIRED_PACKAGES = ("deepspeed", "webdataset", "img2dataset", "transformers", "tokenizers",
                     "safetensors", "pyarrow", "tensorboard", "matplotlib")
GIB = 1024**3


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def check_python() -> Check:
    ok = sys.version_info >= (3, 10)
    return Check("python", "ok" if ok else "fail",
                 platform.python_version() + ("" if ok else ": vlp needs Python 3.10 or newer"))


def check_packages() -> Check:
    missing = []
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # img2dataset's would ask PyPI
    for name in REQUIRED_PACKAGES:
        try:
            importlib.import_module(name)
        except Exception:  # a broken install fails its import in many ways
            missing.append(name)
    if missing:
        return Check("packages", "fail", f"cannot import {', '.join(missing)}: run "
                     "launch_scripts/install_cpu.sh or `pip install -e .`")
    return Check("packages", "ok", f"{len(REQUIRED_PACKAGES)} required packages import")


def check_torch() -> list[Check]:
    import torch

    from vlp.pipeline.distributed import fast_bf16

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
    checks = [Check("torch", "ok", f"{torch.__version__}, {build}")]
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        bf16 = "bf16" if fast_bf16("cuda") else ("no native bf16 (compute capability < 8.0): "
                                                 "bf16 configs train in fp32, zero3_fp16.json "
                                                 "in fp16")
        checks.append(Check("accelerator", "ok", f"{torch.cuda.device_count()} x "
                            f"{', '.join(names)} ({bf16})"))
    else:
        bf16 = "native bf16" if fast_bf16("cpu") else "no native bf16: bf16 configs train in fp32"
        checks.append(Check("accelerator", "warn",
                            f"no CUDA device: training runs on CPU ranks (gloo), {bf16}"))
    return checks


def check_deepspeed_ops() -> Check:
    """Which DeepSpeed ops this machine can build (ds_report's compatibility column), and the
    tools a just-in-time build needs."""
    try:
        import deepspeed
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
        from deepspeed.ops.op_builder.builder import probe_is_compatible
        from torch.utils.cpp_extension import is_ninja_available
    except Exception as exc:
        return Check("deepspeed ops", "fail", f"DeepSpeed does not import: {exc}")
    builds = {name: probe_is_compatible(builder) for name, builder in sorted(ALL_OPS.items())
              if name != "deepspeed_not_implemented"}
    can = [name for name, ok in builds.items() if ok]
    cannot = [name for name, ok in builds.items() if not ok]
    detail = (f"DeepSpeed {deepspeed.__version__}: {len(can)} of {len(builds)} ops can build "
              f"here ({', '.join(can)})" + (f"; not: {', '.join(cannot)}" if cannot else ""))
    tools = [t for t, ok in (("ninja", is_ninja_available()), ("a C++ compiler",
                                                                 shutil.which("c++"))) if not ok]
    if tools:
        return Check("deepspeed ops", "fail",
                     f"{detail}; missing {' and '.join(tools)}, which every op build needs")
    return Check("deepspeed ops", "ok", detail)


def check_free_space(name: str, path: Path, min_free_gb: float, required: bool,
                     why: str) -> Check:
    try:
        free = shutil.disk_usage(path).free / GIB
    except OSError as exc:
        return Check(name, "fail" if required else "warn", f"{path}: {exc.strerror}")
    if free < min_free_gb:
        return Check(name, "fail" if required else "warn",
                     f"{path}: {free:.1f} GiB free, below {min_free_gb:g} GiB ({why})")
    return Check(name, "ok", f"{path}: {free:.1f} GiB free")


def check_java() -> Check:
    """Java runs the caption metrics' reference scorers (METEOR, SPICE in pycocoevalcap)."""
    java = shutil.which("java")
    if java is None:
        return Check("java", "warn", "not found: needed only for caption metrics (METEOR, SPICE)")
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("java", "warn", f"{java} does not run: {exc}")
    first = (done.stderr or done.stdout).strip().splitlines()
    return Check("java", "ok" if done.returncode == 0 else "warn",
                 first[0] if first else f"{java} exited with {done.returncode}")


def run_checks(path: Path, min_free_gb: float, min_shm_gb: float) -> list[Check]:
    checks = [check_python(), check_packages()]
    checks += check_torch()
    checks.append(check_deepspeed_ops())
    checks.append(check_free_space("disk", path, min_free_gb, required=True,
                                   why="checkpoints and shards"))
    checks.append(check_free_space("/dev/shm", Path("/dev/shm"), min_shm_gb, required=False,
                                   why="loader workers and DeepSpeed's shared-memory collectives"))
    checks.append(check_java())
    return checks


def verdict(checks: list[Check]) -> str:
    failed = [c for c in checks if c.status == "fail"]
    warned = [c for c in checks if c.status == "warn"]
    if failed:
        return f"not ready ({len(failed)} required check(s) failed: " \
               f"{', '.join(c.name for c in failed)})"
    return "ready" + (f" ({len(warned)} warning(s))" if warned else "")


def _cmd_doctor(args) -> int:
    from vlp.pipeline.data.errors import UserError

    if args.min_free_gb < 0 or args.min_shm_gb < 0:
        raise UserError("--min-free-gb and --min-shm-gb must be >= 0")
    path = Path(args.path)
    if not path.exists():
        raise UserError(f"--path {path}: no such folder")
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed logs to stdout on import
        checks = run_checks(path, args.min_free_gb, args.min_shm_gb)
    if args.json:
        print(json.dumps({"checks": [asdict(c) for c in checks], "verdict": verdict(checks)},
                         indent=1))
    else:
        width = max(len(c.name) for c in checks)
        for check in checks:
            label = {"ok": " ok ", "warn": "warn", "fail": "FAIL"}[check.status]
            print(f"[{label}] {check.name:<{width}}  {check.detail}")
        print(f"verdict: {verdict(checks)}")
    return 1 if any(c.status == "fail" for c in checks) else 0


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    p = add_command(subparsers, "doctor", "check this machine before a long job (exit 1 when "
                                          "something required is missing)",
                    ["vlp doctor --path /shared/runs"])
    p.add_argument("--path", default=".", help="where runs and shards will be written")
    p.add_argument("--min-free-gb", type=float, default=10.0,
                   help="free disk needed under --path")
    p.add_argument("--min-shm-gb", type=float, default=1.0,
                   help="free /dev/shm below which to warn")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(func=_cmd_doctor)
