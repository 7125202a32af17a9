"""The training loop: GRPO and SDPO (the baselines PMD is measured against), one readable step at a time.

One step, in order:
  1. take the next `problems_per_step` problems (shuffled per epoch, deterministic by seed)
  2. sample `group_size` completions per problem from the current policy (memory-free, as at deployment)
  3. verify each completion: reward in [0, 1] and a feedback string
  4. sdpo: build each rollout's teacher prompt (SDPO reprompt: first other passing sibling as demonstration,
     else the rollout's own feedback, else no signal)
  5. update: per-token loss on the student's own completions, gradient accumulation over micro-batches,
     `optimizer_steps_per_batch` optimizer steps (later ones off-policy, hence the clips)
  6. sdpo: one EMA update of the teacher
  7. log a metrics row and the rollouts; evaluate every `eval_every`; checkpoint every `save_every`

Simplifications and choices, against the references (lasgroup/SDPO, TRL):
  - Loss: `grpo` is Dr.GRPO-style (advantage r - mean(group), no std, no KL, token-mean, PPO clip 0.2/0.28).
    `sdpo` is SDPO's logit-level loss (student top-k + tail, alpha-JSD, IS clip 2, sequence token-mean then
    batch mean) with an optional GRPO term of weight `grpo_weight`.
  - bf16 runs matmuls in bf16 under autocast with float32 trainable weights (pure bf16 AdamW loses updates).
  - Dropout stays off in both passes (the model is never put in train mode): teacher targets must not be noisy.
  - An over-long teacher prompt drops its demonstration (never cuts the problem or the instruction).
  - Every rollout row samples from its own generator (seed, step, problem, sample), so rollouts do not depend on
    batching. Launched with N processes (accelerate launch / torchrun), each samples and trains on
    problems_per_step / N problems and the main process owns the memory and the run folder (pmd/distributed.py,
    docs/scaling.md); the loss keeps global denominators, so N processes take the same step as one.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pmd import base_eval, losses
from pmd.config import Config, ConfigError
from pmd.distributed import Processes, check_processes
from pmd.evaluate import encode_chat, evaluate, verify_all
from pmd.models import load_model_and_tokenizer
from pmd.rollout import SamplingCopy, completion_logits, generate, pack, sample_seed
from pmd.runlog import RunDir, rng_state, seed_everything
from pmd.tasks import Problem, load_task
from pmd.prefix import grouped_prefix_completion_logits
from pmd.procedural import rollout_id
from pmd.teacher import TeacherWeights, reprompt, sdpo_choices

# Phases of a step that are memory work (time/memory is their sum).
MEMORY_PHASES = ("memory_observe", "reflect", "consolidate", "teacher_context", "memory_record")


class Trainer:
    """Holds the model, optimizer, teacher and data of one run; `train_step` is one step of the loop."""

    def __init__(self, cfg: Config, run_path: str | Path | None = None, processes: Processes | None = None):
        self.cfg = cfg
        self.processes = processes or Processes()  # one, unless launched with accelerate launch / torchrun
        check_processes(cfg, self.processes.world)
        self.device = self.processes.device
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.autocast_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else None

        self.task = load_task(cfg.task, cfg.task_params, seed=cfg.seed)
        self.train_problems = self.task.problems("train", cfg.train_problems)
        self.eval_problems = self.task.problems("eval", cfg.eval_problems) if cfg.eval_problems else []

        self.model, self.tokenizer = load_model_and_tokenizer(
            cfg.model, dtype=torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32,
            attn_implementation=self.attention_kernel())
        self.model = self.model.to(self.device)
        self.sampler = SamplingCopy(self.model)  # rollouts and evaluation sample from it
        # freeze=reflector: reflections come from the initial weights, kept in a copy that is never synced
        self.initial = SamplingCopy(self.model) if cfg.freeze == "reflector" else None
        self.model = prepare_for_training(self.model, cfg)
        self.sampler.sync(self.model)
        self.pad_id = self.tokenizer.pad_token_id
        self.teacher = TeacherWeights(self.model, cfg.teacher_model_kind, cfg.teacher_update_rate)
        # the student forward of the loss goes through this (DDP with several processes: its backward
        # averages the gradients); everything else uses self.model, the same parameters
        self.student = self.processes.wrap(self.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2))
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self._prompt_ids: dict[str, list[int]] = {}
        # the memory lives in the main process only (with one process: this one)
        self.memory = self._build_memory(run_path) if cfg.method == "pmd" and self.processes.is_main else None
        self.last_memory_ids: list[list[int]] | None = None
        self.sequence_logps: dict[int, tuple[float, float]] = {}  # rollout -> (teacher, student) mean logp
        self.prefix_states: dict = {}  # teacher prompt -> its encoded keys/values, for one teacher weight state

    def _build_memory(self, run_path):
        """The procedural memory of a pmd run: its store in the run folder, embedder and reflector."""
        from pmd.embedder import make_embedder
        from pmd.memory import MemoryStore
        from pmd.procedural import ProceduralMemory, memory_limits

        cfg, tok = self.cfg, self.tokenizer
        limits = memory_limits(cfg)
        embed = make_embedder(cfg.embedder)

        def item_tokens(text: str) -> int:
            return len(tok(text, add_special_tokens=False)["input_ids"])

        def prompt_tokens(messages: list[dict], last: str) -> int:
            return len(encode_chat(tok, [*messages[:-1], {**messages[-1], "content": last}]))

        if run_path is None:
            import tempfile
            run_path = tempfile.mkdtemp(prefix="pmd-memory-")
        store = MemoryStore.for_run(run_path, limits, embed=embed, count_tokens=item_tokens)
        return ProceduralMemory(store, cfg, reflect=self._build_reflector(), embed=embed,
                                prompt_tokens=prompt_tokens, item_tokens=item_tokens)

    def _build_reflector(self):
        from pmd.reflector import LocalReflector, OpenAIReflector, parse_reflector_spec

        cfg = self.cfg
        kind, where, name = parse_reflector_spec(cfg.reflector)
        options = {"temperature": cfg.reflect_temperature, "max_new_tokens": cfg.reflect_max_new_tokens}
        if kind == "openai":
            return OpenAIReflector(where, name, **options)
        if kind == "local":
            model, tokenizer = load_model_and_tokenizer(where, dtype=torch.bfloat16 if cfg.dtype == "bfloat16"
                                                        else torch.float32, attn_implementation=self.attention_kernel())
            model = model.to(self.device).eval()
            return LocalReflector(lambda: model, tokenizer, batch_size=cfg.generation_batch_size, **options)
        source = self.initial if self.initial is not None else self.sampler  # the current policy by default
        return LocalReflector(lambda: source.model, self.tokenizer, batch_size=cfg.generation_batch_size,
                              **options)

    # ------------------------------------------------------------------------------------------------ data
    def problems_for_step(self, step: int) -> list[Problem]:
        """Problems of step `step` (1-based): consecutive slices of per-epoch permutations of the pool."""
        n, P = len(self.train_problems), self.cfg.problems_per_step
        out = []
        for pos in range((step - 1) * P, step * P):
            epoch, i = divmod(pos, n)
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
            out.append(self.train_problems[int(torch.randperm(n, generator=g)[i])])
        return out

    def prompt_ids(self, problem: Problem) -> list[int]:
        if problem.id not in self._prompt_ids:
            self._prompt_ids[problem.id] = encode_chat(self.tokenizer, self.task.messages(problem))
        return self._prompt_ids[problem.id]

    # ------------------------------------------------------------------------------------------------ step
    def train_step(self, step: int) -> tuple[dict, list[dict]]:
        """One step of the loop. Returns the metrics row and the rollout rows (on the main process; the others
        return empty ones).

        With N processes each one samples, verifies and trains on a consecutive share of the step's problems.
        Names ending in `_B` hold the step's whole batch, in `_b` this process's rows (the same with one
        process); rows_b[j] is the batch index of this process's row j.
        """
        cfg, G, procs = self.cfg, self.cfg.group_size, self.processes
        timer = PhaseTimer()
        self.sequence_logps = {}

        # ---- 1-2. rollouts: G samples per problem from the current policy, memory-free
        problems_P = self.problems_for_step(step)
        rows_b = [k * G + j for k in procs.shard(len(problems_P)) for j in range(G)]
        problem_b = [problems_P[i // G] for i in rows_b]
        prompts_b = [self.prompt_ids(p) for p in problem_b]
        in_context = None
        if cfg.freeze == "policy":  # the in-context baseline: the student itself reads the memory
            with timer("teacher_context"):
                in_context, context_ids_P = self.in_context_prompts(step, problems_P)
                prompts_b = [context_ids_P[i // G] for i in rows_b]
        with timer("generate"):
            # each row samples from its own generator, seeded by (seed, step, problem, sample): the rollouts do
            # not depend on the batching nor on the number of processes
            completions_b, finished_b = generate(
                self.sampler.model, self.tokenizer, prompts_b, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_p=cfg.top_p, greedy=False,
                batch_size=cfg.generation_batch_size,
                seeds=[sample_seed("rollout", cfg.seed, step, i // G, i % G) for i in rows_b])
            texts_b = self.tokenizer.batch_decode(completions_b, skip_special_tokens=True)

        # ---- 3. verify (a group never spans two processes, so advantages are local)
        with timer("verify"):
            verdicts_b = verify_all(self.task, problem_b, texts_b)
            rewards_b = torch.tensor([v.reward for v in verdicts_b], dtype=torch.float32)
            passed_b = [r >= cfg.success_threshold for r in rewards_b.tolist()]
            advantages_b = losses.group_advantages(rewards_b, G)
        # the whole batch, in batch order (consecutive shares in rank order), for the memory and the logs
        shares = procs.gather((texts_b, verdicts_b, [len(c) for c in completions_b], finished_b,
                               advantages_b.tolist()))
        texts_B, verdicts_B, lengths_B, finished_B, advantages_B = ([x for share in shares for x in share[f]]
                                                                    for f in range(5))
        problem_B = [problems_P[i // G] for i in range(len(texts_B))]
        rewards_B = torch.tensor([v.reward for v in verdicts_B], dtype=torch.float32)
        passed_B = [r >= cfg.success_threshold for r in rewards_B.tolist()]

        # ---- 4. teacher prompts (sdpo): SDPO's reprompt within each group
        teacher_prompts_b: list[list[int] | None] = [None] * len(rows_b)
        kinds_b = ["none"] * len(rows_b)
        if cfg.method == "sdpo":
            with timer("teacher_context"):
                teacher_prompts_b, kinds_b = self.sdpo_teacher_prompts(problem_b, texts_b, passed_b,
                                                                      [v.feedback for v in verdicts_b])

        memory_row: dict = {}
        if cfg.method == "pmd":  # the main process owns the memory: it builds every teacher prompt
            teacher_prompts_B = kinds_B = None
            if procs.is_main:
                teacher_prompts_B, kinds_B, memory_row = self.pmd_teacher_prompts(
                    step, problems_P, texts_B, rewards_B.tolist(), passed_B, [v.feedback for v in verdicts_B],
                    timer, in_context)
            teacher_prompts_B, kinds_B = procs.broadcast((teacher_prompts_B, kinds_B))
            teacher_prompts_b, kinds_b = [teacher_prompts_B[i] for i in rows_b], [kinds_B[i] for i in rows_b]

        # ---- 5. update (none under freeze=policy: the in-context baseline never changes its weights)
        update_metrics = {"loss": 0.0, "grad_norm": 0.0}
        if cfg.freeze != "policy":
            update_metrics = self.update(prompts_b, completions_b, advantages_b, teacher_prompts_b, timer)

            # ---- 6. teacher EMA, once per rollout batch (skipped when the gradient was not finite)
            if math.isfinite(update_metrics["grad_norm"]):
                self.teacher.update(self.model)
            with timer("sync_sampler"):
                self.sampler.sync(self.model)

        # ---- metrics and rollout rows, over the whole batch, by the main process
        shares = procs.gather((kinds_b, [t is not None for t in teacher_prompts_b],
                               {rows_b[j]: v for j, v in self.sequence_logps.items()}))
        if not procs.is_main:
            return {}, []
        kinds_B = [k for share in shares for k in share[0]]
        signal_B = [s for share in shares for s in share[1]]
        self.sequence_logps = {i: v for share in shares for i, v in share[2].items()}
        passed_P = [any(passed_B[i * G:(i + 1) * G]) for i in range(len(problems_P))]
        row = {
            "step": step,
            "loss": update_metrics.pop("loss"),
            "reward_mean": rewards_B.mean().item(),
            "reward_std": rewards_B.std().item() if len(rewards_B) > 1 else 0.0,
            "success_sample_fraction": sum(passed_B) / len(passed_B),
            "success_group_fraction": sum(passed_P) / len(passed_P),
            "completion_length_mean": sum(lengths_B) / len(lengths_B),
            "completion_clipped_fraction": 1 - sum(finished_B) / len(finished_B),
            "rollouts": step * len(problem_B),
            **update_metrics,
            "lr": self.scheduler.get_last_lr()[0],
        }
        if any(getattr(v, "error", False) for v in verdicts_B):
            row["verifier_error_fraction"] = sum(getattr(v, "error", False) for v in verdicts_B) / len(verdicts_B)
        if cfg.method in ("sdpo", "pmd"):
            row["teacher_signal_fraction"] = sum(signal_B) / len(kinds_B)
            row["demonstration_fraction"] = sum("demonstration" in k for k in kinds_B) / len(kinds_B)
            row["feedback_used_fraction"] = sum("feedback" in k for k in kinds_B) / len(kinds_B)
            row.update(teacher_preference(self.sequence_logps, passed_B, G))
        row.update(memory_row)
        row.update({f"time/{k}": round(v, 3) for k, v in timer.seconds.items()})
        row["time/memory"] = round(sum(timer.seconds.get(k, 0.0) for k in MEMORY_PHASES), 3)
        rollout_rows = [
            {"step": step, "id": rollout_id(step, i), "problem": p.id, "completion": t, "reward": v.reward,
             "feedback": v.feedback, "extracted": v.extracted, "advantage": round(a, 4), "teacher_context": k}
            for i, (p, t, v, a, k) in enumerate(zip(problem_B, texts_B, verdicts_B, advantages_B, kinds_B))]
        if self.last_memory_ids is not None:
            for r, ids in zip(rollout_rows, self.last_memory_ids):
                r["memory_ids"] = ids
        return row, rollout_rows

    # ------------------------------------------------------------------------------------------------ pmd
    def in_context_prompts(self, step: int, problems_P: list[Problem]) -> tuple[list | None, list[list[int]]]:
        """freeze=policy: each problem's memory context (main process; None elsewhere) and its sampling
        prompt (token ids, on every process)."""
        contexts = ids_P = None
        if self.memory is not None:
            contexts = [self.memory.prompt_context(step, p, self.task.messages(p)) for p in problems_P]
            ids_P = [self.context_ids(p, c) for p, c in zip(problems_P, contexts)]
        return contexts, self.processes.broadcast(ids_P)

    def context_ids(self, problem: Problem, context) -> list[int]:
        """Token ids of the problem's chat with its last message replaced by a memory context."""
        if context is None:
            return self.prompt_ids(problem)
        messages = self.task.messages(problem)
        return encode_chat(self.tokenizer, [*messages[:-1], {**messages[-1], "content": context.text}])

    def pmd_teacher_prompts(self, step, problems_P, texts_B, rewards_B, passed_B, feedback_B, timer, in_context):
        """Memory work of one step (observe, reflect, consolidate) and each rollout's teacher prompt."""
        cfg, memory, G = self.cfg, self.memory, self.cfg.group_size
        frozen = cfg.freeze == "memory" and step > cfg.freeze_memory_after
        if not frozen:
            with timer("memory_observe"):
                gained = memory.observe(step, problems_P, texts_B, rewards_B, passed_B, feedback_B)
            with timer("reflect"):
                memory.reflect(step, gained, {p.id: self.task.messages(p)[-1]["content"] for p in gained})
            if cfg.behavior_every and step % cfg.behavior_every == 0:
                with timer("consolidate"):
                    memory.consolidate(step)
        prompts_B: list[list[int] | None] = []
        kinds_B: list[str] = []
        contexts_B = []
        shared_P = []
        with timer("teacher_context"):
            for k, problem in enumerate(problems_P):
                rows = slice(k * G, (k + 1) * G)
                if in_context is not None:  # freeze=policy: no teacher; the sampling prompt was the context
                    group = [in_context[k]] * G
                    shared_P.append(in_context[k])
                else:
                    contexts = memory.group_contexts(step, problem, self.task.messages(problem), texts_B[rows],
                                                     passed_B[rows], feedback_B[rows])
                    group = contexts.per_rollout
                    shared_P.append(contexts.shared)
                encoded: dict[int, list[int]] = {}  # one token list per distinct context: equal prefixes
                for context in group:
                    contexts_B.append(context)
                    kinds_B.append(context_kinds(context, in_prompt=in_context is not None))
                    if context is None or in_context is not None:
                        prompts_B.append(None)
                        continue
                    if id(context) not in encoded:
                        encoded[id(context)] = self.context_ids(problem, context)
                    prompts_B.append(encoded[id(context)])
        used = {i for c in contexts_B if c is not None for i in c.entry_ids}
        if not frozen:
            with timer("memory_record"):
                memory.record(step, problems_P, passed_B, shared_P, used)
        self.last_memory_ids = [c.entry_ids if c else [] for c in contexts_B]
        n = len(contexts_B)
        row = {f"context_{level}_fraction": sum(c is not None and level in c.levels for c in contexts_B) / n
               for level in ("experience", "insight", "behavior")}
        with_context = [c for c in contexts_B if c is not None]
        row["teacher_prompt_tokens_mean"] = (sum(c.tokens for c in with_context) / len(with_context)
                                             if with_context else 0.0)
        row["memory_frozen"] = frozen
        row.update(memory.size_metrics())
        row.update(memory.take_counters())
        return prompts_B, kinds_B, row


    def sdpo_teacher_prompts(self, problem_B, texts_B, passed_B, feedback_B):
        """Token ids of each rollout's teacher prompt (None: no signal) and which context it got."""
        G = self.cfg.group_size
        prompts: list[list[int] | None] = []
        kinds: list[str] = []
        for g in range(0, len(problem_B), G):
            choices = sdpo_choices(texts_B[g:g + G], passed_B[g:g + G], feedback_B[g:g + G],
                                   self.cfg.use_feedback)
            messages = self.task.messages(problem_B[g])
            for choice in choices:
                ids, kind = None, "none"
                for demo, fb in ((choice.demonstration, None), (None, choice.feedback)):
                    if demo or fb:
                        ids = encode_chat(self.tokenizer, reprompt(messages, demo, fb))
                        if len(ids) <= self.cfg.max_teacher_prompt_tokens:
                            kind = "demonstration" if demo else "feedback"
                            break
                        ids = None  # too long: drop the demonstration, never cut the problem
                prompts.append(ids)
                kinds.append(kind)
        return prompts, kinds

    def update(self, prompts_B, completions_B, advantages_B, teacher_prompts_B, timer) -> dict:
        """Loss, backward over micro-batches, optimizer step(s). Returns loss and update metrics.

        The rows are this process's (all of them with one process); losses and metrics are over all processes.
        """
        cfg, procs = self.cfg, self.processes
        B = len(prompts_B)
        old_logps = None
        if cfg.optimizer_steps_per_batch > 1:  # later mini-batches are off-policy: keep the sampling policy
            with timer("old_logprobs"):
                old_logps = self.sampling_logprobs(prompts_B, completions_B)
        sums: dict[str, float] = defaultdict(float)
        grad_norms = []
        for mini in _split(list(range(B)), cfg.optimizer_steps_per_batch):
            self.prefix_states = {}  # teacher prompts encoded under the current teacher weights
            # denominators of the whole mini-batch, over all processes (each holds an equal share of it)
            counts = procs.gather((len(mini), sum(max(1, len(completions_B[i])) for i in mini)))
            n_seq, n_tok = sum(c[0] for c in counts), sum(c[1] for c in counts)
            # similar lengths share a micro-batch: less padding; the exact denominators keep the gradient.
            # With prefix sharing, rows with the same prompt (student) or teacher prompt go together so that
            # it is encoded once per micro-batch.
            student_key = (lambda i: tuple(prompts_B[i])) if cfg.student_prefix_sharing else (lambda i: ())
            if cfg.teacher_prefix_sharing and cfg.method != "grpo":
                order = sorted(mini, key=lambda i: (student_key(i), tuple(teacher_prompts_B[i] or ()),
                                                    len(completions_B[i])))
            else:
                order = sorted(mini, key=lambda i: (student_key(i), len(prompts_B[i]) + len(completions_B[i])))
            micros = _chunks(order, cfg.micro_batch_size)  # as many on every process
            for m_index, micro in enumerate(micros):
                # gradients are all-reduced once per optimizer step, in the backward of its last micro-batch
                with procs.no_sync(self.student, skip=m_index < len(micros) - 1):
                    loss, m = self.micro_batch_loss(micro, prompts_B, completions_B, advantages_B,
                                                    teacher_prompts_B, old_logps, n_seq, n_tok, timer)
                    with timer("backward"):
                        # loss is this process's part of the global mean (global denominators), and the global
                        # loss is the sum of the N parts; DDP averages gradients over N processes, so x N gives
                        # the gradient of the global loss: mean_r grad(N * loss_r) = grad(sum_r loss_r)
                        (loss * procs.world).backward()
                for k, v in m.items():
                    sums[k] += v
            with timer("optimizer"):
                params = [p for p in self.model.parameters() if p.requires_grad]
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))
                grad_norms.append(norm.item())
                if math.isfinite(norm.item()):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.scheduler.step()
        self.prefix_states = {}
        sums = procs.sum_dicts(sums)  # the parts of every process: global losses and counts
        n_mini = cfg.optimizer_steps_per_batch
        out = {"loss": sums.pop("loss") / n_mini, "grad_norm": sum(grad_norms) / len(grad_norms)}
        if "divergence_tokens" in sums:
            tokens = sums.pop("divergence_tokens")
            out["teacher_student_divergence"] = sums.pop("divergence_sum") / tokens if tokens else 0.0
        out.update({k: v / n_mini for k, v in sums.items()})
        return out

    def micro_batch_loss(self, micro, prompts_B, completions_B, advantages_B, teacher_prompts_B,
                         old_logps, n_seq, n_tok, timer):
        cfg = self.cfg
        batch = pack([prompts_B[i] for i in micro], [completions_B[i] for i in micro], self.pad_id).to(self.device)
        mask = batch.completion_mask.float()
        R = batch.completion_len
        with timer("student_forward"), self.autocast():
            logits = self.policy_logits(self.student, micro, prompts_B, completions_B, batch)  # (b, R, V)
            logp = losses.token_logprobs(logits, batch.completion_ids)  # (b, R)
        old = old_logps[micro, :R] if old_logps is not None else logp.detach()
        metrics: dict[str, float] = {}

        grpo_loss = logits.new_zeros(())
        if cfg.method == "grpo" or cfg.grpo_weight > 0:
            with timer("loss"):
                per_token = losses.grpo_token_loss(logp, old, advantages_B[micro].to(self.device),
                                                   cfg.grpo_clip_low, cfg.grpo_clip_high)
                grpo_loss = losses.token_mean(per_token, mask, num_tokens=n_tok)
            metrics["grpo_loss"] = grpo_loss.item()
        if cfg.method == "grpo":
            metrics["loss"] = grpo_loss.item()
            return grpo_loss, metrics

        # sdpo: distill the teacher's next-token distribution on the student's own completion tokens
        rows = [j for j, i in enumerate(micro) if teacher_prompts_B[i] is not None]
        distill_loss = logits.sum() * 0.0  # graph-attached zero when no rollout has a signal
        if rows:
            teacher_batch = pack([teacher_prompts_B[micro[j]] for j in rows],
                                 [completions_B[micro[j]] for j in rows], self.pad_id).to(self.device)
            with timer("teacher_forward"), torch.no_grad(), self.autocast():
                forward = functools.partial(self.teacher.forward, self.model)
                if cfg.teacher_prefix_sharing:  # a prompt shared by several rollouts is encoded once
                    teacher_logits = grouped_prefix_completion_logits(
                        forward, [teacher_prompts_B[micro[j]] for j in rows],
                        [completions_B[micro[j]] for j in rows], self.pad_id, cfg.temperature,
                        states=self.prefix_states, device=self.device)
                else:
                    teacher_logits = completion_logits(forward, teacher_batch, cfg.temperature)
            with timer("loss"):  # top-k support, divergence, weights and the diagnostics' log-probs
                distill_loss, per_token, row_mask = self.distillation_loss(
                    micro, rows, logits, logp, old, teacher_logits, teacher_batch, mask, n_seq)
            metrics["divergence_sum"] = (per_token.detach() * row_mask).sum().item()
            metrics["divergence_tokens"] = row_mask.sum().item()
        metrics["distill_loss"] = distill_loss.item()
        loss = (1 - cfg.grpo_weight) * distill_loss + cfg.grpo_weight * grpo_loss
        metrics["loss"] = loss.item()
        return loss, metrics

    def distillation_loss(self, micro, rows, logits, logp, old, teacher_logits, teacher_batch, mask, n_seq):
        """SDPO's per-token top-k divergence, IS-weighted, sequence-mean token-mean; records sequence log-probs."""
        cfg = self.cfg
        student_logits = logits[rows, :teacher_batch.completion_len]
        per_token = losses.topk_divergence(student_logits, teacher_logits,
                                           topk=cfg.distillation_topk or None,
                                           alpha=cfg.distillation_alpha,
                                           add_tail=cfg.distillation_add_tail)
        r = teacher_batch.completion_len
        weight = losses.importance_weight(logp[rows, :r], old[rows, :r], cfg.distillation_is_clip)
        row_mask = mask[rows, :r]
        distill_loss = losses.seq_mean_token_mean(per_token * weight, row_mask, num_sequences=n_seq)
        teacher_logp = losses.token_logprobs(teacher_logits, teacher_batch.completion_ids)
        lengths = row_mask.sum(-1).clamp(min=1)
        teacher_seq = ((teacher_logp * row_mask).sum(-1) / lengths).tolist()
        student_seq = ((logp[rows, :r].detach() * row_mask).sum(-1) / lengths).tolist()
        for j, t, s in zip(rows, teacher_seq, student_seq):
            self.sequence_logps[micro[j]] = (t, s)
        return distill_loss, per_token, row_mask

    def policy_logits(self, forward, micro, prompts_B, completions_B, batch):
        """Policy logits predicting the completion tokens of rows `micro`: (b, R, V). With prefix sharing the rows
        of one problem read its prompt's keys/values, computed once (with gradients when they are enabled)."""
        if self.cfg.student_prefix_sharing:
            return grouped_prefix_completion_logits(
                forward, [prompts_B[i] for i in micro], [completions_B[i] for i in micro], self.pad_id,
                self.cfg.temperature, device=self.device)
        return completion_logits(forward, batch, self.cfg.temperature)

    @torch.no_grad()
    def sampling_logprobs(self, prompts_B, completions_B) -> torch.Tensor:
        """log pi_old(y_t) of every completion token before any update: (B, R_max)."""
        R = max(1, max(len(c) for c in completions_B))
        out = torch.zeros(len(prompts_B), R, device=self.device)
        for micro in _chunks(list(range(len(prompts_B))), self.cfg.micro_batch_size):
            batch = pack([prompts_B[i] for i in micro], [completions_B[i] for i in micro], self.pad_id)
            batch = batch.to(self.device)
            with self.autocast():
                logits = self.policy_logits(self.model, micro, prompts_B, completions_B, batch)
                out[micro, :batch.completion_len] = losses.token_logprobs(logits, batch.completion_ids).float()
        return out

    # ------------------------------------------------------------------------------------------------ eval
    def evaluate(self, step: int) -> dict:
        """Memory-free held-out accuracy (the headline), plus eval_memory_* with memory in the prompt."""
        cfg = self.cfg
        options = dict(samples=cfg.eval_samples, temperature=cfg.eval_temperature, top_p=cfg.eval_top_p,
                       max_new_tokens=cfg.max_new_tokens, batch_size=cfg.generation_batch_size,
                       seed=cfg.seed + 1)
        out = _eval_fields(evaluate(self.sampler.model, self.tokenizer, self.task, self.eval_problems,
                                    desc=f"eval@{step}", processes=self.processes, **options))
        if cfg.method == "pmd" and (cfg.eval_with_memory or cfg.freeze == "policy"):
            prompts = fraction = None
            if self.memory is not None:  # the main process reads the memory; every process evaluates a share
                contexts = [self.memory.eval_context(p, self.task.messages(p)) for p in self.eval_problems]
                prompts = [self.context_ids(p, c) for p, c in zip(self.eval_problems, contexts)]
                fraction = sum(c is not None for c in contexts) / len(contexts)
            prompts, fraction = self.processes.broadcast((prompts, fraction))
            with_memory = evaluate(self.sampler.model, self.tokenizer, self.task, self.eval_problems,
                                   prompts=prompts, desc=f"eval+memory@{step}", processes=self.processes,
                                   **options)
            out.update({"eval_memory_" + k[len("eval_"):]: v for k, v in _eval_fields(with_memory).items()
                        if k not in ("eval_n", "eval_k")})
            out["eval_memory_context_fraction"] = fraction
        return out

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    def attention_kernel(self) -> str:
        if self.cfg.attn_implementation != "auto":
            return self.cfg.attn_implementation
        return "eager" if torch.device(self.device).type == "cpu" else "sdpa"

    def save_final(self, path: Path) -> None:
        """A plain transformers folder: LoRA merged in float32, so small updates are not rounded away."""
        model = self.model.to(torch.float32)  # before merging: PEFT merges in the base weights' dtype
        if self.cfg.finetune == "lora":
            model = model.merge_and_unload()
        model.config.use_cache = True
        model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)


