import json
import re

import pytest
import torch

from brep_rl.data import Problem, scratchpad_solution
from brep_rl.errors import ConfigError
from brep_rl.sft import SFTCollator, build_sft_examples
from brep_rl.sft import main as sft_main
from testing_utils import sft_args


def problems(n=3, words=30):
    return [Problem(f"p{i}", f"Question {i}: what is {i} + {i}?", str(2 * i), " ".join(["step"] * words) + f"\n#### {2 * i}") for i in range(n)]


def test_truncated_examples_mask_exactly_the_intended_tokens(tokenizer):
    T = 5
    [full], _ = build_sft_examples(problems(1), tokenizer, truncate_prob=0.0, truncate_tokens=T, max_length=512)
    [cut], stats = build_sft_examples(problems(1), tokenizer, truncate_prob=1.0, truncate_tokens=T, max_length=512)
    start = full["response_start"]
    answer = tokenizer(problems(1)[0].solution, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    # prompt: no loss; whole answer (with end of turn) otherwise
    assert full["labels"][:start] == [-100] * start and full["labels"][start:] == answer
    assert full["input_ids"][start:] == answer
    # truncated: loss on exactly the first T answer tokens, and nothing after them is fed
    assert cut["response_start"] == start and cut["input_ids"] == full["input_ids"][: start + T]
    assert cut["labels"] == [-100] * start + answer[:T]
    assert stats.truncated == 1 and stats.loss_tokens == T


def test_truncation_probability_and_determinism(tokenizer):
    rows, stats = build_sft_examples(problems(200, words=20), tokenizer, truncate_prob=0.9, truncate_tokens=4, max_length=512, seed=3)
    assert 160 <= stats.truncated <= 195
    again, _ = build_sft_examples(problems(200, words=20), tokenizer, truncate_prob=0.9, truncate_tokens=4, max_length=512, seed=3)
    assert rows == again


def test_short_answers_long_prompts_and_missing_solutions_are_counted(tokenizer):
    items = problems(2, words=1) + [Problem("x", "q", "1", None), Problem("long", "word " * 400, "1", "#### 1")]
    rows, stats = build_sft_examples(items, tokenizer, truncate_prob=1.0, truncate_tokens=64, max_length=128)
    assert (stats.examples, stats.no_solution, stats.prompt_too_long, stats.shorter_than_truncation) == (2, 1, 1, 2)
    assert "dropped 1 without a worked solution and 1 with prompts of >= 128 tokens" in stats.describe(128, 64)
    rows, stats = build_sft_examples(problems(1, words=200), tokenizer, truncate_prob=0.0, truncate_tokens=64, max_length=100)
    assert stats.answer_cut == 1 and len(rows[0]["input_ids"]) == 100
    with pytest.raises(ValueError, match="truncate_prob"):
        build_sft_examples(items, tokenizer, truncate_prob=1.5, truncate_tokens=64, max_length=128)


def test_collator_right_pads_with_no_loss_on_padding():
    batch = SFTCollator(pad_token_id=2)([
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "response_start": 1},
        {"input_ids": [5, 6], "labels": [-100, 6], "response_start": 1},
    ])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 6, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [-100, 6, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["response_start"].tolist() == [1, 1]


def test_sft_trains_only_the_vectors_within_the_radius_and_saves_a_loadable_artifact(tiny_model_dir, tmp_path, capsys):
    from brep_rl import SteeringVectors, load_base

    base_before = {k: v.clone() for k, v in load_base(str(tiny_model_dir))[0].state_dict().items()}
    trainer = sft_main(sft_args(tiny_model_dir, tmp_path / "run"))
    assert "held-out SFT loss (4 gsm8k train problems never trained on): base" in capsys.readouterr().out
    model = trainer.model
    assert all(torch.equal(v, base_before[k]) for k, v in model.state_dict().items() if not k.startswith("brep_steering"))
    norms = [json.loads(line) for line in (tmp_path / "run" / "norms.jsonl").read_text().splitlines()]
    assert [n["step"] for n in norms] == [1, 2, 3, 4]
    assert all(max(n["bias"] + n["prefix"]) <= 0.05 + 1e-6 for n in norms)
    assert max(norms[-1]["bias"]) > 0.04  # lr 0.05 pushes them to the bound: the restraint is what holds them
    fresh, _ = load_base(str(tiny_model_dir))
    loaded = SteeringVectors.from_pretrained(tmp_path / "run", fresh)
    assert torch.equal(loaded.bias, trainer.steer.bias.detach())
    assert loaded.config.provenance["stage"] == "sft" and loaded.config.provenance["global_step"] == 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-4").iterdir() if "model" in p.name) == []  # no base weights


def test_sft_resume_continues_from_the_saved_step(tiny_model_dir, tmp_path):
    whole = sft_main(sft_args(tiny_model_dir, tmp_path / "whole"))
    sft_main(sft_args(tiny_model_dir, tmp_path / "cut", "--max_steps", "2"))  # "killed" after its step-2 checkpoint
    resumed = sft_main(sft_args(tiny_model_dir, tmp_path / "cut", "--resume_from_checkpoint", "last"))
    assert resumed.state.global_step == 4
    assert torch.allclose(resumed.steer.bias, whole.steer.bias, atol=1e-6)
    assert torch.allclose(resumed.steer.prefix, whole.steer.prefix, atol=1e-6)


def test_resuming_a_finished_run_trains_no_further_step(tiny_model_dir, tmp_path):
    """`--resume_from_checkpoint last` on a run that reached max_steps (e.g. a matrix re-run after a kill between the
    last checkpoint and its bookkeeping) keeps its vectors: the Trainer alone would run one step past max_steps."""
    whole = sft_main(sft_args(tiny_model_dir, tmp_path / "run"))
    again = sft_main(sft_args(tiny_model_dir, tmp_path / "run", "--resume_from_checkpoint", "last"))
    assert again.state.global_step == 4 and not (tmp_path / "run" / "checkpoint-5").exists()
    assert torch.equal(again.steer.bias, whole.steer.bias)
    assert len(again.state.log_history) == len(whole.state.log_history)  # the run's history, saved beside the artifact


def test_sft_bad_input_fails_before_training(tiny_model_dir, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": f"q{i}", "answer": str(i)}) + "\n" for i in range(10)))
    with pytest.raises(ValueError, match=r"no usable SFT examples .*dropped 6 without a worked solution"):
        sft_main(sft_args(tiny_model_dir, tmp_path / "x", "--task", str(rows), "--limit", "10"))
    config = tmp_path / "c.yaml"
    config.write_text("model: smollm2-135m\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit):
        sft_main(["--config", str(config)])
    assert "Unknown arguments from config file: ['--learning_rat', '0.1']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="checkpointing is not supported with steering vectors"):
        sft_main(sft_args(tiny_model_dir, tmp_path / "y", "--gradient_checkpointing", "true"))
    assert not (tmp_path / "x").exists()


def test_rejection_sampling_trains_on_the_models_own_correct_samples(tiny_model_dir, tmp_path, monkeypatch, caplog):
    from brep_rl import sft
    from testing_utils import rare_hit

    monkeypatch.setattr(sft, "reward_function", lambda name, fallback: rare_hit)  # a reward a random model earns
    trainer = sft_main(sft_args(tiny_model_dir, tmp_path / "rft", "--solutions", "self", "--self_samples", "4",
                                "--self_max_new_tokens", "8", "--max_steps", "2"))
    kept = int(caplog.text.split("rejection sampling: ")[1].split(" of ")[0])
    assert 0 < kept < 20 and trainer.steer.config.provenance["solutions"] == "self"
    assert 0 < len(trainer.train_dataset) <= kept  # an empty sample that "scored" has no tokens to train on
    for row in trainer.train_dataset:  # every target is a sample of the model itself, not the reference solution
        target = trainer.processing_class.decode([t for t in row["labels"] if t != -100], skip_special_tokens=True)
        assert "####" not in target


def test_rejection_sampling_seeds_each_problem_by_its_id(tiny_llama, tokenizer, monkeypatch):
    """A problem's samples do not depend on which problems are drawn with it (nor on their order)."""
    from brep_rl import SteeringConfig, SteeringVectors, sft
    from brep_rl.arguments import SFTDataArguments
    from testing_utils import rare_hit

    monkeypatch.setattr(sft, "reward_function", lambda name, fallback: rare_hit)
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(mode="bias"))
    args = SFTDataArguments(solutions="self", self_samples=4, self_max_new_tokens=8)
    drawn = problems(12)

    def kept(subset):
        return {p.id: p.solution for p in sft.self_solutions(subset, tiny_llama, tokenizer, steer, "tiny", args, seed=0)}

    everything = kept(drawn)
    assert everything  # some problems have a "right" sample
    assert kept(drawn[::-3]) == {i: s for i, s in everything.items() if i in {p.id for p in drawn[::-3]}}


def test_a_resumed_rejection_sampling_run_trains_on_the_samples_it_drew(tiny_model_dir, tmp_path, monkeypatch):
    from brep_rl import sft
    from testing_utils import rare_hit

    monkeypatch.setattr(sft, "reward_function", lambda name, fallback: rare_hit)
    rft = ("--solutions", "self", "--self_samples", "4", "--self_max_new_tokens", "8")
    whole = sft_main(sft_args(tiny_model_dir, tmp_path / "whole", *rft))
    sft_main(sft_args(tiny_model_dir, tmp_path / "cut", *rft, "--max_steps", "2"))  # "killed" after step 2
    drawn = json.loads((tmp_path / "cut" / "self_solutions.json").read_text())["solutions"]
    assert drawn and drawn == json.loads((tmp_path / "whole" / "self_solutions.json").read_text())["solutions"]
    with pytest.raises(ConfigError, match=r"drawn with other settings \(temperature: 0.7 -> 0.9\)"):
        sft_main(sft_args(tiny_model_dir, tmp_path / "cut", *rft, "--self_temperature", "0.9", "--resume_from_checkpoint", "last"))
    monkeypatch.setattr(sft, "self_solutions", lambda *a, **k: pytest.fail("sampled again on resume"))
    resumed = sft_main(sft_args(tiny_model_dir, tmp_path / "cut", *rft, "--resume_from_checkpoint", "last"))
    assert resumed.state.global_step == 4
    assert torch.allclose(resumed.steer.bias, whole.steer.bias, atol=1e-6)
    # killed after the draw, before the first checkpoint: a fresh start is refused, a resume trains on the draw
    sampled = tmp_path / "sampled"
    sampled.mkdir()
    (sampled / "self_solutions.json").write_text((tmp_path / "cut" / "self_solutions.json").read_text())
    with pytest.raises(ConfigError, match=r"holds a previous run \(self_solutions.json\)"):
        sft_main(sft_args(tiny_model_dir, sampled, *rft))
    again = sft_main(sft_args(tiny_model_dir, sampled, *rft, "--resume_from_checkpoint", "last"))
    assert torch.allclose(again.steer.bias, whole.steer.bias, atol=1e-6)


def test_the_calculator_in_rejection_sampling_needs_llama_cpp_and_self_solutions(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sft_main(sft_args(tiny_model_dir, tmp_path / "a", "--self_calculator", "true"))
    assert "--self_calculator samples the model's own solutions: it needs --solutions self" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--calculator\) needs the llama.cpp backend"):  # the tool reached the sampler
        sft_main(sft_args(tiny_model_dir, tmp_path / "b", "--solutions", "self", "--self_calculator", "true"))


@pytest.mark.parametrize("expression, lines", [
    ("967 + 921 - 882", ["967 + 921 = 1888", "1888 - 882 = 1006", "#### 1006"]),
    ("1 - 5 - 2", ["1 - 5 = -(5 - 1) = -4", "-4 - 2 = -(4 + 2) = -6", "#### -6"]),
    ("-4 + 9", ["-4 + 9 = 9 - 4 = 5", "#### 5"]),
    ("-9 + 4", ["-9 + 4 = -(9 - 4) = -5", "#### -5"]),
    ("2 * 3", None),
    ("12", None),
])
def test_a_scratchpad_works_a_sum_one_operation_a_line(expression, lines):
    assert scratchpad_solution(expression) == ("\n".join(lines) if lines else None)


@pytest.mark.parametrize("expression, lines", [
    ("43 - 15", ["43 - 15 = 43 - 10 - 5 = 33 - 5 = 28", "#### 28"]),
    ("15 - 43", ["15 - 43 = -(43 - 15) = -(43 - 10 - 5) = -(33 - 5) = -28", "#### -28"]),
    ("27 + 48", ["27 + 48 = 27 + 40 + 8 = 67 + 8 = 75", "#### 75"]),
    ("-27 + 48", ["-27 + 48 = 48 - 27 = 48 - 20 - 7 = 28 - 7 = 21", "#### 21"]),
    ("-27 - 48", ["-27 - 48 = -(27 + 48) = -(27 + 40 + 8) = -(67 + 8) = -75", "#### -75"]),
    ("5 + 40 - 9", ["5 + 40 = 45", "45 - 9 = 36", "#### 36"]),  # nothing to split off: as without stepwise
    ("967 - 882", ["967 - 882 = 967 - 800 - 80 - 2 = 167 - 80 - 2 = 87 - 2 = 85", "#### 85"]),  # place by place
])
def test_a_stepwise_scratchpad_takes_the_place_values_one_at_a_time(expression, lines):
    assert scratchpad_solution(expression, stepwise=True) == "\n".join(lines)


@pytest.mark.parametrize("solutions", ["scratchpad", "stepwise"])
def test_sft_on_scratchpads_trains_on_the_worked_sums(tiny_model_dir, tmp_path, solutions):
    three_terms = '{"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 2}'
    trainer = sft_main(sft_args(tiny_model_dir, tmp_path / "pad", "--task", "rg:chain_sum", "--rg_config", three_terms,
                                "--solutions", solutions, "--truncate_prob", "0", "--max_steps", "1", "--max_length", "256"))
    targets = [trainer.processing_class.decode([t for t in row["labels"] if t != -100], skip_special_tokens=True)
               for row in trainer.train_dataset]  # two lines of one operation each, then the answer
    assert targets and all(re.fullmatch(r"(-?\d+ [+-] \d+ = [^\n]+\n){2}#### -?\d+", t) for t in targets), targets[:3]
    split_off = [t for t in targets if re.search(r"\d+ [+-] \d*[1-9]0 [+-] [1-9]\b", t)]  # "43 - 10 - 5"
    assert bool(split_off) == (solutions == "stepwise"), targets[:3]
    assert trainer.steer.config.provenance["rg_config"] == json.loads(three_terms)  # which sums the vectors learned
    with pytest.raises(ValueError, match=f"--solutions {solutions}: no problem of task 'gsm8k' is a sum"):
        sft_main(sft_args(tiny_model_dir, tmp_path / "gsm", "--solutions", solutions))
