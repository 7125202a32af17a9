"""Train from Python on an in-memory dataset with a Python reward, then read the run.

    python docs/examples/train_in_python.py

Rows are plain dicts with a `prompt`; every other column reaches the reward function as a keyword argument
(TRL's signature). The reward may also return feedback, which the self-teacher can read on failed attempts.
"""

import pmd

rows = [{"prompt": f"What is {a} + {b}? Reply with the number only.", "total": str(a + b)}
        for a in range(2, 9) for b in range(3, 9)]


def exact_sum(prompts, completions, total, **kwargs):
    rewards, feedback = [], []
    for completion, expected in zip(completions, total):
        words = completion.strip().split()
        ok = bool(words) and words[0].strip(".") == expected
        rewards.append(1.0 if ok else 0.0)
        feedback.append("" if ok else "Reply with the sum as a single number.")
    return rewards, feedback


run = pmd.train({"method": "pmd", "steps": 4, "problems_per_step": 4, "group_size": 4, "eval_problems": 8,
                 "output_dir": "runs/sums-in-python"},
                dataset=rows, reward=exact_sum)

before, after = run.metrics[0], run.metrics[-1]
print(f"held-out accuracy {before['eval/accuracy']:.2f} -> {after['eval/accuracy']:.2f}")
print(f"final model: {run.final}")
for entry in run.memory(level="insight")[:5]:
    print(f"{entry['kind']:>8}: {entry['text']}")
