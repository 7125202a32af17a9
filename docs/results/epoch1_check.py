"""How sparse is the reward in the first epoch of a grid? A check before the grid runs (docs/results/findings.md point 10).

The untrained policy samples each of the first 24 training problems 4 times at the training temperature, as
epoch 1 does, and this prints the share of rollouts that pass, how many groups of 4 pass 0, 1, ... 4 times (a
group with 0 or 4 gives GRPO no signal), how many completions are cut at the token budget, and a few samples.

    python docs/results/epoch1_check.py TERMS MIN_DIGITS MAX_DIGITS MAX_NEW_TOKENS
    python docs/results/epoch1_check.py 3 1 2 64    # the grid of docs/results/qwen-chain-sum-hard.yaml
"""

import sys
import tempfile
import time
from collections import Counter

from pmd.config import Config
from pmd.loop import setup
from pmd.rollout import encode_chat, generate
from pmd.tasks import verify_many

GROUP = 4
terms, min_digits, max_digits, max_new_tokens = map(int, sys.argv[1:5])
cfg = Config(model="qwen2.5-coder-0.5b-instruct", task="chain_sum", method="grpo", seed=0, threads=2,
             task_params={"min_terms": terms, "max_terms": terms, "min_digits": min_digits, "max_digits": max_digits},
             train_problems=24, eval_problems=0, max_new_tokens=max_new_tokens, temperature=0.7)
run = setup(cfg, tempfile.mkdtemp(prefix="pmd-epoch1-"))
problems = [p for p in run.train_problems for _ in range(GROUP)]
start = time.time()
completions, _ = generate(run.sampler.model, run.tokenizer, [encode_chat(run.tokenizer, run.task.messages(p))
                                                            for p in problems],
                          max_new_tokens=max_new_tokens, temperature=cfg.temperature, top_p=1.0, greedy=False,
                          batch_size=96, seeds=list(range(len(problems))))
texts = run.tokenizer.batch_decode(completions, skip_special_tokens=True)
passed = [v.reward >= 1.0 for v in verify_many(run.task, problems, texts)]
per_group = Counter(sum(passed[i:i + GROUP]) for i in range(0, len(passed), GROUP))
cut = sum(len(c) >= max_new_tokens for c in completions)
print(f"{terms} terms, {min_digits}-{max_digits} digits, {max_new_tokens} tokens: {sum(passed) / len(passed):.1%} of "
      f"rollouts pass; groups by passes {dict(sorted(per_group.items()))}; {cut}/{len(completions)} cut at the "
      f"budget; {time.time() - start:.0f} s")
for i in range(0, len(problems), 6 * GROUP):
    print("  " + repr(texts[i][:160]), "pass" if passed[i] else "fail")
