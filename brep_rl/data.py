"""Math tasks as lists of Problems: gsm8k, math500, reasoning-gym (`rg:<name>`), or any JSONL file.

Every problem carries its gold final answer; problems with a worked solution also carry it in the
answer format the reward extracts (`... #### N`), for SFT.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from brep_rl.errors import DataError

logger = logging.getLogger(__name__)

MAX_RG_DRAWS = 400_000  # reasoning-gym entries drawn at most to find the distinct problems asked for
DEFAULT_INSTRUCTION = "Solve the problem. End with the final answer on its own line as '#### <answer>'."
_CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")


@dataclass
class Problem:
    id: str
    question: str
    answer: str  # the gold final answer
    solution: str | None = None  # a worked solution ending in "#### <answer>", where the source has one
    meta: dict[str, Any] = field(default_factory=dict)


def data_root() -> Path:
    """The shipped data: $BREP_RL_DATA, else shared/data beside the repository root (../shared/data from the
    checkout), wherever the command runs from."""
    if os.environ.get("BREP_RL_DATA"):
        root = Path(os.environ["BREP_RL_DATA"])
        if not root.is_dir():
            raise DataError(f"BREP_RL_DATA={root}: not a folder")
        return root
    checkout = Path(__file__).resolve().parent.parent
    candidates = (checkout.parent / "shared" / "data", checkout / "shared" / "data")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise DataError(f"cannot find the data folder: looked in {', '.join(map(str, candidates))}; set BREP_RL_DATA")


def gsm8k_final_answer(answer: str) -> str | None:
    if "####" not in answer:
        return None
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def gsm8k_solution(answer: str) -> str:
    """GSM8K's worked answer without the `<<48/2=24>>` calculator notes, ending in "#### N"."""
    body, final = answer.rsplit("####", 1)
    return f"{_CALCULATOR_NOTE.sub('', body).strip()}\n#### {final.strip().replace(',', '')}"


def read_jsonl(path: Path) -> list[tuple[int, dict[str, Any] | DataError]]:
    """(line number, row) pairs; a malformed line comes as a DataError naming file:line, for the caller to raise or
    count."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    rows: list[tuple[int, dict[str, Any] | DataError]] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append((number, DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})")))
                continue
            if not isinstance(row, dict):
                row = DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def _field(row: dict[str, Any], name: str, where: str) -> str:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        present = ", ".join(sorted(row)) or "none"
        raise DataError(f"{where}: missing field {name!r} (fields present: {present})")
    return str(value)


def _rows_to_problems(path: Path, make, skip_invalid: bool) -> list[Problem]:
    """Problems from the rows of a JSONL file. A malformed line or an invalid row stops with its error, or with
    `skip_invalid` is skipped and counted. Two rows with the same id are refused: records are keyed by id."""
    problems, skipped = [], []
    for number, row in read_jsonl(path):
        try:
            if isinstance(row, DataError):
                raise row
            problems.append(make(row, f"{path}:{number}", number))
        except DataError as e:
            if not skip_invalid:
                raise
            skipped.append(str(e))
    if skipped:
        logger.warning("%s: skipped %d invalid line(s) (--skip-invalid), e.g. %s", path, len(skipped), skipped[0])
    counts = Counter(p.id for p in problems)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        shown = ", ".join(map(repr, repeated[:5])) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        raise DataError(f"{path}: {len(repeated)} id(s) appear on more than one row ({shown}); every problem needs its own id")
    return problems


GSM8K_HELD_OUT = ("fit", "validation")  # GSM8K train split by id: train on `fit`, choose checkpoints on `validation`


def load_gsm8k(split: str, skip_invalid: bool = False) -> list[Problem]:
    """GSM8K `train` or `test`; or `fit` and `validation`, the two parts of train (about 90% / 10%, by a stable
    hash of each problem's id), so that checkpoints are chosen without touching test. Each problem's meta holds
    `steps`, the number of calculator annotations (<<a*b=c>>) in its reference solution."""
    source = "train" if split in GSM8K_HELD_OUT else split

    def make(row, where, number):
        raw = _field(row, "answer", where)
        gold = gsm8k_final_answer(raw)
        if gold is None:
            raise DataError(f"{where}: field 'answer' has no '#### <answer>' line")
        return Problem(f"gsm8k-{source}-{number}", _field(row, "question", where), gold, gsm8k_solution(raw),
                       {"steps": len(_CALCULATOR_NOTE.findall(raw))})

    problems = _rows_to_problems(_split_file("gsm8k", source), make, skip_invalid)
    if split in GSM8K_HELD_OUT:
        problems = [p for p in problems if in_split(p.id, "test", test_fraction=0.1) == (split == "validation")]
    return problems


def load_math500(split: str, skip_invalid: bool = False) -> list[Problem]:
    def make(row, where, number):
        gold = _field(row, "answer", where)
        solution = row.get("solution")
        return Problem(
            str(row.get("unique_id", f"math500-{number}")), _field(row, "problem", where), gold,
            f"{solution.strip()}\n#### {gold}" if solution else None,
            {"subject": row.get("subject"), "level": row.get("level")},
        )

    return _rows_to_problems(_split_file("math500", split), make, skip_invalid)


def _split_file(task: str, split: str) -> Path:
    folder = data_root() / task
    path = folder / f"{split}.jsonl"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.jsonl")) + (list(GSM8K_HELD_OUT) if task == "gsm8k" else [])
        raise DataError(f"task {task!r} has no split {split!r} in {folder} (available: {', '.join(available) or 'none'})")
    return path


def load_jsonl_task(
    path: Path, question: str = "{question}", answer_field: str = "answer", solution_field: str | None = None,
    skip_invalid: bool = False,
) -> list[Problem]:
    """Any JSONL file: `question` is a template over the row's fields ("{Body} {Question}"), the gold answer is
    `answer_field` (its part after `####` if it has one), and an optional worked solution is `solution_field`."""
    names = re.findall(r"{(\w+)}", question)
    if not names:
        raise DataError(f"question template {question!r} names no field, e.g. '{{question}}'")

    def make(row, where, number):
        for name in names:
            _field(row, name, where)
        raw = _field(row, answer_field, where)
        gold = gsm8k_final_answer(raw) if "####" in raw else raw.strip()
        solution = None
        if solution_field is not None:
            text = _field(row, solution_field, where)
            solution = text if "####" in text else f"{text.strip()}\n#### {gold}"
        elif "####" in raw:
            solution = gsm8k_solution(raw)
        return Problem(str(row.get("id", f"{path.stem}-{number}")), question.format(**row), gold, solution)

    return _rows_to_problems(path, make, skip_invalid)


def in_split(question: str, split: str, test_fraction: float = 0.2) -> bool:
    """Procedural tasks have no splits: a stable hash of the question puts each problem in exactly one."""
    bucket = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return (bucket < test_fraction) == (split == "test")


def rg_solution(meta: dict[str, Any], answer: str) -> str | None:
    """A worked solution for SFT where a reasoning-gym entry has one: its chain of thought (e.g. gsm_symbolic), or
    for arithmetic datasets (chain_sum, basic_arithmetic) the expression worked out: "15 - 43 = -28\n#### -28"."""
    cot = meta.pop("answer_cot", None)
    if cot:
        return f"{cot.strip()}\n#### {answer}"
    if isinstance(meta.get("expression"), str):
        return f"{meta['expression']} = {answer}\n#### {answer}"
    return None


_SUM = re.compile(r"-?\d+(?: [+-] \d+)+")


def scratchpad_solution(expression: str, stepwise: bool = False) -> str | None:
    """A sum like "1 - 5 + 12" worked left to right, one line per operation, every line an addition or subtraction
    of non-negative numbers with the sign taken outside ("1 - 5 = -(5 - 1) = -4"), where small models err most;
    stepwise, each such operation also takes the second number's place values one at a time
    ("43 - 15 = 43 - 10 - 5 = 33 - 5 = 28"). None for anything but integers joined by + and -."""
    if not _SUM.fullmatch(expression.strip()):
        return None
    first, *rest = expression.split()
    total, lines = int(first), []
    for op, term in zip(rest[::2], map(int, rest[1::2]), strict=True):
        result = total + term if op == "+" else total - term
        a, inner_op, b = _unsigned_operation(total, op, term)
        negate = result < 0
        head = f"{total} {op} {term}"
        forms = [f"-({form})" if negate else form for form in _operation_steps(a, inner_op, b, stepwise)]
        lines.append(" = ".join([head, *(form for form in forms if form != head), str(result)]))
        total = result
    return "\n".join([*lines, f"#### {total}"])


def with_scratchpads(problems: list[Problem], task: str, solutions: str) -> list[Problem]:
    """Each problem's solution replaced by a scratchpad of its sum, stepwise or not as `solutions` says (problems
    that are not sums are dropped)."""
    stepwise = solutions == "stepwise"
    worked = [replace(p, solution=pad) for p in problems
              if (pad := scratchpad_solution(str(p.meta.get("expression", "")), stepwise)) is not None]
    option = f"--solutions {solutions}"
    if not worked:
        raise DataError(f"{option}: no problem of task {task!r} is a sum of integers (+ and - only) "
                        "in its metadata's expression (e.g. rg:chain_sum)")
    if len(worked) < len(problems):
        logger.warning("%s: %d of %d problems are not sums and are left out",
                       option, len(problems) - len(worked), len(problems))
    return worked


def _unsigned_operation(total: int, op: str, term: int) -> tuple[int, str, int]:
    """`total op term` as an operation on non-negative numbers whose result is the magnitude of the original's
    (the larger number first in a subtraction): 1 - 5 -> 5 - 1, -4 + 9 -> 9 - 4, -4 - 2 -> 4 + 2."""
    if total >= 0:
        return (total, op, term) if op == "+" or term <= total else (term, "-", total)
    if op == "-":
        return -total, "+", term
    return (term, "-", -total) if term >= -total else (-total, "-", term)


def _operation_steps(a: int, op: str, b: int, stepwise: bool) -> list[str]:
    """"a op b", and stepwise, b's place values taken one at a time: 967 + 921 = 967 + 900 + 20 + 1 = 1867 + 20 + 1
    = 1887 + 1 (the caller adds the result)."""
    forms = [f"{a} {op} {b}"]
    places = [int(digit) * 10**power for power, digit in enumerate(reversed(str(b))) if digit != "0"][::-1]
    if stepwise and len(places) > 1:
        for i, place in enumerate(places[:-1]):
            forms.append(f" {op} ".join(map(str, [a, *places[i:]])))
            a = a + place if op == "+" else a - place
        forms.append(f"{a} {op} {places[-1]}")
    return forms


CHAIN_SUM_KINDS = ("additions", "subtraction", "negative result")


def chain_sum_kind(problem: Problem) -> str | None:
    """What a chain_sum problem asks: "additions" only, a "subtraction" with a result >= 0, or a "negative result"
    (small models fail most on the last); None for other problems."""
    if problem.meta.get("source_dataset") != "chain_sum":
        return None
    if problem.answer.startswith("-"):
        return "negative result"
    return "subtraction" if " - " in problem.meta["expression"] else "additions"


def rg_problem(entry: dict[str, Any], problem_id: str) -> Problem:
    """A reasoning-gym entry as a Problem: its scalar metadata kept, a worked solution where one can be made."""
    meta = {k: v for k, v in entry.get("metadata", {}).items() if isinstance(v, (str, int, float, bool))}
    answer = str(entry["answer"])
    return Problem(problem_id, entry["question"], answer, rg_solution(meta, answer), meta)


def load_reasoning_gym(name: str, split: str, size: int, seed: int = 0, config: dict[str, Any] | None = None) -> list[Problem]:
    """`size` distinct problems of a reasoning-gym dataset in the given split (train/test disjoint by question).

    Entries are drawn in index order (entry i depends only on the seed and i), in growing batches until `size`
    distinct questions of the split are found or a batch finds none new (or MAX_RG_DRAWS are drawn): then the
    dataset has no more, and the warning says how many there are."""
    import reasoning_gym

    if split not in ("train", "test"):
        raise DataError(f"reasoning-gym tasks have splits 'train' and 'test', got {split!r}")
    problems: list[Problem] = []
    seen: set[str] = set()
    drawn, draws = 0, size * 10 + 50
    while len(problems) < size:
        try:
            generated = reasoning_gym.create_dataset(name, size=draws, seed=seed, **(config or {}))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"reasoning-gym dataset {name!r} with config {config or {}}: {e}") from None
        found_before = len(seen)
        for index in range(drawn, draws):
            entry = generated[index]
            question = entry["question"]
            if question in seen:
                continue
            seen.add(question)
            if not in_split(question, split):
                continue
            problems.append(rg_problem(entry, f"rg-{name}-{split}-{seed}-{index}"))
            if len(problems) == size:
                break
        exhausted = len(seen) == found_before or draws >= MAX_RG_DRAWS  # a batch of repeats only: nothing new left
        if len(problems) < size and exhausted:
            logger.warning("reasoning-gym %s %s: only %d distinct %s problems exist (%d distinct questions in %d "
                           "draws); asked for %d", name, config or {}, len(problems), split, len(seen), draws, size)
            break
        drawn, draws = draws, draws * 2
    return problems


def load_task(
    task: str, split: str = "test", limit: int | None = None, offset: int = 0, seed: int = 0,
    question: str = "{question}", answer_field: str = "answer", solution_field: str | None = None,
    rg_config: dict[str, Any] | None = None, skip_invalid: bool = False,
) -> list[Problem]:
    """Problems of `task`: "gsm8k", "math500", "rg:<reasoning-gym dataset>", or a path to a .jsonl file."""
    if task == "gsm8k":
        problems = load_gsm8k(split, skip_invalid)
    elif task == "math500":
        problems = load_math500(split, skip_invalid)
    elif task.startswith("rg:"):
        problems = load_reasoning_gym(task[3:], split, size=offset + (limit or 200), seed=seed, config=rg_config)
    elif task.endswith(".jsonl") or Path(task).is_file():
        problems = load_jsonl_task(Path(task), question, answer_field, solution_field, skip_invalid)
    else:
        raise DataError(f"unknown task {task!r}: expected gsm8k, math500, rg:<reasoning-gym dataset> or a .jsonl file")
    problems = problems[offset:]
    if limit is not None:
        problems = problems[:limit]
    if not problems:
        raise DataError(f"task {task!r} split {split!r}: no problems selected (offset={offset}, limit={limit})")
    return problems


def json_mapping(value: str | dict | None) -> dict | None:
    """A config mapping given as JSON text (command line) or already a mapping (YAML)."""
    if value is None or isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"expected a JSON object such as '{{\"min_terms\": 2}}', got {value!r} ({e.msg})") from None
    if not isinstance(parsed, dict):
        raise DataError(f"expected a JSON object, got {value!r}")
    return parsed


def chat_prompt(tokenizer, question: str, instruction: str | None = DEFAULT_INSTRUCTION, system_prompt: str | None = None) -> str:
    """The question (+ instruction) through the model's chat template, ready for the answer to follow."""
    content = f"{question}\n{instruction}" if instruction else question
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [{"role": "user", "content": content}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_prompt_ids(tokenizer, problems: list[Problem], instruction: str | None, system_prompt: str | None = None) -> list[list[int]]:
    """The token ids of each problem's chat prompt (no special tokens added: the template has them)."""
    return [tokenizer(chat_prompt(tokenizer, p.question, instruction, system_prompt), add_special_tokens=False).input_ids
            for p in problems]


def prompt_batch(tokenizer, problems: list[Problem], instruction: str | None, system_prompt: str | None = None):
    """(input_ids, attention_mask) of the chat prompts of `problems`, left-padded: e.g. to calibrate site norms."""
    texts = [chat_prompt(tokenizer, p.question, instruction, system_prompt) for p in problems]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask
