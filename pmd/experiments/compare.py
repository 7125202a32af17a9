"""`pmd compare`: a grid of arms x seeds on one task and model, at equal rollout budgets, and its results table.

A grid folder holds:

    grid.yaml          the resolved grid: shared config, arms, seeds (a resumed grid must match it)
    configs/ARM-sS.yaml  each run's full config (what `pmd train` is given)
    runs/ARM-sS/       each run's ordinary run folder (metrics, rollouts, memory, checkpoints, report)
    logs/ARM-sS.log    each run's console output
    base_eval/         the initial model's held-out evaluation, shared by the arms of a seed (base_eval.py)
    results.md/.csv    the table: final held-out accuracy per arm, mean and 95% CI over seeds, and the
                       difference to SDPO and to GRPO paired by seed

Every arm shares the grid's config (model, task, steps, problems per step, group size, evaluation points and
held-out set), and changes only the keys of its method: the rollout budget is equal by construction.
A grid file may define its own arms next to the built-in ones (`- NAME: {key: value, ...}` in `arms`).
Running the same command again resumes: finished runs are skipped, a half-finished run resumes from its last
checkpoint (`pmd train` on an existing run folder).
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pmd import config as config_mod
from pmd.config import ConfigError
from pmd.console import say
from pmd.hardware import usable_cores

# Each arm is a set of config keys on top of the grid's shared config.
ARMS: dict[str, dict] = {
    "grpo": {"method": "grpo"},
    # SDPO as published: its reprompt template (demonstration inline), the rollout's own feedback, pure distillation
    "sdpo": {"method": "sdpo", "demonstration_form": "inline", "teacher_feedback": "verbatim", "objective": "distill"},
    "pmd": {"method": "pmd"},
    "pmd-experience": {"method": "pmd", "memory_levels": ["experience"]},
    "pmd-insight": {"method": "pmd", "memory_levels": ["experience", "insight"]},
    "pmd-frozen-memory": {"method": "pmd", "freeze": "memory"},
    "pmd-frozen-policy": {"method": "pmd", "freeze": "policy"},
    "pmd-frozen-reflector": {"method": "pmd", "freeze": "reflector"},
}
ARM_HELP = {
    "grpo": "GRPO, the RL baseline",
    "sdpo": "SDPO: self-teacher reads a sibling's solution or the feedback",
    "pmd": "PMD, all three memory levels (experience + insight + behavior)",
    "pmd-experience": "PMD, experience only",
    "pmd-insight": "PMD, experience + insight",
    "pmd-frozen-memory": "PMD, memory frozen after `freeze_memory_after` steps",
    "pmd-frozen-policy": "PMD, no weight updates: memory in the student's prompt (in-context)",
    "pmd-frozen-reflector": "PMD, reflections written by the initial weights",
}
BASELINES = ("sdpo", "grpo")
PRESETS_DIR = Path(__file__).parent / "presets"


def arm_of(cfg: dict) -> str:
    """The arm a run's config belongs to (the most specific match of ARMS), or its method."""
    levels = list(cfg.get("memory_levels") or ["experience", "insight", "behavior"])
    if cfg.get("method") != "pmd":
        return str(cfg.get("method", "?"))
    if cfg.get("freeze", "none") != "none":
        return f"pmd-frozen-{cfg['freeze']}"
    if levels == ["experience"]:
        return "pmd-experience"
    if levels == ["experience", "insight"]:
        return "pmd-insight"
    return "pmd"


