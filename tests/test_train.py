# pytest tests/test_train.py -q
"""The whole loop on a tiny randomly initialised model (built offline): run folder, methods, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pmd.config import Config, ConfigError, apply
from pmd.loop import Run, save_final, setup, train, train_step

# A random model never answers right: its teacher's only context is the verifier's feedback, shown verbatim.
TINY = dict(model="tiny-random", steps=4, problems_per_step=2, group_size=4, max_new_tokens=12,
            eval_problems=4, eval_samples=2, eval_every=2, save_every=1, micro_batch_size=4,
            train_problems=20, threads=1, learning_rate=1e-3, distillation_topk=20, teacher_feedback="verbatim")


def tiny(tmp_path: Path, **kw) -> Config:
    return apply(Config(), {**TINY, "output_dir": str(tmp_path / "run"), **kw})


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sdpo", "grpo"])
def test_loop_writes_complete_run_folder(tmp_path, method):
    run = train(tiny(tmp_path, method=method))
    for name in ["config.yaml", "metrics.jsonl", "rollouts.jsonl", "summary.json", "final/config.json",
                 "final/model.safetensors", "final/tokenizer.json", "report.html"]:
        assert (run / name).exists(), name
    rows = metrics(run)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert "eval/accuracy" in rows[0] and "eval/accuracy" in rows[2] and "eval/accuracy" in rows[4]
    for r in rows[1:]:
        assert {"train/loss", "train/reward_mean", "train/grad_norm", "time/generate", "time/step"} <= r.keys()
        if method == "sdpo":
            assert 0 <= r["teacher/signal_fraction"] <= 1
    rollouts = [json.loads(x) for x in (run / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4 * 2 * 4 and {"completion", "reward", "feedback"} <= rollouts[0].keys()
    # final/ is a plain transformers folder
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert sum(p.numel() for p in model.parameters()) > 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000004"]


def test_training_changes_trainable_parameters(tmp_path):
    # random rewards are all zero on a random model, so GRPO has no signal; SDPO with feedback always has one
    run = setup(tiny(tmp_path, method="sdpo"))
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    row, _ = train_step(run, 1)
    assert row["teacher/signal_fraction"] > 0 and row["train/grad_norm"] > 0
    changed = [n for n, p in run.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    # LoRA B starts at zero, so A gets no gradient on the first step; every B must move
    assert changed and all(n in changed for n in before if "lora_B" in n)


def _first_step_gradient(run: Run) -> tuple[torch.Tensor, dict, list[dict]]:
    """The accumulated gradient of step 1 (weights kept), with the step's metrics row and rollout rows."""
    run.learner.optimizer.step = lambda: None  # keep weights: compare the accumulated gradient only
    captured = {}
    orig = torch.nn.utils.clip_grad_norm_

    def capture(params, max_norm):
        params = list(params)
        captured["g"] = torch.cat([p.grad.flatten() for p in params if p.grad is not None])
        return orig(params, max_norm)

    torch.nn.utils.clip_grad_norm_ = capture
    try:
        row, rollouts = train_step(run, 1)
    finally:
        torch.nn.utils.clip_grad_norm_ = orig
    return captured["g"], row, rollouts


