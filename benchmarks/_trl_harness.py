"""TRL side of `benchmarks/step_time.py`: build TRL's GRPOTrainer / SDPOTrainer on pmd's settings and time steps.

Everything here is driven by a pmd `Config`, so the TRL run reads the same hyper-parameters pmd uses (learning rate,
clip epsilons, top-k, alpha, EMA rate, ...). Timing works without touching TRL's source: a `TrainerCallback` stamps
the end of every optimizer step, and a few trainer methods are wrapped on the instance to time phases.
"""

from __future__ import annotations

import sys
import tempfile
import time
import types
from collections import defaultdict
from contextlib import contextmanager

import torch


def say(tag: str, msg: str) -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ problems
def problem_order(cfg, n_steps: int):
    """The problems pmd's loop would use at steps 1..n_steps, in order (P per step), and the task.

    Uses pmd's own `problems_for_step` on a stand-in run (no model needed).
    """
    from pmd.loop import problems_for_step
    from pmd.tasks import load_task

    task = load_task(cfg.task, cfg.task_params, seed=cfg.seed)
    stand_in = types.SimpleNamespace(cfg=cfg, train_problems=task.problems("train", cfg.train_problems))
    return task, [p for s in range(1, n_steps + 1) for p in problems_for_step(stand_in, s)]


