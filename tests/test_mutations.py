"""The tests that guard the core invariants fail when the invariant is broken.

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
    Mutation("MLM inputs keep their answers (no [MASK])", "pipeline/data/transforms.py",
             "masked[chosen & (action < 0.8)] = spec.mask_token_id",
             "masked[chosen & (action < 0.0)] = spec.mask_token_id",
             ("tests/test_data_transforms.py::test_mlm_masking_rates_and_targets",)),
    Mutation("special tokens become MLM targets", "pipeline/data/transforms.py",
             "candidates &= ids != special", "pass",
             ("tests/test_data_transforms.py::test_mlm_masking_rates_and_targets",)),
    Mutation("ITM negatives ignore the similarities", "models/losses.py",
             "sim = sim.float()\n", "sim = torch.zeros_like(sim.float())\n",
             ("tests/test_losses.py::test_hard_negatives_prefer_similar_pairs",)),
    Mutation("negative images paired by the wrong index", "models/model.py",
             "index += [own, neg_image]", "index += [own, neg_image.roll(1)]",
             ("tests/test_losses.py::test_itm_pairs_and_labels_are_wired_as_documented",)),
    Mutation("re-ranking by P(no match)", "pipeline/eval/retrieval/job.py",
             "return (logits[:, 1] - logits[:, 0]).cpu()",
             "return (logits[:, 0] - logits[:, 1]).cpu()",
             ("tests/test_eval_jobs.py::test_the_itm_scorer_gives_each_pairs_match_log_odds",),
             fixtures=True),
    Mutation("captions shifted to the next image", "pipeline/eval/retrieval/data.py",
             "text_to_image.extend([index] * len(entry.sentences))",
             "text_to_image.extend([(index + 1) % len(entries)] * len(entry.sentences))",
             ("tests/test_eval_jobs.py::test_each_caption_points_at_its_own_image",),
             fixtures=True),
    Mutation("VQA loss on 1 - targets", "models/losses.py",
             "logits.float(), targets.float(), reduction",
             "logits.float(), 1 - targets.float(), reduction",
             ("tests/test_losses.py::test_vqa_loss_is_bce_summed_over_answers",)),
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
    done = subprocess.run([sys.executable, "-c", "import vlp.pipeline.data.transforms as t; "
                           "print(t.__file__)"], env={**os.environ, "PYTHONPATH": str(root)},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == str(root / "vlp/pipeline/data/transforms.py"), done.stderr


def test_the_guarding_tests_pass_on_the_unmutated_code(tmp_path):
    tests = tuple(dict.fromkeys(test for m in MUTATIONS for test in m.tests))
    done = run_tests(package_copy(tmp_path, None), tests)
    assert done.returncode == 0, done.stdout[-3000:]


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_breakage_fails_its_guarding_test(mutation, tmp_path):
    done = run_tests(package_copy(tmp_path, mutation), mutation.tests, mutation.fixtures)
    assert done.returncode == 1, f"{mutation.name} passed:\n{done.stdout[-3000:]}"
