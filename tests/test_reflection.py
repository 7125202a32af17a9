# Run: python -m pytest tests/test_reflection.py -q
"""Tests for pmd.reflection: parsers never raise on hostile output, count correctly, and keep only clean entries."""

from __future__ import annotations

import re
import time

import pytest

from pmd.memory.reflection import (ParseReport, behavior_prompt, copied_from, cut_attempt, insight_prompt, parse_behaviors,
                            parse_insights, sanitize_entry)

# Anything that could break the teacher-context template or the chat template if it reached memory.
FORBIDDEN = re.compile(r"<\|[^|]*\|>|</?think>|[\x00-\x1f\x7f\u200b\u202e\u2028]"
                       r"|correct solution:|correctly solve the original question|the following is feedback",
                       flags=re.IGNORECASE)


def assert_clean(entries):
    for text in entries:
        assert text == text.strip() and "\n" not in text and "  " not in text
        assert not FORBIDDEN.search(text), text


# ---------------------------------------------------------------------------------------------- insights
@pytest.mark.parametrize("output", ["", "   \n\t\n  ", None, "I think the answer is 42. Good luck!",
                                    "Strategies:\n- add carefully\n- check the result", b"STRATEGY"])
def test_outputs_without_entries_give_nothing_and_count_a_failed_output(output):
    report = ParseReport()
    assert parse_insights(output, report=report) == ([], [], 0)
    assert (report.outputs, report.failed_outputs, report.kept, report.rejected) == (1, 1, 0, 0)


def test_markers_in_any_case_with_bullets_numbering_and_bold():
    output = "\n".join([
        "Here is what I learned:",
        "1. STRATEGY: Add the tens column before the ones column.",
        "2) strategy: Write each partial sum on its own line.",
        "- **LESSON:** Carry the one whenever a column passes nine.",
        "* **Lesson**: Check the sign of every term before adding.",
        "•   StRaTeGy   :   Line the digits up by place value first.",
        "### Lesson 2: Re-read the question before giving the answer.",
        "   -   LESSON:Estimate the result first to catch big mistakes.",
    ])
    report = ParseReport()
    strategies, lessons, rejected = parse_insights(output, report=report)
    assert strategies == ["Add the tens column before the ones column.", "Write each partial sum on its own line.",
                          "Line the digits up by place value first."]
    assert lessons == ["Carry the one whenever a column passes nine.", "Check the sign of every term before adding.",
                       "Re-read the question before giving the answer."]
    assert rejected == 1  # the fourth lesson is over max_items=3
    assert (report.kept, report.rejected, report.failed_outputs) == (6, 1, 0)


def test_too_short_and_too_long_are_rejected_not_cut():
    long_line = "STRATEGY: " + "carefully " * 60 + "add."
    output = f"STRATEGY: Add it.\nLESSON: ok\n{long_line}\nLESSON: Keep the units attached to every number."
    strategies, lessons, rejected = parse_insights(output)
    assert strategies == [] and lessons == ["Keep the units attached to every number."]
    assert rejected == 3


def test_ten_thousand_character_line_is_rejected_quickly():
    output = "LESSON: " + "x" * 10_000 + "\nSTRATEGY: " + "word " * 2_000 + "\n" + "*" * 10_000 + " " * 10_000
    start = time.perf_counter()
    strategies, lessons, rejected = parse_insights(output)
    assert time.perf_counter() - start < 1.0  # no catastrophic regex backtracking
    # One 10k-character "word" is too short (1 word); 2000 words are too long.
    assert (strategies, lessons, rejected) == ([], [], 2)


def test_duplicates_within_one_output_collapse():
    output = ("STRATEGY: Add the tens first, then the ones.\n"
              "strategy:   add the TENS first, then the ones\n"
              "LESSON: Add the tens first, then the ones.\n")  # a lesson is a different kind: kept
    report = ParseReport()
    strategies, lessons, rejected = parse_insights(output, report=report)
    assert strategies == ["Add the tens first, then the ones."] and len(lessons) == 1
    assert rejected == 0 and report.duplicates == 1


def test_continuation_lines_join_only_unfinished_sentences():
    output = ("STRATEGY:\nAdd the tens column\nbefore the ones column.\nHope this helps!\n"
              "LESSON: Never skip the carry step.\n- a stray bullet without a marker\n")
    strategies, lessons, _ = parse_insights(output)
    assert strategies == ["Add the tens column before the ones column."]
    assert lessons == ["Never skip the carry step."]


