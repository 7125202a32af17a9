"""`pmd report` on synthetic run and grid folders: no model, no training; a few seconds."""

from __future__ import annotations

import base64
import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pmd import config as config_mod
from pmd.experiments import compare, report
from pmd.experiments.report import phase_seconds, write_report
from pmd.memory import MemoryConfig, MemoryStore, Rollout
from pmd.metrics import LEGACY_NAMES, upgrade
from pmd.runlog import RunDir

SCRIPT = "<script>alert(1)</script>"
STEPS, PROBLEMS, GROUP = 6, 2, 4
# final held-out accuracy per arm and seed; every arm starts at 0.30 and is halfway at step 3
FINAL = {"grpo": {0: 0.40, 1: 0.50}, "sdpo": {0: 0.45, 1: 0.55}, "pmd": {0: 0.50, 1: 0.70}}
IMG = '<img src="data:image/png;base64,'


def metrics_rows(method: str, final: float | None, steps: int = STEPS, evals: bool = True) -> list[dict]:
    """A plausible metrics.jsonl: a step-0 eval row, training rows (keys by method), eval rows at 3 and 6."""
    rows = [{"step": 0, "eval/accuracy": 0.30, "eval/accuracy_greedy": 0.25}] if evals else []
    for step in range(1, steps + 1):
        row = {"step": step, "train/loss": 0.1 / step, "train/reward_mean": 0.1 * step,
               "rollouts": step * PROBLEMS * GROUP,
               "time/generate": 4.0, "time/verify": 0.5, "time/student_forward": 1.0, "time/backward": 1.5,
               "time/optimizer": 0.1, "time/step": 8.0}
        if method in ("sdpo", "pmd"):
            row.update({"teacher/signal_fraction": 0.5 + 0.04 * step, "teacher/divergence": 0.05 / step,
                        "teacher/prefers_pass": 0.6, "teacher/lift_prefers_pass": 0.55,
                        "time/teacher_forward": 0.8})
        if method == "pmd":
            row.update({"teacher/context_experience_fraction": 1.0, "teacher/context_insight_fraction": 0.8,
                        "teacher/context_behavior_fraction": 0.1 * step, "memory/reflect_calls": 2.0,
                        "memory/reflect_parse_fail": 1.0, "time/reflect": 1.2, "time/memory": 1.3,
                        "time/memory_observe": 0.1})
            for i, level in enumerate(("experience", "insight", "behavior")):
                row[f"memory/{level}_entries"] = (3 - i) * step
                row[f"memory/{level}_tokens"] = 20 * (3 - i) * step
        if evals and final is not None and step in (3, steps):
            accuracy = final if step == steps else (0.30 + final) / 2
            row.update({"eval/accuracy": accuracy, "eval/accuracy_greedy": accuracy - 0.05, "time/eval": 30.0})
        rows.append(row)
    return rows


def make_run(path: Path, method: str, seed: int, final: float | None, finished: bool = True,
             steps_done: int = STEPS, evals: bool = True) -> Path:
    keys = {"method": method, "seed": seed, "output_dir": str(path), "steps": STEPS, "problems_per_step": PROBLEMS,
            "group_size": GROUP, "eval_every": 3, "eval_problems": 10 if evals else 0}
    run = RunDir(path)
    run.write_config(config_mod.apply(config_mod.Config(), keys))
    run.append("metrics.jsonl", metrics_rows(method, final, steps_done, evals))
    if finished:
        (path / "summary.json").write_text('{"wall_seconds_this_session": 120.0}')
    if method == "pmd":
        make_memory(path)
    return path


# memory of every pmd run: utilities spread out so "top 10 by utility" has a definite answer
POSITIVE = [f"strategy {i}: align the digits before adding" for i in range(8)]
NEGATIVE = [f"lesson {i}: guessing the answer fails" for i in range(3)]


