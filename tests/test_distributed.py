# pytest tests/test_distributed.py -q
"""Two CPU processes (DDP over gloo) on the tiny random model: one run folder written by the main process,
the memory in it only, resume with two processes, and two processes matching one process that trains on
the same global batch.

The runs are launched the way users launch them: `accelerate launch --multi_gpu --num_processes 2 -m pmd
train ...` (accelerate's multi-process launcher; without a GPU pmd runs on the CPU with gloo) and
`torchrun --nproc_per_node 2 -m pmd train ...`. Note that `accelerate launch --cpu` starts ONE process
unless MPI is set up, so it is not used here. Every test is skipped when two gloo processes cannot start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pmd
from pmd.config import Config, ConfigError, apply
from pmd.distributed import Processes, check_processes
from pmd.loop import train

TIMEOUT = 300  # seconds per launched run (a few seconds each on an idle machine)

PMD = dict(model="tiny-random", method="pmd", problems_per_step=4, group_size=2, max_new_tokens=12,
           eval_problems=4, eval_samples=2, eval_every=2, save_every=1, micro_batch_size=3, train_problems=20,
           threads=1, learning_rate=1e-3, distillation_topk=20, dtype="float32", embedder="hashing",
           reflector="policy", behavior_every=2, l3_min_sim=-1.0, eval_with_memory=True)

REWARD = '''def score(prompts, completions, **kwargs):
    """Share of digits and spaces: a random model gets varied rewards, so GRPO advantages are not zero."""
    return [sum(c in "0123456789 " for c in text) / max(1, len(text)) for text in completions]
'''


def _env() -> dict:
    """The test's own pmd first on the path, one thread per process, no GPU."""
    root = str(Path(pmd.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "PYTHONUNBUFFERED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), *args]


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(_free_port()), *args]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)


def pmd_train(launcher, **cfg) -> subprocess.CompletedProcess:
    return run(launcher("-m", "pmd", "train", *(f"{k}={v}" for k, v in cfg.items())))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Skip (with the reason) unless two CPU processes can form a gloo group here."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    probe = tmp_path_factory.mktemp("probe") / "probe.py"
    probe.write_text("import torch, torch.distributed as dist\n"
                     "dist.init_process_group('gloo')\n"
                     "t = torch.ones(1)\n"
                     "dist.all_reduce(t)\n"
                     "assert t.item() == dist.get_world_size() == 2\n"
                     "dist.destroy_process_group()\n")
    try:
        result = run(torchrun(str(probe)))
    except subprocess.TimeoutExpired:
        pytest.skip("two gloo processes did not start within the timeout")
    if result.returncode != 0:
        pytest.skip(f"cannot launch two gloo processes: {result.stderr.strip().splitlines()[-1:]}")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def memory_export(path: Path) -> list[dict]:
    r = subprocess.run([sys.executable, "-m", "pmd", "memory", "export", str(path)], env=_env(),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


# ------------------------------------------------------------------------------------------------ no launch
def test_problems_per_step_must_split_evenly_across_processes():
    cfg = apply(Config(), {"problems_per_step": 3, "group_size": 2})
    check_processes(cfg, 1)
    check_processes(cfg, 3)
    with pytest.raises(ConfigError, match="divisible by the number of processes"):
        check_processes(cfg, 2)
    with pytest.raises(ConfigError, match="optimizer_steps_per_batch"):
        check_processes(apply(cfg, {"optimizer_steps_per_batch": 4}), 3)


def test_shards_are_consecutive_and_cover_everything():
    procs = object.__new__(Processes)  # only rank and world matter to shard()
    for n, world in [(8, 2), (7, 3), (2, 4)]:
        shares = []
        for rank in range(world):
            procs.rank, procs.world = rank, world
            shares.append(list(procs.shard(n)))
        assert [i for share in shares for i in share] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


# ------------------------------------------------------------------------------------------------ launched
def test_pmd_with_two_processes_writes_one_run_folder_and_resumes(tmp_path, two_processes):
    """2 steps under accelerate launch, then the same folder with steps=4 under torchrun; compared with one
    process running all 4 steps: the same rollouts, reflections and memory, and the same losses and gradient
    norms up to float32 rounding (the gradient is summed in a different order)."""
    out = tmp_path / "two"
    first = ok(pmd_train(accelerate_launch, **PMD, steps=2, output_dir=out))
    printed = first.stdout + first.stderr
    assert printed.count("run folder:") == 1 and "2 processes" in printed  # only the main process prints
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    second = ok(pmd_train(torchrun, **PMD, steps=4, output_dir=out))
    assert "from step 2" in second.stdout + second.stderr

    # one run folder, written once: a row per step, a rollout per (problem, sample) from both processes
    metrics = rows(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [0, 1, 2, 3, 4]
    assert "eval/memory_accuracy" in metrics[4] and metrics[4]["memory/experience_entries"] > 0
    rollouts = rows(out / "rollouts.jsonl")
    B = PMD["problems_per_step"] * PMD["group_size"]
    for step in range(1, 5):
        ids = [r["id"] for r in rollouts if r["step"] == step]
        assert ids == [f"{step}-{i}" for i in range(B)]  # rows B/2.. were sampled by the second process
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.sqlite")) == [
        "checkpoints/step-000003/memory.sqlite", "checkpoints/step-000004/memory.sqlite", "memory.sqlite"]
    last = out / "checkpoints" / "step-000004"
    assert (last / "rng_rank0.pt").exists() and (last / "rng_rank1.pt").exists()
    assert json.loads((last / "state.json").read_text())["step"] == 4
    assert (out / "final" / "model.safetensors").exists() and (out / "summary.json").exists()

    # the same run with one process
    one = train(apply(Config(), {**PMD, "steps": 4, "output_dir": str(tmp_path / "one")}))
    assert rows(one / "rollouts.jsonl") == rollouts
    assert rows(one / "reflections.jsonl") == rows(out / "reflections.jsonl")
    assert memory_export(one) == memory_export(out)
    for a, b in zip(rows(one / "metrics.jsonl"), metrics):
        assert {k: v for k, v in a.items() if k.startswith(("memory/", "eval/", "train/reward"))} == \
               {k: v for k, v in b.items() if k.startswith(("memory/", "eval/", "train/reward"))}
        if "train/loss" in a:  # a divergence of ~1e-5 between near-equal distributions: float32 noise is ~1e-8
            assert b["train/loss"] == pytest.approx(a["train/loss"], abs=1e-7)
            assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-4)