# ---------------------------------------------------------------------------------------------------- run
def train(cfg: Config, explicit_keys: set[str] | None = None) -> Path:
    """Run (or resume) a full training run; returns the run folder.

    Launched with N processes (accelerate launch / torchrun), every process runs this function; the main one
    alone writes the run folder and prints.
    """
    procs = Processes()
    main = procs.is_main
    say = _say if main else (lambda msg: None)
    # the main process decides the folder, the config and whether to resume; every process follows it
    decision = procs.broadcast(_resolve_run(cfg, explicit_keys or set(), procs.world) if main else None)
    if isinstance(decision, ConfigError):
        raise decision
    cfg, resuming, checkpoint = decision
    run = RunDir(cfg.output_dir)
    if main:
        run.write_config(cfg)

    t0 = time.time()
    if main:
        run.restore_memory(checkpoint)  # the memory of the checkpoint, or none: a kill mid-step loses nothing
    trainer = Trainer(cfg, run.path, procs)
    start = 1
    if checkpoint is not None:
        state = trainer_load(run, trainer, checkpoint)  # every process loads it (its own RNG state)
        start = state["step"] + 1
        if main:
            run.truncate_after(state["step"])
        say(f"resuming {run.path} from step {state['step']}")
    elif resuming and main:
        run.truncate_after(-1)  # nothing was checkpointed: start over cleanly
    procs.barrier()
    say(f"run folder: {run.path}  |  method={cfg.method} model={cfg.model} task={cfg.task}"
        + (f"  |  {procs.world} processes" if procs.world > 1 else ""))

    if start == 1 and cfg.eval_problems:
        before = _evaluate_initial(trainer, procs)
        if main:
            run.append("metrics.jsonl", [{"step": 0, **before}])
        say(f"held-out accuracy before training: {_fmt_eval(before)}"
            + ("  (computed by another run: base_eval_cache)" if before.get("eval_cached") else ""))

    bar = tqdm(range(start, cfg.steps + 1), initial=start - 1, total=cfg.steps, desc="train", unit="step",
               disable=not main)
    for step in bar:
        row, rollouts = trainer.train_step(step)  # gathered to the main process (empty elsewhere)
        if cfg.eval_problems and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            t = time.time()
            row.update(trainer.evaluate(step))
            row["time/eval"] = round(time.time() - t, 3)
        if main:
            run.append("rollouts.jsonl", rollouts)
            if trainer.memory is not None:
                run.append("reflections.jsonl", trainer.memory.take_log())
            run.append("metrics.jsonl", [row])
            bar.write(_step_line(row, cfg))
        if step == cfg.steps or step % cfg.save_every == 0:
            rng_states = procs.gather(rng_state())  # per process: resume restores each one's own stream
            if main:  # weights, teacher and optimizer are the same on every process after a synchronised update
                run.save_checkpoint(step, trainer.model, trainer.teacher.state_dict(), trainer.optimizer,
                                    trainer.scheduler, {"wall_seconds": time.time() - t0}, cfg.keep_checkpoints,
                                    memory=trainer.memory.store if trainer.memory else None, rng_states=rng_states)
            procs.barrier()
    bar.close()

    if main:
        trainer.save_final(run.path / "final")
        summary = _summary(run, cfg, time.time() - t0)
        (run.path / "summary.json").write_text(json.dumps(summary, indent=1))
        say(f"held-out accuracy after training:  {_fmt_eval(summary.get('after', {}))}")
        say(f"final model: {run.path / 'final'}  (load with AutoModelForCausalLM.from_pretrained)")
        try:  # a report that cannot be drawn must not fail a finished run
            from pmd.report import write_report

            say(f"report: {write_report([run.path])}")
        except Exception as e:  # noqa: BLE001
            say(f"report: not written ({type(e).__name__}: {e}); retry with `pmd report {run.path}`")
    procs.barrier()
    return run.path


