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
from dataclasses import dataclass, field

import torch

from pmd import losses
from pmd.prefix import grouped_prefix_completion_logits
from pmd.rollout import completion_logits, pack
from pmd.teacher import TeacherWeights


@dataclass
class Rows:
    """This process's rollouts as the update sees them: aligned `_b` lists (docs: CONTRIBUTING.md, Names)."""

    prompts: list[list[int]]  # the sampling prompt's token ids
    completions: list[list[int]]  # the completion's token ids (with its EOS when it stopped)
    advantages: torch.Tensor  # (b,) group-relative advantages
    teacher_prompts: list[list[int] | None]  # the teacher's prompt ids; None: no teacher signal
    passed: list[bool]
    signal: list[str | None]  # the context's main item: demonstration | example | feedback | memory (None: none)
    answer_masks: list[list[bool]]  # per completion token: part of the final answer the verifier read
    stopped: list[bool]  # ended with EOS (not cut at max_new_tokens)


@dataclass
class MicroBatch:
    """One micro-batch in flight: the student's pass, and the teacher's on `teacher_rows` (indices into it)."""

    micro: list[int]  # row indices into Rows
    mask: torch.Tensor  # (b, R) completion tokens
    logits: torch.Tensor  # (b, R, V) student
    logp: torch.Tensor  # (b, R) student log-probs of the sampled tokens
    old: torch.Tensor  # (b, R) log-probs at sampling time (detached)
    advantages: torch.Tensor  # (b,)
    n_seq: int  # denominators of the whole mini-batch, over all processes
    n_tok: int
    teacher_rows: list[int] = field(default_factory=list)
    teacher_logits: torch.Tensor | None = None  # (t, r, V)
    teacher_batch: object = None  # the teacher rows packed (completion ids, mask)
    teacher_logp: torch.Tensor | None = None  # (t, r) teacher log-probs of the sampled tokens
    divergence: torch.Tensor | None = None  # (t, r) per-token top-k divergence (with gradient unless signed)


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
    def objective_at(self, step: int) -> str:
        """grpo for method=grpo and during the RL-only warm-up; else the configured objective."""
        if self.cfg.method == "grpo" or step <= self.cfg.distill_warmup_steps:
            return "grpo"
        return self.cfg.resolved_objective()

    def update(self, rows: Rows, step: int, timer) -> dict:
        """Loss, backward over micro-batches, optimizer step(s). Returns the update's metrics, over all
        processes (`train/loss`, `train/grad_norm`, `teacher/...` diagnostics)."""
        cfg, procs = self.cfg, self.processes
        objective = self.objective_at(step)
        self.sequence_logps = {}
        old_logps = None
        if cfg.optimizer_steps_per_batch > 1:  # later mini-batches are off-policy: keep the sampling policy
            with timer("old_logprobs"):
                old_logps = self.sampling_logprobs(rows)
        sums: dict[str, float] = defaultdict(float)
        grad_norms = []
        for mini in _split(list(range(len(rows.prompts))), cfg.optimizer_steps_per_batch):
            self.prefix_states = {}  # teacher prompts encoded under the current teacher weights
            # denominators of the whole mini-batch, over all processes (each holds an equal share of it)
            counts = procs.gather((len(mini), sum(max(1, len(rows.completions[i])) for i in mini)))
            n_seq, n_tok = sum(c[0] for c in counts), sum(c[1] for c in counts)
            micros = _chunks(self.micro_batch_order(mini, rows), cfg.micro_batch_size)  # as many on every process
            for m_index, micro in enumerate(micros):
                # gradients are all-reduced once per optimizer step, in the backward of its last micro-batch
                with procs.no_sync(self.student, skip=m_index < len(micros) - 1):
                    loss, m = self.micro_batch_loss(micro, rows, objective, old_logps, n_seq, n_tok, timer)
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

    def micro_batch_order(self, mini, rows: Rows) -> list[int]:
        """Similar lengths share a micro-batch: less padding (the exact denominators keep the gradient). With
        prefix sharing, rows with the same prompt (student) or teacher prompt go together so that it is encoded
        once per micro-batch."""
        cfg = self.cfg
        student_key = (lambda i: tuple(rows.prompts[i])) if cfg.student_prefix_sharing else (lambda i: ())
        if cfg.teacher_prefix_sharing and cfg.method != "grpo":
            return sorted(mini, key=lambda i: (student_key(i), tuple(rows.teacher_prompts[i] or ()),
                                               len(rows.completions[i])))
        return sorted(mini, key=lambda i: (student_key(i), len(rows.prompts[i]) + len(rows.completions[i])))

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
    def micro_batch_loss(self, micro, rows: Rows, objective: str, old_logps, n_seq, n_tok, timer):
        """This micro-batch's part of the mini-batch loss under `objective` (docs/method.md §5), and metrics."""
        batch = pack([rows.prompts[i] for i in micro], [rows.completions[i] for i in micro],
                     self.pad_id).to(self.device)
        with timer("student_forward"), self.autocast():
            logits = self.policy_logits(self.student, micro, rows, batch)  # (b, R, V)
            logp = losses.token_logprobs(logits, batch.completion_ids)  # (b, R)
        old = old_logps[micro, :batch.completion_len] if old_logps is not None else logp.detach()
        step = MicroBatch(micro, batch.completion_mask.float(), logits, logp, old,
                          rows.advantages[micro].to(self.device), n_seq, n_tok)
        if objective != "grpo":  # every row whose teacher has a context
            step.teacher_rows = [j for j, i in enumerate(micro) if rows.teacher_prompts[i] is not None]
        if step.teacher_rows:
            with timer("teacher_forward"):
                step.teacher_logits, step.teacher_batch = self.teacher_logits(
                    [rows.teacher_prompts[micro[j]] for j in step.teacher_rows],
                    [rows.completions[micro[j]] for j in step.teacher_rows])
        with timer("loss"):
            if step.teacher_rows:
                self.teacher_scores(step, with_grad=objective != "signed" or self.cfg.distill_unranked > 0)
            loss, metrics = self.objective_loss(objective, step, rows)
            if step.teacher_rows:
                self.record_teacher(step, rows, metrics)
        metrics["train/loss"] = loss.item()
        return loss, metrics

    def objective_loss(self, objective: str, step: MicroBatch, rows: Rows) -> tuple[torch.Tensor, dict]:
        cfg = self.cfg
        metrics: dict[str, float] = {}

        def grpo(advantages, row_mask=None) -> torch.Tensor:
            per_token = losses.grpo_token_loss(step.logp, step.old, advantages, cfg.grpo_clip_low, cfg.grpo_clip_high)
            mask = step.mask if row_mask is None else step.mask * row_mask[:, None]
            value = losses.token_mean(per_token, mask, num_tokens=step.n_tok)
            metrics["train/grpo_loss"] = value.item()
            return value

        if objective == "grpo":
            return grpo(step.advantages), metrics
        if objective == "signed":  # the reward sets the sign, the teacher the per-token size
            credit = step.advantages[:, None].expand_as(step.logp).clone()
            if step.teacher_rows:
                r = step.teacher_batch.completion_len
                credit[step.teacher_rows, :r] = losses.signed_token_credit(
                    step.advantages[step.teacher_rows], step.teacher_logp, step.logp[step.teacher_rows, :r],
                    cfg.credit_clip)
            if not cfg.distill_unranked:
                return grpo(credit), metrics
            # where the reward ranks no rollout, memory is the only signal (docs/method.md §5)
            keep = self.teacher_mask(step)
            if keep is not None:
                stopped = torch.tensor([rows.stopped[step.micro[j]] for j in step.teacher_rows], device=self.device)
                answer = self.answer_mask(step, rows) if cfg.distill_unranked_tokens == "answer" else None
                keep = losses.unranked_distill_mask(keep, step.advantages[step.teacher_rows], stopped, answer)
            metrics["train/unranked_rows"] = float(keep.any(dim=-1).sum()) if keep is not None else 0.0
            return grpo(credit) + cfg.distill_unranked * self.distillation_loss(step, metrics, keep), metrics
        token_mask = self.teacher_mask(step)
        if objective == "route":  # GRPO where the reward is the best signal, distillation on failures
            passed = torch.tensor([rows.passed[i] for i in step.micro], device=self.device)
            has_teacher = torch.zeros(len(step.micro), dtype=torch.bool, device=self.device)
            has_teacher[step.teacher_rows] = True
            grpo_rows, distill_rows = losses.route_rows(passed, has_teacher)
            if token_mask is not None:
                token_mask = token_mask * distill_rows[step.teacher_rows, None]
            return grpo(step.advantages, grpo_rows) + self.distillation_loss(step, metrics, token_mask), metrics
        distill = self.distillation_loss(step, metrics, token_mask)
        grpo_loss = grpo(step.advantages) if cfg.grpo_weight > 0 else step.logits.new_zeros(())
        return (1 - cfg.grpo_weight) * distill + cfg.grpo_weight * grpo_loss, metrics

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

    @staticmethod
    def teacher_mask(step: MicroBatch) -> torch.Tensor | None:
        """(t, r) completion tokens of the teacher rows; None without any."""
        if not step.teacher_rows:
            return None
        return step.mask[step.teacher_rows, :step.teacher_batch.completion_len]

    @staticmethod
    def answer_mask(step: MicroBatch, rows: Rows) -> torch.Tensor:
        """(t, r) the teacher rows' tokens that spell the final answer the verifier read."""
        r = step.teacher_batch.completion_len
        answer = torch.zeros_like(step.mask[step.teacher_rows, :r])
        for k, j in enumerate(step.teacher_rows):
            flags = rows.answer_masks[step.micro[j]][:r]
            answer[k, :len(flags)] = torch.tensor(flags, dtype=answer.dtype)
        return answer

    def distillation_loss(self, step: MicroBatch, metrics: dict, token_mask: torch.Tensor | None) -> torch.Tensor:
        """SDPO's per-token top-k divergence, IS-weighted, sequence-mean token-mean over the teacher rows' tokens
        in `token_mask` ((t, r), from `teacher_mask`); a graph-attached zero when there are none."""
        cfg = self.cfg
        if not step.teacher_rows:
            metrics["train/distill_loss"] = 0.0
            return step.logits.sum() * 0.0
        rows, r = step.teacher_rows, step.teacher_batch.completion_len
        weight = losses.importance_weight(step.logp[rows, :r], step.old[rows, :r], cfg.distillation_is_clip)
        loss = losses.seq_mean_token_mean(step.divergence * weight, token_mask, num_sequences=step.n_seq)
        metrics["train/distill_loss"] = loss.item()
        return loss

    def teacher_scores(self, step: MicroBatch, with_grad: bool) -> None:
        """The per-token divergence on the student's top-k (differentiable when it is the loss) and the
        teacher's log-probs of the sampled tokens."""
        cfg, r = self.cfg, step.teacher_batch.completion_len
        student_logits = step.logits[step.teacher_rows, :r]
        with torch.set_grad_enabled(with_grad and torch.is_grad_enabled()):
            step.divergence = losses.topk_divergence(student_logits, step.teacher_logits,
                                                     topk=cfg.distillation_topk or None,
                                                     alpha=cfg.distillation_alpha, add_tail=cfg.distillation_add_tail)
        step.teacher_logp = losses.token_logprobs(step.teacher_logits, step.teacher_batch.completion_ids)

    def record_teacher(self, step: MicroBatch, rows: Rows, metrics: dict) -> None:
        """The teacher's view of this micro-batch: mean token log-probs for `teacher_preference`, the
        divergence and the answer/EOS diagnostics (`teacher_diagnostics`)."""
        r = step.teacher_batch.completion_len
        row_mask = step.mask[step.teacher_rows, :r]
        divergence = step.divergence.detach()
        metrics["divergence_sum"] = (divergence * row_mask).sum().item()
        metrics["divergence_tokens"] = row_mask.sum().item()
        student_logp = step.logp[step.teacher_rows, :r].detach()
        lengths = row_mask.sum(-1).clamp(min=1)
        teacher_seq = ((step.teacher_logp * row_mask).sum(-1) / lengths).tolist()
        student_seq = ((student_logp * row_mask).sum(-1) / lengths).tolist()
        for j, t, s in zip(step.teacher_rows, teacher_seq, student_seq):
            self.sequence_logps[step.micro[j]] = (t, s)
        local = [step.micro[j] for j in step.teacher_rows]
        metrics.update(teacher_diagnostics(step.teacher_logp, student_logp, divergence, row_mask,
                                           self.answer_mask(step, rows),
                                           [rows.passed[i] for i in local], [rows.stopped[i] for i in local],
                                           [rows.signal[i] for i in local]))

    def policy_logits(self, forward, micro, rows: Rows, batch):
        """Policy logits predicting the completion tokens of rows `micro`: (b, R, V). With prefix sharing the rows
        of one problem read its prompt's keys/values, computed once (with gradients when they are enabled)."""
        if self.cfg.student_prefix_sharing:
            return grouped_prefix_completion_logits(
                forward, [rows.prompts[i] for i in micro], [rows.completions[i] for i in micro], self.pad_id,
                self.cfg.temperature, device=self.device)
        return completion_logits(forward, batch, self.cfg.temperature)

    @torch.no_grad()
    def sampling_logprobs(self, rows: Rows) -> torch.Tensor:
        """log pi_old(y_t) of every completion token before any update: (b, R_max)."""
        R = max(1, max(len(c) for c in rows.completions))
        out = torch.zeros(len(rows.prompts), R, device=self.device)
        for micro in _chunks(list(range(len(rows.prompts))), self.cfg.micro_batch_size):
            batch = pack([rows.prompts[i] for i in micro], [rows.completions[i] for i in micro], self.pad_id)
            batch = batch.to(self.device)
            with self.autocast():
                logits = self.policy_logits(self.model, micro, rows, batch)
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


