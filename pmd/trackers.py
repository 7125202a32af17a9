"""Experiment trackers (`report_to`): every metrics row also goes to TensorBoard, Weights & Biases or Trackio.

    report_to=tensorboard        event files in <run>/tensorboard/ (`tensorboard --logdir runs/`)
    report_to=wandb              a W&B run named after the run folder, in <run>/wandb/ (WANDB_MODE=offline works)
    report_to=trackio            a Trackio run (local dashboard: `trackio show`)
    report_to=tensorboard,wandb  several at once

The keys are those of metrics.jsonl (README, Metrics), at the same steps, evaluation and memory included; the
run's config goes along as hyperparameters. Each backend is an optional extra: `pip install 'pmd[wandb]'`. A
resumed run continues the same tracker run where the backend can (W&B and Trackio by the run folder's id; a
resumed TensorBoard writer appends, and rows redone after the checkpoint are written again).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # report_to name -> module


def parse_report_to(value: str) -> list[str]:
    """`none`, or a comma-separated list of backends; raises ValueError naming a bad one."""
    names = [v.strip() for v in value.split(",") if v.strip() and v.strip() != "none"]
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise ValueError(f"report_to={value!r}: {bad[0]!r} is not a tracker; valid: none, {', '.join(BACKENDS)}")
    return names


def check_installed(names: list[str]) -> None:
    """A missing extra is a clear error before training starts, with the pip command that installs it."""
    import importlib.util

    for name in names:
        if importlib.util.find_spec(BACKENDS[name]) is None:
            raise ValueError(f"report_to={name} needs the {name} package: pip install 'pmd[{name}]'")


class Trackers:
    """The open tracker runs of one training run (main process only)."""

    def __init__(self, names: list[str], run_path: Path, config: dict):
        self.names = names
        self.closers = []
        self.loggers = [getattr(self, f"_open_{name}")(Path(run_path), config) for name in names]

    def log(self, row: dict) -> None:
        step = int(row["step"])
        scalars = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        for log in self.loggers:
            log(scalars, step)

    def close(self) -> None:
        for close in self.closers:
            close()

    # -------------------------------------------------------------------------------------------- backends
    def _open_tensorboard(self, run_path: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(run_path / "tensorboard"))
        writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()), 0)
        self.closers.append(writer.close)

        def log(scalars: dict, step: int) -> None:
            for key, value in scalars.items():
                writer.add_scalar(key, value, step)
            writer.flush()
        return log

    def _open_wandb(self, run_path: Path, config: dict):
        import wandb

        run = wandb.init(project="pmd", name=run_path.name, id=_run_id(run_path), dir=str(run_path),
                         config=config, resume="allow", reinit="create_new")
        self.closers.append(run.finish)
        return lambda scalars, step: run.log(scalars, step=step)

    def _open_trackio(self, run_path: Path, config: dict):
        import trackio

        run = trackio.init(project="pmd", name=run_path.name, config=config, resume="allow")
        self.closers.append(run.finish)
        return lambda scalars, step: run.log(scalars, step=step)


def _run_id(run_path: Path) -> str:
    """A stable id per run folder, so a resumed run continues its tracker run."""
    return hashlib.sha1(str(run_path.resolve()).encode()).hexdigest()[:12]
