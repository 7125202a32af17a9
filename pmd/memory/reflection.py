"""Reflection prompts and the parsers of their outputs (docs/method.md §8, §9, §11). No model calls here.

Output formats
--------------
Insight reflection:   STRATEGY: <sentence>      LESSON: <sentence>           (one per line, at most 3 each)
Behavior abstraction: BEHAVIOR: <name>: <one-line instruction>
                      WHEN: <applicability cue>

Parsing is forgiving about form and strict about content. Markers are case-insensitive and may carry
bullets (`-`, `*`, `•`, `+`), numbering (`1.`, `2)`), markdown bold or headings, and extra spaces. An entry
whose sentence is unfinished continues on the following plain lines (joined with spaces) until its sentence
ends, a blank line, a bullet, or the next marker. An entry that is too short (< min_words words) or too long
(> max_tokens tokens) is rejected, never cut.

Sanitising (what reaches the memory store)
------------------------------------------
- Control and invisible format characters (NUL, ESC, zero-width and bidi controls, ...) are removed; line
  breaks of any kind become spaces inside an entry.
- Chat-template special tokens (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>`, any `<|...|>`, `<｜...｜>`,
  `<think>`/`</think>`, `<start_of_turn>`/`<end_of_turn>`, `<s>`/`</s>`) are REMOVED, not escaped: an escaped
  form could still be re-tokenised into the special token, and the words around them carry the meaning.
- Phrases that are the teacher context's own section headers ("Correct solution:", "Correctly solve the
  original question.", "The following is feedback ...:", our memory section headers) are removed, so an
  entry can never impersonate a section of the template. An entry that is nothing but a header is then too
  short and is rejected.
- Braces are NOT escaped. Templates must insert untrusted text by concatenation or with one `str.format`
  call (format does not re-read substituted values, so "{problem}" inside an entry stays literal). Never call
  `.format` on a string that already contains memory text.

Every removal is counted in a `ParseReport` (pass one in to accumulate counts over a step's outputs), so the
trainer can log `reflect/parse_fail` and friends.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pmd.memory.store import approx_tokens, normalize_text

# ---------------------------------------------------------------------------------------------- sanitising
SPECIAL_TOKEN = re.compile(
    r"<\|[^|<>\n]{0,64}\|>"  # ChatML / Llama-3 style: <|im_start|>, <|im_end|>, <|endoftext|>, <|eot_id|>
    r"|<｜[^｜<>\n]{0,64}｜>"  # DeepSeek's full-width bars
    r"|</?\s*think\s*>"  # reasoning-model scratchpad tags
    r"|<(?:start_of_turn|end_of_turn|bos|eos|pad)>|</?s>",  # Gemma / Llama-2 / SentencePiece
    flags=re.IGNORECASE)

# The teacher context's section headers (SDPO's, then pmd's; docs/method.md §4), matched loosely in spacing and case.
_HEADER_PHRASES = [
    r"correct\s+solution\s*:",
    r"correctly\s+solve\s+the\s+original\s+question\b\.?",
    r"the\s+following\s+is\s+feedback\b[^:]{0,80}:",
    r"behaviors?\s+that\s+have\s+helped\s+on\s+similar\s+problems\s*:",
    r"strategies\s+that\s+worked\s+on\s+this\s+problem\s*:",
    r"mistakes\s+to\s+avoid\s+on\s+this\s+problem\s*:",
]
TEMPLATE_HEADER = re.compile("|".join(_HEADER_PHRASES), flags=re.IGNORECASE)


@dataclass
class ParseReport:
    """Counts over one or more parsed outputs; pass the same report to several calls to accumulate."""

    outputs: int = 0  # outputs parsed
    failed_outputs: int = 0  # outputs that yielded no kept entry: reflect/parse_fail
    kept: int = 0  # entries kept
    rejected: int = 0  # marker entries dropped: too short, too long, malformed, or over max_items
    duplicates: int = 0  # entries collapsed into an identical earlier one of the same output
    neutralised: int = 0  # special tokens and template headers removed from kept or rejected entries
    control_chars: int = 0  # control / invisible characters removed


def _drop_invisible(text: str, report: ParseReport) -> str:
    """Remove control (Cc), format (Cf), surrogate (Cs) and private-use (Co) characters; tabs become spaces."""
    kept = []
    for char in text.replace("\t", " "):
        if unicodedata.category(char) in ("Cc", "Cf", "Cs", "Co"):
            report.control_chars += 1
        else:
            kept.append(char)
    return "".join(kept)


def strip_special_tokens(text: str) -> tuple[str, int]:
    """Text with chat special tokens and think tags replaced by a space, and how many were removed."""
    return SPECIAL_TOKEN.subn(" ", text)


def sanitize_entry(text: str, report: ParseReport | None = None) -> str:
    """One clean line: no invisible characters, special tokens, template headers, or repeated spaces."""
    report = report if report is not None else ParseReport()
    text = " ".join(text.splitlines())  # every kind of line break, including U+2028 and \x85
    text = _drop_invisible(text, report)
    text, removed_tokens = strip_special_tokens(text)
    text, removed_headers = TEMPLATE_HEADER.subn(" ", text)
    report.neutralised += removed_tokens + removed_headers
    text = re.sub(r"\s+", " ", text).strip()
    return _strip_wrapping(text)


def _strip_wrapping(text: str) -> str:
    """Remove markdown emphasis and matching quotes around a whole entry ("**Check units.**" -> "Check units.")."""
    previous = None
    while previous != text:
        previous = text
        text = text.strip().strip("*_`").strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1]
        elif len(text) >= 2 and text[0] in "“‘" and text[-1] in "”’":
            text = text[1:-1]
    return text


# ---------------------------------------------------------------------------------------------- line splitting
# Leading decoration a model puts before a marker: bullets, numbering, headings, emphasis, quote marks, spaces.
# Every alternative consumes a distinct token, so a hostile line cannot make the regex backtrack badly.
_DECORATION = r"(?:[-*•+>#_`\s]|\d{1,3}[.)]|\(\d{1,3}\))*"
_BULLET_START = re.compile(r"^\s*(?:[-*•+]\s|\d{1,3}\s*[.)]\s)")
_SENTENCE_END = re.compile(r"[.!?][*_`\"'”’)]*\s*$")


def _marker_line(markers: Sequence[str]) -> re.Pattern:
    """`<decoration> MARKER [number] [**] : [**] rest`, case-insensitive."""
    names = "|".join(markers)
    return re.compile(rf"^{_DECORATION}(?P<marker>{names})(?:\s*\d{{1,2}})?[\s*_`]*:[\s*_`]*(?P<rest>.*)$",
                      flags=re.IGNORECASE)


def _split_entries(text: str, markers: Sequence[str], report: ParseReport) -> list[tuple[str, str]]:
    """(MARKER in upper case, raw entry text) pairs.

    An entry continues on the next plain line (not blank, not a bullet, not a marker) only while its sentence
    is unfinished, so "STRATEGY:\nAdd the tens first." works but a closing "Hope this helps!" is not appended.
    """
    pattern = _marker_line(markers)
    entries: list[list[str]] = []
    open_entry = False
    for line in text.splitlines():
        line = _drop_invisible(line, report)
        match = pattern.match(line)
        if match:
            entries.append([match["marker"].upper(), match["rest"]])
        elif open_entry and line.strip() and not _BULLET_START.match(line):
            entries[-1][1] += " " + line
        else:
            open_entry = False
            continue
        open_entry = not _SENTENCE_END.search(entries[-1][1])
    return [(marker, body) for marker, body in entries]


def _length_ok(text: str, min_words: int, max_tokens: int, count_tokens: Callable[[str], int]) -> bool:
    return len(text.split()) >= min_words and count_tokens(text) <= max_tokens


def _as_text(output: object) -> str:
    """Model output as a string: None (an endpoint error) is empty, bytes are decoded leniently."""
    if output is None:
        return ""
    if isinstance(output, bytes):
        return output.decode("utf-8", errors="replace")
    return str(output)


# ---------------------------------------------------------------------------------------------- parsers
def parse_insights(text: str, max_items: int = 3, min_words: int = 4, max_tokens: int = 64, *,
                   count_tokens: Callable[[str], int] = approx_tokens,
                   report: ParseReport | None = None) -> tuple[list[str], list[str], int]:
    """STRATEGY / LESSON lines of one reflection: (strategies, lessons, rejected). Never raises.

    `rejected` counts marker entries dropped for length, emptiness or going over `max_items` per kind.
    Exact repeats (after normalisation) collapse into the first and are not counted as rejected.
    """
    report = report if report is not None else ParseReport()
    report.outputs += 1
    kept: dict[str, list[str]] = {"STRATEGY": [], "LESSON": []}
    seen: dict[str, set[str]] = {"STRATEGY": set(), "LESSON": set()}
    rejected = 0
    for marker, body in _split_entries(_as_text(text), ("strategy", "lesson"), report):
        entry = sanitize_entry(body, report)
        key = normalize_text(entry)
        if key and key in seen[marker]:
            report.duplicates += 1
        elif not _length_ok(entry, min_words, max_tokens, count_tokens) or len(kept[marker]) >= max_items:
            rejected += 1
        else:
            seen[marker].add(key)
            kept[marker].append(entry)
    _finish(report, len(kept["STRATEGY"]) + len(kept["LESSON"]), rejected)
    return kept["STRATEGY"], kept["LESSON"], rejected


# A number of two or more characters ("17", "3.5", "1,000"): problem-specific in a general behavior.
_SPECIFIC_NUMBER = re.compile(r"\d[\d.,/]*\d")


def parse_behaviors(text: str, max_items: int = 1, min_words: int = 4, max_tokens: int = 64, *,
                    max_name_words: int = 8, count_tokens: Callable[[str], int] = approx_tokens,
                    report: ParseReport | None = None) -> tuple[list[tuple[str, str, str]], int]:
    """BEHAVIOR/WHEN pairs of one abstraction: ([(name, instruction, cue)], rejected). Never raises.

    A BEHAVIOR is rejected when its name is empty or longer than `max_name_words`, its instruction fails the
    length rules, its WHEN line is missing or empty, or it contains a multi-digit number (problem-specific
    numbers are forbidden, docs/method.md §9; single digits such as "2 cases" are allowed). A WHEN without a BEHAVIOR is
    ignored. Repeats of the same "name: instruction" collapse.
    """
    report = report if report is not None else ParseReport()
    report.outputs += 1
    kept: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    rejected = 0
    entries = _split_entries(_as_text(text), ("behavior", "when"), report)
    for i, (marker, body) in enumerate(entries):
        if marker != "BEHAVIOR":
            continue
        cue_body = entries[i + 1][1] if i + 1 < len(entries) and entries[i + 1][0] == "WHEN" else ""
        behavior = _clean_behavior(body, cue_body, min_words, max_tokens, max_name_words, count_tokens, report)
        key = normalize_text(f"{behavior[0]}: {behavior[1]}") if behavior else ""
        if behavior and key in seen:
            report.duplicates += 1
        elif behavior is None or len(kept) >= max_items:
            rejected += 1
        else:
            seen.add(key)
            kept.append(behavior)
    _finish(report, len(kept), rejected)
    return kept, rejected


def _clean_behavior(body: str, cue_body: str, min_words: int, max_tokens: int, max_name_words: int,
                    count_tokens: Callable[[str], int], report: ParseReport) -> tuple[str, str, str] | None:
    """(name, instruction, cue) if the entry passes every rule, else None."""
    name, colon, instruction = body.partition(":")
    if not colon:
        return None
    name = sanitize_entry(name, report)
    instruction = sanitize_entry(instruction, report)
    cue = sanitize_entry(cue_body, report)
    if not name or len(name.split()) > max_name_words or not cue:
        return None
    if not _length_ok(instruction, min_words, max_tokens, count_tokens):
        return None
    if _SPECIFIC_NUMBER.search(f"{name} {instruction} {cue}"):
        return None
    return name, instruction, cue


def _finish(report: ParseReport, kept: int, rejected: int) -> None:
    report.kept += kept
    report.rejected += rejected
    report.failed_outputs += kept == 0


# ---------------------------------------------------------------------------------------------- prompts
def copied_from(entry: str, prompt: str, near: float = 0.8) -> bool:
    """Whether a parsed entry repeats its reflection prompt instead of saying something new: it appears in the
    prompt verbatim (after normalisation), nearly equals one prompt line (difflib ratio >= `near`), as when a
    small model rewrites a format placeholder ("what to do next" for "what to do instead"), or contains a
    phrase of the prompts' instructions ("1. A step the correct attempts took that worked; 2. ..."), or holds a
    placeholder in the prompts' own shape ("Regular exercise: <a specific activity or exercise>")."""
    key = normalize_text(entry)
    if not key or key in normalize_text(prompt) or _PLACEHOLDER.search(entry.lower()):
        return True
    words = " " + " ".join(re.findall(r"[a-z0-9]+", key)) + " "
    if any(f" {phrase} " in words for phrase in _INSTRUCTION_PHRASES):
        return True
    matcher = difflib.SequenceMatcher(b=key, autojunk=False)
    for line in prompt.splitlines():
        line = normalize_text(line.split(":", 1)[1] if ":" in line[:20] else line)
        if line and abs(len(line) - len(key)) <= len(key):
            matcher.set_seq1(line)
            if matcher.quick_ratio() >= near and matcher.ratio() >= near:
                return True
    return False


