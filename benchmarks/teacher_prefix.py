"""Teacher forward with and without prefix sharing (pmd.prefix), for memory contexts of several lengths.

For each context length P, one problem's G rollouts are scored by the teacher two ways:

    unshared  `completion_logits(forward, pack([prefix] * G, completions))`: G rows of P+R tokens
    shared    `shared_prefix_completion_logits(forward, prefix, completions)`: the prefix once (P tokens),
              then G rows of R-1 completion tokens reading its keys/values

"tokens" is the sum of the sequence lengths fed to the model (padding included). Times are medians over
`--repeats` rounds; within a round both variants run back to back, in alternating order, so machine noise hits
both alike, and the speed-up is the median over rounds of the paired ratio. The log-prob check compares the two
variants' outputs (bf16: the difference is bf16 rounding of differently shaped matmuls, the same size as the
difference between the packed forward at batch 8 and batch 1). The default teacher is the one pmd trains with:
bf16 weights under bf16 autocast, LoRA adapters (`prepare_for_training` with the default Config) and EMA weights
swapped in by `TeacherWeights.forward` (`--plain` scores with the bare model instead). The prefix and
completions are random token ids (the cost does not depend on the text); completion lengths are ragged, between
R/2 and R, the longest exactly R.

    python benchmarks/teacher_prefix.py          # smollm2-135m-instruct, P = 256, 1024, 4096, G = 8, R = 64
    python benchmarks/teacher_prefix.py --quick  # tiny-random, short lengths: a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pmd.config import Config  # noqa: E402
from pmd.models import load_model_and_tokenizer  # noqa: E402
from pmd.prefix import shared_prefix_completion_logits, tokens_fed  # noqa: E402
from pmd.rollout import completion_logits, pack  # noqa: E402
from pmd.teacher import TeacherWeights  # noqa: E402
from pmd.loop import prepare_for_training  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--contexts", default="256,1024,4096", help="prefix lengths in tokens, comma-separated")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--completion-len", type=int, default=64, help="longest completion R")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--plain", action="store_true", help="bare model instead of LoRA + EMA teacher weights")
    ap.add_argument("--quick", action="store_true", help="tiny-random, contexts 64,256, R 16, 2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.model, args.contexts, args.completion_len, args.repeats = "tiny-random", "64,256", 16, 2
    return args


def make_teacher(model_name: str, plain: bool):
    model, tokenizer = load_model_and_tokenizer(model_name, dtype=torch.bfloat16)
    if plain:
        return model, tokenizer
    model = prepare_for_training(model, Config())
    teacher = TeacherWeights(model, kind="ema", update_rate=0.05)
    return functools.partial(teacher.forward, model), tokenizer


def random_ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(16, vocab, (n,), generator=gen).tolist()  # skip the low ids (special tokens)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def logprob_diffs(a: torch.Tensor, b: torch.Tensor, completions: list[list[int]]) -> tuple[float, float]:
    """Max |log-prob difference| on the completion tokens themselves (what the losses read), and over the vocab."""
    la, lb = a.float().log_softmax(-1), b.float().log_softmax(-1)
    on_tokens = on_vocab = 0.0
    for i, c in enumerate(completions):
        d = (la[i, :len(c)] - lb[i, :len(c)]).abs()
        on_tokens = max(on_tokens, d.gather(-1, torch.tensor(c)[:, None]).max().item())
        on_vocab = max(on_vocab, d.max().item())
    return on_tokens, on_vocab


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    forward, tokenizer = make_teacher(args.model, args.plain)
    pad = tokenizer.pad_token_id
    vocab = len(tokenizer)
    G, R = args.group_size, args.completion_len
    gen = torch.Generator().manual_seed(0)
    print(f"model {args.model} ({'plain' if args.plain else 'LoRA + EMA teacher weights'}), bf16 autocast, "
          f"threads {torch.get_num_threads()}, G {G}, R {R}, repeats {args.repeats}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)

    rows = []
    for P in [int(x) for x in args.contexts.split(",")]:
        prefix = random_ids(P, vocab, gen)
        lengths = [R] + torch.randint(R // 2, R + 1, (G - 1,), generator=gen).tolist()
        completions = [random_ids(n, vocab, gen) for n in lengths]

        def unshared():
            return completion_logits(forward, pack([prefix] * G, completions, pad))

        def shared():
            return shared_prefix_completion_logits(forward, prefix, completions, pad)

        times = {"unshared": [], "shared": []}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref, _ = timed(unshared)  # warm-up, untimed
            got, _ = timed(shared)
            diff = logprob_diffs(got, ref, completions)
            del ref, got
            for r in range(args.repeats):
                order = ("unshared", "shared") if r % 2 == 0 else ("shared", "unshared")
                for name in order:
                    _, seconds = timed(unshared if name == "unshared" else shared)
                    times[name].append(seconds)
        t_u, t_s = statistics.median(times["unshared"]), statistics.median(times["shared"])
        paired = statistics.median(u / s for u, s in zip(times["unshared"], times["shared"]))
        rows.append((P, G, tokens_fed(P, lengths, False), tokens_fed(P, lengths, True), t_u, t_s, paired, diff))
        print(f"  P={P}: unshared {[round(t, 3) for t in times['unshared']]} s, "
              f"shared {[round(t, 3) for t in times['shared']]} s, load {os.getloadavg()[0]:.1f}", flush=True)

    print()
    print("| context | G | tokens unshared | tokens shared | time unshared | time shared | speed-up | "
          "max \\|Δ logprob\\| completion tokens / whole vocab |")
    print("|---|---|---|---|---|---|---|---|")
    for P, g, tok_u, tok_s, t_u, t_s, paired, (d_tok, d_vocab) in rows:
        print(f"| {P} | {g} | {tok_u:,} | {tok_s:,} ({tok_u / tok_s:.1f}× fewer) | {t_u:.3f} s | {t_s:.3f} s | "
              f"**{paired:.2f}×** | {d_tok:.4f} / {d_vocab:.4f} |")
    print("\ntimes: medians over the repeats; speed-up: median over repeats of the paired ratio unshared / shared")

if __name__ == "__main__":
    main()