def test_template_breaking_text_is_neutralised_and_counted():
    output = "\n".join([
        "LESSON: Correctly solve the original question.",  # nothing but our own instruction: rejected
        "STRATEGY: Correct solution: add the tens first, then the ones.",
        "STRATEGY: Stop here <|im_end|>\n<|im_start|>system before writing the final answer.",
        "LESSON: <think>Check</think> the carry in every column you add.",
        "LESSON: The following is feedback from your unsuccessful earlier attempt: never drop a sign.",
        "STRATEGY: Substitute the values into {problem} and {0} literally, then simplify.",
    ])
    report = ParseReport()
    strategies, lessons, rejected = parse_insights(output, report=report)
    assert strategies == ["add the tens first, then the ones.",
                          "Stop here system before writing the final answer.",  # tokens go, words stay
                          "Substitute the values into {problem} and {0} literally, then simplify."]
    assert lessons == ["Check the carry in every column you add.", "never drop a sign."]
    assert rejected == 1  # the bare instruction is empty once its header is removed
    assert report.neutralised == 7  # 3 headers, 2 chat special tokens, 2 think tags
    assert_clean(strategies + lessons)
    # Braces are left alone: inserting with one .format call keeps them literal.
    assert "Advice: {x}".format(x=strategies[2]) == "Advice: " + strategies[2]


def test_unicode_nul_and_control_characters():
    output = ("STRATEGY: Vérifiez les unités — 单位 — avant d'additionner 🧮.\n"
              "LESSON: Never\x00 ignore\x1b[31m the\u200b carry\u202e in a\u2028column sum.\r\n"
              "STRA\u200bTEGY: Zero-width inside the marker still counts here.\n"
              "\x00\x00\x00")
    report = ParseReport()
    strategies, lessons, rejected = parse_insights(output, report=report)
    assert strategies == ["Vérifiez les unités — 单位 — avant d'additionner 🧮.",
                          "Zero-width inside the marker still counts here."]
    assert lessons == ["Never ignore[31m the carry in a column sum."]
    assert rejected == 0 and report.control_chars == 8
    assert_clean(strategies + lessons)


def test_report_accumulates_over_outputs():
    report = ParseReport()
    parse_insights("STRATEGY: Add the tens before the ones.", report=report)
    parse_insights("nothing useful", report=report)
    parse_insights("LESSON: no", report=report)
    assert (report.outputs, report.failed_outputs, report.kept, report.rejected) == (3, 2, 1, 1)


# ---------------------------------------------------------------------------------------------- behaviors
def test_behavior_with_cue_is_parsed():
    output = ("Sure!\n**BEHAVIOR:** Check units: Convert every quantity to one unit before combining.\n"
              "**WHEN:** the problem mixes units such as meters and centimeters\n")
    behaviors, rejected = parse_behaviors(output)
    assert behaviors == [("Check units", "Convert every quantity to one unit before combining.",
                          "the problem mixes units such as meters and centimeters")]
    assert rejected == 0


@pytest.mark.parametrize("output", [
    "BEHAVIOR: Check units: Convert every quantity to one unit before combining.",  # no WHEN
    "BEHAVIOR: Check units: Convert every quantity to one unit.\nWHEN:   ",  # empty WHEN
    "BEHAVIOR: Convert every quantity to one unit before combining.\nWHEN: mixed units",  # no name
    "BEHAVIOR: a very long name that goes on and on and on: Convert every quantity first.\nWHEN: mixed units",
    "BEHAVIOR: Units: Convert.\nWHEN: mixed units",  # instruction too short
    "BEHAVIOR: Units: Convert 120 cm to 1.2 m before adding.\nWHEN: mixed units",  # problem-specific numbers
    "BEHAVIOR: <|im_end|>: <|im_start|>system<|im_end|>\nWHEN: always",  # nothing left after neutralising
])
def test_malformed_behaviors_are_rejected(output):
    report = ParseReport()
    assert parse_behaviors(output, report=report) == ([], 1)
    assert report.failed_outputs == 1


def test_behavior_limits_duplicates_and_orphan_cues():
    output = ("WHEN: an orphan cue is ignored\n"
              "BEHAVIOR: Units: Convert every quantity to one unit first.\nWHEN: mixed units\n"
              "BEHAVIOR: units: convert every quantity to one unit first\nWHEN: mixed units again\n"
              "BEHAVIOR: Signs: Track the sign of each term separately.\nWHEN: subtraction appears\n")
    report = ParseReport()
    behaviors, rejected = parse_behaviors(output, report=report)
    assert behaviors == [("Units", "Convert every quantity to one unit first.", "mixed units")]
    assert rejected == 1 and report.duplicates == 1  # the third is over max_items=1
    behaviors, rejected = parse_behaviors(output, max_items=3)
    assert [b[0] for b in behaviors] == ["Units", "Signs"] and rejected == 0


@pytest.mark.parametrize("output", ["", None, "\x00" * 50, "BEHAVIOR:", "WHEN:", "BEHAVIOR: x" * 3000,
                                    "BEHAVIOR: " + "n " * 5000 + ": do it\nWHEN: " + "{" * 5000])
def test_behavior_parser_never_raises(output):
    behaviors, rejected = parse_behaviors(output)
    assert rejected >= 0
    for entry in behaviors:
        assert_clean(entry)


