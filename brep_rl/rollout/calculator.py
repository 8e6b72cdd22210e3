"""GSM8K's calculator (Cobbe et al. 2021, arXiv 2110.14168, section 3.1): when a completion has just written an
arithmetic expression followed by `=`, the result is written for it, and sampling goes on after it. The model then
chooses what to compute; the tool makes the computation right. A small model's GSM8K answers are mostly the shape of
a solution with wrong arithmetic in it ("16 * 3 = 46"), which this takes out of the measurement.

What is computed: numbers (digits, a decimal point, thousands commas, a `$` before, a `%` after: 50% is 0.5),
`+ - * /`, a minus on the first number or after a parenthesis, `x` or `×` for times, `÷`, `of` (25% of 80),
parentheses, on the line before the `=`. A number may carry a unit of up to three words (`16 eggs per day * 3 days`,
`$10/hour * 45 hours`): small models write GSM8K's arithmetic that way, and the units are read past, not checked.
Anything else (a single number, a word where a number should be, a division by zero) leaves the completion to the
model.
"""

from __future__ import annotations

import ast
import operator
import re

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_NUMBER = r"\$?\d[\d,]*(?:\.\d+)?%?"
_UNIT = r"(?:\s+(?!(?:x|of)\b)(?:per\s+)?[A-Za-z][A-Za-z'’]*|/[A-Za-z]+)"  # " eggs", " per day", "/hour"
_TERM = rf"\(*(?:(?<=\()-)?{_NUMBER}\)*{_UNIT}{{0,3}}"
_OPERATOR = r"\s*(?:[-+*/×÷]|\bx\b|\bof\b)\s*"
_SIGN = r"(?:(?<![^\s(])-)?"  # a minus on the first number ("-3 + 5"), not a dash between words ("apples - 3")
_EXPRESSION = re.compile(rf"{_SIGN}(?:{_TERM}{_OPERATOR})+{_TERM}\s*$")  # the longest one that ends the line
_PIECE = re.compile(r"\d[\d,]*(?:\.\d+)?%?|[-+*/×÷()]|\bx\b|\bof\b")
_SYMBOLS = {"x": "*", "×": "*", "÷": "/", "of": "*"}


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_value(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_value(node.left), _value(node.right))
    raise ValueError("not plain arithmetic")


def _python(piece: str) -> str:
    if piece[0].isdigit():
        number = piece.rstrip("%").replace(",", "")
        return f"({number} / 100)" if piece.endswith("%") else number
    return _SYMBOLS.get(piece, piece)


def calculate(line: str) -> str | None:
    """The result of the arithmetic expression that ends `line` (the text before an `=`), as the model would write
    it (`48`, `12.5`, `-3`), or None when the line does not end in an expression with an operator."""
    match = _EXPRESSION.search(line[-160:])  # bounded: the pattern backtracks
    if match is None:
        return None
    expression = " ".join(_python(piece) for piece in _PIECE.findall(re.sub(r"/[A-Za-z]+", "", match.group())))
    try:
        result = _value(ast.parse(expression, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return None
    if abs(result) >= 1e15:
        return None
    if abs(result - round(result)) < 1e-9:
        return str(int(round(result)))
    return f"{result:.2f}".rstrip("0").rstrip(".")


class Calculator:
    """A backend's tool (brep_rl.rollout.base.Tool): called after each sampled token, it writes the result after an
    expression and `=`; the model's next token may not run on from the written number (`= 6` then `.67` or `0`)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # decoded token texts, so that byte-level marks like Ġ do not hide a leading space
        texts = [tokenizer.convert_tokens_to_string([piece]) if piece is not None else ""
                 for piece in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))]
        self.triggers = {i for i, text in enumerate(texts) if text.endswith("=")}  # only these can end an expression
        self.digits = {i for i, text in enumerate(texts) if text[:1].isdigit()}
        self.points = {i for i, text in enumerate(texts) if text in (".", ",")}

    def banned(self, completion_ids: list[int], since_write: int) -> set[int]:
        """No digit right after the written number, nor after a point or comma that follows it (a sentence's
        full stop may)."""
        if since_write == 0 or (since_write == 1 and completion_ids[-1] in self.points):
            return self.digits
        return set()

    def __call__(self, completion_ids: list[int]) -> list[int]:
        if not completion_ids or completion_ids[-1] not in self.triggers:
            return []
        text = self.tokenizer.decode(completion_ids, skip_special_tokens=True)
        line = text[: text.rfind("=")].rsplit("\n", 1)[-1]
        result = calculate(line)
        if result is None:
            return []
        spaced = line.endswith(" ")  # "16 * 3 = 48", "16*3=48": the model's own spacing
        return self.tokenizer.encode((" " if spaced else "") + result, add_special_tokens=False)
