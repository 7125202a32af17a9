"""The self-teacher: what it reads (its context) and which weights it runs with. One path for sdpo and pmd.

A teacher context is the student's chat with its last user message rewritten to carry privileged items:

    {problem}

    Behaviors that have helped on similar problems:         <- pmd: behavior memory
    - {name}: {instruction}
    Strategies that worked on this problem:                 <- pmd: insight memory
    - {strategy}
    Mistakes to avoid on this problem:
    - {lesson}
    Correct solution:                                       <- a demonstration (sdpo: a passing sibling;
                                                               pmd: a stored pass, else a sibling)
    {demonstration}
    The following is feedback from your unsuccessful earlier attempt:     <- only without a demonstration
    {feedback}

    Correctly solve the original question.

The strings are SDPO's (lasgroup/SDPO, verl/trainer/config/actor/actor.yaml, the values of the official runs);
empty sections are omitted, so a context of one demonstration or one feedback item is exactly SDPO's reprompt.
SDPO is this module with no memory: `sibling_items` offers each rollout the first *other* passing rollout of its
group, else its own feedback (docs/method.md, "Teacher context").

Budget: the problem and the final instruction are never cut. Items are offered in priority order and each is
admitted only if it fits its level's sub-budget and the total; an item that does not fit is dropped whole, so
a context can end up without its demonstration, never with half of one. If the bare problem and instruction
exceed the total, or nothing was admitted, there is no context (the rollout gets no teacher signal).

Memory text is untrusted: it is joined by concatenation or one `str.format` call on our own template (which
does not re-read substituted values), so a "{problem}" inside an entry stays literal.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

REPROMPT_TEMPLATE = "{prompt}{solution}{feedback}\n\nCorrectly solve the original question."
SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{demonstration}"
FEEDBACK_TEMPLATE = "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}"
BEHAVIORS_HEADER = "Behaviors that have helped on similar problems:"
STRATEGIES_HEADER = "Strategies that worked on this problem:"
LESSONS_HEADER = "Mistakes to avoid on this problem:"

_THINK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)
_LEVEL_OF = {"behavior": "behavior", "strategy": "insight", "lesson": "insight",
             "demonstration": "experience", "feedback": "experience"}


def strip_thinking(text: str) -> str:
    """Remove <think>...</think> spans: demonstrations teach the answer path, not the scratchpad."""
    return _THINK.sub("", text).strip()


@dataclass
class Item:
    """One piece of privileged context. `kind`: behavior | strategy | lesson | demonstration | feedback.
    `entry_id` links it to the memory store (None for items not stored, such as a current sibling)."""

    kind: str
    text: str
    entry_id: int | None = None


@dataclass
class Context:
    """A fitted context: the items shown (in admission order) and the rendered last message."""

    items: list[Item] = field(default_factory=list)
    text: str = ""
    tokens: int = 0

    @property
    def entry_ids(self) -> list[int]:
        return [i.entry_id for i in self.items if i.entry_id is not None]

    @property
    def levels(self) -> set[str]:
        """Which memory levels reached this context."""
        return {_LEVEL_OF[i.kind] for i in self.items}

    @property
    def kinds(self) -> str:
        """What it holds, e.g. `demonstration+insight+behavior`."""
        kinds = {i.kind for i in self.items}
        parts = [k for k in ("demonstration", "feedback") if k in kinds]
        return "+".join(parts + sorted(self.levels - {"experience"}))


def render(problem: str, items: list[Item]) -> str:
    """The teacher's last user message for these items (any order in; rendered in the template's order)."""
    def section(header: str, kind: str) -> str:
        lines = [("- " + i.text) for i in items if i.kind == kind]
        return ("\n\n" + header + "\n" + "\n".join(lines)) if lines else ""

    memory = section(BEHAVIORS_HEADER, "behavior") + section(STRATEGIES_HEADER, "strategy") + \
        section(LESSONS_HEADER, "lesson")
    demo = next((i.text for i in items if i.kind == "demonstration"), None)
    feedback = next((i.text for i in items if i.kind == "feedback"), None)
    solution = SOLUTION_TEMPLATE.replace("{demonstration}", demo) if demo else ""
    feedback_text = FEEDBACK_TEMPLATE.replace("{feedback}", feedback) if feedback and not demo else ""
    # One format call on our own template; the substituted values are never re-read as templates.
    return REPROMPT_TEMPLATE.format(prompt=problem + memory, solution=solution, feedback=feedback_text)


def fit(problem: str, candidates: list[Item], prompt_tokens: Callable[[str], int],
        item_tokens: Callable[[str], int], *, max_tokens: int,
        level_budgets: dict[str, int] | None = None) -> Context | None:
    """Admit `candidates` (already in priority order) while the teacher prompt stays within `max_tokens`.

    `prompt_tokens(last_message)` is the length of the whole teacher prompt (chat template included) with that
    last message; `item_tokens` the cost of one item's text. `level_budgets` caps the summed item tokens per
    level ("behavior", "insight"); other kinds only face the total. At most one experience item (a
    demonstration or a feedback) is admitted.
    """
    level_budgets = level_budgets or {}
    if prompt_tokens(render(problem, [])) > max_tokens:
        return None
    admitted: list[Item] = []
    spent: dict[str, int] = {}
    total = 0
    for item in candidates:
        level = _LEVEL_OF[item.kind]
        if level == "experience" and any(_LEVEL_OF[i.kind] == "experience" for i in admitted):
            continue
        cost = item_tokens(item.text)
        if level in level_budgets and spent.get(level, 0) + cost > level_budgets[level]:
            continue
        trial = prompt_tokens(render(problem, admitted + [item]))
        if trial > max_tokens:
            continue
        admitted.append(item)
        spent[level] = spent.get(level, 0) + cost
        total = trial
    if not admitted:
        return None
    return Context(items=admitted, text=render(problem, admitted), tokens=total)


def sibling_items(texts_G: list[str], passed_G: list[bool], feedback_G: list[str],
                  use_feedback: bool) -> list[list[Item]]:
    """SDPO's offer to each rollout of one group: the first *other* passing rollout in group order as a
    demonstration (the rollout's own success is never its demonstration), else its own verifier feedback
    (only when it failed and has some)."""
    offers = []
    for i in range(len(texts_G)):
        demo = next((strip_thinking(texts_G[j]) for j in range(len(texts_G)) if j != i and passed_G[j]), "")
        if demo:
            offers.append([Item("demonstration", demo)])
        elif use_feedback and not passed_G[i] and feedback_G[i]:
            offers.append([Item("feedback", feedback_G[i])])
        else:
            offers.append([])
    return offers


class TeacherPrompts:
    """Fits contexts into the teacher prompt budget, and turns them into the teacher's prompt token ids.

    `encode(messages)` tokenizes a chat ready for the assistant's reply, `item_tokens(text)` counts an item.
    """

    def __init__(self, encode: Callable[[list[dict]], list[int]], item_tokens: Callable[[str], int], *,
                 max_tokens: int, level_budgets: dict[str, int] | None = None):
        self.encode = encode
        self.item_tokens = item_tokens
        self.max_tokens = max_tokens
        self.level_budgets = level_budgets or {}

    @classmethod
    def for_tokenizer(cls, tokenizer, **budgets) -> TeacherPrompts:
        from pmd.rollout import encode_chat

        return cls(lambda messages: encode_chat(tokenizer, messages),
                   lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]), **budgets)

    def messages(self, messages: list[dict], context: Context) -> list[dict]:
        """The teacher's chat: the student's, with the last message rewritten (earlier ones unchanged)."""
        return [*messages[:-1], {**messages[-1], "content": context.text}]

    def fit(self, messages: list[dict], candidates: list[Item]) -> Context | None:
        def prompt_tokens(last: str) -> int:
            return len(self.encode([*messages[:-1], {**messages[-1], "content": last}]))

        return fit(messages[-1]["content"], candidates, prompt_tokens, self.item_tokens, max_tokens=self.max_tokens,
                   level_budgets=self.level_budgets)

    def group(self, messages: list[dict], offers_G: list[list[Item]]) -> list[Context | None]:
        """One context per rollout of a group; rollouts offered the same items share one Context object."""
        fitted: dict[tuple, Context | None] = {}
        out = []
        for offer in offers_G:
            key = tuple((i.kind, i.text) for i in offer)
            if key not in fitted:
                fitted[key] = self.fit(messages, offer) if offer else None
            out.append(fitted[key])
        return out

    def ids(self, messages: list[dict], context: Context) -> list[int]:
        return self.encode(self.messages(messages, context))


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
