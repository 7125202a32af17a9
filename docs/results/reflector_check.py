"""Does a wording of the reflection prompt make a small reflector write advice instead of copying the prompt?

The untrained policy samples each of the first 24 training problems 4 times (3-term chain_sum within 128 tokens,
as docs/results/qwen-chain-sum-working.yaml); each problem's passes and failures (at most 2 of each, with the
checker's feedback) become one insight prompt, as `ProceduralMemory.reflect` builds it. The same model then
reflects on every prompt, field by field at the reflector temperature (2 samples each), once with the closing
instructions used up to 2026-12-02 (BEFORE) and once with today's `INSIGHT_INSTRUCTIONS`. Prints, per
wording: lines that parse as an entry, lines dropped as copies of the prompt (`copied_from`), entries kept,
reflections with at least one kept entry, kept entries that state the problem's answer, and a few outputs.

    python docs/results/reflector_check.py [MODEL]      # default qwen2.5-coder-0.5b-instruct
"""

import sys
import tempfile
import time

from pmd.config import Config
from pmd.loop import setup
from pmd.memory.procedural import INSIGHT_FIELDS
from pmd.memory.reflection import INSIGHT_INSTRUCTIONS, copied_from, insight_prompt, parse_insights
from pmd.memory.reflector import LocalReflector
from pmd.rollout import encode_chat, generate
from pmd.tasks import verify_many

BEFORE = (
    "Write at most {max_items} STRATEGY lines and at most {max_items} LESSON lines.",
    "STRATEGY: a step the correct attempts took that worked.",
    "LESSON: a mistake the wrong attempts made, and what to do instead.",
    "Rules:",
    "- One line each, starting with STRATEGY: or LESSON:",
    "- Each line is one short instruction; someone reading a solution can check if it was followed.",
    "- Do not give the final answer.",
    "- If advice written so far is still right, you may repeat that line exactly.",
    "Write only these lines.",
)
GROUP, SAMPLES = 4, 2
model = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-0.5b-instruct"
cfg = Config(model=model, task="chain_sum", method="pmd", seed=0, threads=2, train_problems=24, eval_problems=0,
             task_params={"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 2},
             max_new_tokens=128, temperature=0.7)
run = setup(cfg, tempfile.mkdtemp(prefix="pmd-reflector-check-"))
start = time.time()
problems = [p for p in run.train_problems for _ in range(GROUP)]
completions, _ = generate(run.sampler.model, run.tokenizer, [encode_chat(run.tokenizer, run.task.messages(p))
                                                            for p in problems],
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, greedy=False,
                          batch_size=96, seeds=list(range(len(problems))))
texts = run.tokenizer.batch_decode(completions, skip_special_tokens=True)
verdicts = verify_many(run.task, problems, texts)
attempts = {}
for p, text, v in zip(problems, texts, verdicts):
    attempts.setdefault(p.id, (p, [], []))[1 if v.reward >= 1.0 else 2].append((text, v.feedback))
print(f"{sum(v.reward >= 1.0 for v in verdicts)}/{len(texts)} attempts pass ({time.time() - start:.0f} s)")

reflect = LocalReflector(lambda: run.sampler.model, run.tokenizer, temperature=cfg.reflect_temperature,
                         max_new_tokens=cfg.reflect_max_new_tokens, batch_size=48)
for name, instructions in [("before", BEFORE), ("today", INSIGHT_INSTRUCTIONS)]:
    jobs = []  # (problem, prompt)
    for p, passes, fails in attempts.values():
        prompt = insight_prompt(run.task.messages(p)[-1]["content"], [t for t, _ in passes[:2]], fails[:2],
                                max_attempt_chars=cfg.reflect_attempt_max_chars, instructions=instructions)
        jobs += [(p, prompt)] * SAMPLES
    outputs = []
    for sample in range(SAMPLES):  # one seed per sample, as reflect() draws one per step
        chosen = jobs[sample::SAMPLES]
        outputs += list(zip(chosen, reflect([q for _, q in chosen], seed=sample, fields=INSIGHT_FIELDS)))
    parsed = copied = kept = useful = answers = 0
    for (p, prompt), output in outputs:
        strategies, lessons, _ = parse_insights(output or "", max_items=3, max_tokens=cfg.l2_entry_max_tokens)
        entries = strategies + lessons
        own = [e for e in entries if not copied_from(e, prompt)]
        parsed, copied, kept = parsed + len(entries), copied + len(entries) - len(own), kept + len(own)
        useful += bool(own)
        answers += sum(p.answer in e for e in own)
    print(f"{name}: {len(outputs)} reflections; {parsed} entries parsed, {copied} copies of the prompt, {kept} kept; "
          f"{useful} reflections keep at least one; {answers} kept entries state the answer "
          f"({time.time() - start:.0f} s)")
    for (_, _), output in outputs[:12:3]:
        print("   ", repr(output))
print("today's closing lines:\n" + "\n".join("    " + line for line in INSIGHT_INSTRUCTIONS))
