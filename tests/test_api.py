# pytest tests/test_api.py -q
"""pmd from Python: the same run as the CLI, an in-memory dataset with a Python reward that resumes after a kill,
memory read back, and the trackers (TensorBoard event files, W&B offline)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

import pmd
from pmd.config import ConfigError

KEYS = dict(model="tiny-random", steps=3, problems_per_step=2, group_size=4, max_new_tokens=10, eval_problems=4,
            eval_samples=1, eval_every=0, save_every=1, micro_batch_size=4, train_problems=10, threads=1,
            dtype="float32", learning_rate=1e-3, method="sdpo", teacher_feedback="verbatim")

# An in-memory dataset and a Python reward: a quarter of the random model's replies pass (by a hash of the text).
SCRIPT = """
import hashlib, json, sys
import pmd

def reward(prompts, completions, target, **kwargs):
    ok = [hashlib.sha256((c + t).encode()).digest()[0] % 4 == 0 for c, t in zip(completions, target)]
    return [1.0 if x else 0.0 for x in ok], ["" if x else "not this one" for x in ok]

rows = [{"prompt": f"Say something about {i}.", "target": str(i)} for i in range(int(sys.argv[2]))]
run = pmd.train(json.loads(sys.argv[1]), dataset=rows, reward=[(reward, 1.0)])
print(run.path)
"""


def python_run(keys: dict, n_rows: int = 12, wait: bool = True):
    cmd = [sys.executable, "-c", SCRIPT, json.dumps(keys), str(n_rows)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def values(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in pmd.TrainedRun(run).metrics]


def test_python_and_cli_give_the_same_run(tmp_path):
    cli = tmp_path / "cli"
    args = [f"{k}={v}" for k, v in {**KEYS, "output_dir": cli}.items()]
    subprocess.run([sys.executable, "-m", "pmd", "train", *args], check=True, capture_output=True)
    script = "import json, sys, pmd; pmd.train(json.loads(sys.argv[1]))"
    api = tmp_path / "api"
    subprocess.run([sys.executable, "-c", script, json.dumps({**KEYS, "output_dir": str(api)})], check=True,
                   capture_output=True)
    assert values(api) == values(cli) and len(values(api)) == 4
    wa, wb = load_file(api / "final" / "model.safetensors"), load_file(cli / "final" / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def test_an_in_memory_dataset_run_resumes_after_a_kill_and_refuses_other_data(tmp_path):
    keys = {**KEYS, "steps": 4, "output_dir": str(tmp_path / "reference")}
    done = python_run(keys)
    assert done.returncode == 0, done.stderr
    reference = Path(done.stdout.strip().splitlines()[-1])
    assert pmd.TrainedRun(reference).config.task == "python"

    out = tmp_path / "killed"
    proc = python_run({**keys, "output_dir": str(out)}, wait=False)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("step-000002")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = python_run({**keys, "output_dir": str(out)})
    assert again.returncode == 0, again.stderr
    assert values(out) == values(reference)
    wa, wb = load_file(reference / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)

    other = python_run({**keys, "output_dir": str(out), "steps": 5}, n_rows=13)  # one more row: other data
    assert other.returncode != 0 and "task_params" in other.stderr and "fingerprint" in other.stderr
    cli = subprocess.run([sys.executable, "-m", "pmd", "train", f"output_dir={out}", "steps=5"],
                         capture_output=True, text=True)
    assert cli.returncode != 0 and "given in Python" in cli.stderr


def test_memory_is_read_back_from_python(tmp_path):
    run = pmd.train({**KEYS, "method": "pmd", "embedder": "hashing", "steps": 2,
                     "output_dir": str(tmp_path / "run")})
    entries = run.memory()
    assert entries and {e["level"] for e in entries} >= {"experience"}
    assert run.memory(level="experience") == [e for e in entries if e["level"] == "experience"]
    assert pmd.read_memory(tmp_path / "nothing-here") == []
    assert run.metrics[0]["step"] == 0 and "eval/accuracy" in run.metrics[-1] and run.final.is_dir()


def test_bad_python_inputs_are_refused_clearly(tmp_path):
    with pytest.raises(ConfigError, match="reward= needs dataset="):
        pmd.train(KEYS, reward=lambda prompts, completions, **kw: [0.0] * len(completions))
    with pytest.raises(ConfigError, match="not callable"):
        pmd.train(KEYS, dataset=[{"prompt": "x"}], reward=["not a function"])
    with pytest.raises(ConfigError, match="non-empty list of dicts"):
        pmd.train(KEYS, dataset=[], reward=lambda *a, **k: [])


def test_tensorboard_scalars_match_the_metrics_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = pmd.train({**KEYS, "report_to": "tensorboard", "eval_every": 2, "output_dir": str(tmp_path / "run")})
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    rows = run.metrics
    for key in ("train/loss", "train/reward_mean", "teacher/signal_fraction", "eval/accuracy", "time/step"):
        logged = {e.step: e.value for e in events.Scalars(key)}
        expected = {r["step"]: float(r[key]) for r in rows if key in r}
        assert logged.keys() == expected.keys() and expected, key
        assert all(logged[s] == pytest.approx(v, rel=1e-6) for s, v in expected.items()), key


def test_wandb_offline_writes_a_run_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = pmd.train({**KEYS, "steps": 1, "report_to": "wandb", "output_dir": str(tmp_path / "run")})
    folders = list((run.path / "wandb").glob("offline-run-*"))
    assert len(folders) == 1 and list(folders[0].glob("*.wandb"))


def test_a_missing_tracker_names_the_pip_command(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(ValueError, match=r"pip install 'pmd\[trackio\]'"):
        pmd.train({**KEYS, "report_to": "trackio", "output_dir": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="report_to"):
        pmd.train({**KEYS, "report_to": "mlflow"})
