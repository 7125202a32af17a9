"""A reward for the regression lock (tests/test_regression_lock.py): on a random model about a quarter of the
completions pass (by a hash of the text), so demonstrations, feedback and memory all get used."""

import hashlib


def reward(prompts, completions, **kwargs):
    rewards = [1.0 if hashlib.sha256(c.encode()).digest()[0] % 4 == 0 else 0.0 for c in completions]
    feedback = ["" if r else f"The reply {c[:4]!r}... is not accepted." for r, c in zip(rewards, completions)]
    return rewards, feedback
