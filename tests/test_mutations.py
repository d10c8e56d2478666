"""The tests that guard the model's interop files fail when those files are broken.

The core modules are mutation-tested by mutmut (`launch_scripts/mutation.sh`, docs/testing.md).
The two files here are outside its reach: the pretrained-weight mapping is not a core module, and
the transformers export's modelling file runs from the export's folder, where no mutant is active.
Each mutation below is a breakage that once passed every test. It is applied to a copy of the
package (a link tree under tmp_path with the one mutated file copied), and the tests named beside
it run against that copy in a subprocess: they must fail. A control run of the same tests on an
unmutated copy must pass, so a failure means the mutation was caught, not that the copy is
broken. When a guarding test stops guarding, this test says which breakage now passes.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pipeline", "data_prep", "ds_configs")  # vlp.<name> -> REPO/<name>


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository
    old: str
    new: str
    tests: tuple[str, ...]
    fixtures: bool = False  # the tests need conftest.py's fixtures (else it is not imported)


MUTATIONS = [
    Mutation("pretrained q, k, v fused in another order", "models/hf_init.py",
             'for n in ("query", "key", "value")', 'for n in ("key", "query", "value")',
             ("tests/test_hf_interop.py::test_a_vit_initialised_image_tower_computes_what_the_"
              "vit_computes",)),
    Mutation("the transformers export runs images through the text expert",
             "models/hf_remote/modeling_vlp.py", "(self.ffn_v if image else self.ffn_l)",
             "(self.ffn_l if image else self.ffn_v)",
             ("tests/test_hf_interop.py::test_transformers_automodel_loads_the_export_and_gives_"
              "vlps_embeddings",)),
]


def package_copy(root: Path, mutation: Mutation | None) -> Path:
    """A `vlp` link tree under `root`; with a mutation, its file is a mutated copy."""
    tree = root / "vlp"
    tree.mkdir(parents=True)
    for name in PACKAGES:
        (tree / name).symlink_to(REPO / name)
    if mutation is None:
        return root
    top, rest = mutation.path.split("/", 1)
    (tree / top).unlink()
    shutil.copytree(REPO / top, tree / top, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    target = tree / top / rest
    text = target.read_text()
    assert text.count(mutation.old) == 1, f"{mutation.name}: the code to break moved"
    target.write_text(text.replace(mutation.old, mutation.new))
    return root


def run_tests(root: Path, tests: tuple[str, ...], fixtures: bool = True
              ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    options = [] if fixtures else ["--noconftest"]  # conftest's imports take seconds
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           *options, *tests], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def test_the_copies_import_from_the_link_tree(tmp_path):
    root = package_copy(tmp_path, MUTATIONS[0])
    done = subprocess.run([sys.executable, "-c", "import vlp.models.hf_init as t; "
                           "print(t.__file__)"], env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == str(root / "vlp/models/hf_init.py"), done.stderr


def test_the_guarding_tests_pass_on_the_unmutated_code(tmp_path):
    tests = tuple(dict.fromkeys(test for m in MUTATIONS for test in m.tests))
    done = run_tests(package_copy(tmp_path, None), tests, any(m.fixtures for m in MUTATIONS))
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_breakage_fails_its_guarding_test(mutation, tmp_path):
    done = run_tests(package_copy(tmp_path, mutation), mutation.tests, mutation.fixtures)
    assert done.returncode == 1, f"{mutation.name} passed:\n{done.stdout[-3000:]}"
