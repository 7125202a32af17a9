"""The policy update of one step: micro-batched forwards of the student and the teacher, the loss, the optimizer.

`Learner.update` takes this process's rollouts (token ids), their group advantages and their teacher prompts
(None: no teacher signal) and runs `optimizer_steps_per_batch` optimizer steps over them:

    for each mini-batch:                       (several: later ones are off-policy, hence the clips)
        for each micro-batch:                  (gradient accumulation; exact, by global denominators)
            student forward (with gradients)   prefix-shared: a problem's prompt is encoded once
            grpo:  clipped policy-gradient loss on the group advantages
            sdpo/pmd:  teacher forward (no grad, EMA weights, prefix-shared), top-k divergence, IS weight
            backward
        clip the gradient norm, optimizer step, scheduler step

The loss pieces are the pure functions of pmd/losses.py; this module only feeds and weighs them. With N
processes every denominator is global, so N processes take the same step as one (the derivation is at the
backward call). Names ending in `_b` hold this process's rows.
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict

import torch

from pmd import losses
from pmd.prefix import grouped_prefix_completion_logits
from pmd.rollout import completion_logits, pack
from pmd.teacher import TeacherWeights


class Learner:
    """The trainable policy and what updates it: optimizer, scheduler, teacher weights, the loss."""

    def __init__(self, cfg, model: torch.nn.Module, processes, pad_id: int, autocast_dtype):
        self.cfg = cfg
        self.model = model
        self.processes = processes
        self.device = processes.device
        self.pad_id = pad_id
        self.autocast_dtype = autocast_dtype
        self.teacher = TeacherWeights(model, cfg.teacher_model_kind, cfg.teacher_update_rate)
        # the student forward of the loss goes through this (DDP with several processes: its backward
        # averages the gradients); everything else uses self.model, the same parameters
        self.student = processes.wrap(model)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                           betas=(cfg.adam_beta1, cfg.adam_beta2))
        warmup = cfg.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
        self.prefix_states: dict = {}  # teacher prompt -> its encoded keys/values, for one teacher weight state
        self.sequence_logps: dict[int, tuple[float, float]] = {}  # row -> (teacher, student) mean token logp

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)

    # ------------------------------------------------------------------------------------------------ update
    def update(self, prompts_b, completions_b, advantages_b, teacher_prompts_b, timer) -> dict:
        """Loss, backward over micro-batches, optimizer step(s). Returns the update's metrics, over all
        processes (`train/loss`, `train/grad_norm`, ...)."""
        cfg, procs = self.cfg, self.processes
        self.sequence_logps = {}
        old_logps = None
        if cfg.optimizer_steps_per_batch > 1:  # later mini-batches are off-policy: keep the sampling policy
            with timer("old_logprobs"):
                old_logps = self.sampling_logprobs(prompts_b, completions_b)
        sums: dict[str, float] = defaultdict(float)
        grad_norms = []
        for mini in _split(list(range(len(prompts_b))), cfg.optimizer_steps_per_batch):
            self.prefix_states = {}  # teacher prompts encoded under the current teacher weights
            # denominators of the whole mini-batch, over all processes (each holds an equal share of it)
            counts = procs.gather((len(mini), sum(max(1, len(completions_b[i])) for i in mini)))
            n_seq, n_tok = sum(c[0] for c in counts), sum(c[1] for c in counts)
            micros = _chunks(self.micro_batch_order(mini, prompts_b, completions_b, teacher_prompts_b),
                             cfg.micro_batch_size)  # as many on every process
            for m_index, micro in enumerate(micros):
                # gradients are all-reduced once per optimizer step, in the backward of its last micro-batch
                with procs.no_sync(self.student, skip=m_index < len(micros) - 1):
                    loss, m = self.micro_batch_loss(micro, prompts_b, completions_b, advantages_b,
                                                    teacher_prompts_b, old_logps, n_seq, n_tok, timer)
                    with timer("backward"):
                        # loss is this process's part of the global mean (global denominators), and the global
                        # loss is the sum of the N parts; DDP averages gradients over N processes, so x N gives
                        # the gradient of the global loss: mean_r grad(N * loss_r) = grad(sum_r loss_r)
                        (loss * procs.world).backward()
                for k, v in m.items():
                    sums[k] += v
            with timer("optimizer"):
                grad_norms.append(self.optimizer_step())
        self.prefix_states = {}
        return _update_metrics(procs.sum_dicts(sums), grad_norms, cfg.optimizer_steps_per_batch)

    def micro_batch_order(self, mini, prompts_b, completions_b, teacher_prompts_b) -> list[int]:
        """Similar lengths share a micro-batch: less padding (the exact denominators keep the gradient). With
        prefix sharing, rows with the same prompt (student) or teacher prompt go together so that it is encoded
        once per micro-batch."""
        cfg = self.cfg
        student_key = (lambda i: tuple(prompts_b[i])) if cfg.student_prefix_sharing else (lambda i: ())
        if cfg.teacher_prefix_sharing and cfg.method != "grpo":
            return sorted(mini, key=lambda i: (student_key(i), tuple(teacher_prompts_b[i] or ()),
                                               len(completions_b[i])))
        return sorted(mini, key=lambda i: (student_key(i), len(prompts_b[i]) + len(completions_b[i])))

    def optimizer_step(self) -> float:
        """Clip the gradient, step (skipped when its norm is not finite), zero it. Returns the norm."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm or float("inf")).item()
        if math.isfinite(norm):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return norm

    # ------------------------------------------------------------------------------------------------ loss
    def micro_batch_loss(self, micro, prompts_b, completions_b, advantages_b, teacher_prompts_b,
                         old_logps, n_seq, n_tok, timer):
        cfg = self.cfg
        batch = pack([prompts_b[i] for i in micro], [completions_b[i] for i in micro], self.pad_id).to(self.device)
        mask = batch.completion_mask.float()
        R = batch.completion_len
        with timer("student_forward"), self.autocast():
            logits = self.policy_logits(self.student, micro, prompts_b, completions_b, batch)  # (b, R, V)
            logp = losses.token_logprobs(logits, batch.completion_ids)  # (b, R)
        old = old_logps[micro, :R] if old_logps is not None else logp.detach()
        metrics: dict[str, float] = {}

        grpo_loss = logits.new_zeros(())
        if cfg.method == "grpo" or cfg.grpo_weight > 0:
            with timer("loss"):
                per_token = losses.grpo_token_loss(logp, old, advantages_b[micro].to(self.device),
                                                   cfg.grpo_clip_low, cfg.grpo_clip_high)
                grpo_loss = losses.token_mean(per_token, mask, num_tokens=n_tok)
            metrics["train/grpo_loss"] = grpo_loss.item()
        if cfg.method == "grpo":
            metrics["train/loss"] = grpo_loss.item()
            return grpo_loss, metrics

        # sdpo/pmd: distill the teacher's next-token distribution on the student's own completion tokens
        rows = [j for j, i in enumerate(micro) if teacher_prompts_b[i] is not None]
        distill_loss = logits.sum() * 0.0  # graph-attached zero when no rollout has a signal
        if rows:
            teacher_ids = [teacher_prompts_b[micro[j]] for j in rows]
            row_completions = [completions_b[micro[j]] for j in rows]
            with timer("teacher_forward"):
                teacher_logits, teacher_batch = self.teacher_logits(teacher_ids, row_completions)
            with timer("loss"):  # top-k support, divergence, weights and the diagnostics' log-probs
                distill_loss, per_token, row_mask = self.distillation_loss(
                    micro, rows, logits, logp, old, teacher_logits, teacher_batch, mask, n_seq)
            metrics["divergence_sum"] = (per_token.detach() * row_mask).sum().item()
            metrics["divergence_tokens"] = row_mask.sum().item()
        metrics["train/distill_loss"] = distill_loss.item()
        loss = (1 - cfg.grpo_weight) * distill_loss + cfg.grpo_weight * grpo_loss
        metrics["train/loss"] = loss.item()
        return loss, metrics

    @torch.no_grad()
    def teacher_logits(self, teacher_ids, completions):
        """The teacher's logits predicting each completion token under its own prompt: (b, R, V), and the
        packed batch (its completion ids and mask)."""
        teacher_batch = pack(teacher_ids, completions, self.pad_id).to(self.device)
        with self.autocast():
            forward = functools.partial(self.teacher.forward, self.model)
            if self.cfg.teacher_prefix_sharing:  # a prompt shared by several rollouts is encoded once
                logits = grouped_prefix_completion_logits(forward, teacher_ids, completions, self.pad_id,
                                                          self.cfg.temperature, states=self.prefix_states,
                                                          device=self.device)
            else:
                logits = completion_logits(forward, teacher_batch, self.cfg.temperature)
        return logits, teacher_batch

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

    def policy_logits(self, forward, micro, prompts_b, completions_b, batch):
        """Policy logits predicting the completion tokens of rows `micro`: (b, R, V). With prefix sharing the rows
        of one problem read its prompt's keys/values, computed once (with gradients when they are enabled)."""
        if self.cfg.student_prefix_sharing:
            return grouped_prefix_completion_logits(
                forward, [prompts_b[i] for i in micro], [completions_b[i] for i in micro], self.pad_id,
                self.cfg.temperature, device=self.device)
        return completion_logits(forward, batch, self.cfg.temperature)

    @torch.no_grad()
    def sampling_logprobs(self, prompts_b, completions_b) -> torch.Tensor:
        """log pi_old(y_t) of every completion token before any update: (b, R_max)."""
        R = max(1, max(len(c) for c in completions_b))
        out = torch.zeros(len(prompts_b), R, device=self.device)
        for micro in _chunks(list(range(len(prompts_b))), self.cfg.micro_batch_size):
            batch = pack([prompts_b[i] for i in micro], [completions_b[i] for i in micro], self.pad_id)
            batch = batch.to(self.device)
            with self.autocast():
                logits = self.policy_logits(self.model, micro, prompts_b, completions_b, batch)
                out[micro, :batch.completion_len] = losses.token_logprobs(logits, batch.completion_ids).float()
        return out


