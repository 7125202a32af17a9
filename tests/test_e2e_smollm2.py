# pytest tests/test_e2e_smollm2.py -q
"""One short end-to-end run per method on the real packaged SmolLM2-135M-Instruct, then `pmd eval` on final/."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("method", ["sdpo", "grpo", "pmd"])
def test_train_then_eval_real_model(tmp_path, method):
    run = tmp_path / method
    settings = ["steps=1", "problems_per_step=2", "group_size=4", "max_new_tokens=32", "eval_problems=4",
                "eval_samples=1", "threads=2", f"method={method}", f"output_dir={run}"]
    printed = subprocess.run([sys.executable, "-m", "pmd", "train", *settings], check=True, capture_output=True,
                             text=True)
    # a default run prints pmd's own lines and bars only: no library warning, no library progress bar
    for noise in ("Warning", "warn(", "Loading weights", "Writing model shards"):
        assert noise not in printed.stdout + printed.stderr, noise
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert {"train/loss", "train/reward_mean", "eval/accuracy"} <= rows[1].keys()
    assert (run / "final" / "model.safetensors").exists() and (run / "rollouts.jsonl").exists()
    if method == "pmd":  # the real embedder and the policy as reflector, on the real model
        assert rows[1]["memory/experience_entries"] > 0 and rows[1]["memory/reflect_calls"] > 0
        assert rows[1]["teacher/signal_fraction"] > 0 and (run / "reflections.jsonl").exists()

    out = subprocess.run([sys.executable, "-m", "pmd", "eval", str(run), "max_new_tokens=32", "threads=2"],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["n"] == 4 and 0.0 <= result["accuracy"] <= 1.0
