"""Per-run diagnostics of a `pmd compare` grid that the results table does not show.

    python docs/results/diagnose.py GRID_FOLDER            # e.g. runs/smollm2-chain-sum-revisit

For every run it prints
  - the training reward per epoch over the training pool (every problem is revisited once per epoch, so epochs
    2+ measure the revisited problems, sampled at the training temperature);
  - how often the teacher's context held memory read back from earlier epochs (insight entries, stored
    demonstrations), and the behaviors that formed;
  - the teacher-direction diagnostics (docs/method.md §16), means over training steps: answer-token lift on
    passing vs failing rollouts, the change of log p(EOS) where the student stopped, per context kind;
  - the groups the reward cannot rank (every rollout passed, or every one failed: GRPO's advantage is 0), what
    their teachers read, and how many all-failing groups belong to a problem that passed at an earlier visit
    (the only ones for which memory holds a verified solution);
  - pmd runs: the worked solutions their teachers read (demonstration or related example) per epoch: how long
    they were and how many were a bare one-line answer, beside the length of the students' own completions.
It reads config.yaml, metrics.jsonl, rollouts.jsonl and memory.sqlite (run folders older than the metric
namespaces included).
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

from pmd.metrics import upgrade

DIAGNOSTICS = ["teacher/signal_fraction", "teacher/context_insight_fraction", "teacher/context_behavior_fraction",
               "teacher/answer_lift_pass", "teacher/answer_lift_fail", "teacher/answer_lift_gap",
               "teacher/demonstration_eos_lift", "teacher/memory_eos_lift", "teacher/feedback_eos_lift",
               "teacher/example_answer_lift_fail", "teacher/example_eos_lift", "train/completion_clipped_fraction"]


def config_value(run: Path, key: str) -> int:
    match = re.search(rf"^{key}:\s*(\d+)", (run / "config.yaml").read_text(), re.M)
    return int(match.group(1))


def mean(values: list[float]) -> str:
    return f"{statistics.mean(values):+.2f}" if values else "–"


def main(grid: Path) -> None:
    runs = sorted(p.parent for p in grid.glob("runs/*/metrics.jsonl"))
    rows_of = {run: [upgrade(json.loads(line)) for line in open(run / "metrics.jsonl")] for run in runs}
    steps_of = {run: [r for r in rows if r.get("step", 0) > 0 and "train/reward_mean" in r]
                for run, rows in rows_of.items()}

    print("Training reward per epoch (epoch 1 = first visit; later epochs revisit the same problems):\n")
    print("| run | " + " | ".join(f"epoch {e}" for e in range(1, 5)) + " | insight entries | behaviors |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        per_epoch = max(1, config_value(run, "train_problems") // config_value(run, "problems_per_step"))
        epochs: dict[int, list[float]] = {}
        for r in steps_of[run]:
            epochs.setdefault((r["step"] - 1) // per_epoch + 1, []).append(r["train/reward_mean"])
        last = steps_of[run][-1] if steps_of[run] else {}
        cells = [f"{statistics.mean(epochs[e]):.2f}" if e in epochs else "–" for e in range(1, 5)]
        print(f"| {run.name} | " + " | ".join(cells) +
              f" | {last.get('memory/insight_entries', '–')} | {last.get('memory/behavior_entries', '–')} |")

    print("\nTeacher diagnostics, means over training steps (nats; lift = teacher − student log-prob):\n")
    print("| run | " + " | ".join(k.split("/")[1] for k in DIAGNOSTICS) + " |")
    print("|---" * (len(DIAGNOSTICS) + 1) + "|")
    for run in runs:
        cells = [mean([r[k] for r in steps_of[run] if isinstance(r.get(k), (int, float))]) for k in DIAGNOSTICS]
        print(f"| {run.name} | " + " | ".join(cells) + " |")

    print("\nGroups the reward cannot rank (advantage 0), and what their rollouts' teachers read:\n")
    print("| run | groups | all fail | all pass | all fail, solved at an earlier visit | teacher contexts (rollouts) |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        if (run / "rollouts.jsonl").exists():
            print(unranked_groups(run))

    shown = [run for run in runs if (run / "memory.sqlite").exists() and (run / "rollouts.jsonl").exists()]
    if shown:
        print("\nWorked solutions the teacher read (demonstration or example), per epoch: rollouts taught by one, "
              "their mean lines and characters, the share that is a one-line answer; and the students' own mean "
              "characters:\n")
        print("| run | " + " | ".join(f"epoch {e}" for e in range(1, 5)) + " |")
        print("|---|---|---|---|---|")
        for run in shown:
            print(worked_solutions(run))


def worked_solutions(run: Path) -> str:
    """One table row: per epoch, what the stored or sibling passes that teachers read looked like. A stored
    pass is found by its memory id (one pruned since is skipped); a sibling demonstration (no stored id) is
    the group's passing completion the run's `demonstration_pick` chooses, other than the rollout itself (and,
    unless the run stored cut passes, one that stopped)."""
    import sqlite3

    per_epoch = max(1, config_value(run, "train_problems") // config_value(run, "problems_per_step"))
    config = (run / "config.yaml").read_text()
    longest = re.search(r"^demonstration_pick:\s*longest", config, re.M) is not None
    # runs from before store_cut_passes existed showed cut passes too
    cut_shown = re.search(r"^store_cut_passes:\s*false", config, re.M) is None
    with sqlite3.connect(f"file:{run / 'memory.sqlite'}?mode=ro", uri=True) as db:
        passes = dict(db.execute("SELECT id, text FROM entries WHERE level = 'experience' AND kind = 'pass'"))
    groups: dict[tuple[int, str], list[dict]] = {}
    for line in open(run / "rollouts.jsonl"):
        r = json.loads(line)
        groups.setdefault((r["step"], r["problem"]), []).append(r)
    read: dict[int, list[str]] = {}
    own: dict[int, list[int]] = {}
    for (step, _), group in groups.items():
        epoch = (step - 1) // per_epoch + 1
        for i, r in enumerate(group):
            own.setdefault(epoch, []).append(len(r["completion"]))
            if r["teacher_context"] not in ("demonstration", "example"):
                continue
            stored = [passes[k] for k in r.get("memory_ids", []) if k in passes]
            if stored:
                read.setdefault(epoch, []).append(stored[0])
            elif r["teacher_context"] == "demonstration":
                siblings = sorted((s["completion"] for j, s in enumerate(group)
                                   if j != i and s["reward"] >= 1 and (cut_shown or s.get("stopped", True))),
                                  key=len, reverse=longest)
                if siblings:
                    read.setdefault(epoch, []).append(siblings[0])
    cells = []
    for epoch in range(1, 5):
        texts = read.get(epoch, [])
        lines = [len([x for x in t.splitlines() if x.strip()]) for t in texts]
        cells.append(f"{len(texts)}: {statistics.mean(lines):.1f} lines, {statistics.mean(map(len, texts)):.0f} "
                     f"chars, {sum(n <= 1 for n in lines) / len(texts):.0%} one-line (students "
                     f"{statistics.mean(own[epoch]):.0f})" if texts else "–")
    return f"| {run.name} | " + " | ".join(cells) + " |"


def unranked_groups(run: Path) -> str:
    """One table row: groups the reward cannot rank, and the memory their teachers had."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for line in open(run / "rollouts.jsonl"):
        r = json.loads(line)
        groups.setdefault((r["step"], r["problem"]), []).append(r)
    solved_before: set[str] = set()  # problems with a passing rollout at an earlier step (one group per step)
    all_fail = all_pass = fail_solved_before = 0
    contexts: dict[str, int] = {}
    for (_, problem), group in sorted(groups.items()):
        solved = any(r["reward"] > 0 for r in group)
        if len({r["reward"] for r in group}) == 1:  # the reward cannot rank this group
            all_pass += solved
            all_fail += not solved
            fail_solved_before += not solved and problem in solved_before
            for r in group:
                contexts[r["teacher_context"]] = contexts.get(r["teacher_context"], 0) + 1
        if solved:
            solved_before.add(problem)
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(contexts.items(), key=lambda kv: -kv[1]))
    return f"| {run.name} | {len(groups)} | {all_fail} | {all_pass} | {fail_solved_before} | {kinds} |"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1], "runs").is_dir():
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