def teacher_preference(sequence_logps: dict[int, tuple[float, float]], passed: list[bool], G: int) -> dict:
    """Does the teacher favour the group's passing rollouts over its failing ones? Counts to sum over processes.

    Over every (pass, fail) pair of one group in which both rollouts had a teacher signal: `prefers` counts the
    pairs where the teacher's mean token log-prob of the passing rollout is higher; `lift_prefers` compares the
    lift (teacher minus student log-prob) instead, i.e. whether the context raises passing rollouts more than
    failing ones, which is what the distillation gradient pushes toward. Ties count half.
    """
    raw = lift = pairs = 0.0
    for g in range(0, len(passed), G):
        scored = [i for i in range(g, g + G) if i in sequence_logps]
        for i in (i for i in scored if passed[i]):
            for j in (j for j in scored if not passed[j]):
                (ti, si), (tj, sj) = sequence_logps[i], sequence_logps[j]
                raw += 1.0 if ti > tj else 0.5 if ti == tj else 0.0
                lift += 1.0 if ti - si > tj - sj else 0.5 if ti - si == tj - sj else 0.0
                pairs += 1
    return {"prefers": raw, "lift_prefers": lift, "pairs": pairs}


def preference_metrics(counts: dict) -> dict:
    """`teacher/prefers_pass` and `teacher/lift_prefers_pass` from summed `teacher_preference` counts (none
    without a pair)."""
    if not counts["pairs"]:
        return {}
    return {"teacher/prefers_pass": counts["prefers"] / counts["pairs"],
            "teacher/lift_prefers_pass": counts["lift_prefers"] / counts["pairs"],
            "teacher/preference_pairs": int(counts["pairs"])}


def _update_metrics(sums: dict, grad_norms: list[float], n_mini: int) -> dict:
    out = {"train/loss": sums.pop("train/loss") / n_mini, "train/grad_norm": sum(grad_norms) / len(grad_norms)}
    if "divergence_tokens" in sums:
        tokens = sums.pop("divergence_tokens")
        out["teacher/divergence"] = sums.pop("divergence_sum") / tokens if tokens else 0.0
    out.update({k: v / n_mini for k, v in sums.items()})
    return out


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