def _resolve_run(cfg: Config, explicit_keys: set[str], world: int):
    """(config, resuming, latest checkpoint) of the run to start or resume, or the ConfigError that stops it."""
    try:
        if not cfg.output_dir:
            cfg.output_dir = str(Path("runs") / f"{cfg.run_name()}-{datetime.now():%Y%m%d-%H%M%S}")
        run = RunDir(cfg.output_dir)
        resuming = run.exists()
        if resuming:
            cfg = run.resume_config(cfg, explicit_keys)
        check_processes(cfg, world)
    except ConfigError as error:  # raised on every process, not only the main one
        return error
    return cfg, resuming, run.latest_checkpoint() if resuming else None


def trainer_load(run: RunDir, trainer: Trainer, checkpoint: Path) -> dict:
    state = run.load_checkpoint(checkpoint, trainer.model, trainer.teacher, trainer.optimizer, trainer.scheduler,
                                rank=trainer.processes.rank)
    trainer.sampler.sync(trainer.model)
    return state


def prepare_for_training(model, cfg: Config):
    """Wrap the model with LoRA adapters (float32), or make every weight a float32 trainable master copy."""
    if cfg.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora_target_modules
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                          target_modules=targets if targets == "all-linear" else targets.split(","))
        model = get_peft_model(model, lora)  # adapters are float32 (PEFT's autocast_adapter_dtype)
    else:
        model = model.to(torch.float32)
        model.requires_grad_(True)
    model.eval()  # dropout off in every pass; gradients still flow
    return model


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