# ------------------------------------------------------------------------------------------------ the grid
@dataclass
class Grid:
    config: dict  # shared config keys (everything but the arm's keys, seed and output_dir)
    arms: list[str]
    seeds: list[int]
    description: str = ""
    jobs: int = 1
    custom_arms: dict[str, dict] = field(default_factory=dict)  # arms the grid file defines: name -> keys
    contrasts: list[tuple[str, str]] = field(default_factory=list)  # (A, B): report A - B paired by seed

    def arm_keys(self, arm: str) -> dict:
        return self.custom_arms[arm] if arm in self.custom_arms else ARMS[arm]

    def run_name(self, arm: str, seed: int) -> str:
        return f"{arm}-s{seed}"

    def run_config(self, arm: str, seed: int, folder: Path) -> config_mod.Config:
        """The full, validated config of one run."""
        keys = {**self.config, **self.arm_keys(arm), "seed": seed,
                "output_dir": str(folder / "runs" / self.run_name(arm, seed))}
        if "base_eval_cache" not in self.config:  # the arms of a seed share their step-0 evaluation
            keys["base_eval_cache"] = str(folder / "base_eval")
        if not keys.get("threads"):  # share the cores between the runs that go at once
            keys["threads"] = max(1, usable_cores() // max(1, self.jobs))
        return config_mod.apply(config_mod.Config(), keys)

    def to_dict(self) -> dict:
        arms = [{a: self.custom_arms[a]} if a in self.custom_arms else a for a in self.arms]
        out = {"description": self.description, "arms": arms, "seeds": self.seeds, "config": self.config}
        if self.contrasts:
            out["contrasts"] = [list(c) for c in self.contrasts]
        return out


def list_presets() -> dict[str, str]:
    """Packaged presets: name -> description."""
    out = {}
    for path in sorted(PRESETS_DIR.glob("*.yaml")):
        out[path.stem] = (yaml.safe_load(path.read_text()) or {}).get("description", "")
    return out


def load_grid(spec: str | Path) -> Grid:
    """A grid from a packaged preset name, a grid YAML file, or an existing grid folder."""
    path = Path(spec)
    if path.is_dir():
        path = path / "grid.yaml"
        if not path.exists():
            raise ConfigError(f"{spec}: a folder without grid.yaml is not a grid folder")
    elif not path.exists():
        preset = PRESETS_DIR / f"{spec}.yaml"
        if not preset.exists():
            raise ConfigError(f"{spec!r} is neither a grid file or folder nor a preset; presets: "
                              f"{', '.join(list_presets()) or '(none)'}")
        path = preset
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a grid file is a mapping with config, arms and seeds")
    unknown = set(raw) - {"description", "config", "arms", "seeds", "contrasts"}
    if unknown:
        raise ConfigError(f"{path}: unknown grid key(s) {', '.join(sorted(unknown))}; "
                          f"valid: description, config, arms, seeds, contrasts")
    return make_grid(raw.get("config") or {}, raw.get("arms") or ["grpo", "sdpo", "pmd"],
                     raw.get("seeds") or [0], raw.get("description", ""), contrasts=raw.get("contrasts"))


def make_grid(config: dict, arms, seeds, description: str = "", custom_arms: dict | None = None,
              contrasts=None) -> Grid:
    """Validate arms, seeds and the shared config keys (built-in arm keys, seed and output_dir are per run).

    An entry of `arms` is a built-in arm's name, the name of one of `custom_arms`, or a one-key mapping
    `{NAME: {config keys}}` that defines a custom arm (e.g. `pmd-qwen-reflector: {method: pmd, reflector: ...}`);
    a custom arm's keys override the shared config for its runs only.
    `contrasts`: pairs [A, B] of the grid's arms whose difference A - B the results report paired by seed
    (an ablation against its full method, say), next to the columns against grpo and sdpo.
    """
    if isinstance(arms, str):
        arms = [a for a in arms.split(",") if a]
    if isinstance(seeds, (str, int)):
        seeds = [s for s in str(seeds).split(",") if s != ""]
    custom = dict(custom_arms or {})
    names = []
    for entry in arms:
        if isinstance(entry, dict):
            name, keys = _custom_arm(entry)
            custom[name] = keys
            entry = name
        names.append(entry)
    arms = names
    bad = [a for a in arms if a not in ARMS and a not in custom]
    if bad:
        raise ConfigError(f"arms: {bad[0]!r} is not an arm; arms are {', '.join([*ARMS, *custom])}, or define "
                          f"one in the grid file as `- NAME: {{key: value, ...}}`")
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise ConfigError(f"seeds: {seeds!r} must be integers") from None
    if not arms or not seeds:
        raise ConfigError("a grid needs at least one arm and one seed")
    if len(set(arms)) != len(arms) or len(set(seeds)) != len(seeds):
        raise ConfigError("arms and seeds must not repeat")
    custom = {a: custom[a] for a in arms if a in custom}  # only the arms this grid runs
    # The built-in arms' keys (method, objective, freeze, ...) and the seed belong to each run: a shared value
    # would be overridden in every run. A custom arm's keys win over the shared config instead, so a one-key
    # variation of a shared setting (reflect_per_step: 2 against the grid's 4) is an arm of the same grid.
    owned = {"seed", "output_dir"} | {k for a in ARMS.values() for k in a}
    clash = sorted(set(config) & owned)
    if clash:
        raise ConfigError(f"config key(s) {', '.join(clash)} are set by each arm or seed, not by the grid")
    config_mod.apply(config_mod.Config(), config)  # validates names and values; raises naming the key
    for name, keys in custom.items():
        try:
            config_mod.apply(config_mod.Config(), {**config, **keys})
        except ConfigError as error:
            raise ConfigError(f"arm {name!r}: {error}") from None
    return Grid(dict(config), list(arms), seeds, description, custom_arms=custom,
                contrasts=_contrasts(contrasts or [], arms))


def _contrasts(entries, arms: list[str]) -> list[tuple[str, str]]:
    """[[A, B], ...] from a grid file -> [(A, B), ...], or a ConfigError naming the bad entry."""
    out = []
    for entry in entries:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[0] != entry[1]):
            raise ConfigError(f"contrasts: {entry!r}: a contrast is a pair of two different arms [A, B] "
                              f"(it reports A - B)")
        missing = [str(a) for a in entry if a not in arms]
        if missing:
            raise ConfigError(f"contrasts: {entry!r}: {missing[0]!r} is not an arm of this grid")
        if tuple(entry) not in out:
            out.append((str(entry[0]), str(entry[1])))
    return out


