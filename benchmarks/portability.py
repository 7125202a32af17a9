"""Step time on this machine's CPU kind: bf16 against fp32, alone and beside one busy process, pmd against TRL.

    python benchmarks/portability.py                  # every arm (about 20-40 min on a 2-core CPU)
    python benchmarks/portability.py --quick          # pmd only, fewer steps
    python benchmarks/portability.py --out portability.json

What it shows:
  - the CPU's capability (lscpu flags: avx512_bf16, amx, avx2) and what `dtype=auto` picks on it;
  - pmd's GRPO step with dtype=auto (the default), float32 and bfloat16: the ratio default / float32 (a CPU
    without native bf16 should be near 1: auto picks float32 there);
  - the same steps while one busy single-threaded process runs beside them (a `while True` loop): the ratio
    busy / alone, for pmd's default `threads=0` (threads follow the cores others leave idle, pmd/hardware.py)
    and the fixed settings it was chosen over (one thread per core, one fewer, OpenMP passive waiting);
  - TRL's GRPOTrainer on the same settings (benchmarks/_trl_harness.py), alone and busy, so each ratio has a
    peer measured on the same hardware in the same run.
Every arm runs in a fresh process; its steps are timed after one warm-up step, and the median is reported.
Run it on an otherwise idle machine: another job running beside it changes every figure.
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
# small enough that an emulated-bf16 step finishes in minutes, not hours
SETTINGS = {"model": "smollm2-135m-instruct", "method": "grpo", "problems_per_step": 2, "group_size": 4,
            "max_new_tokens": 32, "micro_batch_size": 8, "eval_problems": 0, "temperature": 0.7, "task": "chain_sum"}


def cpu_report() -> dict:
    from pmd.hardware import cpu_flags, resolve_dtype, usable_cores

    import torch

    flags = cpu_flags()
    return {"model": _lscpu("Model name"), "cores_usable": usable_cores(), "torch": torch.__version__,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": sorted(f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "bf16")),
            "dtype_auto": resolve_dtype("auto", torch.device("cpu"))}


def _lscpu(field: str) -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith(field)), "?")


# ------------------------------------------------------------------------------------------------ child
def child(side: str, keys: dict, steps: int, result_file: str) -> None:
    import torch

    from pmd.config import Config, apply

    cfg = apply(Config(), {**SETTINGS, **keys})
    if side == "trl":
        sys.path.insert(0, str(HERE))
        import _trl_harness

        from pmd.hardware import resolve_dtype, usable_cores

        cfg = apply(cfg, {"dtype": resolve_dtype(cfg.dtype, torch.device("cpu"))[0],
                          "threads": cfg.threads or usable_cores()})
        out = _trl_harness.run("grpo", cfg, steps)
        seconds = [s["seconds"] for s in out["steps"]]
        threads = [torch.get_num_threads()] * len(seconds)
    else:
        from pmd.loop import setup, train_step

        run = setup(cfg)
        seconds, threads = [], []
        for step in range(1, steps + 2):
            t = time.perf_counter()
            train_step(run, step)
            seconds.append(time.perf_counter() - t)
            threads.append(torch.get_num_threads())  # threads=0 may change it from step to step
    Path(result_file).write_text(json.dumps({"seconds": seconds, "threads": threads}))


# ------------------------------------------------------------------------------------------------ parent
def run_arm(side: str, keys: dict, steps: int, busy: bool, env_extra: dict | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            cmd = [sys.executable, __file__, "--child", side, "--keys", json.dumps(keys), "--steps", str(steps),
                   "--result-file", str(result)]
            proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if proc.returncode != 0 or not result.exists():
                return {"error": proc.stderr[-500:]}
            out = json.loads(result.read_text())
    finally:
        if hog is not None:
            hog.kill()
    timed = out["seconds"][1:]  # the first step is the warm-up
    return {"median_step_seconds": statistics.median(timed), "step_seconds": [round(s, 2) for s in out["seconds"]],
            "threads": out["threads"][-1], "threads_per_step": out["threads"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="pmd only, 2 timed steps")
    parser.add_argument("--out", help="also write every figure as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, json.loads(args.keys), args.steps, args.result_file)
    steps = 2 if args.quick else args.steps
    cpu = cpu_report()
    print(f"CPU: {cpu['model']}; usable cores {cpu['cores_usable']}; flags {' '.join(cpu['flags'])}; "
          f"torch {cpu['torch']} ({cpu['torch_cpu_capability']}); dtype=auto -> {cpu['dtype_auto'][0]} "
          f"({cpu['dtype_auto'][1]})", flush=True)
    cores = cpu["cores_usable"]
    # threads=0 (the default) follows the idle cores each step; the fixed settings are what it was chosen over
    arms = [("pmd", "default (dtype=auto, threads=0)", {"dtype": "auto"}, None),
            ("pmd", "float32", {"dtype": "float32"}, None),
            ("pmd", "bfloat16", {"dtype": "bfloat16"}, None),
            ("pmd", f"float32, threads={cores} fixed", {"dtype": "float32", "threads": cores}, None),
            ("pmd", f"float32, threads={max(1, cores - 1)} fixed", {"dtype": "float32", "threads": max(1, cores - 1)},
             None),
            ("pmd", f"float32, threads={cores} fixed, OMP_WAIT_POLICY=PASSIVE", {"dtype": "float32", "threads": cores},
             {"OMP_WAIT_POLICY": "PASSIVE"})]
    if not args.quick:
        arms += [("trl", "float32", {"dtype": "float32"}, None), ("trl", "bfloat16", {"dtype": "bfloat16"}, None)]
    # Where bf16 is emulated a bf16 step takes minutes: time one step alone, enough to show the ratio to fp32.
    emulated = cpu["dtype_auto"][0] != "bfloat16"
    results = []
    for side, label, keys, env in arms:
        slow = emulated and keys["dtype"] == "bfloat16"
        row = {"side": side, "setting": label + (" (emulated: 1 step, alone only)" if slow else "")}
        for load in ("alone",) if slow else ("alone", "busy"):
            print(f"  {side} {label}, {load} ...", flush=True)
            row[load] = run_arm(side, keys, 1 if slow else steps, busy=load == "busy", env_extra=env)
            print(f"    {row[load].get('step_seconds') or row[load]['error']}", flush=True)
        results.append(row)
    print(table(results, cpu), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu": cpu, "settings": SETTINGS, "steps": steps, "arms": results},
                                             indent=1))


def table(results: list[dict], cpu: dict) -> str:
    def seconds(row, load):
        return row.get(load, {}).get("median_step_seconds")

    fp32 = next(seconds(r, "alone") for r in results if r["side"] == "pmd" and r["setting"] == "float32")
    lines = ["", "| side | setting | alone s | busy s | busy / alone | alone / pmd float32 | threads alone / busy |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        alone, busy = seconds(r, "alone"), seconds(r, "busy")
        cells = [f"{alone:.1f}" if alone else "failed", f"{busy:.1f}" if busy else ("failed" if "busy" in r else "-"),
                 f"{busy / alone:.2f}" if alone and busy else "-", f"{alone / fp32:.2f}" if alone and fp32 else "-",
                 " / ".join(str(r[load].get("threads", "-")) for load in ("alone", "busy") if load in r)]
        lines.append(f"| {r['side']} | {r['setting']} | " + " | ".join(cells) + " |")
    lines.append(f"\nsettings: {json.dumps(SETTINGS)}; {cpu['cores_usable']} usable cores; threads: those of the timed "
                 "steps (last one); busy = one `while True` process beside the step")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
