"""`vlp scripts list|show|copy`: the launch scripts (SLURM, multi-node, cron, shard preparation)
that ship inside the package as `vlp.launch_scripts`, for an install without the checkout.

A few scripts run from the checkout's root (install, tests, quickstart); `list` marks them.
"""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from vlp.pipeline.data.errors import UserError

PACKAGE = "vlp.launch_scripts"
SUFFIXES = (".sh", ".sbatch")
CHECKOUT_ONLY = 'cd "$(dirname "$0")/.."'  # the line of a script that runs from the checkout


def shipped_scripts() -> dict:
    """Script name -> its file (an importlib.resources Traversable), sorted by name."""
    files = [f for f in resources.files(PACKAGE).iterdir() if f.name.endswith(SUFFIXES)]
    return {f.name: f for f in sorted(files, key=lambda f: f.name)}


def summary(text: str) -> str:
    """A script's first comment line after the shebang; '' when it has none."""
    for line in text.splitlines()[1:]:
        if line.startswith("#") and line.strip("# "):
            return line.lstrip("# ").rstrip()
    return ""


def _script(name: str):
    scripts = shipped_scripts()
    if name not in scripts:
        raise UserError(f"no launch script {name!r}; shipped: {', '.join(scripts)}")
    return scripts[name]


def _cmd_list(args) -> int:
    scripts = shipped_scripts()
    width = max(map(len, scripts))
    for name, file in scripts.items():
        text = file.read_text()
        where = " (runs from a checkout)" if CHECKOUT_ONLY in text else ""
        print(f"{name:<{width}}  {summary(text)}{where}")
    return 0


def _cmd_show(args) -> int:
    print(_script(args.name).read_text(), end="")
    return 0


def _cmd_copy(args) -> int:
    """Copy the scripts (all, or those named) into DEST, executable; a different file already
    there is kept unless --force."""
    chosen = {name: _script(name) for name in args.names} if args.names else shipped_scripts()
    dest = Path(args.dest)
    if dest.exists() and not dest.is_dir():
        raise UserError(f"{dest} is not a folder")
    clashes = [name for name, file in chosen.items() if (dest / name).is_file()
               and (dest / name).read_bytes() != file.read_bytes()]
    if clashes and not args.force:
        raise UserError(f"{dest} already holds other versions of {', '.join(clashes)}; "
                        "--force replaces them")
    dest.mkdir(parents=True, exist_ok=True)
    for name, file in chosen.items():
        with resources.as_file(file) as source:
            shutil.copyfile(source, dest / name)
        (dest / name).chmod(0o755)
    print(f"copied {len(chosen)} launch script(s) to {dest}")
    return 0


def register(subparsers) -> None:
    from vlp.pipeline.cli_help import add_command

    scripts = subparsers.add_parser("scripts", help="the shipped launch scripts: list, show, copy")
    commands = scripts.add_subparsers(dest="scripts_command", required=True)
    p = add_command(commands, "list", "list the launch scripts with what each does",
                    ["vlp scripts list"])
    p.set_defaults(func=_cmd_list)
    p = add_command(commands, "show", "print a launch script",
                    ["vlp scripts show train_slurm.sbatch"])
    p.add_argument("name", metavar="NAME", help="a script's file name, as `list` prints it")
    p.set_defaults(func=_cmd_show)
    p = add_command(commands, "copy", "copy launch scripts into a folder, executable",
                    ["vlp scripts copy jobs", "vlp scripts copy jobs train_slurm.sbatch"])
    p.add_argument("dest", metavar="DEST", help="folder to copy into (created if missing)")
    p.add_argument("names", metavar="NAME", nargs="*", default=[],
                   help="scripts to copy (default: all)")
    p.add_argument("--force", action="store_true",
                   help="replace a different file of the same name in DEST")
    p.set_defaults(func=_cmd_copy)
