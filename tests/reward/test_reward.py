import threading
import time

import pytest

from reward import (
    Verifier,
    VerifierError,
    accuracy_reward,
    extract_answer,
    format_reward,
    has_final_answer_format,
    intermediate_reward,
    make_accuracy_reward,
    stated_results,
)


@pytest.fixture(scope="module")
def verifier():
    v = Verifier(timeout=3.0)
    yield v
    v.close()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so the answer is \\boxed{\\frac{1}{\\sqrt{2}}}.", "\\frac{1}{\\sqrt{2}}"),
        ("first \\boxed{3} then \\boxed{4}", "4"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{{a}+{b}}", "{a}+{b}"),
        ("She pays 5 + 3 = 8 dollars.\n#### 8", "8"),
        ("#### 1,234 dollars", "1,234"),
        ("#### $18.", "18"),
        ("#### \\frac{3}{4}", "\\frac{3}{4}"),
        ("#### 5\n\nthen more text 7", "5"),
        ("The total is 12, then 13.", "13"),
        ("it is -4.5 degrees", "-4.5"),
        ("half is 7/2", "7/2"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_fallback_none_and_bad_fallback():
    assert extract_answer("The total is 12", fallback="none") is None
    assert extract_answer("#### 12", fallback="none") == "12"
    with pytest.raises(ValueError, match="fallback: expected one of"):
        extract_answer("1", fallback="first")


def test_format_detection():
    assert has_final_answer_format("#### 5") and has_final_answer_format("\\boxed{5}")
    assert not has_final_answer_format("The answer is 5") and not has_final_answer_format("####\n")


CORRECT = [
    ("18", "18.0"), ("1000", "1,000"), ("1,000", "1000"), ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "1/2"),
    ("50\\%", "50"), ("5", "5 \\text{ cm}"), ("18", "\\$18"), ("18", "$18"), ("-3", "-3"),
    ("x^2+1", "1+x^2"), ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("\\frac{14}{3}", "\\dfrac{14}{3}"),
    ("(3, \\frac{\\pi}{2})", "(3,\\frac{\\pi}{2})"), ("7/2", "3.5"),
]
WRONG = [("3", "4"), ("12", "12.5"), ("-3", "3"), ("1000", "100"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("x^2+1", "x^2-1"), ("5", None), (None, "5")]


@pytest.mark.parametrize("gold, prediction", CORRECT)
def test_equivalent_answers_are_correct(verifier, gold, prediction):
    assert verifier.check([gold], [prediction]) == [True]


@pytest.mark.parametrize("gold, prediction", WRONG)
def test_different_answers_are_wrong(verifier, gold, prediction):
    assert verifier.check([gold], [prediction]) == [False]


def test_pathological_input_times_out_scores_zero_and_is_counted():
    with Verifier(timeout=1.0) as v:
        huge = "\\sqrt{" * 3000 + "}" * 3000
        start = time.monotonic()
        result = v.check(["2", "\\frac{1}{2}", "2"], [huge, "0.5", "2"])
        elapsed = time.monotonic() - start
        assert result == [False, True, True]
        assert v.stats.timeouts == 1 and v.stats.checks == 3
        assert elapsed < 1.0 + 3.0  # bounded by the timeout, not by sympy
        assert v.check(["\\frac{1}{2}"], ["0.5"]) == [True]  # the replaced worker serves again


def test_a_crashed_worker_is_an_error_not_a_crash():
    with Verifier(timeout=5.0) as v:
        assert v.check(["\\frac{1}{2}"], ["0.5"]) == [True]
        for w in v._workers:
            w.process.kill()
        assert v.check(["\\frac{1}{2}", "4"], ["0.5", "4"]) == [False, True]
        assert v.stats.errors == 1 and "worker" in v.stats.last_error


def test_a_batch_where_every_check_fails_raises_instead_of_zeros():
    with Verifier(timeout=0.5) as v:
        huge = "\\sqrt{" * 3000 + "}" * 3000
        with pytest.raises(VerifierError, match="all 2 checks of a batch failed"):
            v.check(["1", "2"], [huge, huge])


def test_checks_from_several_threads_agree(verifier):
    golds = ["\\frac{1}{2}", "x^2+1", "3", "50\\%"] * 5
    preds = ["0.5", "1+x^2", "4", "50"] * 5
    expected = [True, True, False, True] * 5
    results = {}

    def run(i):
        results[i] = verifier.check(golds, preds)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[i] for i in range(4)] == [expected] * 4


def test_trl_reward_functions_score_strings_and_messages(verifier):
    accuracy = make_accuracy_reward(verifier=verifier)
    completions = ["12 + 30 = 42\n#### 42", "I think it is 41", [{"role": "assistant", "content": "\\boxed{\\frac{1}{2}}"}]]
    answers = ["42", "42", "0.5"]
    assert accuracy(prompts=["a", "b", "c"], completions=completions, answer=answers) == [1.0, 0.0, 1.0]
    assert format_reward(prompts=["a", "b", "c"], completions=completions) == [1.0, 0.0, 1.0]
    assert accuracy_reward.__name__ == "accuracy_reward"
    with pytest.raises(ValueError, match="3 completions but 2 gold answers"):
        accuracy(completions=completions, answer=answers[:2])


def test_stated_results_reads_the_numbers_after_equals_and_hashes():
    text = "She earns 12/60 = $0.2 a minute, 0.2 x 6,000 = 1,200 in all, half of 7 = 7/2, 5/0 = 3/0\n#### 72"
    assert stated_results(text) == {0.2, 1200.0, 3.5, 72.0}
    assert stated_results("48 plus 24 is 72") == set()


def test_intermediate_reward_gives_partial_credit_for_the_right_quantities():
    solution = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether.\n#### 72"
    completions = [
        "In May 48/2 = 24, in all 48 + 24 = 72\n#### 72",  # every quantity
        "In May 48/2 = 24, in all 48 * 24 = 1152\n#### 1152",  # the first step right, the answer wrong
        "In May 48 * 2 = 96, in all 48 + 96 = 144\n#### 144",  # nothing right
        "48/2 = 24, 1 = 1, 2 = 2, 3 = 3, 4 = 4\n#### 5",  # the right step among numbers the reference never states
        [{"role": "assistant", "content": "48/2 = 24\n#### 72"}],
    ]
    scores = intermediate_reward(completions=completions, solution=[solution] * len(completions))
    assert scores[0] == 1.0
    assert scores[1] == pytest.approx(2 * 1 / (2 + 2))
    assert scores[2] == 0.0
    assert 0 < scores[3] < scores[1]
    assert scores[4] == 1.0


def test_intermediate_reward_skips_rows_without_a_solution_and_checks_the_column():
    assert intermediate_reward(completions=["1 + 1 = 2"], solution=[None]) == [None]
    assert intermediate_reward(completions=["1 + 1 = 2"], solution=["no results stated"]) == [None]
    with pytest.raises(ValueError, match="column 'solution'"):
        intermediate_reward(completions=["a", "b"], solution=["= 2"])
