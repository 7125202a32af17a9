"""Memory benchmarks: behavior retrieval latency at scale, and the share of a PMD step spent in memory work.

    python benchmarks/memory.py                      # both parts (the step part takes a few minutes)
    python benchmarks/memory.py --skip-step          # retrieval only (~1 min, most of it building 100k rows)
    python benchmarks/memory.py --run RUN            # memory share read from an existing pmd run's metrics
    python benchmarks/memory.py --quick              # smoke test: small sizes, tiny model

Targets (issue 3): at most 5 ms per retrieval query at 100k behaviors; at most 15% of a PMD step in memory
work on the default run. Retrieval is measured on 384-dim clustered unit vectors (the size of the default
MiniLM embedder), through `MemoryStore.search_behaviors`, the call the teacher-context builder makes.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pmd.memory import MemoryStore
from pmd.loop import MEMORY_PHASES


def fill_behaviors(path: Path, n: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    """Write n behaviors straight into a fresh store file (bulk SQL: add_behavior's per-row dedup is O(n))."""
    MemoryStore(path).close()  # creates the schema
    centres = rng.normal(size=(max(1, n // 50), dims)).astype(np.float32)
    vectors = centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(size=(n, dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO entries (level, kind, problem, text, norm, name, cue, support, problem_ids, tokens, "
            "created_step, last_confirmed_step, dedup_vec, search_vec) "
            "VALUES ('behavior', 'behavior', NULL, ?, ?, ?, ?, ?, '[]', 12, 0, 0, ?, ?)",
            ((f"instruction {i}", f"b{i}: instruction {i}", f"b{i}", f"cue {i}", int(rng.integers(1, 9)),
              v.tobytes(), v.tobytes()) for i, v in enumerate(vectors)))
    conn.close()
    return vectors


def retrieval(sizes: list[int], queries: int, dims: int = 384) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "memory.sqlite"
            t = time.perf_counter()
            vectors = fill_behaviors(path, n, dims, rng)
            fill = time.perf_counter() - t
            qs = vectors[rng.integers(0, n, queries)] + 0.3 * rng.normal(size=(queries, dims)).astype(np.float32)
            qs /= np.linalg.norm(qs, axis=1, keepdims=True)
            with MemoryStore(path, readonly=True) as store:
                t = time.perf_counter()
                store.search_behaviors(qs[0], k=4, min_sim=0.3)  # builds the cached index
                build = time.perf_counter() - t
                times, recall = [], []
                for q in qs:
                    t = time.perf_counter()
                    found = store.search_behaviors(q, k=4, min_sim=0.3)
                    times.append(time.perf_counter() - t)
                    exact = np.argsort(-(vectors @ q))[:4] + 1  # ids are 1-based insertion order
                    exact = [int(i) for i in exact if vectors[i - 1] @ q >= 0.3]
                    if exact:
                        recall.append(len({e["id"] for e in found} & set(exact)) / len(exact))
            times.sort()
            rows.append({"behaviors": n, "search": "exact scan",
                         "median_ms": 1e3 * statistics.median(times), "p95_ms": 1e3 * times[int(0.95 * len(times))],
                         "recall_at_4": statistics.mean(recall) if recall else float("nan"),
                         "index_build_s": build, "fill_s": fill})
            print(f"  {n:>7} behaviors: median {rows[-1]['median_ms']:.2f} ms", file=sys.stderr)
    return rows


def step_share(args) -> dict:
    """Run a few default PMD steps (or read a run) and sum the memory phases against the step time."""
    if args.run:
        metrics = [json.loads(line) for line in (Path(args.run) / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "time/step" in m]
        source = f"run {args.run}"
    else:
        from pmd.config import Config, apply
        from pmd.loop import setup, train_step

        overrides = {"method": "pmd", "threads": args.threads}
        if args.quick:
            overrides.update(model="tiny-random", embedder="hashing", problems_per_step=2, group_size=4,
                             max_new_tokens=16, behavior_every=2)
        cfg = apply(Config(), overrides)
        with tempfile.TemporaryDirectory() as tmp:
            run = setup(cfg, tmp)
            steps = [train_step(run, s)[0] for s in range(1, args.steps + 1)]
        source = f"{args.steps} default pmd steps ({cfg.model}, {cfg.problems_per_step}x{cfg.group_size} rollouts)"
    phases = {p: sum(m.get(f"time/{p}", 0.0) for m in steps) for p in MEMORY_PHASES}
    total = sum(m["time/step"] for m in steps)
    return {"source": source, "steps": len(steps), "step_seconds": total, "memory_seconds": sum(phases.values()),
            "share": sum(phases.values()) / total, "phases": phases,
            "other": {k[5:]: round(sum(m.get(k, 0.0) for m in steps), 2) for k in
                      ("time/generate", "time/student_forward", "time/teacher_forward", "time/backward")}}


def _fmt_recall(recall: float) -> str:
    return "n/a (no exact hit >= 0.3)" if recall != recall else f"{recall:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--steps", type=int, default=5, help="PMD steps to time (the default run consolidates "
                                                            "every 5, so 5 steps include one consolidation)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--run", help="read the memory share from this pmd run folder instead of training")
    parser.add_argument("--skip-step", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    sizes = [200, 2000] if args.quick else [int(s) for s in args.sizes.split(",")]

    print("## Behavior retrieval (MemoryStore.search_behaviors, k=4, min_sim=0.3, 384 dims)\n")
    print("| behaviors | search | median ms | p95 ms | recall@4 vs exact | index build s |")
    print("|---|---|---|---|---|---|")
    for r in retrieval(sizes, 50 if args.quick else args.queries):
        print(f"| {r['behaviors']:,} | {r['search']} | {r['median_ms']:.2f} | {r['p95_ms']:.2f} | "
              f"{_fmt_recall(r['recall_at_4'])} | {r['index_build_s']:.2f} |")
    print("\ntarget: median <= 5 ms at 100,000 behaviors")
    if args.skip_step:
        return
    share = step_share(args)
    print(f"\n## Memory work in a PMD step ({share['source']})\n")
    print("| phase | seconds (all steps) |")
    print("|---|---|")
    for phase, seconds in share["phases"].items():
        print(f"| {phase} | {seconds:.2f} |")
    print(f"| **memory total** | **{share['memory_seconds']:.2f}** |")
    for phase, seconds in share["other"].items():
        print(f"| {phase} | {seconds:.2f} |")
    print(f"| step total | {share['step_seconds']:.2f} |")
    print(f"\nmemory share of the step: {100 * share['share']:.1f}%  (target <= 15%)")


if __name__ == "__main__":
    main()
