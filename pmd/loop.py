"""The co-evolution loop of Procedural Memory Distillation (PMD), and its baselines GRPO and SDPO.

One step (`train_step`), in order:
  1. rollouts   take the next `problems_per_step` problems (shuffled per epoch) and sample `group_size`
                completions of each from the current policy, memory-free, as at deployment
  2. verify     reward in [0, 1], pass/fail and feedback per rollout; group advantages r - mean(r)
  3. memory     pmd: the rollouts refresh the procedural memory: experience (the rollouts themselves, and the
                utility credit of what the teacher showed at the problem's last visit), insight (the policy
                reflects on its passes and failures, per problem), behavior (every `behavior_every` steps,
                insights recurring across problems are abstracted)
  4. teacher    each rollout's teacher context: sdpo, the first other passing sibling, else its own feedback;
                pmd, the memory (behaviors, insights, a stored or sibling solution, else feedback). The
                memory records what it showed.
  5. update     grpo: clipped policy gradient on the advantages; sdpo/pmd: the teacher (the same model with the
                context, EMA weights) re-scores the student's own tokens and the student matches its top-k
                distribution (+ `grpo_weight` x GRPO); micro-batched, `optimizer_steps_per_batch` steps
  6. EMA        the teacher's weights move toward the student's; the sampling copy takes the new weights
  7. log        a metrics row and the rollout rows; evaluation every `eval_every` steps (memory-free);
                a checkpoint every `save_every` (weights, optimizer, teacher, RNG, data position, memory)
Memory and policy co-evolve: this step's rollouts shape the memory, and the memory shapes this step's update.
The trained model runs without memory.

Simplifications and choices against the paper and SDPO (docs/method.md has each with its source):
  1. The paper's objective, prompts, caps and cadences are unpublished; pmd keeps SDPO's loss (student top-k +
     tail, alpha-JSD, IS clip 2, sequence token-mean then batch mean) so that memory is the only change.
  2. Memory is updated before the teacher contexts are built, so a problem's current passes can teach its
     current failures (SDPO's role for siblings) and earlier passes can teach an all-fail group.
  3. Reflections are written by the current policy (`reflector=policy`); rollouts never see memory.
  4. GRPO is Dr.GRPO-style: advantage r - mean(group), no std, no KL, token-mean, PPO clip 0.2/0.28.
  5. bf16 runs matmuls in bf16 under autocast with float32 trainable weights (pure bf16 AdamW loses updates);
     dropout stays off in both passes (the model is never put in train mode): teacher targets must not be noisy.
  6. An over-long teacher prompt drops items whole, never cuts the problem or the instruction.
  7. Every rollout row samples from its own generator (seed, step, problem, sample), so rollouts do not depend
     on batching. With N processes each samples and trains on problems_per_step / N problems, the main process
     owns the memory and the run folder, and the loss keeps global denominators (docs/scaling.md).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pmd import losses
from pmd.config import Config, ConfigError
from pmd.console import say, without_library_bars
from pmd.distributed import Processes, check_processes
from pmd.evaluate import evaluate
from pmd.experiments import base_eval
from pmd.hardware import CoreShare, resolve_dtype, usable_cores
from pmd.models import load_model_and_tokenizer
from pmd.rollout import SamplingCopy, answer_token_mask, encode_chat, generate, rollout_id, sample_seed
from pmd.runlog import RunDir, rng_state, seed_everything
from pmd.tasks import Problem, Task, load_task, verify_many
from pmd.teacher import Context, TeacherPrompts, shown_feedback, sibling_items
from pmd.trackers import Trackers, check_installed, parse_report_to
from pmd.update import Learner, Rows, preference_metrics, teacher_preference

# Phases of a step that are memory work (time/memory is their sum).
MEMORY_PHASES = ("memory_observe", "reflect", "consolidate", "teacher_context", "memory_record")


@dataclass
class Run:
    """What a run holds from step to step."""

    cfg: Config
    processes: Processes  # one, unless launched with accelerate launch / torchrun
    task: Task
    train_problems: list[Problem]
    eval_problems: list[Problem]
    tokenizer: object
    dtype: str  # the compute dtype `dtype` resolved to on this device (bfloat16 | float32)
    model: torch.nn.Module  # the policy being trained (LoRA-wrapped, or every weight a float32 master copy)
    sampler: SamplingCopy  # rollouts and evaluation sample from this plain copy of the policy
    learner: Learner  # optimizer, scheduler, teacher weights, the loss
    prompts: TeacherPrompts  # fits teacher contexts into the teacher prompt budget
    memory: object | None = None  # pmd: the procedural memory (main process only)
    initial: SamplingCopy | None = None  # freeze=reflector: the initial weights write the reflections
    cores: CoreShare | None = None  # threads=0 on CPU: threads follow the cores other processes leave idle

    def prompt_ids(self, problem: Problem) -> list[int]:
        return encode_chat(self.tokenizer, self.task.messages(problem))

    def context_ids(self, problem: Problem, context: Context | None) -> list[int]:
        """The problem's chat with its last message replaced by a context (the bare problem without one)."""
        if context is None:
            return self.prompt_ids(problem)
        return self.prompts.ids(self.task.messages(problem), context)