DIAGNOSED_SIGNALS = ("demonstration", "example", "feedback", "memory")


def teacher_diagnostics(teacher_logp, student_logp, divergence, mask, answer, passed, stopped, signal) -> dict:
    """Sums (to add over micro-batches and processes; `diagnostic_metrics` divides) that show whether the
    teacher's context points the update the right way, per kind of context (docs/method.md §16):

    - lift on answer tokens, log p_T - log p_S averaged over the tokens of the final answer, for passing and
      failing rows: a useful teacher raises passing answers more than failing ones;
    - lift at the EOS where the student stopped: negative means the context teaches the student to go on;
    - the divergence's mass on answer tokens against the answer tokens' share of all tokens.
    All tensors are (t, r) for the t rows with a teacher (mask: completion tokens; answer: answer tokens).
    """
    lift = (teacher_logp - student_logp).detach() * mask
    answer = answer * mask
    out: dict[str, float] = defaultdict(float)
    for j, kind in enumerate(signal):
        for key in (f"diag/{kind}/", "diag/all/"):
            n_answer = answer[j].sum().item()
            if n_answer:
                outcome = "pass" if passed[j] else "fail"
                out[key + f"lift_{outcome}_sum"] += (lift[j] * answer[j]).sum().item() / n_answer
                out[key + f"lift_{outcome}_n"] += 1
            length = int(mask[j].sum().item())
            if stopped[j] and length:
                out[key + "eos_sum"] += lift[j, length - 1].item()
                out[key + "eos_n"] += 1
            out[key + "div_answer"] += (divergence[j] * answer[j]).sum().item()
            out[key + "div_total"] += (divergence[j] * mask[j]).sum().item()
            out[key + "answer_tokens"] += n_answer
            out[key + "tokens"] += mask[j].sum().item()
    return dict(out)