def teacher_preference(sequence_logps: dict[int, tuple[float, float]], passed_B: list[bool], G: int) -> dict:
    """Does the teacher favour the group's passing rollouts over its failing ones?

    Over every (pass, fail) pair of one group in which both rollouts had a teacher signal:
    `teacher_prefers_pass` is the fraction where the teacher's mean token log-prob of the passing rollout is
    higher; `teacher_lift_prefers_pass` compares the lift (teacher minus student log-prob) instead, i.e.
    whether the context raises passing rollouts more than failing ones, which is what the distillation
    gradient pushes toward. Ties count half. Empty (no such pair) gives no metric.
    """
    raw = lift = pairs = 0.0
    for g in range(0, len(passed_B), G):
        scored = [i for i in range(g, g + G) if i in sequence_logps]
        for i in (i for i in scored if passed_B[i]):
            for j in (j for j in scored if not passed_B[j]):
                (ti, si), (tj, sj) = sequence_logps[i], sequence_logps[j]
                raw += 1.0 if ti > tj else 0.5 if ti == tj else 0.0
                lift += 1.0 if ti - si > tj - sj else 0.5 if ti - si == tj - sj else 0.0
                pairs += 1
    if not pairs:
        return {}
    return {"teacher_prefers_pass": raw / pairs, "teacher_lift_prefers_pass": lift / pairs,
            "teacher_preference_pairs": int(pairs)}


