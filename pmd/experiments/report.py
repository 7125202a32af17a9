"""`pmd report`: one self-contained HTML page about runs and grids: tables, plots and the best memory entries.

    pmd report RUN                          -> RUN/report.html
    pmd report GRID_FOLDER                  -> GRID_FOLDER/report.html, with the grid's results table
    pmd report RUN1 RUN2 --out cmp.html     -> cmp.html (several folders: ./report.html by default)

The page needs no network: the plots are PNGs inlined as `data:` URIs and the style sheet is inline, so the
file can be archived next to a run, mailed, or opened on an offline machine. Everything read from a run folder
(memory text, problem ids, config values, paths) is untrusted: it reaches the page only through `html.escape`.

Runs are drawn per arm (a folder named ARM-sSEED belongs to ARM, any other to `compare.arm_of` of its config):
seeds of one arm are averaged into one line with a band. Two runs with the same arm *and* seed are different
experiments, not seeds, so that arm is split by source folder.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pmd.experiments import compare
from pmd.config import Config, ConfigError

# One colour per arm, the same in every plot and every report; other line labels take the spare colours.
ARM_COLORS = {
    "grpo": "#4c72b0", "sdpo": "#dd8452", "pmd": "#55a868", "pmd-experience": "#8172b3",
    "pmd-insight": "#937860", "pmd-frozen-memory": "#da8bc3", "pmd-frozen-policy": "#8c8c8c",
    "pmd-frozen-reflector": "#ccb974",
}
SPARE_COLORS = ["#64b5cd", "#c44e52", "#17becf", "#bcbd22", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd"]

# Phases of a training step in loop order (pmd/loop.py). time/step and time/memory are totals of these and
# time/eval is an evaluation, not training: none of the three is stacked with the phases.
PHASES = ("generate", "verify", "memory_observe", "reflect", "consolidate", "teacher_context", "memory_record",
          "old_logprobs", "student_forward", "teacher_forward", "loss", "backward", "optimizer", "sync_sampler")
NOT_PHASES = {"step", "memory", "eval"}
PHASE_COLORS = {  # blues: sampling, greens: memory work, purples/oranges/reds: the update, greys: the rest
    "generate": "#4c72b0", "verify": "#a1c9f4", "memory_observe": "#1b7837", "reflect": "#5aae61",
    "consolidate": "#a6dba0", "teacher_context": "#b8e186", "memory_record": "#00441b", "old_logprobs": "#c7b3e6",
    "student_forward": "#8172b3", "teacher_forward": "#dd8452", "loss": "#e9a3c9", "backward": "#ffb482",
    "optimizer": "#c44e52",
    "sync_sampler": "#937860", "other": "#dddddd",
}

FRACTION = (-0.03, 1.03)  # y range of every fraction or rate
LEVELS = ("experience", "insight", "behavior")
LEVEL_STYLES = {"experience": "-", "insight": "--", "behavior": ":"}
MEMORY_ENTRIES_PER_RUN = 10
MEMORY_RUNS_SHOWN = 4
SETUP_KEYS = ("model", "task", "task_params", "finetune", "steps", "problems_per_step", "group_size",
              "max_new_tokens", "learning_rate", "eval_problems", "eval_samples", "eval_every")

BAND_NOTE = ("Line: mean over seeds; band: mean ± 95% CI (Student t) at points that ≥ 3 seeds reach, "
             "min–max over seeds where fewer (a single seed has no band).")

STYLE = {  # plain, light matplotlib style; applied around each plot only (the caller's rcParams are untouched)
    "font.size": 9, "axes.titlesize": 10, "axes.labelsize": 9, "legend.fontsize": 8, "legend.frameon": False,
    "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True, "grid.alpha": 0.3,
    "grid.linewidth": 0.6, "lines.linewidth": 1.6, "figure.dpi": 100, "savefig.dpi": 110,
}


# ------------------------------------------------------------------------------------------------ loading
@dataclass
class Run:
    """One run folder as the report needs it."""

    result: compare.RunResult  # arm, seed, evaluations, diagnostics, finished, wall minutes
    cfg: Config
    rows: list[dict]  # metrics rows, one per step, in step order
    source: str  # name of the folder given on the command line (the grid's, or the run's own)
    group: str = ""  # the line the run is drawn in: its arm, or "arm (source)" when arms collide

    @cached_property
    def train_rows(self) -> list[dict]:
        return [r for r in self.rows if r.get("step", 0) > 0 and "train/loss" in r]

    @property
    def steps_done(self) -> int:
        return max((r["step"] for r in self.train_rows), default=0)

    @property
    def rollouts_per_step(self) -> int:
        return self.cfg.problems_per_step * self.cfg.group_size


def load(path: Path, source: str) -> Run:
    """A run folder's config, metrics rows and results."""
    from pmd.runlog import RunDir  # imports torch: only when a report is actually made

    run_dir = RunDir(path)
    by_step: dict[int, dict] = {}
    for row in run_dir.metrics():
        if isinstance(row.get("step"), int):
            by_step[row["step"]] = row  # a step logged twice (a resume) counts once: the last
    return Run(compare.load_run(path), run_dir.read_config(), [by_step[s] for s in sorted(by_step)], source)


