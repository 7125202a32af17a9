# pytest tests/test_objectives.py -q
"""The reward-anchored objectives (signed credit, routing, the RL-only warm-up) and what the teacher may read
(feedback forms, the demonstration as a turn), each against an independent calculation."""

from __future__ import annotations

import math

import pytest
import torch

from pmd import losses
from pmd.teacher import OUTCOME_FEEDBACK, Item, TeacherPrompts, shown_feedback
from pmd.update import diagnostic_metrics, teacher_diagnostics


# ------------------------------------------------------------------------------------------------ signed credit
def test_signed_credit_matches_a_written_out_loop():
    torch.manual_seed(0)
    advantages = torch.tensor([0.75, -0.25, 0.0])
    teacher, student = torch.randn(3, 5) * 2, torch.randn(3, 5) * 2
    got = losses.signed_token_credit(advantages, teacher, student, clip=2.0)
    for i in range(3):
        for t in range(5):
            a = advantages[i].item()
            sign = (a > 0) - (a < 0)
            weight = min(max(math.exp(sign * (teacher[i, t].item() - student[i, t].item())), 0.5), 2.0)
            assert got[i, t].item() == pytest.approx(a * weight, rel=1e-6, abs=1e-7)


def test_signed_credit_keeps_the_rewards_sign_and_bounds_the_size():
    advantages = torch.tensor([0.5, -0.5])
    teacher = torch.tensor([[5.0, -5.0, 0.0], [5.0, -5.0, 0.0]])
    got = losses.signed_token_credit(advantages, teacher, torch.zeros(2, 3), clip=3.0)
    # passing row: the teacher's favourite token gets 3x the credit, its least favourite 1/3
    assert got[0].tolist() == pytest.approx([1.5, 0.5 / 3, 0.5])
    # failing row: the token the teacher dislikes gets 3x the blame; the sign never flips
    assert got[1].tolist() == pytest.approx([-0.5 / 3, -1.5, -0.5])
    assert not got.requires_grad


def test_signed_credit_in_grpo_is_grpo_when_the_teacher_agrees_with_the_student():
    logp = torch.randn(2, 4, requires_grad=True)
    advantages = torch.tensor([1.0, -1.0])
    credit = losses.signed_token_credit(advantages, logp.detach(), logp.detach())
    a = losses.grpo_token_loss(logp, logp.detach(), credit)
    b = losses.grpo_token_loss(logp, logp.detach(), advantages)
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ routing
def test_route_sends_failures_with_a_teacher_to_distillation_and_everything_else_to_grpo():
    passed = torch.tensor([True, False, False, True])
    has_teacher = torch.tensor([True, True, False, False])
    grpo_rows, distill_rows = losses.route_rows(passed, has_teacher)
    assert grpo_rows.tolist() == [1.0, 0.0, 1.0, 1.0] and distill_rows.tolist() == [0.0, 1.0, 0.0, 0.0]