@dataclass
class Rollouts:
    """One step's rollouts. `_B`: the whole step in batch order (problem-major, G per problem), on every process;
    `_b`: this process's rows, `rows_b[j]` being the batch index of its row j."""

    problems_P: list[Problem]
    rows_b: list[int]
    prompts_b: list[list[int]]
    completions_b: list[list[int]]
    advantages_b: torch.Tensor
    texts_B: list[str]
    verdicts_B: list
    feedback_B: list[str]  # the feedback a teacher (and the memory) may read: `teacher_feedback` applied
    lengths_B: list[int]
    finished_B: list[bool]
    passed_B: list[bool]

    def problem_of(self, i: int) -> Problem:
        return self.problems_P[i // (len(self.texts_B) // len(self.problems_P))]


# ---------------------------------------------------------------------------------------------------- setup
def setup(cfg: Config, run_path: str | Path | None = None, processes: Processes | None = None,
          task: Task | None = None) -> Run:
    """Model, sampling copy, learner, task and (pmd) memory of a run, in their initial state. `task` replaces
    the config's (an in-memory dataset given from Python)."""
    processes = processes or Processes()
    check_processes(cfg, processes.world)
    torch.set_num_threads(cfg.threads or usable_cores())
    seed_everything(cfg.seed)
    task = task or load_task(cfg.task, cfg.task_params, seed=cfg.seed)
    dtype, _ = resolve_dtype(cfg.dtype, processes.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=getattr(torch, dtype),
                                                attn_implementation=_attention(cfg, processes.device))
    model = model.to(processes.device)
    sampler = SamplingCopy(model)
    initial = SamplingCopy(model) if cfg.freeze == "reflector" else None  # never synced
    model = prepare_for_training(model, cfg)
    sampler.sync(model)
    prompts = TeacherPrompts.for_tokenizer(tokenizer, max_tokens=cfg.max_teacher_prompt_tokens, level_budgets={
        "behavior": cfg.behavior_token_budget, "insight": cfg.insight_token_budget},
        demonstration_form=cfg.demonstration_form)
    autocast = torch.bfloat16 if dtype == "bfloat16" else None
    run = Run(cfg, processes, task, task.problems("train", cfg.train_problems),
              task.problems("eval", cfg.eval_problems) if cfg.eval_problems else [], tokenizer, dtype, model,
              sampler, Learner(cfg, model, processes, tokenizer.pad_token_id, autocast), prompts, initial=initial,
              cores=CoreShare() if cfg.threads == 0 and processes.device.type == "cpu" else None)
    if cfg.method == "pmd" and processes.is_main:  # the memory lives in the main process only
        run.memory = _build_memory(run, run_path)
    return run


def _build_memory(run: Run, run_path):
    from pmd.memory import MemoryConfig, build_memory
    from pmd.memory.reflector import make_reflector

    cfg = run.cfg
    if run_path is None:
        import tempfile
        run_path = tempfile.mkdtemp(prefix="pmd-memory-")
    source = run.initial or run.sampler  # the current policy by default
    reflect = make_reflector(cfg.reflector, policy=lambda: source.model, tokenizer=run.tokenizer,
                             load_model=lambda spec: _load_reflector_model(spec, run),
                             temperature=cfg.reflect_temperature, max_new_tokens=cfg.reflect_max_new_tokens,
                             batch_size=cfg.generation_batch_size)
    texts = {p.id: run.task.messages(p)[-1]["content"] for p in run.train_problems}
    return build_memory(MemoryConfig.from_config(cfg), run_path, embedder=cfg.embedder, reflect=reflect,
                        prompts=run.prompts, problem_texts=texts)


def _load_reflector_model(spec: str, run: Run):
    device = run.processes.device
    model, tokenizer = load_model_and_tokenizer(spec, dtype=getattr(torch, run.dtype),
                                                attn_implementation=_attention(run.cfg, device))
    return model.to(device).eval(), tokenizer


def prepare_for_training(model, cfg: Config):
    """Wrap the model with LoRA adapters (float32), or make every weight a float32 trainable master copy."""
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=targets if targets == "all-linear" else targets.split(","))
        with warnings.catch_warnings():  # PEFT 0.21 reads a property transformers 5.24 deprecates: not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(model, lora)  # adapters are float32 (PEFT's autocast_adapter_dtype)
    else:
        model = model.to(torch.float32)
        model.requires_grad_(True)
    model.eval()  # dropout off in every pass; gradients still flow
    return model


