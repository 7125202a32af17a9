"""Model FLOPs utilisation of pmd's training forward/backward on this CPU.

Peak: the best GFLOP/s of large square matmuls (`torch.mm`, n x n by n x n, 2n^3 FLOPs) in bf16 and in fp32.
Achieved: one LoRA training micro-step of the model as pmd trains it (`prepare_for_training` with the default
`Config()`: LoRA r=16 on all linear layers, float32 adapters, bf16 base weights, bf16 autocast, dropout off) on a
batch of B sequences x T tokens: forward, a token-level loss (next-token cross-entropy on every position, so
the LM head runs on every token), backward. The optimizer step is not included (AdamW on the adapters is tiny).
Also the forward alone under no_grad (inference, e.g. the teacher), for reference.

FLOPs counted (multiply-add = 2 FLOPs; embeddings lookups and elementwise ops are not counted):
    N_frozen = weights of every frozen linear layer, the LM head included (tied to the embeddings here, but it
               is a real matmul on every token); N_lora = weights of the LoRA A and B matrices
    train step  = (4 * N_frozen + 6 * N_lora) * tokens + 12 * L * tokens * S * d_attn
                  frozen matrices: forward 2NT + activation gradient 2NT (their weight gradient is skipped);
                  adapters: forward, activation and weight gradients, 6NT; attention scores and values
                  (QK^T and PV, 4 * S * d_attn per token and layer, S = sequence length, no causal discount,
                  as in PaLM's MFU) forward and backward (2x forward): 12 * L * T * S * d_attn
    forward     = 2 * (N_frozen + N_lora) * tokens + 4 * L * tokens * S * d_attn
MFU = achieved GFLOP/s / bf16 peak GFLOP/s. Rounds are interleaved (peaks, train step, forward, repeated), and
both the best-of-rounds and the median-of-rounds figures are printed, since shared machines are noisy.

    python benchmarks/mfu.py              # smollm2-135m-instruct, B=8, T=128, 5 rounds
    python benchmarks/mfu.py --quick      # tiny-random, small matmuls: a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pmd.config import Config  # noqa: E402
from pmd.models import load_model_and_tokenizer  # noqa: E402
from pmd.loop import prepare_for_training  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--sizes", default="2048,3072,4096", help="square matmul sizes for the peaks")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--attn", default="sdpa,eager",
                    help="attention kernels to time (transformers attn_implementation), comma-separated; "
                         "pmd trains with eager on CPU (attn_implementation=auto)")
    ap.add_argument("--quick", action="store_true", help="tiny-random, B=2, T=32, matmuls 512/1024, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.model, args.batch, args.seq_len, args.sizes, args.rounds = "tiny-random", 2, 32, "512,1024", 2
    return args


def seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def matmul_gflops(n: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)  # warm-up (kernel selection, first-touch)
    best = min(seconds(lambda: torch.mm(a, b)) for _ in range(2))
    return 2 * n ** 3 / best / 1e9


def flop_counts(model, tokens: int, seq_len: int) -> tuple[float, float, dict]:
    n_frozen = n_lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if "lora_" in name:
                n_lora += module.weight.numel()
            else:
                n_frozen += module.weight.numel()
    cfg = model.config
    layers = cfg.num_hidden_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    d_attn = cfg.num_attention_heads * head_dim
    attention_fwd = 4 * layers * tokens * seq_len * d_attn
    train = (4 * n_frozen + 6 * n_lora) * tokens + 3 * attention_fwd
    forward = 2 * (n_frozen + n_lora) * tokens + attention_fwd
    return train, forward, {"n_frozen": n_frozen, "n_lora": n_lora, "attention_fwd": attention_fwd}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kernels = [k for k in args.attn.split(",") if k]
    models = {}
    for kernel in kernels:
        torch.manual_seed(0)  # the same LoRA initialisation for every kernel
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.bfloat16, attn_implementation=kernel)
        models[kernel] = prepare_for_training(model, Config())
    B, T = args.batch, args.seq_len
    ids = torch.randint(16, len(tokenizer), (B, T))
    mask = torch.ones_like(ids)
    train_flops, fwd_flops, parts = flop_counts(model, B * T, T)
    sizes = [int(s) for s in args.sizes.split(",")]

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def train_step(model):
        with autocast():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    def forward_only(model):
        with torch.no_grad(), autocast():
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    print(f"model {args.model}, LoRA r={Config().lora_r} ({Config().lora_target_modules}), bf16 autocast, "
          f"threads {torch.get_num_threads()}, batch {B} x {T} tokens, load {os.getloadavg()[0]:.1f}")
    print(f"N_frozen {parts['n_frozen'] / 1e6:.1f} M, N_lora {parts['n_lora'] / 1e6:.2f} M; FLOPs per train step "
          f"{train_flops / 1e9:.1f} G (attention {3 * parts['attention_fwd'] / train_flops:.1%}), "
          f"per forward {fwd_flops / 1e9:.1f} G", flush=True)
    for model in models.values():  # warm-up
        train_step(model), forward_only(model)
    runs: dict[str, list[float]] = {"bf16": [], "fp32": []}
    for r in range(args.rounds):
        runs["bf16"].append(max(matmul_gflops(n, torch.bfloat16) for n in sizes))
        runs["fp32"].append(max(matmul_gflops(n, torch.float32) for n in sizes))
        for kernel, model in models.items():
            runs.setdefault(f"train {kernel}", []).append(train_flops / seconds(lambda: train_step(model)) / 1e9)
            runs.setdefault(f"forward {kernel}", []).append(fwd_flops / seconds(lambda: forward_only(model)) / 1e9)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} GFLOP/s" for k, v in runs.items())
              + f", load {os.getloadavg()[0]:.1f}", flush=True)

    best = {k: max(v) for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in runs.items()}
    labels = [("bf16", "peak bf16 matmul"), ("fp32", "peak fp32 matmul")]
    for kernel in kernels:
        labels += [(f"train {kernel}", f"LoRA train step (fwd+bwd), {kernel} attention"),
                   (f"forward {kernel}", f"forward only (no_grad), {kernel} attention")]
    print()
    print("| GFLOP/s | best of rounds | median of rounds |")
    print("|---|---|---|")
    for key, label in labels:
        print(f"| {label} | {best[key]:.1f} | {med[key]:.1f} |")
    print()
    print("| utilisation of the bf16 peak | best / best | median / median | paired (median of per-round ratios) |")
    print("|---|---|---|---|")
    for key, label in labels[2:]:
        paired = statistics.median(a / p for a, p in zip(runs[key], runs["bf16"]))
        label = f"**MFU, {label}**" if key.startswith("train") else label
        print(f"| {label} | {best[key] / best['bf16']:.1%} | {med[key] / med['bf16']:.1%} | {paired:.1%} |")
    for kernel in kernels:
        key = f"train {kernel}"
        print(f"\ntrain step, {kernel}: {train_flops / best[key] / 1e9:.3f} s best, "
              f"{train_flops / med[key] / 1e9:.3f} s median; target MFU >= 40%")


if __name__ == "__main__":
    main()