class VerifierReward:
    """pmd's task verifier as a TRL reward function (one float per completion).

    It also keeps, for the SDPO hook below, each rollout's verifier feedback (None for a passing rollout, as pmd
    never shows feedback to the teacher of a rollout that passed) and a few numbers for the progress line.
    """

    __name__ = "pmd_verifier"

    def __init__(self, task, problems, success_threshold: float):
        self.task = task
        self.problems = problems
        self.threshold = success_threshold
        self.last_feedback: list[str | None] = []
        self.last_reward_mean = float("nan")
        self.last_length_mean = float("nan")

    def __call__(self, prompts, completions, completion_ids, problem_index, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        verdicts = [self.task.verify(self.problems[i], t) for i, t in zip(problem_index, texts)]
        rewards = [v.reward for v in verdicts]
        self.last_feedback = [None if r >= self.threshold else (v.feedback or None)
                              for r, v in zip(rewards, verdicts)]
        self.last_reward_mean = sum(rewards) / len(rewards)
        self.last_length_mean = sum(len(ids) for ids in completion_ids) / len(completion_ids)
        return rewards


# ------------------------------------------------------------------------------------------------ timing
class PhaseClock:
    """Wall seconds per phase for the current optimizer step, filled by wrapped trainer methods.

    Phases named `total_*` enclose others (e.g. total_prepare = generation + rewards + teacher context + the rest
    of TRL's batch preparation); all other phases are disjoint.
    """

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.last_backward_end = None

    @contextmanager
    def phase(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t

    def wrap(self, owner, method: str, phase) -> bool:
        """Replace `owner.method` (on the instance only) by a timed call. `phase` is a name or a function of
        nothing returning one. Returns False when the method does not exist (TRL moved things)."""
        original = getattr(owner, method, None)
        if original is None:
            return False

        def timed(*args, **kwargs):
            with self.phase(phase() if callable(phase) else phase):
                return original(*args, **kwargs)

        setattr(owner, method, timed)
        return True

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


def _make_step_callback(trainer, clock: PhaseClock, reward: VerifierReward, tag: str, total_steps: int,
                        results: list):
    from transformers import TrainerCallback

    def signal_fraction():
        builder = getattr(trainer, "teacher_context_builder", None)
        return getattr(builder, "last_metrics", {}).get("self_distillation/reprompt_sample_fraction")

    class StepTimer(TrainerCallback):
        """Stamps the end of every optimizer step; a step's time is the gap to the previous stamp."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()
            clock.take()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            phases = clock.take()
            if clock.last_backward_end is not None:
                # clip + optimizer.step + scheduler + zero_grad + on_step_end callbacks (TRL's EMA teacher update)
                phases["optimizer"] = now - clock.last_backward_end
            step_seconds = now - self.last
            self.last = now
            results.append({"step": state.global_step, "seconds": step_seconds, "phases": phases,
                            # the quantities pmd logs, under pmd's metric names (step_time.STEP_METRICS)
                            "train/reward_mean": reward.last_reward_mean,
                            "train/completion_length_mean": reward.last_length_mean,
                            "teacher/signal_fraction": signal_fraction(),
                            "threads": torch.get_num_threads()})
            kind = "warm-up" if state.global_step == 1 else "timed"
            say(tag, f"step {state.global_step}/{total_steps} ({kind}) {step_seconds:.1f}s  "
                     f"gen {phases.get('generate', 0):.1f}s  reward {reward.last_reward_mean:.3f}  "
                     f"len {reward.last_length_mean:.1f}")

    return StepTimer()


# ------------------------------------------------------------------------------------------------ the arm
def run(method: str, cfg, timed_steps: int) -> dict:
    """Build TRL's trainer for `method` ("grpo" or "sdpo") from pmd's cfg, train 1 warm-up + `timed_steps`
    optimizer steps, and return per-step wall times and phases."""
    with tempfile.TemporaryDirectory(prefix=f"pmd-bench-trl-{method}-") as scratch:
        return _run(method, cfg, timed_steps, scratch)


def _run(method: str, cfg, timed_steps: int, scratch: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pmd.models import resolve_model

    tag = f"trl-{method}"
    total_steps = 1 + timed_steps
    torch.set_num_threads(cfg.threads)
    assert cfg.finetune == "lora" and cfg.optimizer_steps_per_batch == 1, "harness covers pmd's default mode"

    task, problems = problem_order(cfg, total_steps)
    dataset = Dataset.from_list([{"prompt": task.messages(p), "problem_index": i} for i, p in enumerate(problems)])
    reward = VerifierReward(task, problems, cfg.success_threshold)

    path = resolve_model(cfg.model)
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    targets = cfg.lora_target_modules
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=targets if targets == "all-linear" else targets.split(","))

    G, P = cfg.group_size, cfg.problems_per_step
    rollouts = G * P
    assert rollouts % cfg.micro_batch_size == 0
    common = dict(
        output_dir=scratch,  # nothing is saved there (save_strategy="no"); removed on exit
        use_cpu=True, bf16=cfg.dtype == "bfloat16", seed=cfg.seed,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, max_steps=total_steps,
        # Batch layout: one optimizer step = gradient_accumulation_steps micro-batches of
        # per_device_train_batch_size completions = 4 x 8 = 32 = problems_per_step x group_size (pmd: one step =
        # 32 rollouts in micro-batches of micro_batch_size=8). TRL generates once every
        # steps_per_generation x num_iterations micro-batches, for generation_batch_size =
        # per_device_train_batch_size x steps_per_generation = 32 completions (4 prompts x num_generations=8).
        # With steps_per_generation == gradient_accumulation_steps and num_iterations=1, one generation feeds
        # exactly one optimizer step, and since gradient_accumulation_steps % (steps_per_generation x
        # num_iterations) == 0 TRL knows the rollouts are on-policy and skips the extra "old log-prob" forward pass,
        # as pmd does with optimizer_steps_per_batch=1. Both sides run 4 training forward passes of 8 sequences.
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=rollouts // cfg.micro_batch_size,
        steps_per_generation=rollouts // cfg.micro_batch_size,
        num_iterations=1,
        num_generations=G,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        shuffle_dataset=False,  # the dataset is already in pmd's per-step problem order
        gradient_checkpointing=False,  # TRL defaults to True; pmd does not checkpoint
        disable_dropout=True,  # pmd never runs dropout
        beta=0.0,  # no KL term, no reference model
        # optimizer: pmd's AdamW (torch, not fused), constant LR, same clip
        optim="adamw_torch", learning_rate=cfg.learning_rate, lr_scheduler_type="constant",
        warmup_steps=cfg.warmup_steps, weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2, max_grad_norm=cfg.max_grad_norm or 0.0,
    )

    clock = PhaseClock()
    if method == "grpo":
        from trl import GRPOConfig, GRPOTrainer

        args = GRPOConfig(
            **common,
            loss_type="dapo",  # token-mean over all completion tokens of the step, as pmd's grpo
            scale_rewards="none",  # advantage r - mean(group), no std (pmd: Dr.GRPO-style)
            epsilon=cfg.grpo_clip_low, epsilon_high=cfg.grpo_clip_high,
            mask_truncated_completions=False,
        )
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora)
        clock.wrap(trainer, "_generate_and_score_completions", "total_prepare")
        clock.wrap(trainer, "_generate", "generate")
        clock.wrap(trainer, "_get_per_token_logps_and_entropies", "student_forward")
    elif method == "sdpo":
        from pmd import teacher as pmd_teacher
        from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

        args = SDPOConfig(
            **common,
            distillation_weight=1.0 - cfg.grpo_weight,  # pmd sdpo: (1-l)*distill + l*grpo, l=grpo_weight=0
            distillation_mode="topk_logits",
            distillation_topk=cfg.distillation_topk,
            distillation_alpha=cfg.distillation_alpha,
            distillation_add_tail=cfg.distillation_add_tail,
            distillation_is_clip=cfg.distillation_is_clip,
            teacher_model_kind=cfg.teacher_model_kind,
            teacher_update_rate=cfg.teacher_update_rate,
            teacher_sync_steps=1,
            use_successful_as_teacher=True,
            success_reward_threshold=cfg.success_threshold,
            dont_reprompt_on_self_success=True,
            remove_thinking_from_demonstration=True,
            # pmd's use_feedback: verifier feedback only when no sibling succeeded (fed in by the hook below)
            include_environment_feedback=cfg.use_feedback,
            environment_feedback_only_without_solution=True,
            max_reprompt_len=cfg.max_teacher_prompt_tokens,
            # pmd's reprompt strings (SDPO's), with TRL's placeholder names
            reprompt_template=pmd_teacher.REPROMPT_TEMPLATE,
            solution_template=pmd_teacher.SOLUTION_TEMPLATE.replace("{demonstration}",
                                                                    "{successful_previous_attempt}"),
            feedback_template=pmd_teacher.FEEDBACK_TEMPLATE.replace("{feedback}", "{feedback_raw}"),
            scale_rewards="none", loss_type="dapo",  # only used by the (zero-weight) policy term
            epsilon=cfg.grpo_clip_low, epsilon_high=cfg.grpo_clip_high,
            max_prompt_length=None,
            diagnostics_warning_interval=0,
        )
        trainer = SDPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=lora)

        # TRL reads privileged feedback from a static dataset column, before rewards exist. pmd's feedback is the
        # verifier's verdict on each rollout, so hand the builder the feedback the reward function just produced.
        builder = trainer.teacher_context_builder
        build = builder.build

        def build_with_verifier_feedback(output, prompts, rewards, feedbacks=None):
            fed = reward.last_feedback if len(reward.last_feedback) == len(prompts) else feedbacks
            return build(output, prompts, rewards, feedbacks=fed)

        builder.build = build_with_verifier_feedback
        clock.wrap(builder, "build", "teacher_context")
        clock.wrap(trainer, "_prepare_training_batch", "total_prepare")
        clock.wrap(trainer, "_generate", "generate")
        clock.wrap(trainer, "_forward_logits",
                   lambda: "student_forward" if torch.is_grad_enabled() else "teacher_forward")
    else:
        raise ValueError(f"unknown method {method!r}")

    assert args.generation_batch_size == rollouts and args.steps_per_generation == args.gradient_accumulation_steps
    clock.wrap(trainer, "_calculate_rewards", "verify")
    clock.wrap(trainer, "compute_loss", "total_compute_loss")
    accelerator = trainer.accelerator
    backward = accelerator.backward

    def timed_backward(loss, **kwargs):
        with clock.phase("backward"):
            out = backward(loss, **kwargs)
        clock.last_backward_end = time.perf_counter()
        return out

    accelerator.backward = timed_backward

    results: list[dict] = []
    trainer.add_callback(_make_step_callback(trainer, clock, reward, tag, total_steps, results))
    say(tag, f"training {total_steps} steps (1 warm-up); threads={torch.get_num_threads()} "
             f"mixed_precision={accelerator.mixed_precision}")
    t0 = time.perf_counter()
    trainer.train()
    return {"steps": results, "train_call_seconds": time.perf_counter() - t0,
            "mixed_precision": str(accelerator.mixed_precision),
            "generation_batch_size": args.generation_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "steps_per_generation": args.steps_per_generation}
