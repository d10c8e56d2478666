"""The workspace a mutmut run happens in: build/mutation, the package laid out as src/vlp/.

mutmut names a mutant after its file's path and the tests import the package as `vlp.*`, so the
package's folders are copied to src/vlp/ (mutmut strips the `src.` prefix), which puts
`vlp.models.losses` in src/vlp/models/losses.py. The repository files tests read by path (docs,
README, configs, the folders themselves) are copied beside it. Copies keep their modification
times, so mutmut's results in build/mutation/mutants stay valid for unchanged functions.
"""
from __future__ import annotations

import os
import shutil
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# One run at a time per workspace; MUTATION_WORKSPACE gives a parallel run its own.
WORKSPACE = Path(os.environ.get("MUTATION_WORKSPACE", REPO / "build" / "mutation")).resolve()
MODULES_FILE = REPO / "tests" / "mutation" / "modules.toml"
PACKAGE_DIRS = ("models", "pipeline", "data_prep", "ds_configs", "launch_scripts")
REPO_FILES = ("tests", "docs", "README.md", "setup.cfg") + PACKAGE_DIRS
# Tests that cannot see a mutant (they run the code in subprocesses) or need a GPU stay out.
PYTEST_ARGS = ["-m", "not slow and not gpu", "-p", "no:cacheprovider", "-q"]


def core_modules() -> dict[str, list[str]]:
    """modules.toml: each core module's path in the repository -> the test files guarding it."""
    with open(MODULES_FILE, "rb") as f:
        return tomllib.load(f)["modules"]


def _copy(source: Path, target: Path) -> None:
    if target.is_dir():
        shutil.rmtree(target)
    elif target.exists():
        target.unlink()
    if source.is_dir():
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        shutil.copy2(source, target)


def _toml_list(values) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def stage(modules: list[str]) -> Path:
    """Copy the package and the repository files into the workspace and configure mutmut to
    mutate `modules` (repository paths) against the test files that guard them."""
    guards = core_modules()
    unknown = [m for m in modules if m not in guards]
    if unknown:
        raise SystemExit(f"not a core module in {MODULES_FILE.name}: {', '.join(unknown)}")
    package = WORKSPACE / "src" / "vlp"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").touch()
    for name in PACKAGE_DIRS:
        _copy(REPO / name, package / name)
    for name in REPO_FILES:
        _copy(REPO / name, WORKSPACE / name)
    for module in modules:
        # An earlier run of other modules left this one copied unmutated, with the source's
        # modification time, which mutmut takes for "already mutated": remove the copy.
        copy = WORKSPACE / "mutants" / "src" / "vlp" / module
        if copy.exists() and not copy.with_name(copy.name + ".meta").exists():
            copy.unlink()
    tests = sorted({t for m in modules for t in guards[m]})
    (WORKSPACE / "pyproject.toml").write_text(
        "# Written by tests/mutation/workspace.py; edit tests/mutation/modules.toml instead.\n"
        "[tool.mutmut]\n"
        'source_paths = ["src/vlp"]\n'
        f"only_mutate = {_toml_list('src/vlp/' + m for m in modules)}\n"
        f"pytest_add_cli_args = {_toml_list(PYTEST_ARGS)}\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
        f"also_copy = {_toml_list(REPO_FILES)}\n"
        # torch is not fork-safe once a test has run: fork each mutant from a clean server.
        'process_isolation = "forkserver"\n')
    return WORKSPACE