# ---------------------------------------------------------------------------------------------------- step
def train_step(run: Run, step: int) -> tuple[dict, list[dict]]:
    """One step of the loop (see the module docstring). Returns the metrics row and the rollout rows on the
    main process (empty ones elsewhere)."""
    cfg, timer = run.cfg, PhaseTimer()
    if run.cores is not None:  # threads=0: leave the cores other processes keep busy to them (pmd/hardware.py)
        torch.set_num_threads(run.cores.threads())

    # ---- 1-2. rollouts, memory-free, and their verdicts (the whole batch on every process)
    in_prompt = in_context_prompts(run, step, timer) if cfg.freeze == "policy" else None
    batch = sample_and_verify(run, step, in_prompt, timer)

    # ---- 3. memory update (pmd): experience, insight, behavior
    frozen = cfg.freeze == "memory" and step > cfg.freeze_memory_after
    if run.memory is not None and not frozen:
        update_memory(run, step, batch, timer)

    # ---- 4. teacher contexts (sdpo: siblings; pmd: memory), built by the main process
    contexts_B = None
    if cfg.method != "grpo":
        contexts_B = run.processes.from_main(lambda: teacher_contexts(run, step, batch, in_prompt, frozen, timer))

    # ---- 5-6. update, teacher EMA, sampling copy (none under freeze=policy: the in-context baseline)
    update_row = {"train/loss": 0.0, "train/grad_norm": 0.0}
    if cfg.freeze != "policy":
        update_row = run.learner.update(update_rows(run, batch, contexts_B), step, timer)
        if math.isfinite(update_row["train/grad_norm"]):  # no EMA step after a non-finite gradient
            run.learner.teacher.update(run.model)
        with timer("sync_sampler"):
            run.sampler.sync(run.model)

    # ---- 7. log
    local = teacher_preference(run.learner.sequence_logps, [batch.passed_B[i] for i in batch.rows_b],
                               cfg.group_size)
    preference = run.processes.sum_dicts(local)
    if not run.processes.is_main:
        return {}, []
    row = step_metrics(run, step, batch, update_row, contexts_B, preference, frozen, timer)
    row["train/threads"] = torch.get_num_threads()
    return row, rollout_rows(step, batch, contexts_B, in_prompt, with_memory_ids=cfg.method == "pmd")