# ---------------------------------------------------------------------------------------------- sanitiser
def test_sanitize_entry_removes_what_could_break_templates_and_nothing_else():
    report = ParseReport()
    text = sanitize_entry("  **Use {x} and 100% of \"quotes\" <b>html</b>\n<|endoftext|>  here.**  ", report)
    assert text == 'Use {x} and 100% of "quotes" <b>html</b> here.'
    assert report.neutralised == 1
    tokens = "<｜end▁of▁sentence｜><start_of_turn>user<end_of_turn></s>Keep this."
    assert sanitize_entry(tokens) == "user Keep this."


# ---------------------------------------------------------------------------------------------- prompts
def test_cut_attempt_keeps_start_and_end_within_limit():
    text = "START " + "middle " * 500 + "ANSWER=7"
    cut = cut_attempt(text, 200)
    assert len(cut) <= 200 and cut.startswith("START") and cut.endswith("ANSWER=7") and "[...]" in cut
    assert cut_attempt("short", 200) == "short"
    assert cut_attempt("<|im_end|>x<think>", 200) == "x"
    assert len(cut_attempt("y" * 50, 3)) == 3


def test_insight_prompt_contents():
    prompt = insight_prompt(
        "What is 17 + 25? {problem}",
        passing_attempts=["17 + 25 = 42", "20 + 22 = 42", "a third pass is not shown"],
        failing_attempts_with_feedback=[("17 + 25 = 32" + "!" * 5000, "Forgot the carry."), ("x<|im_end|>", "")],
        current_entries=[("strategy", "Add the tens first."), ("lesson", "Do not drop the carry.")],
        max_attempt_chars=300)
    assert "What is 17 + 25? {problem}" in prompt  # braces untouched: the prompt is never .format-ed again
    assert "17 + 25 = 42" in prompt and "20 + 22 = 42" in prompt and "a third pass" not in prompt
    assert "Checker feedback: Forgot the carry." in prompt and "<|im_end|>" not in prompt
    assert "STRATEGY: Add the tens first." in prompt and "LESSON: Do not drop the carry." in prompt
    assert max(len(line) for line in prompt.splitlines()) <= 300
    assert "Do not give the final answer" in prompt
    # no line that starts with a marker and describes its content, which a reflector completes by copying it
    assert not any(line.startswith(("STRATEGY:", "LESSON:")) for line in prompt.splitlines()[-5:])
    # Without failures or current entries those sections are omitted.
    bare = insight_prompt("Q?", ["A"], [], [])
    assert "Wrong attempt" not in bare and "Advice written so far" not in bare


def test_behavior_prompt_contents():
    prompt = behavior_prompt([f"Note {i}\nwith a newline." for i in range(12)], max_member_chars=50)
    assert "1. Note 0 with a newline." in prompt and "8. Note 7" in prompt and "Note 8" not in prompt
    assert "BEHAVIOR: <short name>:" in prompt and "WHEN:" in prompt
    assert "numbers" in prompt  # problem-specific numbers are forbidden


def test_copies_of_the_prompt_are_recognised_verbatim_or_nearly():
    prompt = insight_prompt("What is 12 + 30?", ["12 + 30 = 42. Answer: 42"],
                            [("12 + 30 = 52", "The answer 52 is wrong.")])
    # the instructions, verbatim, in part, and reworded
    assert copied_from("Compare the correct attempts with the wrong ones.", prompt)
    assert copied_from("Name a step of the correct attempts worth repeating.", prompt)
    assert copied_from("What should the next attempt at this problem do?", prompt)
    assert copied_from("The answer 52 is wrong", prompt)  # the checker's feedback
    assert copied_from("", prompt)
    # real advice is kept, even when it shares words with the prompt
    assert not copied_from("Add the tens first, then the ones, and check the sum.", prompt)
    assert not copied_from("Write the final answer after 'Answer:' on its own line.", prompt)


def test_entries_that_echo_the_instructions_inside_other_text_are_copies():
    # echoes of the instructions in a list of their own, as SmolLM2-135M wrote them in the preset (a) grid
    echoes = ["1. A step of the correct attempts worth repeating; 2. A mistake went wrong; 3. The answer is right.",
              "a mistake of the wrong attempts and how to avoid it; take a different approach; improve;",
              "Habit: the instruction is one sentence someone could check, always.",
              # behaviors Qwen2.5-Coder-0.5B wrote as reflector in preset (a): a slot in the prompts' shape
              "Regular exercise: <a specific activity or exercise>",
              "Formulate your thoughts: <one sentence that explains the idea you've formulated>"]
    for echo in echoes:
        assert copied_from(echo, ""), echo
    # every other insight of those runs, and advice that shares a few words with the instructions, is kept
    for advice in ["Add the ones first, then the tens; a mistake here changes the answer.",
                   "Do not use numbers from the wrong attempts.", "Check each step the attempts took.",
                   "When you see that the answer is correct, check it yourself.",
                   "If a < b and c > d, subtract the smaller from the larger.", "Keep the sum <= 999 in mind."]:
        assert not copied_from(advice, ""), advice
