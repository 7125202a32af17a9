"""Experiments on top of training: grids of runs, their results, and the report.

    compare.py    `pmd compare`: a grid of arms x seeds at equal rollout budgets (resumable), and its results
                  table (results.md/.csv: means with t intervals, differences to SDPO and GRPO paired by seed)
    report.py     `pmd report`: one self-contained HTML page about runs and grids (tables, plots, best memory)
    base_eval.py  the initial model's held-out evaluation, computed once and shared by the arms of a seed
    presets/      the packaged grid presets (YAML), e.g. `pmd compare smollm2-chain-sum`

Everything here reads run folders through `pmd.runlog.RunDir`, with metric names as `pmd.metrics` defines them.
"""