def collect(paths: list[Path]) -> tuple[list[Run], list[tuple[Path, list[Run]]]]:
    """The runs behind the given folders (a grid folder gives each run it has started) and the grids."""
    runs: list[Run] = []
    grids: list[tuple[Path, list[Run]]] = []
    seen: set[Path] = set()

    def add(path: Path, source: str) -> Run | None:
        if path.resolve() in seen:  # the same run given twice (or inside a grid also given) counts once
            return None
        seen.add(path.resolve())
        runs.append(load(path, source))
        return runs[-1]

    for path in paths:
        if (path / "grid.yaml").exists():
            members = [add(p, path.resolve().name) for p in compare.grid_runs(path)]
            grids.append((path, [m for m in members if m is not None]))
        elif (path / "config.yaml").exists():
            add(path, path.resolve().name)
        else:
            raise ValueError(f"{path}: neither a run folder (config.yaml) nor a grid folder (grid.yaml)")
    assign_groups(runs)
    return runs, grids


def assign_groups(runs: list[Run]) -> None:
    """Each run's line label: its arm; for an arm in which two runs share a seed, "arm (source folder)"."""
    pairs = Counter((r.result.arm, r.result.seed) for r in runs)
    split = {arm for (arm, _), n in pairs.items() if n > 1}
    for r in runs:
        r.group = f"{r.result.arm} ({r.source})" if r.result.arm in split else r.result.arm
    if len({(r.group, r.result.seed) for r in runs}) < len(runs):  # sources with equal names: use full paths
        for r in runs:
            if r.result.arm in split:
                r.group = f"{r.result.arm} ({r.result.path})"