def _custom_arm(entry: dict) -> tuple[str, dict]:
    """`{NAME: {config keys}}` from a grid file -> (NAME, keys), or a ConfigError naming what is wrong."""
    if len(entry) != 1:
        raise ConfigError(f"arms: {entry!r}: a custom arm is one `NAME: {{key: value, ...}}` mapping")
    (name, keys), = entry.items()
    name = str(name)
    if name in ARMS:
        raise ConfigError(f"arms: {name!r} is a built-in arm; give the custom arm another name")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) or re.search(r"-s\d+$", name):
        raise ConfigError(f"arms: {name!r}: an arm name is letters, digits, '.', '_' and '-' (names its run "
                          f"folders NAME-sSEED, so it may not itself end in -s<digits>)")
    if not isinstance(keys, dict) or not keys:
        raise ConfigError(f"arms: {name!r} needs a mapping of config keys, e.g. {{method: pmd, reflector: ...}}")
    if {"seed", "output_dir"} & set(keys):
        raise ConfigError(f"arms: {name!r}: seed and output_dir belong to the grid, not to an arm")
    return name, dict(keys)


# ------------------------------------------------------------------------------------------------ running
def run_done(run: Path) -> bool:
    return (run / "summary.json").exists()


def run_grid(grid: Grid, folder: str | Path, jobs: int = 1, dry_run: bool = False,
             python: str = sys.executable, progress_every: float = 120.0) -> list[tuple[str, int, str]]:
    """Run every unfinished run of the grid (up to `jobs` at once); returns (arm, seed, status) per run. A run
    that another process is writing (it holds the run's lock) is skipped and reported, never started twice."""
    from pmd.runlog import RunDir

    folder = Path(folder)
    grid.jobs = jobs
    arms, seeds = list(grid.arms), list(grid.seeds)  # what this call runs; the folder's grid may hold more
    _write_or_check_grid(grid, folder)
    for sub in ("configs", "runs", "logs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    todo, status = [], []
    for arm in arms:  # arm-major: the baselines (listed first) finish first, so pairs form early
        for seed in seeds:
            name = grid.run_name(arm, seed)
            cfg = grid.run_config(arm, seed, folder)
            config_path = folder / "configs" / f"{name}.yaml"
            if not dry_run:  # a dry run with another --jobs must not change the threads of the real one
                config_path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            writer = RunDir(cfg.output_dir).writer()
            if run_done(Path(cfg.output_dir)):
                status.append((arm, seed, "done"))
            elif writer:  # another process is writing it (an earlier `pmd compare` still running): leave it
                status.append((arm, seed, f"running elsewhere (pid {writer}), skipped"))
            else:
                todo.append((arm, seed, config_path))
    live = sum(what.startswith("running") for _, _, what in status)
    say(f"grid {folder}: {len(arms)} arms x {len(seeds)} seeds; {len(status) - live} done, "
        + (f"{live} running elsewhere (skipped), " if live else "") + f"{len(todo)} to run, {jobs} at once")
    if dry_run:
        return status + [(a, s, "todo") for a, s, _ in todo]

    def launch(arm: str, seed: int, config_path: Path) -> tuple[str, int, str]:
        name = grid.run_name(arm, seed)
        log = folder / "logs" / f"{name}.log"
        t0 = time.time()
        # the child imports the same pmd as this process (a pinned checkout stays pinned)
        package_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        with open(log, "a") as out:
            out.write(f"\n===== pmd train {config_path}  ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")
            out.flush()
            code = subprocess.run([python, "-m", "pmd", "train", str(config_path)], stdout=out,
                                  stderr=subprocess.STDOUT, env=env).returncode
        minutes = (time.time() - t0) / 60
        return arm, seed, ("done" if code == 0 and run_done(folder / "runs" / name)
                           else f"failed (exit {code}, see {log})") + f" in {minutes:.1f} min"

    finished, total = len(status), len(arms) * len(seeds)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        pending = {pool.submit(launch, *t): t for t in todo}
        while pending:
            done, _ = wait(pending, timeout=progress_every, return_when=FIRST_COMPLETED)
            if not done:  # a heartbeat: where the running runs are
                say("  running: " + ", ".join(_progress(folder, grid, arm, seed) for arm, seed, _ in
                                             (pending[f] for f in pending if f.running())))
            for future in done:
                pending.pop(future)
                arm, seed, what = future.result()
                finished += 1
                status.append((arm, seed, what))
                say(f"[{finished}/{total}] {grid.run_name(arm, seed)}: {what}")
                write_results(folder)  # the table grows as runs finish
    return status


def _progress(folder: Path, grid: Grid, arm: str, seed: int) -> str:
    """`arm-sS step k/N (last eval 0.23)` from the run's metrics so far."""
    from pmd.runlog import RunDir

    name = grid.run_name(arm, seed)
    rows = RunDir(folder / "runs" / name).metrics()
    steps = grid.config.get("steps", config_mod.Config().steps)
    text = f"{name} step {max((r.get('step', 0) for r in rows), default=0)}/{steps}"
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    return text + (f" (last eval {evals[-1]:.3f})" if evals else "")


def _write_or_check_grid(grid: Grid, folder: Path) -> None:
    path = folder / "grid.yaml"
    if path.exists():
        stored = load_grid(folder)
        if stored.config != grid.config:
            diff = sorted(k for k in set(stored.config) | set(grid.config)
                          if stored.config.get(k) != grid.config.get(k))
            raise ConfigError(f"{folder} is a grid with a different shared config (keys: {', '.join(diff)}); "
                              f"resume it with `pmd compare {folder}` or choose a new --out")
        changed = sorted(a for a in stored.custom_arms
                         if a in grid.custom_arms and grid.custom_arms[a] != stored.custom_arms[a])
        if changed:
            raise ConfigError(f"{folder} defines arm {changed[0]!r} with other keys ({stored.custom_arms[changed[0]]}); "
                              f"give the new one another name")
        # arms and seeds may grow: a grid is extended, never silently changed
        grid.custom_arms = {**stored.custom_arms, **grid.custom_arms}
        grid.arms = stored.arms + [a for a in grid.arms if a not in stored.arms]
        grid.seeds = stored.seeds + [s for s in grid.seeds if s not in stored.seeds]
        grid.contrasts = stored.contrasts + [c for c in grid.contrasts if c not in stored.contrasts]
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(grid.to_dict(), sort_keys=False))


