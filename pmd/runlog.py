"""The run folder: everything a person needs to understand a run, and everything a resume needs.

    <run>/config.yaml        the full resolved config
    <run>/metrics.jsonl      one JSON object per step (and one for the evaluation before step 1, step 0);
                             read it with RunDir.metrics(): older runs' flat names come back as today's
    <run>/rollouts.jsonl     every rollout: id, step, problem, completion, reward, feedback, teacher context
    <run>/reflections.jsonl  pmd: every reflection: raw output, what was parsed from it, the entries written
    <run>/memory.sqlite      pmd: the procedural memory (SQLite, WAL); `pmd memory show|export|stats RUN`
    <run>/checkpoints/step-N/ trainable weights, teacher, optimizer, scheduler, loop state, memory, and the
                             RNG state of every process (rng_rank0.pt, rng_rank1.pt, ...)
    <run>/final/             the trained model (LoRA merged): plain `AutoModelForCausalLM.from_pretrained`
    <run>/summary.json       accuracy before and after, wall time
    <run>/.lock              held by the one process that writes the run (RunDir.lock)

Checkpoints are written to a temporary folder and renamed, so a kill at any moment leaves either the old or
the new checkpoint, never half of one. On resume, metric and rollout rows newer than the checkpoint are
dropped: those steps are redone exactly, so no step is repeated or skipped in the logs. With several processes
the main one writes everything (the weights are the same on every process after a synchronised update) and
every process loads the checkpoint on resume.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from pmd.config import Config, ConfigError, apply
from pmd.memory import MEMORY_FILENAME, MemoryStore
from pmd.metrics import upgrade

# Keys that may change when resuming: they do not alter the training trajectory.
RESUMABLE_CHANGES = {"steps", "eval_every", "save_every", "keep_checkpoints", "threads", "output_dir",
                     "eval_samples", "eval_problems", "base_eval_cache"}


_HELD: dict[Path, object] = {}  # run folders this process writes -> their open, locked `.lock` file


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"

    def lock(self) -> None:
        """Hold `.lock` in the folder for as long as this process lives (the OS drops it however the process
        ends, so a killed run resumes freely). A second process that would write the same folder stops here
        with an error instead of truncating the first one's logs. Held already by this process: nothing to do
        (a resume within one Python session)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock
            return
        key = self.path.resolve()
        if key in _HELD:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / ".lock", "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip()
            handle.close()
            who = f" (pid {holder})" if holder else ""
            raise ConfigError(f"{self.path} is being written by another process{who}; wait for it to end, "
                              "or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD[key] = handle

    def writer(self) -> str | None:
        """The pid (as written) of another process that holds `.lock` now, else None: a free folder, no lock
        file, or one held by this process. Used by `pmd compare` to skip runs that are being written."""
        lock = self.path / ".lock"
        if self.path.resolve() in _HELD or not lock.exists():
            return None
        try:
            import fcntl
        except ImportError:
            return None
        with open(lock) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return handle.read().strip() or "?"
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    # ---------------------------------------------------------------- config
    def exists(self) -> bool:
        return (self.path / "config.yaml").exists()

    def write_config(self, cfg: Config) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.path / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def read_config(self) -> Config:
        data = yaml.safe_load((self.path / "config.yaml").read_text())
        return apply(Config(), data)

    def resume_config(self, requested: Config, explicit: set[str]) -> Config:
        """The stored config, with the explicitly requested keys that may change on resume applied."""
        stored = self.read_config()
        conflicts = [k for k in explicit - RESUMABLE_CHANGES
                     if getattr(requested, k) != getattr(stored, k)]
        if conflicts:
            detail = ", ".join(f"{k}: run has {getattr(stored, k)!r}, asked {getattr(requested, k)!r}"
                               for k in sorted(conflicts))
            raise ConfigError(f"{self.path} is an existing run with a different config ({detail}). "
                              f"Resume it without these keys, or choose a new output_dir.")
        return apply(stored, {k: getattr(requested, k) for k in explicit & RESUMABLE_CHANGES})

    # ---------------------------------------------------------------- jsonl logs
    def append(self, name: str, rows: list[dict]) -> None:
        with open(self.path / name, "a") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self, name: str) -> list[dict]:
        p = self.path / name
        if not p.exists():
            return []
        rows = []
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                pass
        return rows

    def metrics(self) -> list[dict]:
        """The metrics.jsonl rows with today's metric names (`pmd.metrics.upgrade`), whenever they were written."""
        return [upgrade(row) for row in self.read("metrics.jsonl")]

    def truncate_after(self, step: int) -> None:
        """Drop log rows of steps after `step` (they will be redone)."""
        for name in ("metrics.jsonl", "rollouts.jsonl", "reflections.jsonl"):
            p = self.path / name
            if p.exists():
                kept = [r for r in self.read(name) if r.get("step", 0) <= step]
                _atomic_write(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))

    # ---------------------------------------------------------------- checkpoints
    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.exists():
            return None
        done = [p for p in self.checkpoints.glob("step-*") if (p / "state.json").exists()]
        return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)

    def save_checkpoint(self, step: int, model: torch.nn.Module, teacher_state: dict, optimizer,
                        scheduler, loop_state: dict, keep: int, memory=None,
                        rng_states: list[dict] | None = None) -> Path:
        """`rng_states`: every process's `rng_state()`, in rank order (default: this process's only)."""
        final = self.checkpoints / f"step-{step:06d}"
        tmp = self.checkpoints / f".tmp-step-{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        if teacher_state:
            save_file({n: t.cpu().contiguous() for n, t in teacher_state.items()}, tmp / "teacher.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "optimizer.pt")
        for rank, state in enumerate(rng_states or [rng_state()]):
            torch.save(state, tmp / f"rng_rank{rank}.pt")
        if memory is not None:  # a consistent copy of the memory store (SQLite backup API)
            memory.snapshot(tmp / MEMORY_FILENAME)
        (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(self.checkpoints.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self, path: Path, model: torch.nn.Module, teacher, optimizer, scheduler,
                        rank: int = 0) -> dict:
        trainable = load_file(path / "trainable.safetensors")
        params = dict(model.named_parameters())
        missing = [n for n in trainable if n not in params]
        if missing:
            raise RuntimeError(f"checkpoint {path} does not match the model (e.g. {missing[0]})")
        with torch.no_grad():
            for n, t in trainable.items():
                params[n].copy_(t)
        if (path / "teacher.safetensors").exists():
            teacher.load_state_dict(load_file(path / "teacher.safetensors"))
        opt = torch.load(path / "optimizer.pt", weights_only=False)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        rng = path / f"rng_rank{rank}.pt"
        if not rng.exists() and rank == 0:
            rng = path / "rng.pt"  # a checkpoint from before per-process RNG files
        if rng.exists():  # absent: this process did not exist in the run that saved (more processes now)
            _set_rng_state(torch.load(rng, weights_only=False))
        return json.loads((path / "state.json").read_text())


    def restore_memory(self, checkpoint: Path | None) -> None:
        """Make the live memory store the checkpoint's (or remove it when starting over)."""
        live = self.path / MEMORY_FILENAME
        for suffix in ("", "-wal", "-shm"):
            Path(str(live) + suffix).unlink(missing_ok=True)
        if checkpoint is not None and (checkpoint / MEMORY_FILENAME).exists():
            MemoryStore.restore(checkpoint / MEMORY_FILENAME, live).close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict:
    """This process's random state: Python, NumPy and torch (CPU, and CUDA when present)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