def make_memory(path: Path) -> None:
    with MemoryStore.for_run(path, MemoryConfig(l2_max_strategies=10, l2_max_lessons=10)) as store:
        store.add_rollouts(1, "chain_sum/train/7", [Rollout("3 + 4 = 7. Answer: 7", 1.0, True, rollout_id="1-0"),
                                                    Rollout("Answer: 8", 0.0, False, "8 is wrong", "1-3")])
        ids = store.add_insights(2, "chain_sum/train/7", strategies=POSITIVE, lessons=NEGATIVE + [SCRIPT],
                                 source_rollouts=["1-0", "1-3"])
        behavior = store.add_behavior(4, "add-carefully", "Add column by column.", "WHEN: sums of numbers",
                                      ["chain_sum/train/7", "chain_sum/train/9", "chain_sum/train/11"],
                                      ["insight:3", "insight:5"])
        for rank, entry_id in enumerate(ids[:8]):  # POSITIVE: utility grows with the index
            store.credit([entry_id], 0.1 * (rank + 1), step=3)
        for entry_id in ids[8:11]:  # NEGATIVE: below every other entry
            store.credit([entry_id], -0.5, step=3)
        store.credit([ids[11]], 5.0, step=3)  # the script entry is the best one: it must be shown, escaped
        store.record_usage(4, [behavior])


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """A finished 3-arm x 2-seed grid folder, as `pmd compare` lays it out."""
    folder = tmp_path_factory.mktemp("grid")
    spec = compare.make_grid({"steps": STEPS, "problems_per_step": PROBLEMS, "group_size": GROUP},
                             list(FINAL), [0, 1], "three arms <b>bold</b>")
    (folder / "grid.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    for arm, seeds in FINAL.items():
        for seed, final in seeds.items():
            make_run(folder / "runs" / f"{arm}-s{seed}", arm, seed, final)
    return folder


@pytest.fixture(scope="module")
def grid_html(grid) -> str:
    out = write_report([grid])
    assert out == grid / "report.html"  # one folder: the report goes into it
    return out.read_text()


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_grid_report_has_every_plot_as_inline_png(grid_html):
    pngs = images(grid_html)
    # all seven plots: eval, reward, teacher signal, divergence, memory, time, diagnostics
    assert len(pngs) == 7 and grid_html.count(IMG) == 7
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 5000 for p in pngs)
    for title in ("Held-out accuracy", "Training reward", "Teacher signal", "Teacher–student divergence",
                  "Memory size", "Time per phase", "Diagnostics"):
        assert f"<h3>{title}</h3>" in grid_html


def test_grid_report_needs_no_network_and_runs_no_script(grid_html):
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', grid_html, re.I)
    assert "<link" not in grid_html.lower() and "@import" not in grid_html and "url(" not in grid_html
    assert "<script" not in grid_html.lower()  # the memory entry below included: it is text, not markup
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in grid_html
    assert "three arms &lt;b&gt;bold&lt;/b&gt;" in grid_html  # the grid description is untrusted too


def test_grid_report_results_table(grid_html):
    from scipy import stats

    for arm in FINAL:
        assert re.search(rf"<td>{arm}</td><td class=\"num\">2</td>", grid_html), arm  # every arm: a row, 2 seeds
    half = stats.t.ppf(0.975, 1) / math.sqrt(2)  # 95% CI half-width of a mean of two, per unit of SD

    def mean_ci(values):
        mean = sum(values) / 2
        sd = math.sqrt(sum((v - mean) ** 2 for v in values))
        return f"{100 * mean:.1f} ± {100 * sd * half:.1f}"

    pmd = list(FINAL["pmd"].values())
    assert mean_ci(pmd) in grid_html  # per-arm mean ± CI
    vs_grpo = [FINAL["pmd"][s] - FINAL["grpo"][s] for s in (0, 1)]
    vs_sdpo = [FINAL["pmd"][s] - FINAL["sdpo"][s] for s in (0, 1)]
    assert "+" + mean_ci(vs_grpo) in grid_html and "+" + mean_ci(vs_sdpo) in grid_html  # paired deltas
    for column in ("Δ vs SDPO", "Δ vs GRPO", "teacher prefers pass", "lift prefers pass", "parse fail"):
        assert f"<th>{column}</th>" in grid_html
    # pmd's diagnostics: signal is the mean of 0.54..0.74, parse-fail rate 1 of 2 calls
    row = re.search(r"<tr><td>pmd</td>.*?</tr>", grid_html).group(0)
    assert "<td class=\"num\">0.64</td>" in row and "<td class=\"num\">0.50</td>" in row


def test_grid_report_memory_top_entries_with_provenance(grid_html):
    section = grid_html.split("Memory: top entries by utility")[1]
    first_run = section.split("<h3>")[1]
    assert first_run.count("<tr>") == 1 + 10  # header + at most 10 entries
    assert all(text in first_run for text in POSITIVE[-4:])  # the highest utilities
    assert not any(text in first_run for text in NEGATIVE)  # the lowest are cut by the limit
    assert first_run.index("&lt;script&gt;") < first_run.index(POSITIVE[-1])  # best utility first
    assert "1-0, 1-3" in first_run  # source rollouts
    assert "chain_sum/train/7" in first_run and "insight/strategy" in first_run


