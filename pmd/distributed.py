"""Many processes: `accelerate launch -m pmd train ...` (or `torchrun -m pmd train ...`) with N processes.

What runs where (docs/scaling.md has the launch commands):
  - every process samples, verifies and trains on its own contiguous share of the step's problems
    (problems_per_step / N each, all G rollouts of a problem on one process), with its own model replica;
    DDP (accelerate's `prepare`) averages the gradients once per optimizer step
  - the main process (rank 0) alone owns the procedural memory (memory.sqlite, reflection, consolidation):
    it receives every process's rollouts, builds every teacher context and sends them back
  - evaluation is sharded by problem and gathered; metrics and rollout rows are gathered to the main process,
    which writes the run folder and checkpoints (every process's RNG state goes into the checkpoint)
  - only the main process prints and shows progress bars

Without a launcher this is one process, the collectives below return their input unchanged, and nothing
differs from a plain single-process run. Everything sent between processes is a small picklable object
(token id lists, texts, floats), sent with accelerate's object collectives.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from pmd.config import ConfigError


class Processes:
    """This process's place in the run (rank, world size, device) and the collectives the loop uses."""

    def __init__(self):
        from accelerate import Accelerator

        # CPU unless CUDA is present: a plain `pmd train` keeps running on the CPU (as it always has) where
        # accelerate would otherwise pick MPS; under torchrun on a CPU machine this also selects gloo.
        # Precision is pmd's own `dtype` (bf16 autocast in every forward), never the launcher's mixed_precision.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
        kind = self.accelerator.distributed_type.value
        if kind != "NO" and not kind.startswith("MULTI_"):
            raise ConfigError(f"launched with {kind}: pmd trains data-parallel only (DDP, one full model replica "
                              f"per process). Its sampling copy, EMA teacher and checkpoints read whole, unsharded "
                              f"weights, so FSDP and DeepSpeed are not supported (docs/scaling.md).")
        self.rank = self.accelerator.process_index
        self.world = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.is_main = self.rank == 0
        if not self.is_main:  # one copy of transformers' progress bars and notices is enough
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()

    def shard(self, n: int) -> range:
        """This process's consecutive share of n items (sizes differ by at most one)."""
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return range(start, start + size + (1 if self.rank < extra else 0))

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast(self, obj):
        """The main process's `obj` on every process."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def concat(self, *lists_b: list) -> list[list]:
        """Each of this process's lists joined with every other process's, in rank order (the whole batch)."""
        if self.world == 1:
            return [list(x) for x in lists_b]
        shares = self.gather(lists_b)
        return [[x for share in shares for x in share[f]] for f in range(len(lists_b))]

    def from_main(self, compute):
        """`compute()` run by the main process alone, its result on every process (e.g. what needs the memory)."""
        return self.broadcast(compute() if self.is_main else None)

    def sum_dicts(self, d: dict) -> dict:
        """Key-wise sums of every process's numbers (keys in first-seen order)."""
        parts = self.gather(dict(d))
        if len(parts) == 1:
            return parts[0]
        total: dict = {}
        for part in parts:
            for k, v in part.items():
                total[k] = total.get(k, 0) + v
        return total

    def barrier(self) -> None:
        if self.world > 1:
            self.accelerator.wait_for_everyone()

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose backward synchronises gradients (DDP with several processes, else the model)."""
        return self.accelerator.prepare(model) if self.world > 1 else model

    def no_sync(self, wrapped: torch.nn.Module, skip: bool):
        """Accumulate gradients locally (no all-reduce) in this forward/backward when `skip`."""
        return self.accelerator.no_sync(wrapped) if skip and self.world > 1 else nullcontext()

    def finish(self) -> None:
        """Tear down the process group at the end of a launched run."""
        if self.world > 1:
            self.barrier()
            self.accelerator.end_training()


def check_processes(cfg, world: int) -> None:
    """Config constraints of an N-process run (a ConfigError on every process alike)."""
    if world == 1:
        return
    if cfg.problems_per_step % world:
        raise ConfigError(f"problems_per_step={cfg.problems_per_step} must be divisible by the number of "
                          f"processes ({world}): each process samples problems_per_step / {world} problems")
    rows = cfg.problems_per_step // world * cfg.group_size
    if cfg.optimizer_steps_per_batch > rows:
        raise ConfigError(f"optimizer_steps_per_batch={cfg.optimizer_steps_per_batch}: cannot exceed the "
                          f"rollouts of one process ({rows}) with {world} processes")
