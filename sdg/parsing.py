"""Reading structure out of model text without inventing any.

The rule (NeMo Curator's hallucination guard in ``convert_response_to_yaml_list``): an item
is kept only if its text occurs in the model's output. Nothing is repaired, completed or
guessed: a malformed item is dropped, and a response with no list gives no items.
"""

from __future__ import annotations

import json
import re

# "1. x", "1) x", "(1) x", "- x", "* x", "• x", "Q1: x", "Question 2: x"
_ITEM = re.compile(r"^\s*(?:\(?\d{1,3}[.)\]:]|[-*•+]|(?:Q|Question|Topic|Subtopic|Task|Instruction)\s*\d{0,3}\s*[:.)])\s+(.+?)\s*$",
                   re.IGNORECASE)
_QUOTES = "\"'`“”‘’"


def _clean(item: str) -> str:
    item = item.strip().strip(_QUOTES).strip()
    item = re.sub(r"^\*\*(.+)\*\*$", r"\1", item)  # a bold markdown item
    return item.rstrip(",;").strip()


def parse_list(text: str, limit: int | None = None) -> list[str]:
    """The items of a list in ``text``: a JSON array of strings, or lines with list markers
    (numbers, bullets, "Question 1:"). Every item returned is a substring of ``text``;
    duplicates (case-insensitive) are dropped; at most ``limit`` items, in order."""
    items = _json_items(text)
    if not items:
        items = [_clean(m.group(1)) for line in text.splitlines() if (m := _ITEM.match(line))]
    seen, kept = set(), []
    for item in items:
        if len(item) < 2 or item not in text or item.lower() in seen:
            continue  # the guard: never return text the model did not write
        seen.add(item.lower())
        kept.append(item)
    return kept[:limit] if limit is not None else kept


def _json_items(text: str) -> list[str]:
    match = re.search(r"\[[^\[\]]*\]", text, re.DOTALL)
    if not match:
        return []
    try:
        values = json.loads(match.group(0))
    except json.JSONDecodeError:
        return []
    return [_clean(v) for v in values if isinstance(v, str)]


def parse_single(text: str) -> str:
    """One requested item (a question, a task, a problem): the response without a leading
    label ("Question:", "Revised question:") and surrounding quotes; '' if nothing is left."""
    text = text.strip()
    text = re.sub(r"^(?:revised\s+)?(?:question|task|problem|instruction|prompt)\s*\d*\s*:\s*", "", text, flags=re.IGNORECASE)
    return text.strip().strip(_QUOTES).strip()


# ----- math answers

_ANSWER_LINE = re.compile(r"(?:final answer|answer)\s*(?:is)?\s*[:=]?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+)?%?")


def _last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (``\\fbox``), braces nested to any depth."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def final_answer(text: str) -> str | None:
    """The final answer of a math response: ``\\boxed{...}``, then ``#### x`` (GSM8K),
    then an "Answer: x" line (its LaTeX as written, else its first number), then the last
    number; None when there is none."""
    if (boxed := _last_boxed(text)) is not None:
        return boxed.strip()
    if (hashes := re.findall(r"####\s*(.+)", text)):
        return hashes[-1].strip()
    lines = [m.group(1).strip() for line in text.splitlines() if (m := _ANSWER_LINE.search(line))]
    if lines and lines[-1]:
        line = lines[-1].rstrip(".").strip()
        if "\\" in line:  # \frac{3}{4}, \{1, 2\}, $x \le 2$: the expression, not its first digit
            return line
        number = _NUMBER.search(line)
        return number.group(0) if number else line
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(answer: str) -> str | float:
    """A number when the answer is one (``$1,200.00`` -> 1200.0, ``3/4`` -> 0.75, ``50%`` -> 50.0),
    else lower-case text without spaces, ``$`` and a trailing period."""
    text = answer.strip().rstrip(".").replace("$", "").replace(",", "").replace("\\%", "%").strip()
    text = re.sub(r"^\\text\{(.*)\}$", r"\1", text)
    try:
        if re.fullmatch(r"-?\d+/\d+", text):
            numerator, denominator = text.split("/")
            return int(numerator) / int(denominator)
        return float(text.rstrip("%"))
    except (ValueError, ZeroDivisionError):
        return re.sub(r"\s+", "", text.lower())


# ----- code

_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The Python in a response: every fenced block joined, or the whole text when none."""
    blocks = _FENCE.findall(text)
    return "\n\n".join(b.strip("\n") for b in blocks) if blocks else text.strip()