def context_kinds(context, in_prompt: bool = False) -> str:
    """What a memory context holds, e.g. `demonstration+insight+behavior` (`none` without one)."""
    if context is None:
        return "none"
    kinds = {i.kind for i in context.items}
    parts = [k for k in ("demonstration", "feedback") if k in kinds]
    parts += sorted(context.levels - {"experience"})
    return ("in_prompt:" if in_prompt else "") + "+".join(parts)


def _split(items: list, n: int) -> list[list]:
    """n nearly equal consecutive parts."""
    k, r = divmod(len(items), n)
    out, i = [], 0
    for j in range(n):
        size = k + (1 if j < r else 0)
        out.append(items[i:i + size])
        i += size
    return [o for o in out if o]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _evaluate_initial(trainer: Trainer, procs: Processes) -> dict:
    """The step-0 evaluation, read from `base_eval_cache` when a run with the same key stored it."""
    cfg = trainer.cfg
    with_memory = cfg.method == "pmd" and (cfg.eval_with_memory or cfg.freeze == "policy")
    path = None if with_memory else base_eval.cache_path(cfg.to_dict(), procs.world)  # eval_memory_* differ
    cached = procs.broadcast(base_eval.load(path) if procs.is_main else None)
    if cached is not None:
        return {**cached, "eval_cached": True}
    before = trainer.evaluate(0)
    if procs.is_main:
        base_eval.store(path, cfg.to_dict(), before)
    return before


