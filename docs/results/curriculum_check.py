"""Would a memory that keeps growing teach more than one frozen after the first epoch? A check before any grid.

On preset (a′) it did not (docs/results/findings.md point 8): every chain_sum problem there has two terms, so any solved
problem from epoch 1 is as good an example as a later one. This script asks whether a pool that mixes
difficulties (chain_sum with 2 to 4 terms) changes that, with three measurements on the untrained model:

1. Which problems epoch 1 can solve: the model samples each of 40 training problems 4 times at the training
   temperature, as the first epoch does. Passes by number of terms = what a memory frozen after epoch 1 holds.
2. Whether memory would pick an example of the same difficulty: for each training problem, the nearest other
   training problem under the memory's embedder (`related_examples` ranks by it), and whether its number of
   terms is the same.
3. Whether the harder example teaches more: held-out accuracy by number of terms with no example in context,
   with a solved 2-term problem, and with a solved 4-term problem (extra samples of the 4-term training
   problems stand in for the solutions a policy that improves would add to memory later).

A growing memory can only beat a frozen one here if (1) epoch 1 solves few hard problems, (2) retrieval prefers
the same difficulty, and (3) the hard example lifts hard held-out problems more than the easy one does.

    python docs/results/curriculum_check.py [THREADS]   # 1 h 39 min with 1 thread beside 2-3 training runs
                                                        # (AVX2, float32); its output: docs/results/findings.md point 8
"""

import sys
import tempfile
import time
from collections import Counter

import numpy as np
import torch

from pmd.config import Config
from pmd.evaluate import evaluate
from pmd.loop import setup
from pmd.memory.embedder import make_embedder
from pmd.rollout import encode_chat, generate
from pmd.tasks import verify_many

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
cfg = Config(model="smollm2-135m-instruct", task="chain_sum", method="grpo", seed=0,
             task_params={"min_terms": 2, "max_terms": 4, "min_digits": 1, "max_digits": 2},
             train_problems=40, eval_problems=150, eval_samples=2, max_new_tokens=64, temperature=0.7,
             generation_batch_size=64)
run = setup(cfg, tempfile.mkdtemp(prefix="pmd-curriculum-"))
tokenizer, model, task = run.tokenizer, run.sampler.model, run.task


def terms(problem) -> int:
    return problem.metadata["num_terms"]


def sample(problems, n: int, seed: int) -> list[list[str]]:
    """n completions of each problem at the training temperature; [problem][sample] texts."""
    prompts = [encode_chat(tokenizer, task.messages(p)) for p in problems for _ in range(n)]
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))]
    completions, _ = generate(model, tokenizer, prompts, max_new_tokens=cfg.max_new_tokens,
                              temperature=cfg.temperature, top_p=1.0, greedy=False,
                              batch_size=cfg.generation_batch_size, seeds=seeds)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(problems))]


def passes(problems, texts_per_problem) -> list[tuple]:
    """(problem, shortest passing text) for every problem with a pass."""
    found = []
    for problem, texts in zip(problems, texts_per_problem):
        verdicts = verify_many(task, [problem] * len(texts), texts)
        ok = sorted((t for t, v in zip(texts, verdicts) if v.reward >= cfg.success_threshold), key=len)
        if ok:
            found.append((problem, ok[0]))
    return found


started = time.time()
pool = run.train_problems
print(f"training pool by number of terms: {dict(sorted(Counter(map(terms, pool)).items()))}")

# 1. what the first epoch solves
epoch1 = passes(pool, sample(pool, 4, seed=1))
print(f"1. epoch-1 proxy (4 samples each, T={cfg.temperature}): problems with a pass by number of terms: "
      f"{dict(sorted(Counter(terms(p) for p, _ in epoch1).items()))}  ({time.time() - started:.0f} s)", flush=True)

# 2. does retrieval keep the difficulty
embed = make_embedder(cfg.embedder)
vectors = embed([task.messages(p)[-1]["content"] for p in pool])
similarity = vectors @ vectors.T
np.fill_diagonal(similarity, -np.inf)
nearest = similarity.argmax(axis=1)
same = Counter()
for i, j in enumerate(nearest):
    same[terms(pool[i]), terms(pool[i]) == terms(pool[j])] += 1
for k in sorted({terms(p) for p in pool}):
    print(f"2. {k}-term problems whose nearest other problem ({cfg.embedder}) has {k} terms: "
          f"{same[k, True]} of {same[k, True] + same[k, False]}")

# 3. does a harder solved example teach hard problems more
hard_pool = [p for p in pool if terms(p) == 4]
late = passes(hard_pool, sample(hard_pool, 16, seed=2))
easy = next(((p, t) for p, t in epoch1 if terms(p) == 2), None)
hard = min(late, key=lambda pt: len(pt[1]), default=None)
print(f"   4-term training problems with a pass in 16 more samples: {len(late)} of {len(hard_pool)}  "
      f"({time.time() - started:.0f} s)", flush=True)

options = dict(samples=cfg.eval_samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size, seed=0)
held_out = run.eval_problems
by_terms = {k: [p for p in held_out if terms(p) == k] for k in sorted({terms(p) for p in held_out})}
conditions = [("no example", None), ("2-term example", easy), ("4-term example", hard)]
for label, example in conditions:
    if label != "no example" and example is None:
        print(f"3. {label}: none solved, skipped")
        continue
    if example is not None:
        label += f" ({example[1]!r})"
    cells = []
    for k, problems in by_terms.items():
        prompts = None
        if example is not None:
            shown = task.messages(example[0]) + [{"role": "assistant", "content": example[1]}]
            prompts = [encode_chat(tokenizer, shown + [task.messages(p)[-1]]) for p in problems]
        result = evaluate(model, tokenizer, task, problems, prompts=prompts, **options)
        cells.append(f"{k} terms (n={len(problems)}) mean@2 {100 * result['accuracy']:.1f}%, "
                     f"greedy {100 * result['accuracy_greedy']:.1f}%")
    print(f"3. {label}: " + "; ".join(cells) + f"  ({time.time() - started:.0f} s)", flush=True)