def by_group(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs per line label, in the order of compare.ARMS, then by label."""
    arm_order = {a: i for i, a in enumerate(compare.ARMS)}
    ordered = sorted(runs, key=lambda r: (arm_order.get(r.result.arm, len(arm_order)), r.group, r.result.seed))
    groups: dict[str, list[Run]] = {}
    for r in ordered:
        groups.setdefault(r.group, []).append(r)
    return groups


def group_colors(groups: dict[str, list[Run]]) -> dict[str, str]:
    """A plain arm keeps its fixed colour; other labels take spare colours in order."""
    spare = iter(SPARE_COLORS * (1 + len(groups) // len(SPARE_COLORS)))
    return {g: ARM_COLORS[g] if g in ARM_COLORS else next(spare) for g in groups}


# ------------------------------------------------------------------------------------------------ series
def number(value) -> float | None:
    """A finite float, or None (missing keys, booleans, NaN written by an old run)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def series(run: Run, key: str, x: str = "step") -> dict[float, float]:
    """{x: value} over the run's training rows that carry `key`; x is the step or the rollouts consumed."""
    out = {}
    for row in run.train_rows:
        y = number(row.get(key))
        if y is not None:
            out[row_x(run, row, x)] = y
    return out


def row_x(run: Run, row: dict, x: str) -> float:
    if x == "rollouts":  # logged by the trainer; older rows lack it, and it is step x rollouts per step
        return number(row.get("rollouts")) or row["step"] * run.rollouts_per_step
    return row["step"]


def ratio_series(run: Run, num: str, den: str) -> dict[float, float]:
    """{step: num / den} over rows where den > 0 (e.g. reflection parse failures per call)."""
    out = {}
    for row in run.train_rows:
        n, d = number(row.get(num)), number(row.get(den))
        if n is not None and d:
            out[row["step"]] = n / d
    return out


def smooth(points: dict[float, float], window: int) -> dict[float, float]:
    """Trailing moving average over `window` points (fewer at the start)."""
    xs = sorted(points)
    return {x: sum(points[v] for v in xs[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
            for i, x in enumerate(xs)}


def across_seeds(per_seed: list[dict[float, float]]) -> tuple[list, list, list, list]:
    """x, mean, band low, band high over seeds at each x (see BAND_NOTE)."""
    xs = sorted(set().union(*per_seed)) if per_seed else []
    means, lows, highs = [], [], []
    for x in xs:
        ys = [s[x] for s in per_seed if x in s]
        if len(ys) >= 3:
            mean, ci = compare.mean_ci(ys)
            low, high = mean - ci, mean + ci
        else:
            mean, low, high = sum(ys) / len(ys), min(ys), max(ys)
        means.append(mean)
        lows.append(low)
        highs.append(high)
    return xs, means, lows, highs


def phase_seconds(rows: list[dict]) -> dict[str, float]:
    """Mean seconds per training step of each phase, plus `other`: time/step that no phase accounts for.

    A phase missing from a row took no time in that step (consolidate runs every few steps), so it counts 0.
    """
    train = [r for r in rows if r.get("step", 0) > 0 and "train/loss" in r]
    if not train:
        return {}
    found = {k[5:] for r in train for k in r if k.startswith("time/")} - NOT_PHASES
    names = [p for p in PHASES if p in found] + sorted(found - set(PHASES))
    means = {p: sum(number(r.get(f"time/{p}")) or 0.0 for r in train) / len(train) for p in names}
    totals = [number(r.get("time/step")) for r in train]
    totals = [t for t in totals if t is not None]
    if totals:
        other = sum(totals) / len(totals) - sum(means.values())
        if other > 0.01 * max(sum(totals) / len(totals), 1e-9):  # below 1% it is rounding, not a phase
            means["other"] = other
    return {p: s for p, s in means.items() if s > 0}


# ------------------------------------------------------------------------------------------------ plots
@dataclass
class Plot:
    title: str
    caption: str
    png: str  # base64


def mpl_text(text: str) -> str:
    """A label matplotlib shows literally ($ would start math mode)."""
    return str(text).replace("$", r"\$")


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1):
    """A figure on the Agg canvas (no pyplot: no global backend switch, no figure kept alive)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def panels_plot(fig: Figure, flat: list, used: int, title: str, caption: str) -> Plot:
    """A grid of panels as a Plot: legends on the used panels, the unused ones hidden."""
    for i, ax in enumerate(flat):
        if i < used:
            ax.legend(loc="best", fontsize=7)
        else:
            ax.set_visible(False)
    return Plot(title, caption, to_png(fig))


def to_png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def draw_groups(ax, per_group: dict[str, list[dict[float, float]]], colors: dict[str, str], band: bool = True,
                marker: str | None = None, style: str = "-", label_suffix: str = "") -> bool:
    """One mean line (and band) per group that has data; returns whether anything was drawn."""
    drawn = False
    for group, per_seed in per_group.items():
        per_seed = [s for s in per_seed if s]
        if not per_seed:
            continue
        xs, mean, low, high = across_seeds(per_seed)
        ax.plot(xs, mean, color=colors[group], marker=marker, markersize=3.5, linestyle=style,
                label=mpl_text(group + label_suffix))
        if band and len(per_seed) > 1:
            ax.fill_between(xs, low, high, color=colors[group], alpha=0.18, linewidth=0)
        drawn = True
    return drawn


def line_plot(groups, colors, get, title: str, ylabel: str, xlabel: str, caption: str,
              marker: str | None = None, ylim=None) -> Plot | None:
    """The common shape of plots 1-4: one metric per group over one x axis; None when no run has it."""
    per_group = {g: [get(r) for r in runs] for g, runs in groups.items()}
    fig, axes = new_figure(8.5, 3.4)
    ax = axes[0][0]
    if not draw_groups(ax, per_group, colors, marker=marker):
        return None
    ax.set(xlabel=xlabel, ylabel=ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.legend(loc="best")
    return Plot(title, caption, to_png(fig))


def plot_eval(groups, colors) -> Plot | None:
    """1. Held-out accuracy against rollouts consumed: the headline curve, at equal budgets across arms."""
    def get(run: Run) -> dict[float, float]:
        return {ev["rollouts"]: 100 * ev["eval/accuracy"] for ev in run.result.evals
                if number(ev.get("eval/accuracy")) is not None}
    return line_plot(groups, colors, get, "Held-out accuracy", "accuracy (%), mean@k, memory-free",
                     "rollouts consumed",
                     "Held-out accuracy (eval/accuracy, sampled mean@k, memory-free) at each evaluation, against "
                     "the training rollouts consumed so far, so arms are compared at equal budgets. "
                     + BAND_NOTE, marker="o")


def plot_reward(groups, colors) -> Plot | None:
    """2. Training reward against rollouts: is the policy getting better on its own training problems?"""
    longest = max((len(r.train_rows) for runs in groups.values() for r in runs), default=0)
    window = max(1, min(10, longest // 10))
    smoothing = (f"a trailing moving average over {window} steps per seed" if window > 1
                 else "raw per-step values (too few steps to smooth)")
    return line_plot(groups, colors, lambda r: smooth(series(r, "train/reward_mean", "rollouts"), window),
                     "Training reward", "train/reward_mean", "rollouts consumed",
                     f"Mean reward of each step's rollouts (train/reward_mean), {smoothing}. Training problems "
                     "recur across epochs, so this can rise faster than held-out accuracy. " + BAND_NOTE)


def plot_teacher_signal(groups, colors) -> Plot | None:
    """3. How many rollouts got a teacher signal at all (sdpo/pmd): without one a rollout teaches nothing."""
    return line_plot(groups, colors, lambda r: series(r, "teacher/signal_fraction"), "Teacher signal",
                     "teacher/signal_fraction", "step",
                     "Fraction of rollouts whose teacher prompt had a demonstration or feedback to distil "
                     "(sdpo and pmd only; grpo has no teacher). Low values mean most of the batch gave no "
                     "distillation gradient.", ylim=FRACTION)


def plot_divergence(groups, colors) -> Plot | None:
    """4. Teacher-student divergence: how far the context moves the teacher from the student."""
    return line_plot(groups, colors, lambda r: series(r, "teacher/divergence"),
                     "Teacher–student divergence", "divergence per token", "step",
                     "Mean per-token divergence between the student and its context-reading teacher on the "
                     "student's own completions. Near 0 the context changes nothing (no learning signal); "
                     "a steady fall means the student is absorbing what the teacher knows (or the EMA teacher is "
                     "catching up with the student).")


def plot_memory(groups, colors) -> Plot | None:
    """5. Memory size per level (pmd arms): does the memory grow, saturate at its caps, or get pruned?"""
    levels = [lv for lv in LEVELS if any(series(r, f"memory/{lv}_entries") for rs in groups.values() for r in rs)]
    if not levels:
        return None
    fig, axes = new_figure(8.5, 2.9, 1, len(levels))
    for ax, level in zip(axes[0], levels):
        draw_groups(ax, {g: [series(r, f"memory/{level}_entries") for r in rs] for g, rs in groups.items()},
                    colors)
        ax.set(title=level, xlabel="step")
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    axes[0][0].set_ylabel("entries")
    axes[0][0].legend(loc="best")
    return Plot("Memory size", "Entries per memory level after each step (pmd arms only). Experience is capped per "
                "problem, so it grows with the problems visited; insight grows with reflections; behaviors appear "
                "at consolidation steps. A level stuck at 0 is not being written.", to_png(fig))


def plot_time(groups, colors) -> Plot | None:
    """6. Where a training step's seconds go, per arm: the cost side of each method."""
    seconds = {g: phase_seconds([row for r in rs for row in r.rows]) for g, rs in groups.items()}
    seconds = {g: s for g, s in seconds.items() if s}
    if not seconds:
        return None
    phases = [p for p in (*PHASES, *sorted({p for s in seconds.values() for p in s} - set(PHASES) - {"other"}),
                          "other") if any(p in s for s in seconds.values())]
    spare = iter(SPARE_COLORS * (1 + len(phases) // len(SPARE_COLORS)))
    palette = {p: PHASE_COLORS.get(p) or next(spare) for p in phases}  # a phase keeps its colour everywhere
    fig, axes = new_figure(8.5, 1.6 + 0.45 * len(seconds))
    ax = axes[0][0]
    labels = list(seconds)[::-1]  # first group on top
    for phase in phases:
        left = [sum(seconds[g].get(p, 0.0) for p in phases[:phases.index(phase)]) for g in labels]
        ax.barh(range(len(labels)), [seconds[g].get(phase, 0.0) for g in labels], left=left, height=0.6,
                color=palette[phase], edgecolor="white", linewidth=0.5, label=mpl_text(phase))
    for i, g in enumerate(labels):
        ax.text(sum(seconds[g].values()), i, f"  {sum(seconds[g].values()):.1f} s", va="center", fontsize=8)
    ax.set_yticks(range(len(labels)), [mpl_text(g) for g in labels])
    ax.set_xlabel("seconds per training step (mean)")
    ax.grid(axis="y", visible=False)
    ax.margins(x=0.12)
    fig.legend(loc="outside lower center", ncols=min(7, len(phases)), fontsize=7.5)
    return Plot("Time per phase", "Mean wall seconds per training step, by phase, over every training step of "
                "every seed (evaluation time excluded). `other` is step time that no phase covers. The memory "
                "phases (memory_observe, reflect, consolidate, teacher_context, memory_record) are PMD's "
                "overhead over SDPO.", to_png(fig))


def plot_diagnostics(groups, colors) -> Plot | None:
    """7. Is the memory useful to the teacher, which levels reach its prompt, and does reflection parse?"""
    panels = []
    for key, title in (("teacher/prefers_pass", "teacher prefers passing rollout"),
                       ("teacher/lift_prefers_pass", "teacher lift prefers passing rollout")):
        data = {g: [series(r, key) for r in rs] for g, rs in groups.items()}
        if any(any(s) for s in data.values()):
            panels.append((title, data, 0.5, None))
    levels = {lv: {g: [series(r, f"teacher/context_{lv}_fraction") for r in rs] for g, rs in groups.items()}
              for lv in LEVELS}
    levels = {lv: d for lv, d in levels.items() if any(any(s) for s in d.values())}
    if levels:
        panels.append(("teacher context: fraction with each level", None, None, levels))
    fails = {g: [ratio_series(r, "memory/reflect_parse_fail", "memory/reflect_calls") for r in rs]
             for g, rs in groups.items()}
    if any(any(s) for s in fails.values()):
        panels.append(("reflection parse-fail rate", fails, None, None))
    if not panels:
        return None
    rows = (len(panels) + 1) // 2
    fig, axes = new_figure(8.5, 2.8 * rows, rows, 2)
    flat = [ax for row in axes for ax in row]
    for ax, (title, data, reference, by_level) in zip(flat, panels):
        if by_level:  # colour = arm, line style = level
            for level, per_group in by_level.items():
                draw_groups(ax, per_group, colors, band=False, style=LEVEL_STYLES[level],
                            label_suffix=f" · {level}")
        else:
            draw_groups(ax, data, colors)
        if reference is not None:
            ax.axhline(reference, color="#999999", linestyle="--", linewidth=0.8)
        ax.set(title=title, xlabel="step", ylim=FRACTION)
    return panels_plot(fig, flat, len(panels), "Diagnostics",
                       "Teacher prefers pass: over (passing, failing) rollout pairs of a group, the fraction in which the "
                       "teacher gives the passing one the higher mean log-prob; lift prefers pass compares teacher minus "
                       "student log-prob, which is the direction the distillation gradient pushes. Near 0.5 (dashed) the "
                       "context does not help the teacher tell good from bad rollouts. Context levels: the fraction of "
                       "rollouts whose teacher prompt held each memory level (line style = level; mean over seeds). "
                       "Parse-fail rate: reflection outputs that yielded no kept entry, per reflection call.")


def plot_teacher_direction(groups, colors) -> Plot | None:
    """8. Does the teacher's context favour passing answers at the answer tokens, and let the student stop?"""
    panels = [(key, title) for key, title in (
        ("teacher/answer_lift_gap", "answer tokens: lift on passing minus failing rows"),
        ("teacher/answer_lift_fail", "answer tokens: lift on failing rows"),
        ("teacher/eos_lift", "EOS where the student stopped: lift"),
        ("teacher/answer_divergence_share", "divergence share on answer tokens"))
        if any(series(r, key) for rs in groups.values() for r in rs)]
    if not panels:
        return None
    rows = (len(panels) + 1) // 2
    fig, axes = new_figure(8.5, 2.8 * rows, rows, 2)
    flat = [ax for row in axes for ax in row]
    for ax, (key, title) in zip(flat, panels):
        draw_groups(ax, {g: [series(r, key) for r in rs] for g, rs in groups.items()}, colors)
        if "share" not in key:
            ax.axhline(0.0, color="#999999", linestyle="--", linewidth=0.8)
        ax.set(title=title, xlabel="step")
    return panels_plot(fig, flat, len(panels), "Teacher direction",
                       "Lift = teacher minus student log-prob of the student's own token (docs/method.md §16). On the "
                       "tokens of the final answer, a helpful teacher raises passing answers and lowers failing ones "
                       "(gap above 0, failing lift below 0). At the end-of-sequence token where the student stopped, a "
                       "negative lift teaches the student to keep going. The divergence share on answer tokens shows "
                       "whether the distillation signal sits on the answer or on the rest of the text.")


PLOTS = (plot_eval, plot_reward, plot_teacher_signal, plot_divergence, plot_memory, plot_time, plot_diagnostics,
         plot_teacher_direction)


def make_plots(runs: list[Run]) -> list[Plot]:
    groups = by_group(runs)
    colors = group_colors(groups)
    pmd_groups = {g: rs for g, rs in groups.items() if rs[0].cfg.method == "pmd"}
    plots = []
    with matplotlib.rc_context(STYLE):
        for make in PLOTS:
            plot = make(pmd_groups if make is plot_memory else groups, colors)
            if plot is not None:
                plots.append(plot)
    return plots


# ------------------------------------------------------------------------------------------------ html
e = html.escape  # every run-derived string goes through this


def table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), cls: str = "") -> str:
    """An HTML table; cells must already be escaped (they may hold markup of ours, e.g. <code>)."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def pct(value) -> str:
    v = number(value)
    return "–" if v is None else f"{100 * v:.1f}"


def setup_section(runs: list[Run]) -> str:
    """The config keys that define the comparison: one value, or every value when runs differ."""
    rows = []
    for key in SETUP_KEYS:
        values = sorted({str(getattr(r.cfg, key)) for r in runs})
        shown = values[0] if len(values) == 1 else \
            "varies: " + " | ".join(values[:6]) + (" …" if len(values) > 6 else "")
        rows.append([f"<code>{e(key)}</code>", e(shown)])
    return "<h2>Setup</h2>" + table(["key", "value"], rows, cls="setup")


def results_section(title: str, runs: list[Run], grid_folder: Path | None = None) -> str:
    """The per-arm results table of compare.summarize, with the columns of results.md."""
    out = [f"<h2>{e(title)}</h2>"]
    if grid_folder is not None:
        try:
            grid = compare.load_grid(grid_folder)
            if grid.description:
                out.append(f"<p>{e(grid.description)}</p>")
            shared = ", ".join(f"{k}={v}" for k, v in grid.config.items())
            out.append(f"<p>Shared config: <code>{e(shared or '(defaults)')}</code></p>")
        except (ConfigError, OSError) as error:
            out.append(f'<p class="note">grid.yaml could not be read: {e(str(error))}</p>')
    rows = compare.summarize([r.result for r in runs])
    out.append("<p class=\"note\">Held-out accuracy (%) at the final evaluation, memory-free: mean over seeds "
               "± 95% CI (Student t). Δ columns: the arm minus the baseline, paired by seed. Diagnostics are "
               "means over training steps. Only finished runs count.</p>")
    headers = list(compare.SUMMARY_HEADERS)
    cells = [[e(c) for c in compare.summary_cells(r)] for r in rows]
    if cells:
        out.append(table(headers, cells, numeric=set(range(1, len(headers)))))
    else:
        out.append('<p class="note">No finished run with an evaluation yet.</p>')
    unfinished = [r for r in runs if not r.result.finished]
    if unfinished:
        out.append('<p class="note">Not finished yet (not in the table): '
                   + e(", ".join(f"{r.result.arm}-s{r.result.seed} (step {r.steps_done})" for r in unfinished))
                   + "</p>")
    return "\n".join(out)


def runs_section(runs: list[Run]) -> str:
    """One line per run: where it stands and where it lives."""
    rows = []
    for group, members in by_group(runs).items():
        for r in members:
            final = r.result.final
            rows.append([e(group), e(str(r.result.seed)), f"{r.steps_done} / {r.cfg.steps}",
                         "finished" if r.result.finished else "not finished",
                         pct(final.get("eval/accuracy")), pct(final.get("eval/accuracy_greedy")),
                         compare._num(r.result.wall_minutes, 1), f"<code>{e(str(r.result.path))}</code>"])
    return "<h2>Runs</h2>" + table(["arm", "seed", "steps", "state", "final eval % (mean@k)", "greedy %",
                                    "wall min", "run folder"], rows, numeric={1, 2, 4, 5, 6})


def plots_section(plots: list[Plot], runs: list[Run]) -> str:
    out = ["<h2>Plots</h2>", f'<p class="note">Colours are per arm throughout. {e(BAND_NOTE)}</p>']
    if not any(r.result.evals for r in runs):
        out.append('<p class="note">No evaluation rows in these runs (eval_problems=0, or no evaluation yet), '
                   "so there is no held-out accuracy plot.</p>")
    for p in plots:
        out.append(f'<figure><h3>{e(p.title)}</h3><img src="data:image/png;base64,{p.png}" alt="{e(p.title)}">'
                   f"<figcaption>{e(p.caption)}</figcaption></figure>")
    if not plots:
        out.append('<p class="note">No training steps logged yet: nothing to plot.</p>')
    return "\n".join(out)


def top_entries(path: Path, limit: int = MEMORY_ENTRIES_PER_RUN) -> list[dict]:
    """The run's memory entries with the highest utility (ties: more uses, more support, higher level)."""
    from pmd.memory import MEMORY_FILENAME, MemoryStore

    with MemoryStore(path / MEMORY_FILENAME, readonly=True) as store:
        entries = list(store.entries())
    rank = {lv: i for i, lv in enumerate(LEVELS)}
    entries.sort(key=lambda x: (-x["utility"], -x["uses"], -x.get("support", 1), -rank[x["level"]], x["id"]))
    return entries[:limit]


def clip(text, limit: int = 400) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def entry_row(x: dict) -> list[str]:
    """One memory entry as escaped table cells, provenance included."""
    text = e(clip(x["text"]))
    if x.get("cue"):
        text += f'<div class="cue">when: {e(clip(x["cue"], 200))}</div>'
    if x["level"] == "experience" and x.get("feedback"):
        text += f'<div class="cue">feedback: {e(clip(x["feedback"], 200))}</div>'
    problems = [x["problem"]] if x["problem"] is not None else list(x.get("problem_ids") or [])
    sources = [str(s) for s in x["source_rollouts"]]
    return [e(f"{x['level']}/{x['kind']}"), f'<div class="text">{text}</div>', f"{x['utility']:+.3f}",
            str(x["uses"]), str(x.get("support", 1)),
            e(", ".join(map(str, problems[:4])) + (f" (+{len(problems) - 4})" if len(problems) > 4 else "")),
            str(x["created_step"]),
            e(", ".join(sources[:8]) + (f" (+{len(sources) - 8})" if len(sources) > 8 else "") or "–")]


def memory_section(runs: list[Run]) -> str:
    """Best memory entries of the best few pmd runs (finished first, then final accuracy, then progress)."""
    from pmd.memory import MEMORY_FILENAME

    with_memory = [r for r in runs if r.cfg.method == "pmd" and (r.result.path / MEMORY_FILENAME).exists()]
    if not with_memory:
        return ""
    def merit(r: Run) -> tuple:
        accuracy = number(r.result.final.get("eval/accuracy"))
        return r.result.finished, -1.0 if accuracy is None else accuracy, r.steps_done

    with_memory.sort(key=merit, reverse=True)
    out = ["<h2>Memory: top entries by utility</h2>",
           '<p class="note">Utility = helpful / (uses + 2), where helpful is the credit an entry received when its '
           "problem did better than others after the entry was in the teacher context. Sources are rollout ids "
           "(<code>step-index</code> in rollouts.jsonl) or the insights a behavior was built from.</p>"]
    for r in with_memory[:MEMORY_RUNS_SHOWN]:
        out.append(f"<h3>{e(r.group)}, seed {e(str(r.result.seed))} <small><code>{e(str(r.result.path))}</code>"
                   "</small></h3>")
        try:
            entries = top_entries(r.result.path)
        except sqlite3.Error as error:  # e.g. a store mid-restore; the rest of the page is still useful
            out.append(f'<p class="note">memory.sqlite could not be read: {e(str(error))}</p>')
            continue
        if entries:
            out.append(table(["level", "text", "utility", "uses", "support", "problem(s)", "created step",
                              "sources"], [entry_row(x) for x in entries], numeric={2, 3, 4, 6}, cls="memory"))
        else:
            out.append('<p class="note">(no entries)</p>')
    if len(with_memory) > MEMORY_RUNS_SHOWN:
        out.append(f'<p class="note">{len(with_memory) - MEMORY_RUNS_SHOWN} more pmd run(s) not shown; '
                   "see <code>pmd memory show RUN</code>.</p>")
    return "\n".join(out)


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0 auto;
       max-width: 1120px; padding: 16px 24px 48px; line-height: 1.4; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.02em; margin: 1.2em 0 0.4em; } .meta, .note, figcaption { color: #555; font-size: 0.88em; }
table { border-collapse: collapse; font-size: 0.82em; margin: 0.4em 0 0.8em; }
th, td { border: 1px solid #ddd; padding: 3px 7px; vertical-align: top; text-align: left; }
th { background: #f3f4f6; } tbody tr:nth-child(even) { background: #fafafa; } td.num { text-align: right; }
code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 0.95em; word-break: break-all; }
table.memory .text { white-space: pre-wrap; max-width: 520px; } .cue { color: #666; margin-top: 2px; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def render(runs: list[Run], grids: list[tuple[Path, list[Run]]], title: str, sources: list[Path]) -> str:
    """The whole page as one string."""
    parts = [f"<h1>{e(title)}</h1>",
             f'<p class="meta">Generated {e(time.strftime("%Y-%m-%d %H:%M"))} by <code>pmd report</code> from '
             + ", ".join(f"<code>{e(str(p))}</code>" for p in sources) + f". {len(runs)} run(s).</p>"]
    if runs:
        parts.append(setup_section(runs))
    for folder, members in grids:
        parts.append(results_section(f"Results: {folder.resolve().name}", members, folder))
    in_grid = {id(r) for _, members in grids for r in members}
    loose = [r for r in runs if id(r) not in in_grid]
    if loose and len({(r.result.arm, r.result.seed) for r in loose}) == len(loose):
        if any(r.result.finished and r.result.evals for r in loose):
            parts.append(results_section("Results" if not grids else "Results: other runs", loose))
    if runs:
        parts.append(runs_section(runs))
        parts.append(plots_section(make_plots(runs), runs))
        parts.append(memory_section(runs))
    else:
        parts.append('<p class="note">No runs have started yet.</p>')
    body = "\n".join(p for p in parts if p)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def default_title(paths: list[Path]) -> str:
    names = [p.resolve().name for p in paths]
    shown = ", ".join(names) if len(names) <= 4 else f"{', '.join(names[:3])} and {len(names) - 3} more"
    return f"pmd report: {shown}"


def write_report(paths: list[str | Path], out: str | Path | None = None, title: str | None = None) -> Path:
    """Write the HTML report of run and/or grid folders; returns the file written.

    `out` defaults to FOLDER/report.html for one folder, else ./report.html. The page is written to a
    temporary file and renamed, so a browser never sees half of it.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("pmd report needs at least one run or grid folder")
    runs, grids = collect(paths)
    target = Path(out) if out else (paths[0] / "report.html" if len(paths) == 1 else Path.cwd() / "report.html")
    page = render(runs, grids, title or default_title(paths), paths)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(page, encoding="utf-8")
    os.replace(partial, target)
    return target