def sample_and_verify(run: Run, step: int, in_prompt, timer) -> Rollouts:
    """This process's share of the step's rollouts, sampled and verified; the texts and verdicts of all."""
    cfg, procs, G = run.cfg, run.processes, run.cfg.group_size
    problems_P = problems_for_step(run, step)
    rows_b = [k * G + j for k in procs.shard(len(problems_P)) for j in range(G)]
    problem_b = [problems_P[i // G] for i in rows_b]
    prompts_b = [run.prompt_ids(p) for p in problem_b]
    sampling_prompts_b = [in_prompt[1][i // G] for i in rows_b] if in_prompt else prompts_b
    with timer("generate"):
        # each row samples from its own generator, seeded by (seed, step, problem, sample): the rollouts do
        # not depend on the batching nor on the number of processes
        completions_b, finished_b = generate(
            run.sampler.model, run.tokenizer, sampling_prompts_b, max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature, top_p=cfg.top_p, greedy=False, batch_size=cfg.generation_batch_size,
            seeds=[sample_seed("rollout", cfg.seed, step, i // G, i % G) for i in rows_b])
        texts_b = run.tokenizer.batch_decode(completions_b, skip_special_tokens=True)
    with timer("verify"):  # a group never spans two processes, so advantages are local
        verdicts_b = verify_many(run.task, problem_b, texts_b)
        advantages_b = losses.group_advantages(torch.tensor([v.reward for v in verdicts_b]), G)
    texts_B, verdicts_B, lengths_B, finished_B = procs.concat(
        texts_b, verdicts_b, [len(c) for c in completions_b], finished_b)
    passed_B = [v.reward >= cfg.success_threshold for v in verdicts_B]
    feedback_B = ["" if ok else shown_feedback(v.feedback, v.extracted, cfg.teacher_feedback)
                  for v, ok in zip(verdicts_B, passed_B)]
    return Rollouts(problems_P, rows_b, sampling_prompts_b, completions_b, advantages_b, texts_B, verdicts_B,
                    feedback_B, lengths_B, finished_B, passed_B)


def update_rows(run: Run, batch: Rollouts, contexts_B) -> Rows:
    """This process's rollouts with what the update needs of them: teacher prompts, outcomes, answer tokens."""
    rows_b = batch.rows_b
    teacher_b = [contexts_B[i] if contexts_B is not None else (None, None) for i in rows_b]
    with_teacher = run.cfg.method != "grpo"
    answers_b = [answer_token_mask(run.tokenizer, c, batch.verdicts_B[i].extracted) if with_teacher else []
                 for c, i in zip(batch.completions_b, rows_b)]
    return Rows(batch.prompts_b, batch.completions_b, batch.advantages_b, [ids for _, ids in teacher_b],
                passed=[batch.passed_B[i] for i in rows_b],
                signal=[c.signal if c is not None and ids is not None else None for c, ids in teacher_b],
                answer_masks=answers_b, stopped=[batch.finished_B[i] for i in rows_b])


def problems_for_step(run: Run, step: int) -> list[Problem]:
    """Problems of step `step` (1-based): consecutive slices of per-epoch permutations of the pool."""
    n, P = len(run.train_problems), run.cfg.problems_per_step
    out = []
    for pos in range((step - 1) * P, step * P):
        epoch, i = divmod(pos, n)
        g = torch.Generator().manual_seed(run.cfg.seed * 1_000_003 + epoch)
        out.append(run.train_problems[int(torch.randperm(n, generator=g)[i])])
    return out


def update_memory(run: Run, step: int, batch: Rollouts, timer) -> None:
    """pmd, main process: the step's rollouts enter experience; problems that gained one are reflected on
    (insight); every `behavior_every` steps insights are consolidated into behaviors."""
    memory, cfg = run.memory, run.cfg
    rewards_B = [v.reward for v in batch.verdicts_B]
    with timer("memory_observe"):
        gained = memory.observe(step, batch.problems_P, batch.texts_B, rewards_B, batch.passed_B, batch.feedback_B,
                                batch.finished_B)
    with timer("reflect"):
        memory.reflect(step, gained, {p.id: run.task.messages(p)[-1]["content"] for p in gained})
    if cfg.behavior_every and step % cfg.behavior_every == 0:
        with timer("consolidate"):
            memory.consolidate(step)


def teacher_contexts(run: Run, step: int, batch: Rollouts, in_prompt, frozen: bool, timer) -> list[tuple]:
    """Main process: (context, teacher prompt ids) per rollout of the batch; (None, None) for no signal.

    sdpo: the rollout's siblings (`pmd.teacher.sibling_items`). pmd: the memory's items, through the same
    fitting (`ProceduralMemory.group_contexts`); the memory then records what it showed. freeze=policy: the
    context was the sampling prompt, there is no teacher."""
    G, out, shared_P = run.cfg.group_size, [], []
    with timer("teacher_context"):
        for k, problem in enumerate(batch.problems_P):
            messages, rows = run.task.messages(problem), slice(k * G, (k + 1) * G)
            feedback_G = batch.feedback_B[rows]
            if in_prompt is not None:
                group, shared = [in_prompt[0][k]] * G, in_prompt[0][k]
            elif run.memory is not None:
                group, shared = run.memory.group_contexts(step, problem, messages, batch.texts_B[rows],
                                                          batch.passed_B[rows], feedback_G, batch.finished_B[rows])
            else:
                offers = sibling_items(batch.texts_B[rows], batch.passed_B[rows], feedback_G)
                group, shared = run.prompts.group(messages, offers), None
            shared_P.append(shared)
            # one token list per distinct context (equal prefixes); none in the in-context baseline
            encoded = {id(c): run.context_ids(problem, c) for c in group if c is not None and in_prompt is None}
            out += [(c, encoded.get(id(c))) for c in group]
    if run.memory is not None and not frozen:
        with timer("memory_record"):
            used = {i for c, _ in out if c is not None for i in c.entry_ids}
            run.memory.record(step, batch.problems_P, batch.passed_B, shared_P, used)
    return out


def in_context_prompts(run: Run, step: int, timer) -> tuple[list, list[list[int]]]:
    """freeze=policy, the in-context baseline: each problem's memory context (main process) and the sampling
    prompt that carries it (on every process)."""
    with timer("teacher_context"):
        def build():
            problems_P = problems_for_step(run, step)
            contexts = [run.memory.prompt_context(step, p, run.task.messages(p)) for p in problems_P]
            return contexts, [run.context_ids(p, c) for p, c in zip(problems_P, contexts)]
        return run.processes.from_main(build)


# ---------------------------------------------------------------------------------------------------- logs
def step_metrics(run: Run, step: int, batch: Rollouts, update_row: dict, contexts_B, preference: dict,
                 frozen: bool, timer) -> dict:
    """The metrics row of one step (names: pmd/metrics.py)."""
    cfg, G = run.cfg, run.cfg.group_size
    rewards_B = torch.tensor([v.reward for v in batch.verdicts_B], dtype=torch.float32)
    passed_P = [any(batch.passed_B[i * G:(i + 1) * G]) for i in range(len(batch.problems_P))]
    n = len(batch.texts_B)
    row = {"step": step, "rollouts": step * n, "train/reward_mean": rewards_B.mean().item(),
           "train/reward_std": rewards_B.std().item() if n > 1 else 0.0,
           "train/success_sample_fraction": sum(batch.passed_B) / n,
           "train/success_group_fraction": sum(passed_P) / len(passed_P),
           "train/completion_length_mean": sum(batch.lengths_B) / n,
           "train/completion_clipped_fraction": 1 - sum(batch.finished_B) / n,
           **update_row, "train/lr": run.learner.scheduler.get_last_lr()[0]}
    errors = sum(getattr(v, "error", False) for v in batch.verdicts_B)
    if errors:
        row["train/verifier_error_fraction"] = errors / n
    if contexts_B is not None:
        row.update(teacher_metrics([c for c, _ in contexts_B], [ids is not None for _, ids in contexts_B]))
        row.update(preference_metrics(preference))
    if run.memory is not None:
        row.update(memory_metrics(run, [c for c, _ in contexts_B], frozen))
    row.update({f"time/{k}": round(v, 3) for k, v in timer.seconds.items()})
    row["time/memory"] = round(sum(timer.seconds.get(k, 0.0) for k in MEMORY_PHASES), 3)
    return row


def teacher_metrics(contexts_B: list, signal_B: list[bool]) -> dict:
    n = len(contexts_B)
    kinds_B = [c.kinds if c is not None else "none" for c in contexts_B]
    return {"teacher/signal_fraction": sum(signal_B) / n,
            "teacher/demonstration_fraction": sum("demonstration" in k for k in kinds_B) / n,
            "teacher/feedback_fraction": sum("feedback" in k for k in kinds_B) / n}


def memory_metrics(run: Run, contexts_B: list, frozen: bool) -> dict:
    n = len(contexts_B)
    row = {f"teacher/context_{level}_fraction": sum(c is not None and level in c.levels for c in contexts_B) / n
           for level in ("experience", "insight", "behavior")}
    with_context = [c for c in contexts_B if c is not None]
    row["teacher/example_fraction"] = sum(any(i.kind == "example" for i in c.items) for c in with_context) / n
    row["teacher/prompt_tokens_mean"] = (sum(c.tokens for c in with_context) / len(with_context)
                                         if with_context else 0.0)
    row["memory/frozen"] = frozen
    row.update(run.memory.size_metrics())
    row.update(run.memory.take_counters())
    return row


def rollout_rows(step: int, batch: Rollouts, contexts_B, in_prompt, with_memory_ids: bool) -> list[dict]:
    """rollouts.jsonl: every rollout with its reward, feedback, advantage, length in tokens, whether it stopped
    (EOS within max_new_tokens) and the context its teacher read."""
    advantages_B = losses.group_advantages(torch.tensor([v.reward for v in batch.verdicts_B]),
                                           len(batch.texts_B) // len(batch.problems_P)).tolist()
    rows = []
    for i, (text, verdict) in enumerate(zip(batch.texts_B, batch.verdicts_B)):
        context = contexts_B[i][0] if contexts_B is not None else None
        kind = ("in_prompt:" if in_prompt else "") + context.kinds if context is not None else "none"
        row = {"step": step, "id": rollout_id(step, i), "problem": batch.problem_of(i).id, "completion": text,
               "reward": verdict.reward, "feedback": verdict.feedback, "extracted": verdict.extracted,
               "advantage": round(advantages_B[i], 4), "tokens": batch.lengths_B[i],
               "stopped": batch.finished_B[i], "teacher_context": kind}
        if with_memory_ids:
            row["memory_ids"] = context.entry_ids if context is not None else []
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------- eval
def evaluate_run(run: Run, step: int) -> dict:
    """Memory-free held-out accuracy (the headline), plus eval/memory_* with memory in the prompt."""
    cfg = run.cfg
    options = dict(samples=cfg.eval_samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                   max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size, seed=cfg.seed + 1)
    out = _eval_fields(evaluate(run.sampler.model, run.tokenizer, run.task, run.eval_problems,
                                desc=f"eval@{step}", processes=run.processes, **options))
    if cfg.method == "pmd" and (cfg.eval_with_memory or cfg.freeze == "policy"):
        def with_memory():  # the main process reads the memory; every process evaluates a share
            contexts = [run.memory.eval_context(p, run.task.messages(p)) for p in run.eval_problems]
            return ([run.context_ids(p, c) for p, c in zip(run.eval_problems, contexts)],
                    sum(c is not None for c in contexts) / len(contexts))
        prompts, fraction = run.processes.from_main(with_memory)
        result = evaluate(run.sampler.model, run.tokenizer, run.task, run.eval_problems, prompts=prompts,
                          desc=f"eval+memory@{step}", processes=run.processes, **options)
        out.update({"eval/memory_" + k[len("eval/"):]: v for k, v in _eval_fields(result).items()
                    if k not in ("eval/n", "eval/k")})
        out["eval/memory_context_fraction"] = fraction
    return out


def _evaluate_initial(run: Run) -> dict:
    """The step-0 evaluation, read from `base_eval_cache` when a run with the same key stored it."""
    cfg, procs = run.cfg, run.processes
    with_memory = cfg.method == "pmd" and (cfg.eval_with_memory or cfg.freeze == "policy")
    key = {**cfg.to_dict(), "dtype": run.dtype}  # what `auto` resolved to on this machine
    path = None if with_memory else base_eval.cache_path(key, procs.world)  # eval/memory_* differ
    cached = procs.from_main(lambda: base_eval.load(path))
    if cached is not None:
        return {**cached, "eval/cached": True}
    before = evaluate_run(run, 0)
    if procs.is_main:
        base_eval.store(path, key, before)
    return before


def _eval_fields(result: dict) -> dict:
    out = {"eval/accuracy": result["accuracy"], "eval/accuracy_greedy": result["accuracy_greedy"],
           "eval/n": result["n"], "eval/k": result["k"]}
    if "pass_at_k" in result:
        out["eval/pass_at_k"] = result["pass_at_k"]
    return out


# ---------------------------------------------------------------------------------------------------- run
def train(cfg: Config, explicit_keys: set[str] | None = None, task: Task | None = None) -> Path:
    """Run (or resume) a full training run; returns the run folder. `task` replaces the config's (`pmd.train`
    with a dataset given in Python).

    Launched with N processes (accelerate launch / torchrun), every process runs this function; the main one
    alone writes the run folder and prints.
    """
    procs = Processes()
    main = procs.is_main
    tell = say if main else (lambda message: None)
    run_dir, run, start = _start(cfg, explicit_keys or set(), procs, tell, task)
    t0 = time.time()
    cfg = run.cfg
    trackers = Trackers(parse_report_to(cfg.report_to), run_dir.path, cfg.to_dict()) if main else None
    if start == 1 and cfg.eval_problems:
        before = _evaluate_initial(run)
        if main:
            run_dir.append("metrics.jsonl", [{"step": 0, **before}])
            trackers.log({"step": 0, **before})
        tell(f"held-out accuracy before training: {_fmt_eval(before)}"
             + ("  (computed by another run: base_eval_cache)" if before.get("eval/cached") else ""))
    bar = tqdm(range(start, cfg.steps + 1), initial=start - 1, total=cfg.steps, desc="train", unit="step",
               disable=not main)
    for step in bar:
        row, rollouts = train_step(run, step)  # gathered to the main process (empty elsewhere)
        if cfg.eval_problems and _every(step, cfg.eval_every, cfg.steps):
            t = time.time()
            row.update(evaluate_run(run, step))
            row["time/eval"] = round(time.time() - t, 3)
        if main:
            run_dir.append("rollouts.jsonl", rollouts)
            if run.memory is not None:
                run_dir.append("reflections.jsonl", run.memory.take_log())
            run_dir.append("metrics.jsonl", [row])
            trackers.log(row)
            bar.write(_step_line(row, cfg))
        if _every(step, cfg.save_every, cfg.steps):
            save_checkpoint(run, run_dir, step, time.time() - t0)
    bar.close()
    if main:
        trackers.close()
        _finish(run, run_dir, time.time() - t0, tell)
    procs.barrier()
    return run_dir.path


def _start(cfg: Config, explicit_keys: set[str], procs: Processes, tell, task) -> tuple[RunDir, Run, int]:
    """The run folder, the run in its initial or checkpointed state, and the first step to run."""
    # the main process decides the folder, the config and whether to resume; every process follows it
    decision = procs.from_main(lambda: _resolve_run(cfg, explicit_keys, procs.world))
    if isinstance(decision, ValueError):
        raise decision
    cfg, resuming, checkpoint = decision
    run_dir = RunDir(cfg.output_dir)
    if procs.is_main:
        run_dir.write_config(cfg)
        run_dir.restore_memory(checkpoint)  # the memory of the checkpoint, or none: a kill mid-step loses nothing
    run = setup(cfg, run_dir.path, procs, task)
    start = 1
    if checkpoint is not None:
        state = load_checkpoint(run, run_dir, checkpoint)  # every process loads it (its own RNG state)
        start = state["step"] + 1
        if procs.is_main:
            run_dir.truncate_after(state["step"])
        tell(f"resuming {run_dir.path} from step {state['step']}")
    elif resuming and procs.is_main:
        run_dir.truncate_after(-1)  # nothing was checkpointed: start over cleanly
    procs.barrier()
    tell(f"run folder: {run_dir.path}  |  method={cfg.method} model={cfg.model} task={cfg.task}"
         + (f"  |  {procs.world} processes" if procs.world > 1 else ""))
    tell(f"compute: {run.dtype} on {procs.device} ({resolve_dtype(cfg.dtype, procs.device)[1]})")
    return run_dir, run, start


def _resolve_run(cfg: Config, explicit_keys: set[str], world: int):
    """(config, resuming, latest checkpoint) of the run to start or resume, or the ConfigError that stops it."""
    try:
        if not cfg.output_dir:
            cfg.output_dir = str(Path("runs") / f"{cfg.run_name()}-{datetime.now():%Y%m%d-%H%M%S}")
        run_dir = RunDir(cfg.output_dir)
        run_dir.lock()  # before anything is read or truncated: one writer per run folder
        resuming = run_dir.exists()
        if resuming:
            cfg = run_dir.resume_config(cfg, explicit_keys)
        check_processes(cfg, world)
        check_installed(parse_report_to(cfg.report_to))
    except ValueError as error:  # raised on every process, not only the main one (ConfigError is one)
        return error
    return cfg, resuming, run_dir.latest_checkpoint() if resuming else None


def save_checkpoint(run: Run, run_dir: RunDir, step: int, wall_seconds: float) -> None:
    """Weights, teacher, optimizer, scheduler, every process's RNG state, loop state and memory."""
    procs, learner = run.processes, run.learner
    rng_states = procs.gather(rng_state())  # per process: resume restores each one's own stream
    if procs.is_main:  # weights, teacher and optimizer are the same on every process after a synchronised update
        run_dir.save_checkpoint(step, run.model, learner.teacher.state_dict(), learner.optimizer,
                                learner.scheduler, {"wall_seconds": wall_seconds}, run.cfg.keep_checkpoints,
                                memory=run.memory.store if run.memory else None, rng_states=rng_states)
    procs.barrier()


def load_checkpoint(run: Run, run_dir: RunDir, checkpoint: Path) -> dict:
    learner = run.learner
    state = run_dir.load_checkpoint(checkpoint, run.model, learner.teacher, learner.optimizer, learner.scheduler,
                                    rank=run.processes.rank)
    run.sampler.sync(run.model)
    return state


def _finish(run: Run, run_dir: RunDir, wall: float, tell) -> None:
    """Final model, summary and report of a finished run (main process), and one line saying where they are."""
    save_final(run, run_dir.path / "final")
    summary = _summary(run_dir, run.cfg, wall)
    (run_dir.path / "summary.json").write_text(json.dumps(summary, indent=1))
    tell(f"held-out accuracy after training:  {_fmt_eval(summary.get('after', {}))}")
    try:  # a report that cannot be drawn must not fail a finished run
        from pmd.experiments.report import write_report

        report = f"report {write_report([run_dir.path])}"
    except Exception as e:  # noqa: BLE001
        report = f"no report ({type(e).__name__}: {e}; retry with `pmd report {run_dir.path}`)"
    path = run_dir.path
    memory = f", memory {path / 'memory.sqlite'} (`pmd memory show {path}`)" if run.memory is not None else ""
    tell(f"done: final model {path / 'final'}, {report}{memory}; evaluate with `pmd eval {path}`, compare "
         f"with `pmd report {path} OTHER_RUN`")


def save_final(run: Run, path: Path) -> None:
    """A plain transformers folder: LoRA merged in float32, so small updates are not rounded away."""
    model = run.model.to(torch.float32)  # before merging: PEFT merges in the base weights' dtype
    if run.cfg.finetune == "lora":
        model = model.merge_and_unload()
    model.config.use_cache = True
    with without_library_bars():
        model.save_pretrained(path)
    run.tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------------------------------- helpers
class PhaseTimer:
    """Accumulates wall seconds per named phase."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.start = time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] += time.perf_counter() - t
            self.seconds["step"] = time.perf_counter() - self.start


def _attention(cfg: Config, device: torch.device) -> str:
    """The attention kernel: as configured, or for `auto` eager on CPU (faster at short sequences), sdpa elsewhere."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "eager" if torch.device(device).type == "cpu" else "sdpa"


def _every(step: int, period: int, last: int) -> bool:
    """At every `period`-th step and at the last; `period` 0 means only at the last."""
    return step == last or (period > 0 and step % period == 0)


def _fmt_eval(e: dict) -> str:
    """One line from a metrics row's eval fields (`_eval_fields`)."""
    if not e:
        return "n/a"
    return f"mean@{e['eval/k']} {e['eval/accuracy']:.3f}, greedy {e['eval/accuracy_greedy']:.3f} (n={e['eval/n']})"


def _step_line(row: dict, cfg: Config) -> str:
    parts = [f"step {row['step']}/{cfg.steps}", f"loss {row['train/loss']:.4f}",
             f"reward {row['train/reward_mean']:.3f}"]
    if "teacher/signal_fraction" in row:
        parts.append(f"signal {row['teacher/signal_fraction']:.2f}")
    parts.append(f"gnorm {row['train/grad_norm']:.3f}")
    if "eval/accuracy" in row:
        parts.append(f"eval {row['eval/accuracy']:.3f} (greedy {row['eval/accuracy_greedy']:.3f})")
    parts.append(f"gen {row.get('time/generate', 0):.1f}s")
    train = sum(row.get(f"time/{k}", 0) for k in ("student_forward", "teacher_forward", "backward", "optimizer"))
    parts.append(f"train {train:.1f}s")
    parts.append(f"{row['time/step']:.1f}s")
    return " | ".join(parts)


def _summary(run_dir: RunDir, cfg: Config, wall: float) -> dict:
    evals = [{k: v for k, v in r.items() if k.startswith("eval/") or k == "step"}
             for r in run_dir.metrics() if "eval/accuracy" in r]
    out = {"method": cfg.method, "model": cfg.model, "task": cfg.task, "steps": cfg.steps,
           "wall_seconds_this_session": round(wall, 1)}
    if evals:
        out["before"], out["after"] = evals[0], evals[-1]
    return out
