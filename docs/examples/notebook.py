# %% [markdown]
# # pmd in a notebook
# Cells for Jupyter or VS Code (`# %%`). Train GRPO and PMD on the same in-memory dataset, compare them, and
# look into PMD's memory. Runs on a CPU in a few minutes with the packaged SmolLM2-135M.

# %%
import pmd

rows = [{"prompt": f"What is {a} times {b}? Reply with the number only.", "product": str(a * b)}
        for a in range(2, 10) for b in range(2, 10)]


def exact_product(prompts, completions, product, **kwargs):
    return [1.0 if c.strip().split()[:1] == [p] else 0.0 for c, p in zip(completions, product)]


# %% Two runs at the same rollout budget
keys = {"steps": 6, "problems_per_step": 4, "group_size": 4, "train_problems": 16, "eval_problems": 12}
runs = {method: pmd.train({**keys, "method": method, "output_dir": f"runs/products-{method}"},
                          dataset=rows, reward=exact_product)
        for method in ("grpo", "pmd")}

# %% Held-out accuracy before and after, memory-free
for method, run in runs.items():
    rows_ = run.metrics
    print(method, rows_[0]["eval/accuracy"], "->", rows_[-1]["eval/accuracy"])

# %% What the teacher saw: the signal and the memory levels, step by step
for row in runs["pmd"].metrics[1:]:
    print(row["step"], row["train/reward_mean"], row.get("teacher/signal_fraction"),
          row.get("memory/experience_entries"), row.get("memory/insight_entries"))

# %% The memory itself: stored solutions, insights, behaviors, with their usage counters
for entry in runs["pmd"].memory()[:10]:
    print(entry["level"], entry["kind"], entry["uses"], entry["text"][:80])

# %% An HTML report of both runs (plots, tables, memory), readable offline
from pmd.experiments.report import write_report

print(write_report([run.path for run in runs.values()], out="runs/products-report.html"))