# ------------------------------------------------------------------------------------------------ results
@dataclass
class RunResult:
    arm: str
    seed: int
    path: Path
    evals: list[dict]  # rows with step, rollouts, eval/accuracy, eval/accuracy_greedy (step order)
    diagnostics: dict = field(default_factory=dict)  # DIAGNOSTICS column -> mean over training steps
    finished: bool = False
    wall_minutes: float = float("nan")

    @property
    def final(self) -> dict:
        return self.evals[-1] if self.evals else {}

    @property
    def before(self) -> dict:
        return self.evals[0] if self.evals and self.evals[0]["step"] == 0 else {}


# Results columns (results.csv, `summarize` rows) -> the metric each one averages over training steps.
DIAGNOSTICS = {"teacher_signal_fraction": "teacher/signal_fraction", "teacher_prefers_pass": "teacher/prefers_pass",
               "teacher_lift_prefers_pass": "teacher/lift_prefers_pass",
               "teacher_student_divergence": "teacher/divergence", "reward_mean": "train/reward_mean",
               "completion_clipped_fraction": "train/completion_clipped_fraction"}


def load_run(path: str | Path) -> RunResult:
    """A run folder's evaluations and per-run diagnostic means."""
    import json

    from pmd.runlog import RunDir

    run = RunDir(path)
    cfg = run.read_config()
    per_step = cfg.problems_per_step * cfg.group_size
    rows = run.metrics()
    evals = [{"step": r["step"], "rollouts": r["step"] * per_step, "eval/accuracy": r["eval/accuracy"],
              "eval/accuracy_greedy": r.get("eval/accuracy_greedy")}
             for r in rows if "eval/accuracy" in r]
    train_rows = [r for r in rows if r.get("step", 0) > 0 and "train/loss" in r]
    diagnostics = {}
    for column, metric in DIAGNOSTICS.items():
        values = [r[metric] for r in train_rows if isinstance(r.get(metric), (int, float))]
        if values:
            diagnostics[column] = sum(values) / len(values)
    calls = sum(r.get("memory/reflect_calls", 0) for r in train_rows)
    if calls:
        fails = sum(r.get("memory/reflect_parse_fail", 0) for r in train_rows)
        diagnostics["reflect_parse_fail_rate"] = fails / calls
    summary_path = Path(path) / "summary.json"
    finished = summary_path.exists()
    wall = sum(r.get("time/step", 0) + r.get("time/eval", 0) for r in train_rows) / 60
    if finished:
        wall = max(wall, json.loads(summary_path.read_text()).get("wall_seconds_this_session", 0) / 60)
    return RunResult(_arm_of_run(Path(path), cfg), cfg.seed, Path(path), evals, diagnostics, finished, wall)


