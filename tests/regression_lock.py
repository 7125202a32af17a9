"""Fingerprints of tiny-model runs, to show that a change of structure changed no result.

`fingerprint(source, method, folder)` runs `pmd train` from the source tree `source` (a checkout of any commit)
in a fresh process and returns what the run produced: every metrics value except timings, every rollout row,
and the sha256 of every tensor of the final model. tests/test_regression_lock.py compares the fingerprint of
the working tree with that of REFERENCE_COMMIT.

    python tests/regression_lock.py SOURCE_DIR METHOD     # prints one fingerprint as JSON
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).parent / "data"

# Small enough for seconds per run, big enough that every path runs: demonstrations and feedback (about half
# of the random model's replies pass, see data/parity_reward.py), revisited problems (8 problems, 2 per step),
# reflections, one consolidation, two evaluations, checkpoints.
BASE = dict(model="tiny-random", steps=4, problems_per_step=2, group_size=4, max_new_tokens=12,
            train_problems=4, eval_problems=4, eval_samples=2, eval_every=2, save_every=2,
            micro_batch_size=4, threads=1, learning_rate=1e-3, distillation_topk=20, dtype="float32",
            task=str(DATA / "parity_prompts.jsonl"),
            task_params={"reward_fn": f"{DATA / 'parity_reward.py'}:reward"})
METHODS = {
    "grpo": dict(method="grpo"),
    "sdpo": dict(method="sdpo"),
    "pmd": dict(method="pmd", embedder="hashing", behavior_every=2, l3_min_problems=2,
                l3_cluster_similarity=0.2),
    # the in-context baseline (memory in the sampling prompt, no update) and a memory frozen after step 2,
    # with each rollout's own feedback
    "pmd-frozen-policy": dict(method="pmd", embedder="hashing", freeze="policy"),
    "pmd-frozen-memory": dict(method="pmd", embedder="hashing", freeze="memory", freeze_memory_after=2,
                              feedback_source="own"),
}

_RUN = """
import json, sys
from pmd import config
cfg = config.apply(config.Config(), json.loads(sys.argv[1]))
try:
    from pmd.loop import train  # the loop module since the public pmd.train(...) of pmd/api.py
except ImportError:
    from pmd.train import train
train(cfg)
"""


def fingerprint(source: str | Path, method: str, folder: str | Path, extra: dict | None = None) -> dict:
    """Run `method` from the source tree `source` into `folder`; its metrics, rollouts and final weights."""
    folder = Path(folder)
    keys = {**BASE, **METHODS[method], **(extra or {}), "output_dir": str(folder / "run")}
    env = {**os.environ, "PYTHONPATH": str(source), "PYTHONHASHSEED": "0"}
    subprocess.run([sys.executable, "-c", _RUN, json.dumps(keys)], cwd=folder, env=env, check=True,
                   capture_output=True, text=True)
    run = folder / "run"
    metrics = [{k: v for k, v in row.items() if not k.startswith("time/")}
               for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    rollouts = [json.loads(line) for line in (run / "rollouts.jsonl").read_text().splitlines()]
    from safetensors import safe_open

    weights = {}
    with safe_open(run / "final" / "model.safetensors", framework="pt") as f:
        for name in sorted(f.keys()):
            weights[name] = hashlib.sha256(f.get_tensor(name).numpy().tobytes()).hexdigest()
    return {"metrics": metrics, "rollouts": rollouts, "weights": weights}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(fingerprint(sys.argv[1], sys.argv[2], tmp), indent=1))
