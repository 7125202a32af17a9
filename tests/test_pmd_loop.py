# pytest tests/test_pmd_loop.py -q
"""method=pmd end to end on a tiny random model: all memory levels fill, `pmd memory` prints them, memory is
checkpointed, and a kill in the middle of a step resumes with the checkpoint's memory, exactly.

A random model writes unparseable reflections, so the reflector here is an OpenAI-compatible HTTP endpoint
served by the test (which also exercises `reflector=openai:...`): it answers insight prompts with STRATEGY /
LESSON lines and abstraction prompts with a BEHAVIOR, deterministically.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from pmd.config import Config, apply
from pmd.loop import train

INSIGHT = "1. STRATEGY: Add the two numbers column by column.\n- LESSON: Do not forget the carry digit."
BEHAVIOR = "BEHAVIOR: Column addition: Add digits column by column and keep the carry.\nWHEN: adding numbers"


class Reflector:
    """A local chat-completions endpoint. `block_when()` true: the request hangs (the test kills the client)."""

    def __init__(self):
        self.requests = 0
        self.blocked = threading.Event()
        self.block_when = lambda: False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests += 1
                if owner.block_when():
                    owner.blocked.set()
                    time.sleep(60)
                    return
                prompt = body["messages"][-1]["content"]
                text = BEHAVIOR if prompt.startswith("Each note") else INSIGHT
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.spec = f"openai:http://127.0.0.1:{self.server.server_address[1]}/v1#scripted"


@pytest.fixture
def reflector():
    r = Reflector()
    yield r
    r.server.shutdown()


PMD = dict(model="tiny-random", method="pmd", steps=4, problems_per_step=3, group_size=4, max_new_tokens=12,
           eval_problems=4, eval_samples=2, eval_every=2, save_every=1, micro_batch_size=4, train_problems=20,
           threads=1, learning_rate=1e-3, distillation_topk=20, embedder="hashing", behavior_every=2,
           l3_min_sim=-1.0)


def pmd_config(out: Path, reflector: Reflector, **kw) -> Config:
    return apply(Config(), {**PMD, "reflector": reflector.spec, "output_dir": str(out), **kw})


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pmd_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmd", *args], capture_output=True, text=True)


def test_pmd_run_fills_every_level_and_memory_commands_show_it(tmp_path, reflector):
    run = train(pmd_config(tmp_path / "run", reflector, eval_with_memory=True))
    metrics = rows(run / "metrics.jsonl")
    last = metrics[-1]
    assert last["memory/experience_entries"] > 0 and last["memory/insight_entries"] > 0
    assert last["memory/behavior_entries"] > 0
    assert last["teacher/signal_fraction"] == 1.0 and last["teacher/context_behavior_fraction"] > 0
    assert {"memory/reflect_calls", "memory/reflect_parse_fail", "time/memory", "teacher/prompt_tokens_mean"} <= last.keys()
    assert "eval/memory_accuracy" in last and "eval/accuracy" in last
    assert all((c / "memory.sqlite").exists() for c in (run / "checkpoints").iterdir())
    rollouts = rows(run / "rollouts.jsonl")
    assert all("memory_ids" in r and r["id"] for r in rollouts)
    reflections = rows(run / "reflections.jsonl")
    assert {r["kind"] for r in reflections} == {"insight", "behavior"} and reflections[0]["strategies"]

    shown = pmd_cli("memory", "show", str(run))
    assert shown.returncode == 0, shown.stderr
    for level in ("experience/", "insight/strategy", "insight/lesson", "behavior/behavior"):
        assert level in shown.stdout
    assert "sources:" in shown.stdout and "written step" in shown.stdout and "uses" in shown.stdout

    exported = pmd_cli("memory", "export", str(run))
    entries = [json.loads(line) for line in exported.stdout.splitlines()]
    assert {e["level"] for e in entries} == {"experience", "insight", "behavior"}
    for e in entries:
        assert {"level", "text", "problem", "uses", "helpful", "created_step", "source_rollouts"} <= e.keys()
        assert (e["problem"] is None) == (e["level"] == "behavior")
    known = {r["id"] for r in rollouts}
    assert all(s in known for e in entries if e["level"] == "experience" for s in e["source_rollouts"])

    stats = pmd_cli("memory", "stats", str(run))
    assert stats.returncode == 0 and "behavior" in stats.stdout and "tokens" in stats.stdout
    only = pmd_cli("memory", "show", str(run), "--level", "insight", "--problem", entries[0]["problem"])
    assert only.returncode == 0 and "behavior/" not in only.stdout


def test_ablations_run(tmp_path, reflector):
    levels = train(pmd_config(tmp_path / "l1", reflector, memory_levels="experience", steps=2, eval_problems=0))
    last = rows(levels / "metrics.jsonl")[-1]
    assert last["memory/insight_entries"] == 0 and last["teacher/context_insight_fraction"] == 0
    frozen = train(pmd_config(tmp_path / "fm", reflector, freeze="memory", freeze_memory_after=1, steps=3,
                              eval_problems=0))
    m = rows(frozen / "metrics.jsonl")
    assert m[-1]["memory/frozen"] and m[-1]["memory/experience_entries"] == m[0]["memory/experience_entries"]
    policy = train(pmd_config(tmp_path / "fp", reflector, freeze="policy", steps=2, eval_problems=2))
    m = rows(policy / "metrics.jsonl")
    assert "eval/memory_accuracy" in m[-1] and m[-1]["teacher/signal_fraction"] == 0.0
    assert "train/loss" in m[-1] and m[-1]["train/grad_norm"] == 0.0


def test_kill_mid_step_resumes_with_the_checkpoint_memory(tmp_path, reflector):
    reference = train(pmd_config(tmp_path / "ref", reflector, steps=4, eval_every=0))
    out = tmp_path / "killed"
    args = [f"{k}={v}" for k, v in {**PMD, "steps": 4, "eval_every": 0, "reflector": reflector.spec,
                                    "output_dir": out}.items()]
    cmd = [sys.executable, "-m", "pmd", "train", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # hang the first reflection request of step 3: the process dies after step 3's experience was written
    reflector.block_when = lambda: (out / "checkpoints" / "step-000002" / "state.json").exists()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert reflector.blocked.wait(120), "the run never reached step 3"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reflector.block_when = lambda: False

    checkpoint = out / "checkpoints" / "step-000002" / "memory.sqlite"
    live, saved = _export(out), _export(checkpoint)
    assert live != saved  # the kill really came mid-step: step 3 had already written experience
    assert max(r["step"] for r in rows(out / "metrics.jsonl")) == 2

    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = rows(reference / "metrics.jsonl"), rows(out / "metrics.jsonl")
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra.get("train/loss") == rb.get("train/loss")
        assert {k: v for k, v in ra.items() if k.startswith("memory/")} == \
               {k: v for k, v in rb.items() if k.startswith("memory/")}
    assert _export(reference) == _export(out)  # same entries, ids, counters and provenance


def _export(path: Path) -> list[dict]:
    r = pmd_cli("memory", "export", str(path))
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]
