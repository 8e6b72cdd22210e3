import json
import subprocess
import sys
from pathlib import Path

import pytest

from brep_rl import data
from brep_rl.data import DataError, chat_prompt, data_root, gsm8k_solution, in_split, load_jsonl_task, load_task


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_gsm8k_from_shared_data():
    problems = load_task("gsm8k", "train", limit=3)
    assert problems[0].answer == "72" and problems[0].question.startswith("Natalia sold clips")
    assert problems[0].solution.endswith("#### 72") and "<<" not in problems[0].solution
    assert len(load_task("gsm8k", "test", limit=5, offset=2)) == 5


def test_gsm8k_solution_strips_calculator_notes_and_separators():
    assert gsm8k_solution("She has 48/2 = <<48/2=24>>24.\n#### 1,024") == "She has 48/2 = 24.\n#### 1024"


def test_math500_keeps_latex_answers():
    problems = load_task("math500", "test", limit=2)
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)" and problems[0].meta["level"] == 2


def test_reasoning_gym_splits_are_disjoint_and_deterministic():
    cfg = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
    train = load_task("rg:chain_sum", "train", limit=40, rg_config=cfg)
    test = load_task("rg:chain_sum", "test", limit=40, rg_config=cfg)
    assert not {p.question for p in train} & {p.question for p in test}
    assert all(in_split(p.question, "test") for p in test)
    assert [p.question for p in test] == [p.question for p in load_task("rg:chain_sum", "test", limit=40, rg_config=cfg)]
    with pytest.raises(DataError, match="reasoning-gym dataset 'no_such_task'"):
        load_task("rg:no_such_task", "test", limit=2)


def test_jsonl_with_a_question_template(tmp_path):
    path = write_jsonl(tmp_path / "svamp.jsonl", [{"Body": "Tom has 3 apples.", "Question": "How many?", "Answer": 3.0}])
    [p] = load_task(str(path), question="{Body} {Question}", answer_field="Answer")
    assert (p.question, p.answer) == ("Tom has 3 apples. How many?", "3.0")


def test_jsonl_errors_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q1", "answer": "1"}, "{oops", {"question": "q3", "answer": "3"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_jsonl_task(path)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q1", "answer": "1"}, {"question": "q2"}, {"question": "q3", "answer": ""}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: missing field 'answer' \(fields present: question\)"):
        load_jsonl_task(path)
    assert [p.answer for p in load_jsonl_task(path, skip_invalid=True)] == ["1"]
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'Body'"):
        load_jsonl_task(path, question="{Body}")
    with pytest.raises(DataError, match="file not found"):
        load_task(str(tmp_path / "none.jsonl"))


def test_skip_invalid_counts_malformed_lines_and_bad_rows(tmp_path, caplog):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "q1", "answer": "1"}, "{oops", "[1, 2]",
                                                   {"question": "q4"}, {"question": "q5", "answer": "5"}])
    assert [p.answer for p in load_jsonl_task(path, skip_invalid=True)] == ["1", "5"]
    assert "skipped 3 invalid line(s)" in caplog.text and "mixed.jsonl:2: not valid JSON" in caplog.text


def test_duplicate_ids_are_refused_by_name(tmp_path):
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "question": "q1", "answer": "1"},
                                                {"id": "b", "question": "q2", "answer": "2"},
                                                {"id": "a", "question": "q3", "answer": "3"}])
    with pytest.raises(DataError, match=r"dup\.jsonl: 1 id\(s\) appear on more than one row \('a'\)"):
        load_jsonl_task(path)


def test_task_and_selection_errors():
    with pytest.raises(DataError, match="unknown task 'gsm9k'"):
        load_task("gsm9k")
    with pytest.raises(DataError, match=r"no split 'dev' .*available: test, train, fit, validation"):
        load_task("gsm8k", "dev")
    with pytest.raises(DataError, match="no problems selected"):
        load_task("gsm8k", "test", offset=10_000)


def test_chat_prompt_uses_the_template(tokenizer):
    text = chat_prompt(tokenizer, "What is 2+2?", "Answer with ####.")
    assert text.endswith("<|im_start|>assistant\n") and "What is 2+2?\nAnswer with ####." in text


