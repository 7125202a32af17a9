"""Memory-free evaluation on held-out problems: mean@k accuracy over sampled completions, and greedy.

The model sees only the problem, exactly as at deployment. Every sampled completion draws from its own seeded
generator, so an evaluation neither depends on nor disturbs the training random stream (resume stays exact).
"""

from __future__ import annotations

from tqdm.auto import tqdm

from pmd.rollout import encode_chat, generate, sample_seed
from pmd.tasks import Problem, Task, verify_many


def evaluate(model, tokenizer, task: Task, problems: list[Problem], *, samples: int, temperature: float,
             top_p: float, max_new_tokens: int, batch_size: int, seed: int, desc: str = "eval",
             prompts: list[list[int]] | None = None, processes=None) -> dict:
    """Returns {accuracy, accuracy_greedy, pass_at_k, n, k}. `accuracy` is mean@k (greedy when k = 0).

    `prompts` replaces the problems' own prompts (token ids), e.g. with memory in context. With `processes`
    (pmd.distributed.Processes) each process evaluates a consecutive share of the problems and the rewards
    are gathered: sample s of problem i draws from its own generator, seeded by (seed, i, s), so the result
    does not depend on the batching or on the number of processes.
    """
    if prompts is None:
        prompts = [encode_chat(tokenizer, task.messages(p)) for p in problems]
    n = len(problems)
    if n == 0:
        raise ValueError("evaluation needs at least one problem (eval_problems=0?)")
    mine = processes.shard(n) if processes is not None else range(n)
    jobs = [("greedy", [(i, 0) for i in mine])]
    if samples:
        jobs.append(("sampled", [(i, s) for i in mine for s in range(samples)]))
    total = sum(len(j[1]) for j in jobs)
    show = processes is None or processes.is_main
    rewards: dict[str, list[float]] = {}
    with tqdm(total=total, desc=desc, unit="seq", leave=False, disable=not show) as bar:
        for kind, job_rows in jobs:
            out: list[float] = []
            for start in range(0, len(job_rows), batch_size):
                chunk = job_rows[start:start + batch_size]
                seeds = [sample_seed("eval", seed, i, s) for i, s in chunk] if kind == "sampled" else None
                completions, _ = generate(model, tokenizer, [prompts[i] for i, _ in chunk],
                                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                          greedy=kind == "greedy", batch_size=batch_size, seeds=seeds)
                texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
                out += [v.reward for v in verify_many(task, [problems[i] for i, _ in chunk], texts)]
                bar.update(len(chunk))
            rewards[kind] = out
    if processes is not None and processes.world > 1:  # shares are consecutive: rank order is problem order
        shares = processes.gather(rewards)
        rewards = {kind: [r for share in shares for r in share[kind]] for kind in rewards}
    greedy = sum(rewards["greedy"]) / n
    result = {"accuracy": greedy, "accuracy_greedy": greedy, "n": n, "k": samples}
    if samples:
        sampled = rewards["sampled"]
        result["accuracy"] = sum(sampled) / len(sampled)
        per_problem = [sampled[i * samples:(i + 1) * samples] for i in range(n)]
        result["pass_at_k"] = sum(max(r) >= 1.0 for r in per_problem) / n
    return result