def test_micro_batching_does_not_change_the_gradient(tmp_path):
    grads = []
    for micro in (8, 3):
        run = setup(tiny(tmp_path, micro_batch_size=micro, dtype="float32", max_grad_norm=0.0))
        torch.manual_seed(0)
        grads.append(_first_step_gradient(run)[0])
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_prefix_shared_teacher_gives_the_same_gradient(tmp_path, monkeypatch):
    """Teacher forward with each distinct teacher prompt encoded once == the packed forward (float32)."""
    import pmd.prefix

    encoded = []
    real_encode = pmd.prefix.encode_prefix
    monkeypatch.setattr(pmd.prefix, "encode_prefix", lambda f, ids, *a: encoded.append(len(ids)) or real_encode(f, ids, *a))
    out = {}
    for sharing in (False, True):
        run = setup(tiny(tmp_path, method="sdpo", dtype="float32", max_grad_norm=0.0, group_size=6,
                               teacher_prefix_sharing=sharing))
        grad, row, rollouts = _first_step_gradient(run)
        out[sharing] = (grad, row, [r["completion"] for r in rollouts])
    assert out[True][2] == out[False][2]  # same rollouts: the comparison is of the teacher forward alone
    assert 0 < len(encoded) < 2 * 6 * out[True][1]["teacher/signal_fraction"]  # prompts were shared
    assert torch.allclose(out[True][0], out[False][0], atol=1e-6, rtol=1e-4)
    for key in ("train/loss", "teacher/divergence", "teacher/prefers_pass"):
        if key in out[False][1]:
            assert out[True][1][key] == pytest.approx(out[False][1][key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("method", ["grpo", "sdpo"])
def test_prefix_shared_student_gives_the_same_gradient(tmp_path, monkeypatch, method):
    """Student forward with each problem's prompt encoded once per micro-batch == the packed forward (float32):
    the gradient flows through the shared keys/values into the prompt's computation."""
    import pmd.prefix

    encoded = []
    real_encode = pmd.prefix.encode_prefix
    monkeypatch.setattr(pmd.prefix, "encode_prefix",
                        lambda f, ids, *a: encoded.append(len(ids)) or real_encode(f, ids, *a))
    # varied rewards (share of digits), so GRPO advantages are not all zero
    (tmp_path / "reward.py").write_text(
        "def score(prompts, completions, **kw):\n"
        "    return [sum(c.isdigit() for c in t) / max(1, len(t)) for t in completions]\n")
    (tmp_path / "data.jsonl").write_text("".join(f'{{"prompt": "Write digits, case {i}."}}\n' for i in range(20)))
    out = {}
    for sharing in (False, True):
        encoded.clear()
        # micro-batch 4 < group 6: a problem's rows span micro-batches, and some micro-batches mix problems
        run = setup(tiny(tmp_path, method=method, dtype="float32", max_grad_norm=0.0, group_size=6,
                               micro_batch_size=4, teacher_prefix_sharing=False, student_prefix_sharing=sharing,
                               task=str(tmp_path / "data.jsonl"), success_threshold=0.2,
                               task_params={"reward_fn": f"{tmp_path / 'reward.py'}:score"}))
        grad, row, rollouts = _first_step_gradient(run)
        out[sharing] = (grad, row, [r["completion"] for r in rollouts], len(encoded))
    assert out[True][2] == out[False][2]
    assert out[False][3] == 0 < out[True][3] < len(out[True][2])  # fewer prompt encodes than rows
    assert out[True][0].abs().max() > 0
    assert torch.allclose(out[True][0], out[False][0], atol=1e-6, rtol=1e-4)
    assert out[True][1]["train/loss"] == pytest.approx(out[False][1]["train/loss"], rel=1e-4, abs=1e-6)


def _final_weights(run: Path) -> dict:
    return load_file(run / "final" / "model.safetensors")


def test_resume_continues_exactly(tmp_path):
    full = train(tiny(tmp_path / "a"))
    # the same run in two sessions: stop after step 2, then ask for 4 steps on the same folder
    part = tiny(tmp_path / "b", steps=2)
    train(part)
    resumed = train(apply(part, {"steps": 4}), explicit_keys={"steps"})
    a, b = metrics(full), metrics(resumed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra.get("train/loss") == rb.get("train/loss") and ra.get("train/reward_mean") == rb.get("train/reward_mean")
    wa, wb = _final_weights(full), _final_weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_and_resume(tmp_path):
    """SIGKILL a training process mid-run, rerun the same command: the run finishes as if never killed."""
    reference = train(tiny(tmp_path / "ref", steps=5, eval_every=0))
    out = tmp_path / "killed"
    args = [f"{k}={v}" for k, v in {**TINY, "steps": 5, "eval_every": 0, "output_dir": out}.items()]
    cmd = [sys.executable, "-m", "pmd", "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "checkpoints").glob("step-000002")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = metrics(reference), metrics(out)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5]
    assert [r.get("train/loss") for r in a] == [r.get("train/loss") for r in b]
    wa, wb = _final_weights(reference), _final_weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_a_different_config(tmp_path):
    cfg = tiny(tmp_path, steps=1, eval_problems=0)
    train(cfg)
    with pytest.raises(ConfigError, match="learning_rate"):
        train(apply(cfg, {"learning_rate": 1.0}), explicit_keys={"learning_rate"})


def test_off_policy_minibatches_run(tmp_path):
    run = train(tiny(tmp_path, steps=1, eval_problems=0, optimizer_steps_per_batch=2, grpo_weight=0.5))
    assert metrics(run)[-1]["step"] == 1


def test_cli_errors_name_the_key(tmp_path):
    def pmd(*args):
        return subprocess.run([sys.executable, "-m", "pmd", *args], capture_output=True, text=True)

    r = pmd("train", "stpes=3")
    assert r.returncode != 0 and "stpes" in r.stderr and "steps" in r.stderr
    r = pmd("train", "method=ppo")
    assert r.returncode != 0 and "grpo" in r.stderr and "sdpo" in r.stderr
    r = pmd("train", "model=smollm2-135m", f"output_dir={tmp_path / 'x'}")
    assert r.returncode != 0 and "smollm2-135m-instruct" in r.stderr
    r = pmd("eval", "tiny-random", "learning_rate=1")
    assert r.returncode != 0 and "learning_rate" in r.stderr


def test_eval_prints_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pmd", "eval", "tiny-random", "eval_problems=3", "eval_samples=2",
                        "max_new_tokens=8", "threads=1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["n"] == 3 and 0 <= result["accuracy"] <= 1 and "accuracy_greedy" in result


def test_final_model_equals_the_policy_that_was_evaluated(tmp_path):
    """final/ loaded in the run's dtype has exactly the weights the sampling copy had (LoRA merged in fp32,
    rounded once)."""
    from pmd.models import load_model_and_tokenizer

    run = setup(tiny(tmp_path, learning_rate=1e-2))
    train_step(run, 1)
    train_step(run, 2)
    sampled = {n: p.detach().clone() for n, p in run.sampler.model.named_parameters()}
    save_final(run, tmp_path / "final")
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "final"), dtype=getattr(torch, run.dtype))
    for n, p in loaded.named_parameters():
        assert torch.equal(p, sampled[n]), n


@pytest.mark.parametrize("objective", ["route", "signed"])
def test_reward_anchored_objectives_train_and_diagnose(tmp_path, objective):
    (tmp_path / "reward.py").write_text(
        "import hashlib\n"
        "def score(prompts, completions, **kw):\n"
        "    return [1.0 if hashlib.sha256(c.encode()).digest()[0] % 3 == 0 else 0.0 for c in completions]\n")
    (tmp_path / "data.jsonl").write_text("".join(f'{{"prompt": "Say {i}."}}\n' for i in range(20)))
    run = setup(tiny(tmp_path, method="sdpo", objective=objective, group_size=6, task=str(tmp_path / "data.jsonl"),
                     task_params={"reward_fn": f"{tmp_path / 'reward.py'}:score"}, distill_warmup_steps=1,
                     distill_unranked=0.0))  # the objective alone (the unranked term: the next test)
    first, _ = train_step(run, 1)  # the warm-up: GRPO alone, no teacher forward
    assert "time/teacher_forward" not in first and "teacher/divergence" not in first
    before = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    row, _ = train_step(run, 2)
    assert row["teacher/signal_fraction"] > 0 and row["time/teacher_forward"] > 0
    assert "train/grpo_loss" in row and ("train/distill_loss" in row) == (objective == "route")
    assert row["train/grad_norm"] > 0 and "teacher/eos_lift" in row
    assert any(not torch.equal(p, before[n]) for n, p in run.model.named_parameters() if p.requires_grad)


def test_signed_credit_distils_the_groups_the_reward_cannot_rank(tmp_path):
    """distill_unranked: the prompts with an even number always pass (their groups have advantage 0 and a
    sibling demonstration), the others pass at random; the loss is signed GRPO plus the weighted distillation."""
    (tmp_path / "reward.py").write_text(
        "import hashlib, re\n"
        "def score(prompts, completions, **kw):\n"
        "    even = [int(re.search(r'Say (\\d+)', str(p)).group(1)) % 2 == 0 for p in prompts]\n"
        "    return [1.0 if e or hashlib.sha256(c.encode()).digest()[0] % 3 == 0 else 0.0\n"
        "            for e, c in zip(even, completions)]\n")
    (tmp_path / "data.jsonl").write_text("".join(f'{{"prompt": "Say {i}."}}\n' for i in range(20)))
    run = setup(tiny(tmp_path, method="sdpo", objective="signed", distill_unranked=0.5, group_size=4,
                     problems_per_step=4, task=str(tmp_path / "data.jsonl"),
                     task_params={"reward_fn": f"{tmp_path / 'reward.py'}:score"}))
    row, _ = train_step(run, 1)
    assert row["train/distill_loss"] > 0
    assert row["train/loss"] == pytest.approx(row["train/grpo_loss"] + 0.5 * row["train/distill_loss"], rel=1e-5)


def test_unranked_distillation_can_keep_only_the_answer_tokens(tmp_path, monkeypatch):
    """distill_unranked_tokens=answer distils only the tokens that spell the answer (here: scripted as the first
    two of every completion), a part of what `all` distils."""
    import pmd.loop

    monkeypatch.setattr(pmd.loop, "answer_token_mask", lambda tokenizer, ids, answer: [k < 2 for k in range(len(ids))])
    (tmp_path / "data.jsonl").write_text("".join(f'{{"prompt": "Say {i}.", "answer": "{i}"}}\n' for i in range(20)))
    (tmp_path / "reward.py").write_text("def score(prompts, completions, **kw):\n    return [0.0] * len(prompts)\n")
    distill = {}
    for tokens in ("all", "answer"):
        (tmp_path / tokens).mkdir()
        config = tiny(tmp_path / tokens, method="pmd", objective="signed", distill_unranked=1.0,
                      distill_unranked_tokens=tokens, group_size=4, problems_per_step=4, memory_levels="experience",
                      teacher_reference=True, task=str(tmp_path / "data.jsonl"),
                      task_params={"reward_fn": f"{tmp_path / 'reward.py'}:score"})
        row, _ = train_step(setup(config), 1)
        distill[tokens] = row["train/distill_loss"]
        assert row["train/unranked_rows"] == 16  # every group fails, every teacher reads the reference
        assert row["train/loss"] == pytest.approx(row["train/grpo_loss"] + row["train/distill_loss"], rel=1e-5)
    assert 0 < distill["answer"] and distill["answer"] != pytest.approx(distill["all"])


def test_related_examples_reach_the_all_fail_group_in_the_loop(tmp_path, monkeypatch):
    """related_examples wired through the loop: the first problem of step 1 passes (a patched verifier), so the
    other problem's all-fail group is taught by it, an earlier exchange in the teacher's prompt."""
    import dataclasses

    import pmd.loop

    # The tiny random model never stops before the budget; store_cut_passes lets its patched pass be an example.
    run = setup(tiny(tmp_path, method="pmd", related_examples=1, embedder="hashing", teacher_feedback="auto",
                     memory_levels="experience", store_cut_passes=True))
    solved = pmd.loop.problems_for_step(run, 1)[0]
    real = pmd.loop.verify_many

    def verify(task, problems, texts):
        return [dataclasses.replace(v, reward=1.0) if p.id == solved.id else v
                for v, p in zip(real(task, problems, texts), problems)]

    monkeypatch.setattr(pmd.loop, "verify_many", verify)
    row, rollouts = train_step(run, 1)
    assert set(run.memory.problem_texts) == {p.id for p in run.train_problems}
    assert row["teacher/example_fraction"] == 0.5  # the other problem's 4 rollouts of 8
    assert row["teacher/demonstration_fraction"] == 0.5 and row["teacher/signal_fraction"] == 1.0
    assert [r["teacher_context"] for r in rollouts if r["problem"] != solved.id] == ["example"] * 4


def test_a_run_folder_has_one_writer(tmp_path, hold_lock):
    """A second process that would write a run folder in use stops with an error naming it (a duplicate `pmd
    compare` or `pmd train` would otherwise truncate the first one's logs); the lock goes with its holder."""
    from pmd.runlog import RunDir

    folder = tmp_path / "run"
    folder.mkdir()
    release = hold_lock(folder / ".lock")
    with pytest.raises(ConfigError, match=r"being written by another process \(pid 4242\)"):
        RunDir(folder).lock()
    release()
    RunDir(folder).lock()  # the holder is gone: free
    RunDir(folder).lock()  # held by this process already: fine
    assert (folder / ".lock").read_text().strip() == str(os.getpid())
