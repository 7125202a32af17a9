"""The output layer on a sliced input: pmd's contiguous-input hook vs none, with the weights frozen.

transformers computes logits only for the positions it keeps (`logits_to_keep`): the last prompt position when
generation starts, the completion positions when the loss is computed. It slices the hidden states for that,
which gives a non-contiguous view. With a frozen output layer (pmd's sampling copy; the base model under LoRA,
the default `finetune`) torch's matmul then copies the whole weight once per batch row and runs a batched
product instead of one matrix product. `pmd.models.contiguous_input`, a forward pre-hook that
`load_model_and_tokenizer` registers on the output layer, copies the small slice instead.

Each round times, back to back and in alternating order, one forward of the same batch with the hook and
without it, in two settings:
- prefill: `generate`'s first forward over a batch of distinct prompts (greedy evaluation), no_grad,
  `logits_to_keep=1`;
- score: a training-style forward with gradients on, `logits_to_keep` = completion length + 1 (the teacher and
  student passes of `micro_batch_loss` with prefix sharing off), the weights frozen as LoRA leaves them.
The speed-up is the median of the paired ratios. The last line gives the process's peak RSS; `--hook-only` skips
the runs without the hook, so the difference of the two invocations' peaks is the memory the copies take.

    python benchmarks/output_layer.py                                # qwen2.5-coder-0.5b-instruct, 16 rows
    python benchmarks/output_layer.py --model smollm2-135m-instruct
    python benchmarks/output_layer.py --hook-only                    # the peak RSS with the hook alone
    python benchmarks/output_layer.py --quick                        # tiny-random (seconds)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pmd.hardware import resolve_dtype  # noqa: E402
from pmd.models import load_model_and_tokenizer  # noqa: E402


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def forward(model, ids: torch.Tensor, keep: int, grad: bool) -> float:
    """Seconds for one forward keeping `keep` positions' logits."""
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        model(input_ids=ids, use_cache=False, logits_to_keep=keep)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--rows", type=int, default=16, help="batch rows (each adds a weight copy without the hook)")
    parser.add_argument("--prompt", type=int, default=48, help="prompt tokens")
    parser.add_argument("--completion", type=int, default=32, help="completion tokens (score setting)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--hook-only", action="store_true", help="time only the hooked forward (peak RSS baseline)")
    parser.add_argument("--quick", action="store_true", help="tiny-random model, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.model, args.rounds = "tiny-random", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name, why = resolve_dtype("auto", torch.device("cpu"))
    model, _ = load_model_and_tokenizer(args.model, dtype=getattr(torch, dtype_name))
    model.requires_grad_(False)  # as the sampling copy and LoRA's base model are
    head = model.get_output_embeddings()
    hooks = dict(head._forward_pre_hooks)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    settings = {"prefill": (args.prompt, 1, False), "score": (args.prompt + args.completion, args.completion + 1, True)}
    print(f"model {args.model} ({dtype_name}: {why}), {args.rows} rows, torch threads {torch.get_num_threads()}")
    print(f"{'setting':<8} {'hook s':>8} {'none s':>8} {'speed-up':>9}")
    for name, (length, keep, grad) in settings.items():
        ids = torch.randint(0, vocab, (args.rows, length), generator=generator)
        hooked, plain, ratios = [], [], []
        for round_ in range(args.rounds + 1):  # round 0 warms up both paths
            order = ("hook", "none") if round_ % 2 == 0 else ("none", "hook")
            times = {"none": float("nan")}
            for which in order:
                if which == "none" and args.hook_only:
                    continue
                head._forward_pre_hooks.clear()
                if which == "hook":
                    head._forward_pre_hooks.update(hooks)
                times[which] = forward(model, ids, keep, grad)
            if round_:
                hooked.append(times["hook"])
                plain.append(times["none"])
                ratios.append(times["none"] / times["hook"])
        head._forward_pre_hooks.clear()
        head._forward_pre_hooks.update(hooks)
        print(f"{name:<8} {statistics.median(hooked):8.3f} {statistics.median(plain):8.3f} "
              f"{statistics.median(ratios):8.1f}x")
    print(f"peak RSS {peak_rss_gb():.1f} GB" + (" (hooked forwards only)" if args.hook_only else ""))


if __name__ == "__main__":
    main()
