"""Wall time of one training step: pmd vs TRL 1.16, for GRPO and SDPO, on identical settings.

What is compared
----------------
Five arms, each in its own subprocess (run one after the other, so they never share memory or CPU threads):

    trl-grpo   trl.GRPOTrainer / trl.GRPOConfig
    pmd-grpo   pmd.loop.train_step with method=grpo
    trl-sdpo   trl.experimental.sdpo.SDPOTrainer / trl.experimental.sdpo.SDPOConfig
    pmd-sdpo   pmd.loop.train_step with method=sdpo
    pmd-pmd    pmd.loop.train_step with method=pmd (package memory defaults: MiniLM embedder, the policy reflects
               on its own rollouts, consolidation every 5 steps), held against trl-sdpo. Memory work (observe,
               reflect, consolidate, contexts, record) is inside the timed step.

Targets (issue 5): pmd-sdpo at most 0.6x trl-sdpo; pmd-pmd at most 0.8x trl-sdpo.

Each arm trains 1 warm-up step (model load, first-call and allocator overheads; not timed) and then `--steps`
timed steps; the figure reported is the median wall time of the timed steps. One step = sample 32 completions,
verify them, (sdpo) build teacher prompts, forward/backward in 4 micro-batches of 8, one optimizer step
(and, for sdpo, one EMA update of the teacher).

Settings shared by both sides (all read from one pmd `Config`, so the TRL arm follows pmd's defaults):
    model SmolLM2-135M-Instruct (pmd's packaged copy, `pmd.models.resolve_model`), bf16 weights with bf16 autocast
    (TRL: bf16=True, use_cpu=True), LoRA r=16 alpha=32 all-linear dropout 0 (float32 adapters on both sides),
    torch.set_num_threads(2) + OMP_NUM_THREADS=2, task chain_sum (2 terms, 1-2 digits) with pmd's prompts and
    the same problems in the same order, 4 problems x 8 rollouts, max 64 new tokens, temperature 1.0, top-p 1,
    top-k off, pmd's verifier as the reward, one optimizer step per rollout batch (on-policy: no old-log-prob
    pass on either side), no KL / reference model, no gradient checkpointing, dropout off, torch AdamW
    (non-fused) lr 5e-5 constant, weight decay 0.01, grad clip 1.0.
    grpo: advantage r - mean(group) without std scaling, PPO clip 0.2 / 0.28, token-mean over the step's tokens
          (TRL scale_rewards="none", loss_type="dapo", epsilon=0.2, epsilon_high=0.28).
    sdpo: pure distillation, student top-k 100 + tail bucket, alpha 0.5 (generalised JSD), IS clip 2,
          EMA teacher with rate 0.05 updated every step, teacher prompt = SDPO reprompt with the first *other*
          successful rollout of the group as demonstration, else (pmd's use_feedback) the rollout's own verifier
          feedback, else no signal; pmd's reprompt strings are passed to TRL's templates.

Differences that remain (implementation choices of the two libraries, i.e. part of what is measured, or not
configurable in TRL):
  1. Sampling model: TRL calls `generate` on the training model itself: the PEFT model with bf16 base weights
     and float32 adapters, outside the accelerator's autocast, so PEFT runs the adapter matmuls in float32 on
     every decoding step. pmd (at the time of writing) samples from a plain bf16 copy of the policy with the LoRA
     deltas merged in, re-synced after every optimizer step (its `sync_sampler` phase). Training forwards run
     under bf16 autocast with float32 adapters on both sides.
  2. Log-probs (grpo): TRL patches the model with its fused, tiled LM head (`add_fused_lm_head`) that returns
     log-probs and the entropy (always computed, for its `entropy` metric) of the real completion tokens only; pmd
     materialises (batch, R, vocab) logits for the completion columns and takes a log-softmax.
  3. Padding: TRL pads all 32 completions to the longest one of the step and then splits them into
     micro-batches (GRPO also shuffles the 32 before splitting); pmd packs each micro-batch of 8 to its own
     longest completion, in group order.
  4. SDPO teacher forward: TRL runs it on all 32 rollouts (rows without a signal keep the plain prompt and get
     mask 0); pmd runs it only on the rollouts that have a teacher signal.
  5. SDPO EMA teacher: TRL keeps a second LoRA adapter ("teacher"), switches to it for the teacher forward and
     updates it through `get/set_peft_model_state_dict` in an `on_step_end` callback; pmd keeps the EMA tensors
     itself and calls `torch.func.functional_call`. TRL's EMA adapter starts from zeros (A and B), pmd's from the
     initial adapter (A random, B = 0): both equal the base model at the first step, but differ afterwards.
  6. SDPO feedback: TRL only reads privileged feedback from a static dataset column (`privileged_context`),
     collected before the rewards exist. To give its teacher pmd's per-rollout verifier feedback, the benchmark
     wraps `trainer.teacher_context_builder.build` to pass the feedback computed by the reward function (None for
     passing rollouts, as in pmd). Demonstrations from successful rollouts are TRL's own mechanism
     (`use_successful_as_teacher`, `dont_reprompt_on_self_success`).
  7. Over-long teacher prompts: TRL cuts them from the left at `max_reprompt_len` (2048 here); pmd drops the
     demonstration. Never triggered at these lengths.
  8. SDPO importance ratio: on-policy, TRL has no old log-probs and skips the clip; pmd multiplies by a detached
     ratio that is exactly 1 (same loss, negligible cost).
  9. Sampling differs (different RNG streams and, after step 1, slightly different weights), so completion lengths
     and rewards differ between arms; step time grows with completion length, so the mean completion length of
     the timed steps is printed next to each time.
 10. Step boundaries: a TRL step is the interval between two `on_step_end` callbacks (includes the dataloader,
     Trainer bookkeeping and callbacks); a pmd step is the wall time of `pmd.loop.train_step` (includes its EMA).

Phases: pmd's come from the `time/...` keys of `Trainer.train_step`. TRL's are measured by wrapping trainer
methods on the instance: generate = `_generate`, verify = `_calculate_rewards`, teacher_context =
`teacher_context_builder.build`, student/teacher forward = `_get_per_token_logps_and_entropies` (grpo) or
`_forward_logits` with / without grad (sdpo), backward = `accelerator.backward`, optimizer = end of the last
backward to `on_step_end` (clip, AdamW, scheduler, zero_grad, EMA callback). On both sides `other` is the step
time minus the listed phases (tokenisation, decoding, padding, advantages, the loss itself, EMA for pmd, ...).
Phases pmd reports beyond the list above (e.g. `sync_sampler`) get their own column. Per-phase figures are
medians over the timed steps, so they need not add up to the median step time.

Run
---
    python benchmarks/step_time.py                 # both methods, 3 timed steps per arm
    python benchmarks/step_time.py --steps 2 --out step_time.json
    python benchmarks/step_time.py --methods grpo   # one method only

Progress goes to stderr; the final tables and one JSON line with every figure go to stdout. On an idle 2-core
CPU the whole run takes about 5 minutes with --steps 2 (each arm also pays model loading and one warm-up step).
Timings on a shared machine are noisy (the 1-minute load average around each arm is recorded in the JSON):
compare arms from the same run, and repeat the run before trusting a small difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREADS = 2

# The one description of the run; the TRL arm derives its config from the same pmd Config.
PMD_SETTINGS = {
    "model": "smollm2-135m-instruct", "problems_per_step": 4, "group_size": 8, "max_new_tokens": 64,
    "micro_batch_size": 8, "threads": THREADS, "eval_problems": 0, "finetune": "lora", "dtype": "bfloat16",
    "lora_r": 16, "lora_alpha": 32, "lora_target_modules": "all-linear", "temperature": 1.0,
    "optimizer_steps_per_batch": 1, "task": "chain_sum",
    "task_params": {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2},
}
SDPO_SETTINGS = {"distillation_topk": 100, "distillation_add_tail": True, "distillation_alpha": 0.5,
                 "teacher_model_kind": "ema", "teacher_update_rate": 0.05, "grpo_weight": 0.0}

# pmd's PMD step (memory work included) has no TRL counterpart; it is compared with TRL's SDPO step.
ARMS = [("grpo", "trl"), ("grpo", "pmd"), ("sdpo", "trl"), ("sdpo", "pmd"), ("pmd", "pmd")]
TARGETS = {"sdpo": 0.6, "pmd": 0.8}  # issue 5: pmd step / TRL SDPO step at most this
# pmd metrics kept per step; the TRL harness records the same quantities under the same names
STEP_METRICS = ("train/reward_mean", "train/completion_length_mean", "teacher/signal_fraction")
PHASES = ["generate", "verify", "teacher_context", "student_forward", "teacher_forward", "loss", "backward",
          "optimizer"]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pmd_config(method: str):
    from pmd.config import Config, apply

    # pmd: the package defaults for memory (MiniLM embedder, the policy as its own reflector, all three levels)
    return apply(Config(), {**PMD_SETTINGS, **(SDPO_SETTINGS if method != "grpo" else {}), "method": method})


# ------------------------------------------------------------------------------------------------ child: one arm
def run_pmd(method: str, timed_steps: int) -> dict:
    import torch

    from pmd.loop import setup, train_step
    from pmd.metrics import upgrade

    tag = f"pmd-{method}"
    torch.set_num_threads(THREADS)
    cfg = pmd_config(method)
    run = setup(cfg)
    total = 1 + timed_steps
    say(f"[{tag}] training {total} steps (1 warm-up); threads={torch.get_num_threads()}")
    steps = []
    for step in range(1, total + 1):
        t = time.perf_counter()
        row, _ = train_step(run, step)
        seconds = time.perf_counter() - t
        row = upgrade(row)  # today's metric names, whichever the trainer writes
        phases = {k.removeprefix("time/"): v for k, v in row.items() if k.startswith("time/")}
        steps.append({"step": step, "seconds": seconds, "phases": phases, **{k: row.get(k) for k in STEP_METRICS},
                      "threads": torch.get_num_threads()})
        kind = "warm-up" if step == 1 else "timed"
        say(f"[{tag}] step {step}/{total} ({kind}) {seconds:.1f}s  gen {phases.get('generate', 0):.1f}s  "
            f"reward {row.get('train/reward_mean', float('nan')):.3f}  "
            f"len {row.get('train/completion_length_mean', 0):.1f}")
    return {"steps": steps}


def run_trl(method: str, timed_steps: int) -> dict:
    sys.path.insert(0, str(HERE))
    import _trl_harness

    return _trl_harness.run(method, pmd_config(method), timed_steps)


def child(arm: str, timed_steps: int, result_file: str) -> None:
    import transformers

    transformers.utils.logging.disable_progress_bar()
    side, method = arm.split(":")
    out = (run_pmd if side == "pmd" else run_trl)(method, timed_steps)
    versions = {}
    for name in ("torch", "transformers", "trl", "peft", "accelerate"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    out["versions"] = versions
    Path(result_file).write_text(json.dumps(out))


# ------------------------------------------------------------------------------------------------ parent
def run_arm(method: str, side: str, timed_steps: int) -> dict:
    """Run one arm in a fresh interpreter; its stdout and stderr both go to our stderr (progress)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore::FutureWarning,ignore::UserWarning"}
    with tempfile.TemporaryDirectory(prefix="pmd-step-time-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{side}:{method}",
               "--steps", str(timed_steps), "--result-file", str(result_file)]
        load_before = os.getloadavg()[0]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr, stderr=sys.stderr)
        wall = time.perf_counter() - t
        load = {"loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0]}
        if proc.returncode != 0 or not result_file.exists():
            return {"error": f"subprocess exited with code {proc.returncode}", "wall_seconds": wall, **load}
        out = json.loads(result_file.read_text())
    return {**out, "wall_seconds": wall, **load}


def summarize(out: dict) -> dict:
    """Medians over the timed steps (all but the first)."""
    if "error" in out:
        return out
    timed = out["steps"][1:]
    names = sorted({n for s in timed for n in s["phases"]}, key=lambda n: (n not in PHASES, PHASES.index(n)
                                                                           if n in PHASES else n))
    phases: dict[str, float] = {}
    for name in names:
        phases[name] = statistics.median(s["phases"].get(name, 0.0) for s in timed)
    # disjoint phases only: pmd's own "step" and "memory" (the sum of its memory phases) and TRL's enclosing
    # "total_*" are not parts of the step
    others = [s["seconds"] - sum(v for n, v in s["phases"].items()
                                 if n not in ("step", "memory") and not n.startswith("total_"))
              for s in timed]
    phases["other"] = statistics.median(others)

    def mean_of(key):
        values = [s[key] for s in timed if s.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {"median_step_seconds": statistics.median(s["seconds"] for s in timed),
            "mean_step_seconds": statistics.mean(s["seconds"] for s in timed),  # PMD: consolidation amortised
            "step_seconds": [round(s["seconds"], 3) for s in out["steps"]],  # first one is the warm-up
            "phases_median": {k: round(v, 3) for k, v in phases.items()},
            "train/completion_length_mean": mean_of("train/completion_length_mean"),
            "train/reward_mean": mean_of("train/reward_mean"),
            "threads": sorted({s["threads"] for s in out["steps"]}),
            "arm_wall_seconds": round(out["wall_seconds"], 1),
            "raw_steps": out["steps"],
            **{k: v for k, v in out.items() if k not in ("steps", "wall_seconds")}}


def fmt(x, width=9, digits=1) -> str:
    return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def report(results: dict, timed_steps: int, wall: float) -> dict:
    methods = list(results)
    lines = ["", f"Step time, pmd vs TRL (median of {timed_steps} timed steps after 1 warm-up; seconds)", ""]
    lines.append(f"{'method':<8}{'TRL':>10}{'pmd':>10}{'pmd/TRL':>10}{'target':>8}{'TRL len':>10}{'pmd len':>10}")
    summary = {"timed_steps": timed_steps, "threads": THREADS, "settings": PMD_SETTINGS,
               "sdpo_settings": SDPO_SETTINGS, "wall_seconds": round(wall, 1), "methods": {}}
    for method in methods:
        # the PMD step is held against TRL's SDPO step (TRL has no PMD)
        trl = results.get("sdpo" if method == "pmd" else method, {}).get("trl", {})
        pmd = results[method].get("pmd", {})
        t, p = trl.get("median_step_seconds"), pmd.get("median_step_seconds")
        ratio = p / t if t and p else None
        target = TARGETS.get(method)
        summary["methods"][method] = {"trl_step_seconds": t, "pmd_step_seconds": p, "ratio_pmd_over_trl": ratio,
                                      "target_ratio": target, "trl": trl, "pmd": pmd}
        label = "pmd*" if method == "pmd" else method
        lines.append(f"{label:<8}{fmt(t, 10)}{fmt(p, 10)}{fmt(ratio, 10, 2)}{fmt(target, 8, 1)}"
                     f"{fmt(trl.get('train/completion_length_mean'), 10)}"
                     f"{fmt(pmd.get('train/completion_length_mean'), 10)}")
    if "pmd" in methods:
        lines.append("pmd*: pmd's PMD step (memory work included) against TRL's SDPO step")
    lines += ["", "Per-phase medians (seconds; 'other' = step minus the listed phases)", ""]
    names = {"teacher_context": "teach_ctx", "student_forward": "stud_fwd", "teacher_forward": "teach_fwd"}
    extra = sorted({n for m in methods for arm in results[m].values() for n in arm.get("phases_median", {})
                    if n not in PHASES and n not in ("step", "other") and not n.startswith("total_")})
    cols = PHASES + extra + ["other"]
    widths = [max(10, len(names.get(c, c)) + 2) for c in cols]
    lines.append(f"{'arm':<10}{'step':>8}{'mean':>8}" + "".join(f"{names.get(c, c):>{w}}" for c, w in zip(cols, widths)))
    for method in methods:
        for side in ("trl", "pmd"):
            arm = results[method].get(side)
            if arm is None:
                continue
            label = f"{side}-{method}"
            if "error" in arm:
                lines.append(f"{label:<10}  failed: {arm['error']}")
                continue
            ph = arm["phases_median"]
            lines.append(f"{label:<10}{fmt(arm['median_step_seconds'], 8)}{fmt(arm['mean_step_seconds'], 8)}"
                         + "".join(fmt(ph.get(c), w, 2 if c in ('verify', 'teacher_context', 'optimizer') else 1)
                                   for c, w in zip(cols, widths)))
    loads = [f"{side}-{m} {arm['loadavg_1min_before']:.1f}->{arm['loadavg_1min_after']:.1f}"
             for m in methods for side, arm in results[m].items() if "loadavg_1min_before" in arm]
    lines += ["", f"1-min load average before->after each arm ({THREADS} threads per arm): " + ", ".join(loads),
              f"whole benchmark: {wall / 60:.1f} min"]
    print("\n".join(lines), flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm, after one warm-up step")
    parser.add_argument("--methods", default="grpo,sdpo,pmd", help="comma-separated subset of grpo,sdpo,pmd "
                                                                    "(pmd also runs TRL's SDPO arm)")
    parser.add_argument("--out", help="also write the JSON summary to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.child:
        child(args.child, args.steps, args.result_file)
        return

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in ("grpo", "sdpo", "pmd") for m in methods):
        parser.error("--methods: choose from grpo, sdpo, pmd")
    arms = [(m, s) for m, s in ARMS if m in methods or (m, s) == ("sdpo", "trl") and "pmd" in methods]
    t0 = time.perf_counter()
    results: dict[str, dict] = {m: {} for m, _ in arms}
    for i, (method, side) in enumerate(arms, 1):
        say(f"\n=== arm {i}/{len(arms)}: {side}-{method}  ({1 + args.steps} steps; "
            f"{(time.perf_counter() - t0) / 60:.1f} min elapsed) ===")
        results[method][side] = summarize(run_arm(method, side, args.steps))
        arm = results[method][side]
        if "error" in arm:
            say(f"=== {side}-{method} FAILED: {arm['error']} ===")
        else:
            say(f"=== {side}-{method}: median step {arm['median_step_seconds']:.1f}s ===")
    summary = report(results, args.steps, time.perf_counter() - t0)
    line = json.dumps(summary, default=str)
    print(line, flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1, default=str) + "\n")
        say(f"wrote {args.out}")
    if any("error" in results[m][s] for m, s in arms):
        sys.exit(1)


if __name__ == "__main__":
    main()
