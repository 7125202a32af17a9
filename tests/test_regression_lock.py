# pytest tests/test_regression_lock.py -q
"""A change of structure changes no result: the working tree reproduces REFERENCE_COMMIT bit for bit.

For every configuration of tests/regression_lock.py (grpo, sdpo, pmd, and the frozen-policy and frozen-memory
arms, on the tiny random model), the run of REFERENCE_COMMIT (extracted from git) and the run of this tree give
identical metrics values (old metric names read through `pmd.metrics.upgrade`; metrics added since may appear
beside them), identical rollout rows (new fields may appear beside them) and a bit-identical final model. REFERENCE_COMMIT is the last commit before the loop was redesigned into
train.py / update.py / teacher.py / memory/ / tasks/ / experiments/.

When a later change alters these results on purpose, it gives the keys that restore the old behaviour in
`TODAY_KEYS` (passed to this tree only); a change that cannot is a change of results, and says so in its commit.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pmd.metrics import upgrade
from regression_lock import METHODS, fingerprint

REFERENCE_COMMIT = "67e95c6ffb28e13de48e3b0c1b600c701af870ad"
REPO = Path(__file__).resolve().parent.parent
# keys that make today's code behave as REFERENCE_COMMIT did (their defaults changed since)
TODAY_KEYS: dict = {"teacher_feedback": "verbatim", "demonstration_form": "inline", "objective": "distill",
                    "temperature": 1.0, "reflect_per_step": 0, "distill_unranked": 0.0, "related_examples": 0,
                    "generation_batch_size": 32, "store_cut_passes": True}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference_tree(tmp_path_factory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    found = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{REFERENCE_COMMIT}^{{commit}}"],
                           capture_output=True)
    if found.returncode != 0:
        pytest.skip(f"commit {REFERENCE_COMMIT[:7]} is not in this clone (shallow?): `git fetch --unshallow`")
    tree = tmp_path_factory.mktemp("reference")
    archive = subprocess.run(["git", "-C", str(REPO), "archive", REFERENCE_COMMIT, "pmd"], capture_output=True,
                             check=True)
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    return tree


@pytest.mark.parametrize("method", list(METHODS))
def test_the_tree_reproduces_the_reference_commit(method, reference_tree, tmp_path):
    (tmp_path / "before").mkdir()
    (tmp_path / "after").mkdir()
    before = fingerprint(reference_tree, method, tmp_path / "before")
    after = fingerprint(REPO, method, tmp_path / "after", extra=TODAY_KEYS)
    # every value the reference logged, reproduced (metrics added since may appear next to them)
    reference = [upgrade(r) for r in before["metrics"]]
    assert [{k: upgrade(r).get(k) for k in ref} for r, ref in zip(after["metrics"], reference)] == reference
    assert len(after["metrics"]) == len(reference)
    # every rollout field the reference wrote, identical (fields added since may appear beside them)
    assert [{k: r.get(k) for k in ref} for r, ref in zip(after["rollouts"], before["rollouts"])] == before["rollouts"]
    assert len(after["rollouts"]) == len(before["rollouts"])
    assert after["weights"] == before["weights"]