def test_runs_table_and_single_run_in_progress_without_evals(tmp_path):
    run = make_run(tmp_path / "pmd-live", "pmd", 3, None, finished=False, steps_done=2, evals=False)
    out = write_report([run])
    assert out == run / "report.html" and out.exists()
    page = out.read_text()
    assert f"2 / {STEPS}" in page and "not finished" in page
    assert "No evaluation rows" in page and "<h3>Held-out accuracy</h3>" not in page
    assert page.count(IMG) == 6  # every plot but the accuracy curve
    assert "&lt;script&gt;" in page and "<script" not in page


def test_several_runs_default_to_cwd_and_same_arm_seed_stay_apart(tmp_path, monkeypatch):
    a = make_run(tmp_path / "lr-high", "sdpo", 0, 0.6)
    b = make_run(tmp_path / "lr-low", "sdpo", 0, 0.4)
    c = make_run(tmp_path / "base", "grpo", 0, 0.3)
    monkeypatch.chdir(tmp_path)
    out = write_report([a, b, c], title="cmp <i>x</i>")
    assert out == Path.cwd() / "report.html" and out.exists()
    page = out.read_text()
    assert "<title>cmp &lt;i&gt;x&lt;/i&gt;</title>" in page
    # two sdpo seed-0 runs are two experiments, not two seeds: one line each
    assert "<td>sdpo (lr-high)</td>" in page and "<td>sdpo (lr-low)</td>" in page and "<td>grpo</td>" in page
    assert page.count(IMG) == 6  # no pmd run: no memory plot
    explicit = write_report([a, c], out=tmp_path / "sub" / "cmp.html")
    assert explicit == tmp_path / "sub" / "cmp.html" and explicit.read_text().count(IMG) == 6


def flat(row: dict) -> dict:
    """The same metrics row as a run folder written before the metric namespaces holds it."""
    old = {new: name for name, new in LEGACY_NAMES.items()}
    return {old.get(k) or k.replace("memory/reflect_", "reflect/"): v for k, v in row.items()}


def test_a_grid_written_with_the_flat_names_gives_the_same_tables(grid, tmp_path):
    folders = {}
    for names in ("namespaced", "flat"):
        folders[names] = shutil.copytree(grid, tmp_path / names, ignore=shutil.ignore_patterns("report.html"))
    for metrics in folders["flat"].glob("runs/*/metrics.jsonl"):
        rows = RunDir(metrics.parent).read("metrics.jsonl")
        assert all(upgrade(flat(r)) == r for r in rows) and any(flat(r) != r for r in rows)
        metrics.unlink()
        RunDir(metrics.parent).append("metrics.jsonl", [flat(r) for r in rows])
    tables = {}
    for names, folder in folders.items():
        md, csv = compare.write_results(folder)
        tables[names] = (md.read_text(), csv.read_text(),
                         report.results_section("Results", report.collect([folder])[1][0][1], folder))
    assert tables["flat"] == tables["namespaced"]
    assert "| pmd | 2 |" in tables["flat"][0] and "<td>pmd</td>" in tables["flat"][2]


def test_not_a_run_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="neither a run folder"):
        write_report([tmp_path])


def test_phase_seconds_stacks_phases_not_totals():
    rows = [{"step": 0, "eval/accuracy": 0.1, "time/eval": 99.0},
            {"step": 1, "train/loss": 0.0, "time/generate": 4.0, "time/backward": 3.0, "time/reflect": 1.0,
             "time/memory": 1.0, "time/step": 10.0, "time/eval": 50.0},
            {"step": 2, "train/loss": 0.0, "time/generate": 2.0, "time/backward": 3.0, "time/step": 6.0}]
    seconds = phase_seconds(rows)
    # reflect ran in one step of two: 0.5 s per step; other = mean step (8) - phases (3 + 3 + 0.5)
    assert seconds == {"generate": 3.0, "reflect": 0.5, "backward": 3.0, "other": 1.5}
    assert list(seconds) == ["generate", "reflect", "backward", "other"]  # loop order


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_chromium_renders_the_report(grid, grid_html, tmp_path):
    page = grid / "report.html"  # written by the grid_html fixture
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,3000", f"--screenshot={shot}",
         page.resolve().as_uri()], capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.exists() and shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 50_000
    assert ":CONSOLE" not in result.stderr  # the page logs nothing (it has no script; a broken resource would)
