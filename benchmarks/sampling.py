"""Nucleus (top-p) sampling of one decoded token: pmd's candidate cut (`pmd.rollout.nucleus`) vs a full sort.

Evaluation samples at top-p 0.95 (`eval_top_p`). The straightforward nucleus sorts all V probabilities of every
row at every decoded token; at Qwen's 152k vocabulary that cost more than the model's output layer. pmd first
cuts each row to its 64 most probable tokens (`topk`, one pass over V) and sorts in full only a row whose
nucleus does not fit in them. Both give the same tokens (checked here on every round).

The rows are real next-token distributions: the model's logits at the completion positions of greedy answers
to chain_sum problems (teacher-forced), divided by the evaluation temperature. Each round times, back to back
and in alternating order, the full-sort nucleus, pmd's nucleus, the whole `_sample` step (softmax, nucleus,
one uniform per token and row, the race) and, for scale, the output layer's matmul for the same rows
(hidden size x V). Figures are medians over rounds; the speed-up is the median of the paired ratios.

    python benchmarks/sampling.py                      # smollm2-135m-instruct, 32 rows
    python benchmarks/sampling.py --model qwen2.5-coder-0.5b-instruct
    python benchmarks/sampling.py --quick              # tiny-random (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pmd.models import load_model_and_tokenizer  # noqa: E402
from pmd.rollout import _sample, completion_logits, encode_chat, generate, nucleus, pack  # noqa: E402
from pmd.tasks import load_task  # noqa: E402


def full_sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The peer: sort every row in full and keep a token while the mass before it is <= top_p."""
    ordered, order = probs.sort(dim=-1, descending=True)
    ordered = ordered.masked_fill(ordered.cumsum(-1) - ordered > top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, ordered)


def real_logits(model, tokenizer, rows: int, max_new_tokens: int) -> torch.Tensor:
    """(rows, V) next-token logits at the completion positions of greedy chain_sum answers."""
    task = load_task("chain_sum")
    problems = task.problems("eval", max(1, rows // 8))
    prompts = [encode_chat(tokenizer, task.messages(p)) for p in problems]
    completions, _ = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0,
                              greedy=True, batch_size=len(prompts))
    batch = pack(prompts, completions, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = completion_logits(model, batch, 1.0)
    mask = batch.completion_mask.bool()
    return logits[mask][:rows].float()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--rows", type=int, default=32, help="rows sampled at once (the decoding batch)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny-random, 3 repeats")
    args = ap.parse_args()
    if args.quick:
        args.model, args.repeats = "tiny-random", 3
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.float32)
    model.eval()
    logits = real_logits(model, tokenizer, args.rows, max_new_tokens=24)
    while logits.shape[0] < args.rows:  # short answers: repeat rows up to the batch
        logits = torch.cat([logits, logits])[:args.rows]
    probs = torch.softmax(logits / args.temperature, dim=-1)
    head = model.get_output_embeddings().weight.detach().float()
    hidden = torch.randn(logits.shape[0], head.shape[1])
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(logits.shape[0])]  # noqa: E731
    sizes = (nucleus(probs, args.top_p) > 0).sum(-1).float()
    print(f"model {args.model}: V = {probs.shape[-1]}, {probs.shape[0]} rows, temperature {args.temperature}, "
          f"top-p {args.top_p}, torch threads {args.threads}; nucleus size median {sizes.median():.0f}, "
          f"max {sizes.max():.0f}")

    rounds = {"full sort": [], "pmd nucleus": [], "_sample (pmd)": [], "output layer": []}
    ratios = []
    for r in range(args.repeats):
        assert torch.equal(nucleus(probs, args.top_p), full_sort_nucleus(probs, args.top_p))
        pair = [("full sort", lambda: full_sort_nucleus(probs, args.top_p)),
                ("pmd nucleus", lambda: nucleus(probs, args.top_p))]
        for name, fn in (pair if r % 2 == 0 else pair[::-1]):
            rounds[name].append(timed(fn))
        ratios.append(rounds["full sort"][-1] / rounds["pmd nucleus"][-1])
        rounds["_sample (pmd)"].append(timed(lambda: _sample(logits, args.temperature, args.top_p, False,
                                                                 generators())))
        rounds["output layer"].append(timed(lambda: hidden @ head.T))
    for name, values in rounds.items():
        print(f"  {name:<15} {1000 * statistics.median(values):8.2f} ms")
    print(f"speed-up of the nucleus (full sort / pmd, median of paired ratios): {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
