"""Final-answer extraction: the last \\boxed{...}, else the last `#### N`, else a configurable fallback."""

from __future__ import annotations

import re

FALLBACKS = ("last_number", "none")

NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+"  # 1,234 / 4.5 / 7/2 / .5
_NUMBER_RE = re.compile(NUMBER)
_LEADING_NUMBER_RE = re.compile(rf"^\s*\\?\$?\s*({NUMBER})(?![\w^/])")
_HASHES_RE = re.compile(r"####\s*([^\n]*)")


def last_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} (or \\fbox{...}), nested braces included; None if there is none or it is unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        # "\boxed 5" (no braces): the next token
        rest = text[start:].split(maxsplit=1)
        return rest[1].split()[0].rstrip(".$") if len(rest) > 1 and rest[1].strip() else None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i].strip()
    return None


def _clean(answer: str) -> str | None:
    answer = answer.strip().rstrip(".").strip()
    if not answer:
        return None
    # "18 dollars", "$18.", "18 apples": keep the number, not the words around it
    match = _LEADING_NUMBER_RE.match(answer)
    if match and not re.search(r"[\\{}^=]", answer[match.end() :]):
        return match.group(1)
    return answer


def has_final_answer_format(text: str) -> bool:
    """True when the completion states its answer explicitly (\\boxed{} or ####), not just somewhere in the text."""
    return last_boxed(text) is not None or bool(_HASHES_RE.search(text) and _HASHES_RE.findall(text)[-1].strip())


def extract_answer(text: str, fallback: str = "last_number") -> str | None:
    """The final answer of a completion, or None.

    Order: the last \\boxed{...}; else the text after the last `####` on its line; else, with
    fallback="last_number", the last number in the text (commas, decimals and a/b fractions kept).
    """
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback: expected one of {FALLBACKS}, got {fallback!r}")
    boxed = last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    hashes = [h for h in _HASHES_RE.findall(text) if h.strip()]
    if hashes:
        return _clean(hashes[-1])
    if fallback == "last_number":
        numbers = _NUMBER_RE.findall(text)
        return numbers[-1].rstrip(",") if numbers else None
    return None
