"""`pmd compare`: grid specs, the results statistics, and a tiny grid end to end (with `pmd report`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from scipy import stats

from pmd.cli import main as cli
from pmd.config import ConfigError
from pmd.experiments import compare
from pmd.runlog import RunDir
from pmd.update import preference_metrics, teacher_preference

TINY_GRID = {"model": "tiny-random", "steps": 2, "problems_per_step": 2, "group_size": 4, "max_new_tokens": 8,
             "eval_problems": 4, "eval_samples": 2, "eval_every": 1, "save_every": 1, "train_problems": 20,
             "learning_rate": 1e-3, "distillation_topk": 20, "micro_batch_size": 4, "threads": 1}


# ------------------------------------------------------------------------------------------------ statistics
def test_mean_ci_matches_scipy_t_interval():
    values = [0.12, 0.30, 0.18, 0.25]
    mean, half = compare.mean_ci(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert mean == pytest.approx((low + high) / 2)
    assert half == pytest.approx((high - low) / 2)


def test_mean_ci_small_samples():
    assert compare.mean_ci([0.4])[0] == 0.4
    assert compare.mean_ci([0.4])[1] != compare.mean_ci([0.4])[1]  # nan: no interval from one seed
    assert all(x != x for x in compare.mean_ci([]))


def _result(arm, seed, final, before=0.1, finished=True, **diag):
    evals = [{"step": 0, "rollouts": 0, "eval/accuracy": before, "eval/accuracy_greedy": before},
             {"step": 4, "rollouts": 32, "eval/accuracy": final, "eval/accuracy_greedy": final / 2}]
    return compare.RunResult(arm, seed, Path("."), evals, diag, finished, 1.0)


def test_results_table_lists_every_seed_of_every_arm():
    results = [_result("grpo", 0, 0.20, before=0.10), _result("grpo", 1, 0.30, before=0.12),
               _result("pmd", 1, 0.40, before=0.12), _result("pmd", 0, 0.9, finished=False)]
    table = compare.results_markdown(compare.summarize(results), results)
    assert "| arm | seed 0 | seed 1 |" in table
    assert "| grpo | 10.0 → 20.0 (10.0) | 12.0 → 30.0 (15.0) |" in table
    assert "| pmd | – | 12.0 → 40.0 (20.0) |" in table  # an unfinished run has no cell
    assert compare.per_seed_markdown([], []) == []


def test_summarize_pairs_by_seed_and_skips_unfinished():
    results = [_result("sdpo", 0, 0.20), _result("sdpo", 1, 0.30), _result("sdpo", 2, 0.50),
               _result("pmd", 0, 0.25, teacher_prefers_pass=0.6), _result("pmd", 1, 0.40),
               _result("pmd", 2, 0.90, finished=False)]
    rows = {r["arm"]: r for r in compare.summarize(results)}
    assert rows["pmd"]["seeds"] == 2  # the unfinished seed-2 run is not compared
    assert rows["pmd"]["accuracy"] == pytest.approx(0.325)
    # paired: seeds 0 and 1 only, differences 0.05 and 0.10
    assert rows["pmd"]["vs_sdpo"] == pytest.approx(0.075)
    assert rows["pmd"]["vs_sdpo_pairs"] == 2
    assert rows["pmd"]["vs_sdpo_ci"] == pytest.approx(compare.mean_ci([0.05, 0.10])[1])
    assert rows["sdpo"]["vs_sdpo_pairs"] == 0 and rows["pmd"]["vs_grpo_pairs"] == 0
    assert rows["pmd"]["teacher_prefers_pass"] == pytest.approx(0.6)
    assert list(rows) == ["sdpo", "pmd"]  # ARMS order


def test_teacher_preference_counts_pass_fail_pairs_within_groups():
    # group 0: pass 0 vs fails 1, 2; group 1: rollout 4 passes but no failing rollout was scored
    logps = {0: (-1.0, -1.2), 1: (-2.0, -1.5), 2: (-0.5, -0.2), 4: (-1.0, -1.0)}
    passed = [True, False, False, True, True, False, True, True]
    out = preference_metrics(teacher_preference(logps, passed, 4))
    assert out["teacher/preference_pairs"] == 2
    assert out["teacher/prefers_pass"] == 0.5  # above fail 1, below fail 2
    assert out["teacher/lift_prefers_pass"] == 1.0  # lift +0.2 beats -0.5 and -0.3
    assert preference_metrics(teacher_preference({0: (-1, -1)}, [True, True], 2)) == {}


# ------------------------------------------------------------------------------------------------ grid spec
def test_arm_of_round_trips_every_arm():
    for arm, keys in compare.ARMS.items():
        assert compare.arm_of({"method": "pmd", **keys}) == arm


def test_presets_load_and_validate():
    presets = compare.list_presets()
    assert {"smollm2-chain-sum", "qwen-coder-humaneval"} <= set(presets)
    a = compare.load_grid("smollm2-chain-sum")
    assert set(a.arms) == set(compare.ARMS) and len(a.seeds) >= 3
    b = compare.load_grid("qwen-coder-humaneval")
    assert b.config["task"] == "humaneval" and len(b.seeds) >= 2


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "docs" / "results").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_the_results_grids_load_and_every_run_config_validates(path, tmp_path):
    """The grid files README Results reproduces from: a misspelt key or a bad value fails here, not an hour in."""
    grid = compare.load_grid(path)
    assert grid.arms and grid.seeds
    for arm in grid.arms:
        cfg = grid.run_config(arm, grid.seeds[0], tmp_path)
        cfg.validate()
        assert cfg.model and cfg.seed == grid.seeds[0]


@pytest.mark.parametrize("config, arms, seeds, message", [
    ({}, ["grpo", "nope"], [0], "'nope' is not an arm"),
    ({"method": "pmd"}, ["grpo"], [0], "set by each arm"),
    ({"seed": 3}, ["grpo"], [0], "set by each arm"),
    ({"stepz": 3}, ["grpo"], [0], "stepz"),
    ({"steps": 0}, ["grpo"], [0], "steps"),
    ({}, ["grpo"], ["x"], "seeds"),
    ({}, ["grpo", "grpo"], [0], "repeat"),
    ({}, [{"grpo": {"method": "sdpo"}}], [0], "built-in arm"),
    ({}, [{"mine-s1": {"method": "pmd"}}], [0], "-s<digits>"),
    ({}, [{"mine": {"method": "pmd", "stepz": 1}}], [0], "arm 'mine'.*stepz"),
    ({}, [{"mine": {"seed": 1}}], [0], "belong to the grid"),
    ({}, [{"mine": {}}], [0], "needs a mapping"),
    ({"objective": "signed"}, [{"mine": {"method": "pmd"}}], [0], "set by each arm"),
])
def test_bad_grids_name_the_problem(config, arms, seeds, message):
    with pytest.raises(ConfigError, match=message):
        compare.make_grid(config, arms, seeds)


def test_a_custom_arm_overrides_a_shared_key_for_its_own_runs(tmp_path):
    grid = compare.make_grid({"reflect_per_step": 4, "steps": 2},
                             ["pmd", {"pmd-reflect2": {"method": "pmd", "reflect_per_step": 2}}], [0])
    assert grid.run_config("pmd-reflect2", 0, tmp_path).reflect_per_step == 2
    assert grid.run_config("pmd", 0, tmp_path).reflect_per_step == 4
    assert grid.run_config("pmd-reflect2", 0, tmp_path).steps == 2  # the rest stays shared


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="smollm2-chain-sum"):
        compare.load_grid("no-such-preset")


def test_resuming_with_a_different_config_is_refused(tmp_path):
    grid = compare.make_grid(TINY_GRID, ["grpo"], [0])
    compare.run_grid(grid, tmp_path / "g", dry_run=True)
    changed = compare.make_grid({**TINY_GRID, "steps": 3}, ["grpo"], [0])
    with pytest.raises(ConfigError, match="steps"):
        compare.run_grid(changed, tmp_path / "g", dry_run=True)
    grown = compare.make_grid(TINY_GRID, ["sdpo"], [1])  # arms and seeds may grow
    status = compare.run_grid(grown, tmp_path / "g", dry_run=True)
    assert [(a, s) for a, s, _ in status] == [("sdpo", 1)]  # --arms/--seeds: only the runs asked for
    stored = compare.load_grid(tmp_path / "g")  # the folder's grid holds the union; run by its folder, all of it
    assert (stored.arms, stored.seeds) == (["grpo", "sdpo"], [0, 1])
    status = compare.run_grid(stored, tmp_path / "g", dry_run=True)
    assert {(a, s) for a, s, _ in status} == {("grpo", 0), ("grpo", 1), ("sdpo", 0), ("sdpo", 1)}


def test_a_grid_file_defines_its_own_arms(tmp_path):
    strong = {"method": "pmd", "reflector": "local:qwen2.5-coder-0.5b-instruct"}
    spec = tmp_path / "mine.yaml"
    spec.write_text(yaml.safe_dump({"arms": ["pmd", {"pmd-qwen-reflector": strong}], "seeds": [0],
                                    "config": TINY_GRID}))
    grid = compare.load_grid(spec)
    assert grid.arms == ["pmd", "pmd-qwen-reflector"] and grid.custom_arms == {"pmd-qwen-reflector": strong}
    out = tmp_path / "g"
    status = compare.run_grid(grid, out, dry_run=True)
    assert [(a, s) for a, s, _ in status] == [("pmd", 0), ("pmd-qwen-reflector", 0)]
    assert not (out / "configs" / "pmd-qwen-reflector-s0.yaml").exists()  # a dry run writes no run config
    run_cfg = grid.run_config("pmd-qwen-reflector", 0, out)
    assert (run_cfg.method, run_cfg.reflector, run_cfg.seed) == ("pmd", strong["reflector"], 0)
    # the folder remembers the definition: resuming by name, or adding a seed, needs no grid file
    again = compare.load_grid(out)
    assert again.custom_arms == grid.custom_arms
    grown = compare.make_grid(again.config, ["pmd-qwen-reflector"], [1], custom_arms=again.custom_arms)
    assert ("pmd-qwen-reflector", 1) in {(a, s) for a, s, _ in compare.run_grid(grown, out, dry_run=True)}
    redefined = compare.make_grid(TINY_GRID, [{"pmd-qwen-reflector": {"method": "pmd"}}], [0])
    with pytest.raises(ConfigError, match="pmd-qwen-reflector.*another name"):
        compare.run_grid(redefined, out, dry_run=True)


def test_a_run_that_another_process_writes_is_skipped_not_started_twice(tmp_path, hold_lock):
    """Extending a grid while an earlier `pmd compare` still runs: its live run (lock held) is reported and
    left alone, not started a second time; once its writer is gone it is resumed as any unfinished run."""
    grid = compare.make_grid(TINY_GRID, ["grpo"], [0])
    run = tmp_path / "g" / "runs" / "grpo-s0"
    run.mkdir(parents=True)
    release = hold_lock(run / ".lock")
    assert RunDir(run).writer() == "4242"
    status = compare.run_grid(grid, tmp_path / "g", jobs=1)  # would train grpo-s0 if it did not skip it
    assert status == [("grpo", 0, "running elsewhere (pid 4242), skipped")]
    assert not (tmp_path / "g" / "logs" / "grpo-s0.log").exists()
    release()
    assert RunDir(run).writer() is None
    assert compare.run_grid(grid, tmp_path / "g", dry_run=True) == [("grpo", 0, "todo")]


def test_a_run_belongs_to_the_arm_its_folder_names(tmp_path):
    from pmd.config import Config

    cfg = Config(method="pmd", seed=2)
    assert compare._arm_of_run(tmp_path / "pmd-qwen-reflector-s2", cfg) == "pmd-qwen-reflector"
    assert compare._arm_of_run(tmp_path / "pmd-chain_sum-s2-20261125-0400", cfg) == "pmd"  # pmd train's name
    assert compare._arm_of_run(tmp_path / "anything-s1", cfg) == "pmd"  # another seed's suffix: not a name


# ------------------------------------------------------------------------------------------------ end to end
def test_tiny_grid_end_to_end_with_report(tmp_path, capsys):
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump({"description": "tiny", "arms": ["grpo", "sdpo"], "seeds": [0, 1],
                                    "config": TINY_GRID}))
    out = tmp_path / "grid"
    cli(["compare", str(spec), "--out", str(out), "--jobs", "2"])
    for arm in ("grpo", "sdpo"):
        for seed in (0, 1):
            assert (out / "runs" / f"{arm}-s{seed}" / "summary.json").exists()
    table = (out / "results.md").read_text()
    assert "| grpo | 2 |" in table and "| sdpo | 2 |" in table
    rows = (out / "results.csv").read_text().splitlines()
    assert rows[0].startswith("arm,seeds,rollouts,accuracy") and len(rows) == 3
    run_cfg = yaml.safe_load((out / "runs" / "sdpo-s1" / "config.yaml").read_text())
    assert (run_cfg["method"], run_cfg["seed"], run_cfg["steps"]) == ("sdpo", 1, 2)
    # each seed's initial evaluation ran once, in the grpo run that started first; sdpo read it
    assert len(list((out / "base_eval").glob("*.json"))) == 2
    first_rows = {run.name: RunDir(run).metrics()[0] for run in (out / "runs").iterdir()}
    assert {name for name, row in first_rows.items() if row.get("eval/cached")} == {"sdpo-s0", "sdpo-s1"}
    assert first_rows["sdpo-s1"]["eval/accuracy"] == first_rows["grpo-s1"]["eval/accuracy"]
    html = (out / "report.html").read_text()
    assert "grpo" in html and "sdpo" in html and "data:image/png;base64," in html

    assert compare._progress(out, compare.load_grid(out), "grpo", 0).startswith("grpo-s0 step 2/2 (last eval ")

    # a second call resumes: every run is done, nothing is trained again
    before = {p: p.stat().st_mtime for p in out.glob("runs/*/summary.json")}
    capsys.readouterr()
    cli(["compare", str(out)])
    assert "4 done, 0 to run" in capsys.readouterr().out
    assert before == {p: p.stat().st_mtime for p in out.glob("runs/*/summary.json")}


def test_contrasts_pair_two_arms_by_seed(tmp_path):
    results = [_result("pmd", 0, 0.30), _result("pmd", 1, 0.40), _result("pmd", 2, 0.50, finished=False),
               _result("pmd-frozen-memory", 0, 0.25), _result("pmd-frozen-memory", 1, 0.45),
               _result("pmd-frozen-memory", 2, 0.10)]
    row, = compare.contrast_rows(results, [("pmd", "pmd-frozen-memory")])
    assert row["seeds"] == [0, 1]  # seed 2 of pmd did not finish
    assert row["diffs"] == pytest.approx([0.05, -0.05])
    assert (row["mean"], row["ci"]) == pytest.approx(compare.mean_ci([0.05, -0.05]))
    assert row["greedy"] == pytest.approx(0.0)  # the fake greedy is half of mean@k
    grid = compare.make_grid(TINY_GRID, ["pmd", "pmd-frozen-memory"], [0, 1],
                             contrasts=[["pmd", "pmd-frozen-memory"]])
    table = compare.results_markdown(compare.summarize(results), results, grid)
    assert "| pmd − pmd-frozen-memory | 2 | +0.0 ± 63.5 | +0.0 ± 31.8 | s0 +5.0, s1 -5.0 |" in table
    # the grid folder keeps its contrasts, and a resumed grid may add more
    compare.run_grid(grid, tmp_path / "g", dry_run=True)
    assert compare.load_grid(tmp_path / "g").contrasts == [("pmd", "pmd-frozen-memory")]


@pytest.mark.parametrize("contrasts, message", [
    ([["pmd", "pmd"]], "two different arms"), ([["pmd"]], "two different arms"), (["pmd"], "two different arms"),
    ([["pmd", "sdpo"]], "'sdpo' is not an arm of this grid"),
])
def test_bad_contrasts_name_the_entry(contrasts, message):
    with pytest.raises(ConfigError, match=message):
        compare.make_grid(TINY_GRID, ["pmd", "grpo"], [0], contrasts=contrasts)
