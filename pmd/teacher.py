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
INSTRUCTION = "Correctly solve the original question."
FAILURE_HEADER = "An earlier attempt that was wrong (do not repeat its mistake):"
OUTCOME_FEEDBACK = "Your earlier attempt was incorrect."
REFERENCE_FEEDBACK = "The correct answer is {answer}."  # teacher_reference only (an upper bound, not PMD)
BEHAVIORS_HEADER = "Behaviors that have helped on similar problems:"
STRATEGIES_HEADER = "Strategies that worked on this problem:"
LESSONS_HEADER = "Mistakes to avoid on this problem:"

_THINK = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)
_LEVEL_OF = {"behavior": "behavior", "strategy": "insight", "lesson": "insight",
             "demonstration": "experience", "feedback": "experience", "failure": "experience",
             "example": "experience"}


def strip_thinking(text: str) -> str:
    """Remove <think>...</think> spans: demonstrations teach the answer path, not the scratchpad."""
    return _THINK.sub("", text).strip()


def shown_feedback(feedback: str, answer: str | None, form: str) -> str:
    """The feedback a teacher may read (`teacher_feedback`; "" for none). A small teacher copies what its
    context shows: "The answer 72 is incorrect." raises its probability of writing 72, and any feedback on a
    failure lowers its probability of stopping where the student stopped. So `auto` shows feedback only when it
    says more than the outcome, i.e. when it does not merely restate the rollout's own answer (code tests do;
    "The answer 72 is incorrect." does not), as SDPO runs its science tasks without feedback (docs/method.md §4).
    """
    if not feedback or form == "off":
        return ""
    if form == "outcome":
        return OUTCOME_FEEDBACK
    if form == "auto" and answer and answer in feedback:
        return ""
    return feedback


@dataclass
class Item:
    """One piece of privileged context. `kind`: behavior | strategy | lesson | demonstration | feedback |
    failure (an attempt to avoid) | example (a solved related problem: `question` is that problem's prompt,
    `text` its solution). `entry_id` links it to the memory store (None for items not stored, such as a
    current sibling)."""

    kind: str
    text: str
    entry_id: int | None = None
    question: str = ""


@dataclass
class Context:
    """A fitted context: the items shown (in admission order) and the length of the teacher prompt."""

    items: list[Item] = field(default_factory=list)
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
        parts = [k for k in ("example", "demonstration", "feedback", "failure") if k in kinds]
        return "+".join(parts + sorted(self.levels - {"experience"}))

    @property
    def signal(self) -> str:
        """The main privileged item, for diagnostics: demonstration, else example, else feedback, else memory."""
        kinds = {i.kind for i in self.items}
        return next((k for k in ("demonstration", "example", "feedback") if k in kinds), "memory")


def memory_sections(items: list[Item]) -> str:
    """The behaviors, strategies, lessons and attempt to avoid among `items`, as text after the problem."""
    def section(header: str, kind: str) -> str:
        lines = [("- " + i.text) for i in items if i.kind == kind]
        return ("\n\n" + header + "\n" + "\n".join(lines)) if lines else ""

    failure = next((i.text for i in items if i.kind == "failure"), None)
    return section(BEHAVIORS_HEADER, "behavior") + section(STRATEGIES_HEADER, "strategy") + \
        section(LESSONS_HEADER, "lesson") + ("\n\n" + FAILURE_HEADER + "\n" + failure if failure else "")


def render(problem: str, items: list[Item]) -> str:
    """The teacher's last user message for these items (any order in; rendered in the template's order)."""
    demo = next((i.text for i in items if i.kind == "demonstration"), None)
    feedback = next((i.text for i in items if i.kind == "feedback"), None)
    solution = SOLUTION_TEMPLATE.replace("{demonstration}", demo) if demo else ""
    feedback_text = FEEDBACK_TEMPLATE.replace("{feedback}", feedback) if feedback and not demo else ""
    # One format call on our own template; the substituted values are never re-read as templates.
    return REPROMPT_TEMPLATE.format(prompt=problem + memory_sections(items), solution=solution,
                                    feedback=feedback_text)