def test_reasoning_gym_worked_solutions_become_sft_solutions():
    [p] = load_task("rg:gsm_symbolic", "train", limit=1)
    assert p.solution and p.solution.endswith(f"#### {p.answer}") and "answer_cot" not in p.meta
    [q] = load_task("rg:chain_sum", "train", limit=1)
    assert q.solution == f"{q.meta['expression']} = {q.answer}\n#### {q.answer}"  # arithmetic: the expression worked out
    [r] = load_task("rg:letter_counting", "train", limit=1)
    assert r.solution is None  # no worked solution in this dataset: SFT drops it and says so


def test_the_data_folder_is_found_from_any_directory_or_named_by_a_variable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ../shared from here is not the data
    assert (data_root() / "gsm8k" / "test.jsonl").is_file()
    monkeypatch.setenv("BREP_RL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"BREP_RL_DATA=.*nowhere: not a folder"):
        data_root()


def test_a_missing_data_folder_says_where_it_looked(monkeypatch, tmp_path):
    monkeypatch.delenv("BREP_RL_DATA", raising=False)
    monkeypatch.setattr(data, "__file__", str(tmp_path / "brep_rl" / "data.py"))
    with pytest.raises(DataError, match=rf"looked in {tmp_path.parent}/shared/data, {tmp_path}/shared/data; set BREP_RL_DATA"):
        data_root()


def test_importing_the_package_does_not_import_matplotlib():
    code = "import sys, brep_rl, brep_rl.evidence, brep_rl.plots; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_reasoning_gym_draws_until_enough_distinct_problems_and_says_when_there_are_not(caplog):
    two_digits = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
    # 1,100 distinct test problems: more than the first 11,050 draws hold (968)
    problems = load_task("rg:chain_sum", "test", offset=1000, limit=100, rg_config=two_digits)
    assert len({p.question for p in problems}) == 100
    one_digit = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}  # a few hundred sums in all
    few = load_task("rg:chain_sum", "test", limit=500, rg_config=one_digit)
    assert len(few) < 500 and f"only {len(few)} distinct test problems exist" in caplog.text


def test_gsm8k_train_splits_into_fit_and_validation_by_id_and_counts_calculator_steps():
    train = load_task("gsm8k", "train")
    fit, validation = load_task("gsm8k", "fit"), load_task("gsm8k", "validation")
    assert {p.id for p in fit} | {p.id for p in validation} == {p.id for p in train}
    assert not {p.id for p in fit} & {p.id for p in validation}
    assert 0.08 < len(validation) / len(train) < 0.12
    first = train[0]  # Natalia sold clips: <<48/2=24>> and <<48+24=72>>
    assert first.meta["steps"] == 2 and all(p.meta["steps"] >= 0 for p in train)


def test_chain_sum_problems_by_kind_and_as_a_jsonl_task_of_some_kinds(tmp_path):
    cfg = '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}'
    problems = load_task("rg:chain_sum", "train", limit=60, rg_config=json.loads(cfg))
    kinds = {p.id: data.chain_sum_kind(p) for p in problems}
    for p in problems:
        a, op, b = p.meta["expression"].split()
        expected = "additions" if op == "+" else ("negative result" if int(a) < int(b) else "subtraction")
        assert kinds[p.id] == expected, p
    assert data.chain_sum_kind(load_task("gsm8k", "train", limit=1)[0]) is None

    out = tmp_path / "subtractions.jsonl"
    script = Path(__file__).parents[1] / "scripts" / "chain_sum_subset.py"
    subprocess.run([sys.executable, str(script), "--kinds", "subtraction", "negative result",
                    "--rg_config", cfg, "--limit", "60", "--out", str(out)], check=True, capture_output=True)
    kept = load_jsonl_task(out)
    assert [(p.id, p.question, p.answer) for p in kept] == [
        (p.id, p.question, p.answer) for p in problems if kinds[p.id] != "additions"]
    assert 0 < len(kept) < len(problems)