def cut_attempt(text: str, max_chars: int) -> str:
    """At most `max_chars` characters, keeping the start (the approach) and the end (the answer)."""
    text, _ = strip_special_tokens(text)  # a literal <|im_end|> would end the reflector's own turn
    text = text.strip()
    if len(text) <= max_chars:
        return text
    marker = " [...] "
    if max_chars <= len(marker):
        return text[:max_chars]
    head = (max_chars - len(marker)) // 2
    tail = max_chars - len(marker) - head
    return text[:head] + marker + (text[-tail:] if tail > 0 else "")


# No line starts with a marker followed by a description of its content: with the marker put in its mouth, a
# 0.5B reflector completed it with that description in 3-5 of 24 reflections (docs/results/findings.md point 9).
INSIGHT_INSTRUCTIONS = (
    "Compare the correct attempts with the wrong ones. What should the next attempt at this problem do, and "
    "what should it avoid?",
    "Answer with lines of advice, each one short instruction that someone reading a solution could check: a "
    "STRATEGY line names a step of the correct attempts worth repeating, a LESSON line names a mistake of the "
    "wrong attempts and how to avoid it.",
    "At most {max_items} lines of each kind, each starting with STRATEGY: or LESSON:",
    "Do not give the final answer, and do not copy these instructions.",
    "If advice written so far is still right, you may repeat that line exactly.",
)
BEHAVIOR_INSTRUCTIONS = (
    "Find the one general habit these notes share. Write exactly two lines:",
    "BEHAVIOR: <short name>: <one instruction saying what to do>",
    "WHEN: <the kind of problem where it applies>",
    "Rules:",
    "- The name has at most 5 words.",
    "- The instruction is one sentence someone could check.",
    "- Do not use numbers, names or answers from a specific problem.",
)