def diagnostic_metrics(sums: dict) -> dict:
    """`teacher/[<kind>_]answer_lift_{pass,fail,gap}`, `..._eos_lift`, `..._answer_divergence_share` and
    `..._answer_token_share` from summed `teacher_diagnostics` (kind: demonstration | example | feedback |
    memory; none for all rows together)."""
    out = {}
    for kind in ("all", *DIAGNOSED_SIGNALS):
        key, name = f"diag/{kind}/", "teacher/" + ("" if kind == "all" else kind + "_")
        get = lambda k: sums.get(key + k, 0.0)  # noqa: E731
        for outcome in ("pass", "fail"):
            if get(f"lift_{outcome}_n"):
                out[f"{name}answer_lift_{outcome}"] = get(f"lift_{outcome}_sum") / get(f"lift_{outcome}_n")
        if f"{name}answer_lift_pass" in out and f"{name}answer_lift_fail" in out:
            out[f"{name}answer_lift_gap"] = out[f"{name}answer_lift_pass"] - out[f"{name}answer_lift_fail"]
        if get("eos_n"):
            out[f"{name}eos_lift"] = get("eos_sum") / get("eos_n")
        if get("div_total") > 0 and get("tokens"):
            out[f"{name}answer_divergence_share"] = get("div_answer") / get("div_total")
            out[f"{name}answer_token_share"] = get("answer_tokens") / get("tokens")
    return out


def _update_metrics(sums: dict, grad_norms: list[float], n_mini: int) -> dict:
    out = {"train/loss": sums.pop("train/loss") / n_mini, "train/grad_norm": sum(grad_norms) / len(grad_norms)}
    if "divergence_tokens" in sums:
        tokens = sums.pop("divergence_tokens")
        out["teacher/divergence"] = sums.pop("divergence_sum") / tokens if tokens else 0.0
    diagnostics = {k: sums.pop(k) for k in [k for k in sums if k.startswith("diag/")]}
    out.update({k: v / n_mini for k, v in sums.items()})
    out.update(diagnostic_metrics(diagnostics))
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