def fit(candidates: list[Item], prompt_tokens: Callable[[list[Item]], int], item_tokens: Callable[[str], int],
        *, max_tokens: int, level_budgets: dict[str, int] | None = None) -> Context | None:
    """Admit `candidates` (already in priority order) while the teacher prompt stays within `max_tokens`.

    `prompt_tokens(items)` is the length of the whole teacher prompt (chat template included) showing `items`;
    `item_tokens` the cost of one item's text. `level_budgets` caps the summed item tokens per level
    ("behavior", "insight"); other kinds only face the total. At most one demonstration or feedback is
    admitted (and one attempt to avoid).
    """
    level_budgets = level_budgets or {}
    if prompt_tokens([]) > max_tokens:
        return None
    admitted: list[Item] = []
    spent: dict[str, int] = {}
    total = 0
    for item in candidates:
        level = _LEVEL_OF[item.kind]
        slot = _exclusive(item)
        if slot and slot in {_exclusive(i) for i in admitted}:
            continue
        cost = item_tokens(item.question + item.text)
        if level in level_budgets and spent.get(level, 0) + cost > level_budgets[level]:
            continue
        trial = prompt_tokens(admitted + [item])
        if trial > max_tokens:
            continue
        admitted.append(item)
        spent[level] = spent.get(level, 0) + cost
        total = trial
    if not admitted:
        return None
    return Context(items=admitted, tokens=total)


def _exclusive(item: Item) -> str:
    """Items of the same non-empty slot exclude each other: one solution-or-feedback, one failure."""
    return {"demonstration": "solution", "feedback": "solution", "failure": "failure"}.get(item.kind, "")


def sibling_items(texts_G: list[str], passed_G: list[bool], feedback_G: list[str]) -> list[list[Item]]:
    """SDPO's offer to each rollout of one group: the first *other* passing rollout in group order as a
    demonstration (the rollout's own success is never its demonstration), else its own verifier feedback
    (when it failed and has some to show, see `shown_feedback`)."""
    offers = []
    for i in range(len(texts_G)):
        demo = next((strip_thinking(texts_G[j]) for j in range(len(texts_G)) if j != i and passed_G[j]), "")
        if demo:
            offers.append([Item("demonstration", demo)])
        elif not passed_G[i] and feedback_G[i]:
            offers.append([Item("feedback", feedback_G[i])])
        else:
            offers.append([])
    return offers


class TeacherPrompts:
    """Fits contexts into the teacher prompt budget, and turns them into the teacher's chat and token ids.

    `encode(messages)` tokenizes a chat ready for the assistant's reply, `item_tokens(text)` counts an item.
    `demonstration_form`: inline (SDPO: under "Correct solution:" in the user message) or turn (an earlier
    assistant turn, which the chat template ends with its end-of-turn token, as a completion ends).
    """

    def __init__(self, encode: Callable[[list[dict]], list[int]], item_tokens: Callable[[str], int], *,
                 max_tokens: int, level_budgets: dict[str, int] | None = None, demonstration_form: str = "inline"):
        self.encode = encode
        self.item_tokens = item_tokens
        self.max_tokens = max_tokens
        self.level_budgets = level_budgets or {}
        self.demonstration_form = demonstration_form

    @classmethod
    def for_tokenizer(cls, tokenizer, **options) -> TeacherPrompts:
        from pmd.rollout import encode_chat

        return cls(lambda messages: encode_chat(tokenizer, messages),
                   lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"]), **options)

    def chat(self, messages: list[dict], items: list[Item]) -> list[dict]:
        """The teacher's chat: the student's, with the last message rewritten (earlier ones unchanged), after
        one earlier user/assistant exchange per example (a solved related problem), most similar last."""
        head, problem = messages[:-1], messages[-1]["content"]
        for example in reversed([i for i in items if i.kind == "example"]):
            head = [*head, {"role": "user", "content": example.question},
                    {"role": "assistant", "content": example.text}]
        demo = next((i for i in items if i.kind == "demonstration"), None)
        if self.demonstration_form == "turn" and demo is not None:
            return [*head, {**messages[-1], "content": problem + memory_sections(items)},
                    {"role": "assistant", "content": demo.text}, {"role": "user", "content": INSTRUCTION}]
        return [*head, {**messages[-1], "content": render(problem, items)}]

    def fit(self, messages: list[dict], candidates: list[Item]) -> Context | None:
        return fit(candidates, lambda items: len(self.encode(self.chat(messages, items))), self.item_tokens,
                   max_tokens=self.max_tokens, level_budgets=self.level_budgets)

    def group(self, messages: list[dict], offers_G: list[list[Item]]) -> list[Context | None]:
        """One context per rollout of a group; rollouts offered the same items share one Context object."""
        fitted: dict[tuple, Context | None] = {}
        out = []
        for offer in offers_G:
            key = tuple((i.kind, i.text, i.question) for i in offer)
            if key not in fitted:
                fitted[key] = self.fit(messages, offer) if offer else None
            out.append(fitted[key])
        return out

    def ids(self, messages: list[dict], context: Context) -> list[int]:
        return self.encode(self.chat(messages, context.items))


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