@pytest.mark.parametrize("method,finetune", [("sdpo", "lora"), ("grpo", "full")])
def test_two_processes_match_one_process_on_the_first_step(tmp_path, two_processes, method, finetune):
    """Same seed and global batch (4 problems x 4 samples; 2 problems per process): the same rollouts, and
    the same loss, gradient norm and updated weights up to float32 rounding. A custom reward gives varied
    rewards, so GRPO advantages and SDPO demonstrations are both present."""
    (tmp_path / "reward.py").write_text(REWARD)
    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"Write digits, case {i}."}) + "\n"
                                                 for i in range(40)))
    cfg = dict(model="tiny-random", method=method, finetune=finetune, dtype="float32", steps=1,
               problems_per_step=4, group_size=4, max_new_tokens=12, micro_batch_size=3, eval_problems=0,
               threads=1, learning_rate=1e-3, distillation_topk=20, success_threshold=0.2,
               grpo_weight=0.5 if method == "sdpo" else 0.0, task=str(tmp_path / "data.jsonl"),
               task_params={"reward_fn": f"{tmp_path / 'reward.py'}:score"})
    launched = {**cfg, "task_params": json.dumps(cfg["task_params"]), "output_dir": tmp_path / "two"}
    ok(pmd_train(accelerate_launch, **launched))
    one = train(apply(Config(), {**cfg, "output_dir": str(tmp_path / "one")}))
    two = tmp_path / "two"

    # the tiny tokenizer is one token per character, so equal texts (and lengths) are equal token ids
    assert rows(one / "rollouts.jsonl") == rows(two / "rollouts.jsonl")
    (a,), (b,) = rows(one / "metrics.jsonl"), rows(two / "metrics.jsonl")
    for key in ("train/reward_mean", "train/reward_std", "train/completion_length_mean", "train/completion_clipped_fraction",
                "train/success_sample_fraction", "teacher/signal_fraction", "teacher/demonstration_fraction"):
        assert a.get(key) == b.get(key), key
    assert a["train/grad_norm"] > 0
    for key in ("train/loss", "train/grad_norm", "train/grpo_loss", "train/distill_loss", "teacher/divergence"):
        if key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-8), key
    if method == "sdpo":
        assert 0 < a["teacher/demonstration_fraction"] < 1
    # AdamW's first step moves a weight by about lr * g / (|g| + eps): where g is tiny, rounding in g moves it
    # by a little more than rtol alone allows, so the tolerance includes 1% of the learning rate
    wa, wb = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], rtol=1e-4, atol=1e-2 * cfg["learning_rate"]), name


def test_a_batch_that_does_not_split_evenly_is_a_config_error(tmp_path, two_processes):
    result = pmd_train(torchrun, model="tiny-random", problems_per_step=3, steps=1, threads=1,
                       output_dir=tmp_path / "odd")
    assert result.returncode != 0
    assert "problems_per_step=3 must be divisible by the number of processes (2)" in result.stderr
    assert not (tmp_path / "odd" / "config.yaml").exists()