def _arm_of_run(path: Path, cfg: config_mod.Config) -> str:
    """A folder named ARM-sSEED (every grid run, or a run a user named so) belongs to arm ARM; any other
    run to the arm its config matches (`arm_of`), e.g. `pmd train`'s default `pmd-chain_sum-s0-<time>`."""
    suffix = f"-s{cfg.seed}"
    if path.name.endswith(suffix) and len(path.name) > len(suffix):
        return path.name[: -len(suffix)]
    return arm_of(cfg.to_dict())


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; nan below two values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)


def _finished(results: list[RunResult]) -> dict[tuple[str, int], RunResult]:
    """The runs that finished with a final evaluation, by (arm, seed)."""
    return {(r.arm, r.seed): r for r in results if r.finished and r.final}


def paired(done: dict[tuple[str, int], RunResult], a: str, b: str, key: str) -> tuple[list[int], list[float]]:
    """The seeds where arms a and b both have a final `key`, and the differences a - b seed by seed.

    Pairing by seed removes what two runs of one seed share (problems, sampling), so the interval of the
    differences is much narrower than that of either arm.
    """
    seeds = sorted(s for arm, s in done if arm == a and (b, s) in done
                   and done[a, s].final.get(key) is not None and done[b, s].final.get(key) is not None)
    return seeds, [done[a, s].final[key] - done[b, s].final[key] for s in seeds]


