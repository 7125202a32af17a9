"""The self-teacher: what it reads (its reprompt) and which weights it runs with.

SDPO's teacher is the student model itself, re-reading the problem with privileged context: a successful
sibling rollout as a demonstration, or else the rollout's own verifier feedback. The strings below are
SDPO's (lasgroup/SDPO, verl/trainer/config/actor/actor.yaml, the values used by the official runs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{demonstration}"
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}"

_THINK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)


def strip_thinking(text: str) -> str:
    """Remove <think>...</think> spans: demonstrations teach the answer path, not the scratchpad."""
    return _THINK.sub("", text).strip()


def reprompt(messages: list[dict], demonstration: str | None, feedback: str | None) -> list[dict]:
    """The teacher's chat: the student's messages with the last one rewritten as SDPO's reprompt.

    Earlier messages (a system prompt) are kept unchanged. `feedback` is only shown without a demonstration.
    """
    solution = SOLUTION_TEMPLATE.format(demonstration=demonstration) if demonstration else ""
    feedback_text = FEEDBACK_TEMPLATE.format(feedback=feedback) if feedback and not demonstration else ""
    last = messages[-1]
    content = REPROMPT_TEMPLATE.format(prompt=last["content"], solution=solution, feedback=feedback_text)
    return [*messages[:-1], {**last, "content": content}]


@dataclass
class TeacherChoice:
    """What one rollout's teacher sees. Neither demonstration nor feedback means no signal (mask 0)."""

    demonstration: str | None
    feedback: str | None

    @property
    def has_signal(self) -> bool:
        return bool(self.demonstration or self.feedback)


def sdpo_choices(completions_G: list[str], passed_G: list[bool], feedback_G: list[str],
                 use_feedback: bool) -> list[TeacherChoice]:
    """SDPO's per-rollout teacher context within one group.

    Demonstration: the first *other* passing rollout of the group, in group order (the rollout's own success is
    never its demonstration). Feedback: the rollout's own verifier feedback, only when no demonstration exists;
    passing rollouts carry none.
    """
    choices = []
    for i in range(len(completions_G)):
        demo = next((strip_thinking(completions_G[j]) for j in range(len(completions_G))
                     if j != i and passed_G[j]), None)
        fb = feedback_G[i] if (use_feedback and not passed_G[i] and feedback_G[i]) else None
        choices.append(TeacherChoice(demonstration=demo or None, feedback=None if demo else fb))
    return choices


# ------------------------------------------------------------------------------------------------ weights
class TeacherWeights:
    """Which weights the teacher forward uses.

    `ema`: an exponential moving average of the trainable parameters, starting at the initial weights.
    `base`: the initial weights, never updated. `live`: the current student under no_grad.
    Under LoRA only the adapter parameters are averaged, so the teacher costs almost no memory; the forward
    swaps them in with `torch.func.functional_call`, without copying the model.
    """

    def __init__(self, model: torch.nn.Module, kind: str, update_rate: float):
        self.kind = kind
        self.update_rate = update_rate
        self.params: dict[str, torch.Tensor] = {}
        if kind in ("ema", "base"):
            self.params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """theta_T <- (1 - tau) theta_T + tau theta, once per rollout batch."""
        if self.kind != "ema":
            return
        for n, p in model.named_parameters():
            if n in self.params:
                self.params[n].lerp_(p.detach().to(self.params[n].dtype), self.update_rate)

    def forward(self, model: torch.nn.Module, **inputs):
        if not self.params:
            return model(**inputs)
        return torch.func.functional_call(model, self.params, args=(), kwargs=inputs, strict=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.params

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, t in state.items():
            self.params[n].copy_(t)