def _eval_fields(result: dict) -> dict:
    out = {"eval_accuracy": result["accuracy"], "eval_accuracy_greedy": result["accuracy_greedy"],
           "eval_n": result["n"], "eval_k": result["k"]}
    if "pass_at_k" in result:
        out["eval_pass_at_k"] = result["pass_at_k"]
    return out


def _fmt_eval(e: dict) -> str:
    """One line from metric-row eval fields (`_eval_fields`)."""
    if not e:
        return "n/a"
    return (f"mean@{e['eval_k']} {e['eval_accuracy']:.3f}, greedy {e['eval_accuracy_greedy']:.3f} "
            f"(n={e['eval_n']})")


def _step_line(row: dict, cfg: Config) -> str:
    parts = [f"step {row['step']}/{cfg.steps}", f"loss {row['loss']:.4f}", f"reward {row['reward_mean']:.3f}"]
    if "teacher_signal_fraction" in row:
        parts.append(f"signal {row['teacher_signal_fraction']:.2f}")
    parts.append(f"gnorm {row['grad_norm']:.3f}")
    if "eval_accuracy" in row:
        parts.append(f"eval {row['eval_accuracy']:.3f} (greedy {row['eval_accuracy_greedy']:.3f})")
    parts.append(f"gen {row.get('time/generate', 0):.1f}s")
    train = sum(row.get(f"time/{k}", 0) for k in ("student_forward", "teacher_forward", "backward", "optimizer"))
    parts.append(f"train {train:.1f}s")
    parts.append(f"{row['time/step']:.1f}s")
    return " | ".join(parts)


def _summary(run: RunDir, cfg: Config, wall: float) -> dict:
    evals = [{k: v for k, v in r.items() if k.startswith("eval_") or k == "step"}
             for r in run.read("metrics.jsonl") if "eval_accuracy" in r]
    out = {"method": cfg.method, "model": cfg.model, "task": cfg.task, "steps": cfg.steps,
           "wall_seconds_this_session": round(wall, 1)}
    if evals:
        out["before"], out["after"] = evals[0], evals[-1]
    return out


def _say(msg: str) -> None:
    tqdm.write(msg)