def summarize(results: list[RunResult], metric: str = "eval/accuracy") -> list[dict]:
    """One row per arm: final held-out accuracy over seeds, and the paired difference to each baseline.

    Only finished runs count, so every arm is compared at the same (final) evaluation point.
    """
    done = _finished(results)
    by_arm: dict[str, dict[int, RunResult]] = {}
    for (arm, seed), r in done.items():
        by_arm.setdefault(arm, {})[seed] = r
    order = [a for a in ARMS if a in by_arm] + sorted(a for a in by_arm if a not in ARMS)
    rows = []
    for arm in order:
        runs = by_arm[arm]
        seeds = sorted(runs)
        row = {"arm": arm, "seeds": len(seeds), "rollouts": runs[seeds[0]].final["rollouts"]}
        row["accuracy"], row["accuracy_ci"] = mean_ci([runs[s].final[metric] for s in seeds])
        greedy = [runs[s].final.get("eval/accuracy_greedy") for s in seeds]
        row["greedy"], row["greedy_ci"] = mean_ci([g for g in greedy if g is not None])
        before = [runs[s].before.get(metric) for s in seeds if runs[s].before]
        row["before"], _ = mean_ci(before)
        for base in BASELINES:
            _, diffs = paired(done, arm, base, metric)
            row[f"vs_{base}"], row[f"vs_{base}_ci"] = mean_ci(diffs) if arm != base else (float("nan"),) * 2
            row[f"vs_{base}_pairs"] = len(diffs) if arm != base else 0
        for key in (*DIAGNOSTICS, "reflect_parse_fail_rate"):
            values = [runs[s].diagnostics[key] for s in seeds if key in runs[s].diagnostics]
            row[key] = sum(values) / len(values) if values else float("nan")
        row["minutes_per_run"] = sum(runs[s].wall_minutes for s in seeds) / len(seeds)
        rows.append(row)
    return rows


def contrast_rows(results: list[RunResult], contrasts: list[tuple[str, str]],
                  metric: str = "eval/accuracy") -> list[dict]:
    """One row per contrast (A, B): the final-evaluation difference A - B over the seeds where both finished."""
    done = _finished(results)
    rows = []
    for a, b in contrasts:
        seeds, diffs = paired(done, a, b, metric)
        _, greedy_diffs = paired(done, a, b, "eval/accuracy_greedy")
        row = {"contrast": f"{a} − {b}", "seeds": seeds, "diffs": diffs}
        row["mean"], row["ci"] = mean_ci(diffs)
        row["greedy"], row["greedy_ci"] = mean_ci(greedy_diffs)
        rows.append(row)
    return rows


def grid_runs(folder: str | Path) -> list[Path]:
    """The run folders of a grid folder (those that have started)."""
    runs = Path(folder) / "runs"
    return sorted(p for p in runs.iterdir() if (p / "config.yaml").exists()) if runs.is_dir() else []


def write_results(folder: str | Path) -> tuple[Path, Path]:
    """results.md and results.csv of a grid folder, from the runs finished so far."""
    folder = Path(folder)
    results = [load_run(p) for p in grid_runs(folder)]
    rows = summarize(results)
    grid = load_grid(folder) if (folder / "grid.yaml").exists() else None
    md = folder / "results.md"
    md.write_text(results_markdown(rows, results, grid))
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "results.csv").write_text(out.getvalue())
    return md, folder / "results.csv"


def _pct(mean: float, ci: float | None = None, signed: bool = False) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    text = f"{mean * 100:+.1f}" if signed else f"{mean * 100:.1f}"
    if ci is not None and not math.isnan(ci):
        text += f" ± {ci * 100:.1f}"
    return text


def _num(x: float, digits: int = 2) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.{digits}f}"