def test_unranked_distillation_keeps_zero_advantage_rows_without_their_stop():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.float32)
    advantages = torch.tensor([0.0, 0.0, 0.0, 0.5, 0.0])
    stopped = torch.tensor([True, False, True, True, True])
    got = losses.unranked_distill_mask(mask, advantages, stopped)
    expected = torch.zeros_like(mask)
    for i in range(mask.shape[0]):
        length = int(mask[i].sum())
        if advantages[i] != 0:
            continue  # the reward ranks this rollout: GRPO's term, not distillation
        keep = length - 1 if stopped[i] and length else length  # its EOS is the last real token
        expected[i, :keep] = 1
    assert torch.equal(got, expected)
    assert got.tolist()[1] == [1, 1, 1, 1]  # cut at the length limit: no stop to leave out
    # distill_unranked_tokens=answer: only the answer's tokens of those rows (an answer never includes the stop)
    answer = torch.tensor([[0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(losses.unranked_distill_mask(mask, advantages, stopped, answer), expected * answer)
    assert losses.unranked_distill_mask(mask, advantages, stopped, answer).tolist()[:2] == \
        [[0, 1, 0, 0], [0, 0, 1, 1]]


# ------------------------------------------------------------------------------------------------ feedback
@pytest.mark.parametrize("form,feedback,answer,shown", [
    ("verbatim", "The answer 72 is incorrect.", "72", "The answer 72 is incorrect."),
    ("auto", "The answer 72 is incorrect.", "72", ""),  # only restates the answer: none
    ("auto", "No final answer found; end with 'Answer: <answer>'.", None, "No final answer found; end with "
                                                                          "'Answer: <answer>'."),
    ("auto", "2 of 4 tests failed: assert f(2) == 5", None, "2 of 4 tests failed: assert f(2) == 5"),
    ("outcome", "2 of 4 tests failed", None, OUTCOME_FEEDBACK),
    ("off", "The answer 72 is incorrect.", "72", ""),
    ("verbatim", "", None, ""),
])
def test_the_teacher_never_reads_a_restated_answer_under_auto(form, feedback, answer, shown):
    assert shown_feedback(feedback, answer, form) == shown


# ------------------------------------------------------------------------------------------------ demonstration
def chat_prompts(form: str) -> TeacherPrompts:
    return TeacherPrompts(lambda m: [w for x in m for w in (x["role"] + " " + x["content"]).split()],
                          lambda t: len(t.split()), max_tokens=1000, demonstration_form=form)


def test_a_demonstration_turn_ends_like_a_completion_and_the_instruction_follows():
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "What is 2+3?"}]
    items = [Item("lesson", "Keep the carry."), Item("demonstration", "2+3=5. Answer: 5")]
    turn = chat_prompts("turn").chat(messages, items)
    assert turn == [{"role": "system", "content": "sys"},
                    {"role": "user", "content": "What is 2+3?\n\nMistakes to avoid on this problem:\n- Keep the carry."},
                    {"role": "assistant", "content": "2+3=5. Answer: 5"},
                    {"role": "user", "content": "Correctly solve the original question."}]
    inline = chat_prompts("inline").chat(messages, items)
    assert len(inline) == 2 and inline[-1]["content"].endswith("Correct solution:\n\n2+3=5. Answer: 5\n\n"
                                                               "Correctly solve the original question.")


def test_a_real_chat_template_closes_the_demonstration_turn_with_its_end_token():
    from pmd.models import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer("tiny-random")
    prompts = TeacherPrompts.for_tokenizer(tokenizer, max_tokens=10_000, demonstration_form="turn")
    messages = [{"role": "user", "content": "Q?"}]
    context = prompts.fit(messages, [Item("demonstration", "A.")])
    text = tokenizer.decode(prompts.ids(messages, context))
    end = tokenizer.eos_token
    assert f"A.{end}" in text.replace("\n", "") and text.index("A.") < text.index("Correctly solve")


def test_the_attempt_to_avoid_is_shown_once_and_labelled():
    items = [Item("failure", "2+3=6"), Item("failure", "2+3=7"), Item("demonstration", "5")]
    context = chat_prompts("inline").fit([{"role": "user", "content": "Q"}], items)
    assert [i.kind for i in context.items] == ["failure", "demonstration"]
    text = chat_prompts("inline").chat([{"role": "user", "content": "Q"}], context.items)[-1]["content"]
    assert "An earlier attempt that was wrong (do not repeat its mistake):\n2+3=6" in text


# ------------------------------------------------------------------------------------------------ diagnostics
def test_diagnostics_average_the_lift_over_answer_tokens_per_row_and_read_eos_where_the_row_stopped():
    teacher = torch.tensor([[0.0, -1.0, -0.5, -0.2], [0.0, -3.0, -1.0, 0.0]])
    student = torch.tensor([[0.0, -2.0, -1.5, -0.1], [0.0, -1.0, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 0.0]])  # row 1 is 3 tokens long
    answer = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    divergence = torch.tensor([[0.1, 0.4, 0.4, 0.1], [0.2, 0.6, 0.2, 9.0]])
    sums = teacher_diagnostics(teacher, student, divergence, mask, answer, passed=[True, False],
                               stopped=[True, True], signal=["demonstration", "demonstration"])
    out = diagnostic_metrics(sums)
    assert out["teacher/answer_lift_pass"] == pytest.approx((1.0 + 1.0) / 2)
    assert out["teacher/answer_lift_fail"] == pytest.approx(-2.0)
    assert out["teacher/answer_lift_gap"] == pytest.approx(3.0)
    assert out["teacher/eos_lift"] == pytest.approx((-0.1 + 0.0) / 2)  # last real token of each row
    assert out["teacher/answer_divergence_share"] == pytest.approx((0.8 + 0.6) / (1.0 + 1.0))
    assert out["teacher/answer_token_share"] == pytest.approx(3 / 7)
    assert out["teacher/demonstration_answer_lift_gap"] == out["teacher/answer_lift_gap"]
    assert not any(k.startswith("teacher/feedback") for k in out)
