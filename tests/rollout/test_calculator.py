"""The calculator a backend can run in the loop: what it computes, and the tokens it writes."""

import pytest

from brep_rl.rollout import Calculator
from brep_rl.rollout.calculator import calculate


@pytest.mark.parametrize("line, result", [
    ("16 - 3 - 4 ", "9"),
    ("She has 16 * 3 ", "48"),
    ("(5+3)*2", "16"),
    ("12.5/5", "2.5"),
    ("Step 2: 5 - 8 ", "-3"),  # the step number is not part of the expression
    ("-3 + 5 ", "2"),
    ("The change is -3 + 5 ", "2"),
    ("(-4 + 10) * 2 ", "12"),
    ("She had apples - 3 + 5 ", "8"),  # a dash between words is not a sign
    ("$2 x 9 ", "18"),
    ("10 ÷ 4 × 3 ", "7.5"),
    ("Total cost: $1,250 + $300 + 25.5 ", "1575.5"),
    ("The discount was 25% of $19.50 ", "4.88"),
    ("John bought 200 * 50% ", "100"),
    ("Janet lays 16 eggs per day * 3 days ", "48"),  # units are read past
    ("Eliza's rate is $10/hour * 45 hours ", "450"),
    ("James runs 60 meters each sprint x 3 sprints ", "180"),
    ("Profit = (150% of $80,000) - $98,000 ", "22000"),  # only what follows the last "="
])
def test_calculate_computes_the_expression_that_ends_the_line(line, result):
    assert calculate(line) == result


@pytest.mark.parametrize("line", [
    "48 ",  # a number alone: nothing to compute
    "so Toulouse has 2 * Charleston ",  # a word where a number should be
    "There are 50 coins - Gretchen's coins ",
    "3 / 0 ",
    "Solve 2x + 3 ",
    "(3 + 4 ",  # unbalanced
    "3 ** 4 ",
    "",
])
def test_calculate_leaves_anything_else_to_the_model(line):
    assert calculate(line) is None


def test_calculator_writes_the_result_after_an_equals_sign_in_the_models_spacing(tokenizer):
    calculator = Calculator(tokenizer)

    def written(text: str) -> str:
        return tokenizer.decode(calculator(tokenizer.encode(text, add_special_tokens=False)))

    assert written("Janet has 16 eggs.\nShe sells 16 - 3 - 4 =") == " 9"
    assert written("16*3=") == "48"
    assert written("She sells 16 - 3 - 4") == ""  # no "=" yet
    assert written("She sells 16 - 3 - 4 = 9") == ""  # the model wrote the result itself
    assert written("x = 7 - 2 * 4 =") == " -1"
    assert written("Let x =") == ""
    assert written("2 + 2 = 4\nHe has 5 =") == ""  # an expression on an earlier line does not count