def _instruction_phrases(lines: Iterable[str], words_each: int = 6) -> tuple[str, ...]:
    """Every run of `words_each` consecutive words within a clause of the instruction lines (split at , ; . : <
    >), as lowercase words joined by single spaces: an entry holding one echoes the instructions, whole or in
    part ("Name a step of the correct attempts worth repeating"). Shorter runs ("one line each") are common
    English."""
    phrases = []
    for line in lines:
        for clause in re.split(r"[,;.:<>]", line.lower()):
            words = re.findall(r"[a-z0-9]+", clause)
            phrases += [" ".join(words[i:i + words_each]) for i in range(len(words) - words_each + 1)]
    return tuple(dict.fromkeys(phrases))


# "<short name>", "<one sentence that explains ...>": words in angle brackets, as the prompts write their slots.
# "a < b and c > d" does not match (a space follows "<").
_PLACEHOLDER = re.compile(r"<[a-z][a-z' ]*[a-z]>")
# A parsed entry containing one of these echoes its instructions (`copied_from`)
_INSTRUCTION_PHRASES = _instruction_phrases(INSIGHT_INSTRUCTIONS + BEHAVIOR_INSTRUCTIONS)


def insight_prompt(problem_text: str, passing_attempts: Sequence[str],
                   failing_attempts_with_feedback: Sequence[tuple[str, str]],
                   current_entries: Iterable[tuple[str, str]] = (), *, max_attempt_chars: int = 1500,
                   max_attempts: int = 2, max_items: int = 3,
                   instructions: Sequence[str] = INSIGHT_INSTRUCTIONS) -> str:
    """The insight-reflection prompt (docs/method.md §8). `current_entries` are (kind, text) pairs, kind strategy|lesson.
    `instructions`: the closing lines (a check compares wordings: docs/results/reflector_check.py).

    Untrusted texts are joined by concatenation, never passed through `.format`.
    """
    parts = ["Here is a problem and some attempts at it. Write short advice that would help solve it.",
             "", "Problem:", strip_special_tokens(problem_text)[0].strip(), ""]
    for i, attempt in enumerate(passing_attempts[:max_attempts], 1):
        parts += [f"Correct attempt {i}:", cut_attempt(attempt, max_attempt_chars), ""]
    for i, (attempt, feedback) in enumerate(failing_attempts_with_feedback[:max_attempts], 1):
        parts += [f"Wrong attempt {i}:", cut_attempt(attempt, max_attempt_chars)]
        if feedback and feedback.strip():
            parts += ["Checker feedback: " + cut_attempt(feedback, max_attempt_chars)]
        parts.append("")
    current = [f"{kind.upper()}: {text}" for kind, text in current_entries]
    if current:
        parts += ["Advice written so far:", *current, ""]
    parts += [line.replace("{max_items}", str(max_items)) for line in instructions]
    return "\n".join(parts)


def behavior_prompt(member_texts: Sequence[str], *, max_members: int = 8, max_member_chars: int = 300) -> str:
    """The behavior-abstraction prompt (docs/method.md §9): one general habit shared by advice from different problems."""
    notes = [f"{i}. " + " ".join(cut_attempt(text, max_member_chars).split())
             for i, text in enumerate(member_texts[:max_members], 1)]
    return "\n".join([
        "Each note below is advice written for a different problem.",
        "", "Notes:", *notes, "",
        *BEHAVIOR_INSTRUCTIONS,
    ])