SUMMARY_HEADERS = ("arm", "seeds", "rollouts", "before", "after (mean@k)", "after (greedy)", "Δ vs SDPO", "Δ vs GRPO",
                   "teacher signal", "teacher prefers pass", "lift prefers pass", "divergence", "parse fail",
                   "clipped", "min/run")


def summary_cells(r: dict) -> list[str]:
    """One `summarize` row as the text cells under SUMMARY_HEADERS (results.md and the HTML report)."""
    return [str(r["arm"]), str(r["seeds"]), str(r["rollouts"]), _pct(r["before"]),
            _pct(r["accuracy"], r["accuracy_ci"]), _pct(r["greedy"], r["greedy_ci"]),
            _pct(r["vs_sdpo"], r["vs_sdpo_ci"], True), _pct(r["vs_grpo"], r["vs_grpo_ci"], True),
            _num(r["teacher_signal_fraction"]), _num(r["teacher_prefers_pass"]),
            _num(r["teacher_lift_prefers_pass"]), _num(r["teacher_student_divergence"], 3),
            _num(r["reflect_parse_fail_rate"]), _num(r["completion_clipped_fraction"]),
            _num(r["minutes_per_run"], 1)]


def results_markdown(rows: list[dict], results: list[RunResult], grid: Grid | None = None) -> str:
    lines = []
    if grid is not None:
        shared = ", ".join(f"{k}={v}" for k, v in grid.config.items())
        lines += [f"Grid: {grid.description}".rstrip(), "", f"Shared config: `{shared}`", ""]
    unfinished = [r for r in results if not r.finished]
    lines += ["Held-out accuracy (%) at the final evaluation, memory-free: mean over seeds ± 95% CI "
              "(Student t). Δ columns: the arm minus the baseline, paired by seed. "
              "Diagnostics are means over training steps.", ""]
    lines.append("| " + " | ".join(SUMMARY_HEADERS) + " |")
    lines.append("|" + "---|" * len(SUMMARY_HEADERS))
    lines += ["| " + " | ".join(summary_cells(r)) + " |" for r in rows]
    if not rows:
        lines.append("| (no finished runs yet) |" + " |" * (len(SUMMARY_HEADERS) - 1))
    lines += per_seed_markdown(results, [r["arm"] for r in rows])
    if grid is not None and grid.contrasts:
        lines += ["", "Contrasts: the first arm minus the second, paired by seed (points of held-out accuracy).", "",
                  "| contrast | seeds | Δ mean@k | Δ greedy | per seed |", "|---|---|---|---|---|"]
        for c in contrast_rows(results, grid.contrasts):
            per_seed = ", ".join(f"s{s} {_pct(d, signed=True)}" for s, d in zip(c["seeds"], c["diffs"])) or "–"
            lines.append(f"| {c['contrast']} | {len(c['seeds'])} | {_pct(c['mean'], c['ci'], True)} | "
                         f"{_pct(c['greedy'], c['greedy_ci'], True)} | {per_seed} |")
    if unfinished:
        lines += ["", "Not finished yet (not in the table): " +
                  ", ".join(f"{r.arm}-s{r.seed}" for r in unfinished)]
    return "\n".join(lines) + "\n"


def per_seed_markdown(results: list[RunResult], arms: list[str]) -> list[str]:
    """Lines of a table with one cell per arm and seed: held-out mean@k before -> after, and greedy after."""
    done = {(r.arm, r.seed): r for r in results if r.finished and r.final}
    seeds = sorted({seed for _, seed in done})
    if not seeds:
        return []
    lines = ["", "Per seed: held-out mean@k before → after (greedy after), %.", "",
             "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|" + "---|" * (len(seeds) + 1)]
    for arm in arms:
        cells = []
        for seed in seeds:
            run = done.get((arm, seed))
            if run is None:
                cells.append("–")
                continue
            before = run.before.get("eval/accuracy")
            start = f"{_pct(before)} → " if before is not None else ""
            cells.append(f"{start}{_pct(run.final['eval/accuracy'])} "
                         f"({_pct(run.final.get('eval/accuracy_greedy'))})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines
