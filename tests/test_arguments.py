"""The argument layer: every verb's flags, checked while parsing, before any model loads."""

import re
import subprocess
import sys

import pytest

from brep_rl.arguments import GRPODataArguments, parse_layers
from brep_rl.cli import VERBS, main, parse
from brep_rl.data import in_split
from brep_rl.errors import DataError
from testing_utils import ROOT


def test_layer_specs():
    assert parse_layers("1-", 4) == [1, 2, 3]
    assert parse_layers("all", 4) is None
    assert parse_layers("0,2-3", 4) == [0, 2, 3]
    with pytest.raises(ValueError, match="expected 'all' or indices"):
        parse_layers("first", 4)


# ---- choosing a backend -------------------------------------------------------------------------------


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "brep_rl.cli", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, names", [
    (["sft", "--mode", "bais", "--max_steps", "1", "--output_dir", "x"], ["--mode", "'bais'", "bias+prefix"]),
    (["grpo", "--rollout_backend", "vllm"], ["--rollout_backend", "'vllm'", "llama.cpp"]),
    (["eval", "--fallback", "first"], ["--fallback", "'first'", "last_number"]),
])
def test_a_bad_choice_fails_while_parsing_in_one_line(argv, names, tmp_path):
    proc = run_cli(*argv)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"brep-rl {argv[0]}: error:") and all(n in lines[0] for n in names), lines[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["sft", "--layers", "x"], "--layers: expected 'all' or indices"),
    (["eval", "--scale", "abc"], "--scale: expected comma-separated numbers"),
    (["eval", "--limit", "-3"], "--limit: expected a number > 0, got -3"),
    (["grpo", "--limit", "0"], "--limit: expected a number > 0, got 0"),
    (["eval", "--samples", "4"], "--samples 4 with --temperature 0.0"),
    (["eval", "--rg_config", "{bad"], "--rg_config: expected a JSON object"),
    (["sft", "--truncate_prob", "2"], "--truncate_prob: expected a probability"),
    (["grpo", "--hint_share", "0.5"], "--hint_share gives hints to groups dynamic sampling finds unsolved"),
    (["grpo", "--dynamic_sampling", "true", "--hint_share", "1.5"], "--hint_share: expected a share of the solution"),
    (["grpo", "--dynamic_sampling", "true", "--hint_share", "0.5", "--max_steps", "-1"], "give --hint_decay_steps"),
    (["grpo", "--demonstrations", "true"], "--demonstrations guide groups dynamic sampling finds unsolved"),
    (["grpo", "--dynamic_sampling", "true", "--demonstrations", "true", "--hint_share", "0.5"], "choose one"),
    (["grpo", "--demonstration_groups", "every"], "--demonstration_groups every: add --demonstrations true"),
    (["grpo", "--solutions", "stepwise", "--curriculum", "chain_sum"], "keep their own solutions"),
    (["eval", "--layers", "5-2"], "--layers: "),
    (["eval", "--device", "gpu"], "--device: expected auto or a torch device"),
    (["grpo", "--no_such_flag", "1"], "no_such_flag"),
    (["grpo", "--config", "missing.yaml"], "missing.yaml"),
])
def test_a_bad_value_names_the_flag_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_solutions_without_a_way_into_training_stop_before_the_model_loads(tmp_path, capsys):
    assert main(["grpo", "--solutions", "stepwise", "--model", str(tmp_path / "absent"), "--output_dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("brep-rl grpo: error: --solutions stepwise: the solutions only reach training through "
                   "--demonstrations or --hint_share: set one"), err
    assert not (tmp_path / "x").exists()


def test_flags_take_dashes_or_underscores_and_repeat(tmp_path):
    (args,) = parse("brep-rl eval", VERBS["eval"].types, [
        "--max-new-tokens", "7", "--batch_size", "3", "--steering", "a", "--steering", "b", "c", "--scale", "0.5,1"])
    assert (args.max_new_tokens, args.batch_size, args.steering, args.scales()) == (7, 3, ["a", "b", "c"], [0.5, 1.0])
    config = tmp_path / "eval.yaml"
    config.write_text("task: rg:chain_sum\nrg_config: {min_terms: 2}\nlimit: 5\n")
    (args,) = parse("brep-rl eval", VERBS["eval"].types, ["--config", str(config), "--limit", "9"])
    assert (args.task, args.rg_config, args.limit) == ("rg:chain_sum", {"min_terms": 2}, 9)


def test_the_shipped_configs_parse():
    stages = [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "gsm8k").glob("*.yaml"),
              ROOT / "configs" / "evidence" / "sft.yaml", ROOT / "configs" / "evidence" / "grpo.yaml"]
    for config in sorted(stages):
        verb = "lora" if config.name.startswith("lora") else "sft" if "sft" in config.name and "grpo" not in config.name else "grpo"
        parsed = parse(f"brep-rl {verb}", VERBS[verb].types, ["--config", str(config)])
        assert parsed[3].output_dir, config  # the trainer arguments


def test_rewards_are_named_with_weights():
    data = GRPODataArguments(rewards=["accuracy"], format_reward_weight=0.2, extra_rewards="testing_utils:text_length")
    assert data.reward_names(None) == (["accuracy", "format", "testing_utils:text_length"], [1.0, 0.2, 1.0])
    assert GRPODataArguments(rewards=["accuracy", "format"]).reward_names([1.0, 0.5]) == (["accuracy", "format"], [1.0, 0.5])


def test_provenance_records_a_reasoning_gym_config_only_for_a_reasoning_gym_task():
    chain_sum = GRPODataArguments(task="rg:chain_sum", offset=5, limit=10).provenance()
    assert chain_sum["rg_config"]["max_terms"] == 2 and (chain_sum["offset"], chain_sum["limit"]) == (5, 10)
    assert GRPODataArguments(task="gsm8k", split="fit").provenance()["rg_config"] is None  # not chain_sum's default


ARITHMETIC = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1, "operators": ["+", "-", "*"]}


def test_a_mix_adds_train_split_problems_of_other_tasks():
    data = GRPODataArguments(task="rg:chain_sum", limit=10, mix={"rg:basic_arithmetic": {"limit": 8, "rg_config": ARITHMETIC}})
    problems = data.training_problems(seed=0)
    assert [p.id for p in problems[:10]] == [p.id for p in data.load_problems(seed=0)]  # the task first, unchanged
    mixed = problems[10:]
    assert len(mixed) == 8 and {p.meta["source_dataset"] for p in mixed} == {"basic_arithmetic"}
    assert all(in_split(p.question, "train") for p in mixed)  # never a test-split problem
    numbers = [n for p in mixed for n in re.findall(r"\d+", p.meta["expression"])]
    assert max(map(len, numbers)) == 1 and not any("/" in p.meta["expression"] for p in mixed)  # its rg_config applied


@pytest.mark.parametrize("mix, message", [
    ({"rg:basic_arithmetic": 4}, "expected"),
    ({"rg:basic_arithmetic": {"limit": 0}}, "expected"),
    ({"rg:basic_arithmetic": {"limit": 4, "weight": 2}}, "expected"),
    ('["rg:basic_arithmetic"]', "expected a JSON object"),
])
def test_bad_mixes_are_refused_with_the_task(mix, message):
    with pytest.raises(ValueError, match=f"--mix.*{message}"):
        GRPODataArguments(mix=mix)


def test_a_mix_needs_other_tasks_and_no_curriculum():
    with pytest.raises(ValueError, match="--mix with --curriculum"):
        GRPODataArguments(mix={"rg:basic_arithmetic": {"limit": 4}}, curriculum="chain_sum")
    same = GRPODataArguments(task="rg:chain_sum", limit=10, mix={"rg:chain_sum": {"limit": 4}})
    with pytest.raises(DataError, match="problem ids repeat"):
        same.training_problems(seed=0)


def test_every_verb_has_a_full_help():
    for verb in VERBS:
        proc = run_cli(verb, "--help")
        assert proc.returncode == 0 and f"usage: brep-rl {verb}" in proc.stdout, proc.stderr[-500:]
    assert "--learning_rate" in run_cli("grpo", "--help").stdout


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    def user_error(*args):
        raise DataError("rows.jsonl:3: missing field 'answer'")

    monkeypatch.setattr(VERBS["inspect"], "run", user_error)
    assert main(["inspect", "some/dir"]) == 2
    assert capsys.readouterr().err.strip() == "brep-rl inspect: error: rows.jsonl:3: missing field 'answer'"

    def bug(*args):
        raise KeyError("a bug")

    monkeypatch.setattr(VERBS["inspect"], "run", bug)
    with pytest.raises(KeyError):
        main(["inspect", "some/dir"])


def test_training_on_failures_takes_the_task_alone():
    with pytest.raises(ValueError, match="does not combine with --mix or --curriculum"):
        GRPODataArguments(train_on_failures="runs/eval", curriculum="chain_sum")
    with pytest.raises(ValueError, match="--failures_of names a model of the --train_on_failures run"):
        GRPODataArguments(failures_of="vec")
