"""The learning-evidence matrix on a tiny random llama: stages run as the user's commands, checkpoints are picked on
validation, picks are reported on test and transfer, re-runs resume instead of retraining."""

import json
import subprocess

import pytest
import yaml

from brep_rl import SteeringVectors, evidence
from brep_rl.checkpoints import TRAINER_STATE
from brep_rl.evidence import PlanError, load_plan, pick, run_plan
from brep_rl.validation import VALIDATION
from testing_utils import ROOT

CHAIN_SUM = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}


def write_plan(tmp_path, model_dir, variants):
    sft = {"task": "rg:chain_sum", "rg_config": json.dumps(CHAIN_SUM), "limit": 40, "heldout": 4, "max_length": 96, "eval_limit": 0,
           "max_steps": 2, "per_device_train_batch_size": 2, "save_steps": 1, "save_total_limit": 2, "report_to": "none"}
    grpo = {"task": "rg:chain_sum", "rg_config": json.dumps(CHAIN_SUM), "limit": 40, "eval_limit": 0, "max_steps": 2,
            "per_device_train_batch_size": 4, "num_generations": 2, "max_completion_length": 4, "save_steps": 1,
            "save_total_limit": 2, "report_to": "none"}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft))
    (tmp_path / "grpo.yaml").write_text(yaml.safe_dump(grpo))
    chain_sum = {"task": "rg:chain_sum", "rg_config": CHAIN_SUM, "max_new_tokens": 4, "limit": 4}
    plan = {
        "model": str(model_dir), "output_dir": str(tmp_path / "runs"), "threads": 2,
        "validation": {**chain_sum, "split": "train", "offset": 40}, "test": {**chain_sum, "split": "test"},
        "transfer": {"task": "gsm8k", "split": "test", "limit": 2, "max_new_tokens": 4}, "scales": [2.0],
        "variants": {name: {**spec, "config": str(tmp_path / spec["config"])} for name, spec in variants.items()},
    }
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return path


@pytest.mark.slow
def test_matrix_trains_picks_on_validation_and_reports(tmp_path, tiny_model_dir, monkeypatch):
    path = write_plan(tmp_path, tiny_model_dir, {
        "sft": {"trainer": "sft", "config": "sft.yaml"},
        "sft+grpo": {"trainer": "grpo", "config": "grpo.yaml", "after": "sft", "args": {"mode": "bias+prefix"}},
        "lora": {"trainer": "lora", "config": "grpo.yaml", "args": {"learning_rate": 1e-4}},
    })
    results = run_plan(load_plan(path))
    runs = tmp_path / "runs"
    for name, variant in results["variants"].items():
        labels = list(variant["validation"])
        assert labels == [f"{name}-step1", f"{name}-step2"]  # one candidate per checkpoint
        best = max(variant["validation"][label]["accuracy"] for label in labels)
        assert variant["validation"][variant["picked"]]["accuracy"] == best
        assert variant["test"]["n"] == 4 and variant["transfer"]["n"] == 2
        assert 0 <= variant["test"]["accuracy"] <= 1 and variant["train_seconds"] > 0
    # SFT -> GRPO starts from the SFT pick, in prefix mode as asked
    command = json.loads((runs / "sft+grpo" / "stage.json").read_text())["command"]
    assert command[command.index("--init_from") + 1] == str(runs / "candidates" / results["variants"]["sft"]["picked"])
    assert command[command.index("--mode") + 1] == "bias+prefix"
    assert (runs / "lora" / "adapter_config.json").is_file()
    # the base is generated once per eval set and shared; the LoRA has its own store where it is the "base"
    test_models = {json.loads(line)["model"] for line in (runs / "eval" / "test" / "samples.jsonl").read_text().splitlines()}
    assert test_models == {"base", results["variants"]["sft"]["picked"], results["variants"]["sft+grpo"]["picked"]}
    assert (runs / "eval" / f"test-{results['variants']['lora']['picked']}" / "samples.jsonl").is_file()
    sweep = results["strength_sweep"]
    assert set(sweep["validation"]) == {"1", "2"}  # scale 1 is the pick's own validation score
    assert sweep["validation"]["1"] == results["variants"][sweep["variant"]]["validation"][sweep["picked"]]
    table = (runs / "results.md").read_text()
    assert all(f"| {name} |" in table for name in ("base", "sft", "sft+grpo", "lora")) and "Strength sweep" in table
    assert (runs / "evidence.png").stat().st_size > 10_000 and all((runs / name / "curves.png").is_file() for name in results["variants"])

    # a re-run trains nothing and reproduces the numbers from the stored records
    def no_training(*args, **kwargs):
        raise AssertionError("a finished stage was trained again")

    monkeypatch.setattr(evidence.subprocess, "run", no_training)
    again = run_plan(load_plan(path))
    assert again["variants"] == json.loads(json.dumps(results["variants"]))


def test_a_failed_stage_names_the_variant(tmp_path, tiny_model_dir, monkeypatch):
    path = write_plan(tmp_path, tiny_model_dir, {"sft": {"trainer": "sft", "config": "sft.yaml"}})
    monkeypatch.setattr(evidence.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1))
    monkeypatch.setattr(evidence, "Evaluator", lambda plan: None)
    with pytest.raises(RuntimeError, match="variant 'sft': training exited with code 1"):
        run_plan(load_plan(path))


@pytest.mark.parametrize("torn, before", [(None, 700.0), (4, 300.0)])
def test_a_stage_resumed_in_several_sittings_reports_the_time_of_one_run(torn, before, tmp_path, tiny_model_dir,
                                                                         tiny_llama, monkeypatch):
    """The equal-wall-clock comparison reads stage.json: a resumed stage counts the time up to the checkpoint it
    resumes from (from its validation log) plus the resumed process's, not the last sitting alone, nor time spent on
    steps redone. A torn checkpoint is not resumed from (`last_checkpoint` skips it), so it counts no time either."""
    path = write_plan(tmp_path, tiny_model_dir, {"sft": {"trainer": "sft", "config": "sft.yaml"}})
    plan = load_plan(path)
    run = plan.output_dir / "sft"
    steer = SteeringVectors.attach(tiny_llama)
    for step in (2, 4):
        steer.save_pretrained(run / f"checkpoint-{step}")
        state = json.dumps({"global_step": step})
        (run / f"checkpoint-{step}" / TRAINER_STATE).write_text(state[:9] if step == torn else state)
    rows = [{"step": 0, "seconds": 5.0}, {"step": 2, "seconds": 300.0}, {"step": 4, "seconds": 700.0},
            {"step": 6, "seconds": 1100.0}]  # step 6 was validated, then killed before its checkpoint
    (run / VALIDATION).write_text("".join(json.dumps(row) + "\n" for row in rows) + '{"step": 7, "seco')
    commands = []
    monkeypatch.setattr(evidence.subprocess, "run", lambda command: commands.append(command) or subprocess.CompletedProcess(command, 0))
    seconds = evidence.train(plan, plan.variants[0], None)
    assert commands[0][-2:] == ["--resume_from_checkpoint", "last"]
    assert before <= seconds < before + 60.0
    assert json.loads((run / "stage.json").read_text())["seconds_before_resume"] == before


@pytest.mark.parametrize("variants, message", [
    ({"x": {"trainer": "ppo", "config": "sft.yaml"}}, r"variants\.x: expected a mapping with trainer one of sft, grpo, lora"),
    ({"x": {"trainer": "sft", "config": "missing.yaml"}}, r"variants\.x: config .*missing\.yaml.* not found"),
    ({"x": {"trainer": "grpo", "config": "grpo.yaml", "after": "y"}}, r"variants\.x: after='y' must name a variant listed before it"),
    ({"s": {"trainer": "sft", "config": "sft.yaml"}, "x": {"trainer": "lora", "config": "grpo.yaml", "after": "s"}},
     r"variants\.x: a LoRA stage cannot start from steering vectors"),
])
def test_bad_plans_are_refused_with_the_field(tmp_path, variants, message):
    path = write_plan(tmp_path, tmp_path, variants)
    with pytest.raises(PlanError, match=message):
        load_plan(path)


def test_plan_refuses_sampled_evaluation(tmp_path):
    path = write_plan(tmp_path, tmp_path, {"s": {"trainer": "sft", "config": "sft.yaml"}})
    plan = yaml.safe_load(path.read_text())
    plan["test"].update(samples=4, temperature=0.7)
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(PlanError, match=r"field 'test': the matrix compares greedy answers.*got samples 4, temperature 0.7"):
        load_plan(path)


def test_plan_missing_fields(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text("model: x\n")
    with pytest.raises(PlanError, match=r"plan\.yaml: missing field\(s\) output_dir, variants, validation, test, transfer"):
        load_plan(path)


def test_validation_ties_go_where_the_plan_says(tmp_path):
    accuracy = {"a-step10": 0.58, "a-step20": 0.59, "a-step30": 0.57, "a-step40": 0.59}
    assert pick(accuracy) == pick(accuracy, "later") == "a-step40"
    assert pick(accuracy, "earlier") == "a-step20"
    assert pick({"a-step10": 0.5, "a-step20": 0.6}, "earlier") == "a-step20"  # a tie rule, not a preference
    path = write_plan(tmp_path, tmp_path, {"s": {"trainer": "sft", "config": "sft.yaml"}})
    assert load_plan(path).ties == "later"
    plan = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**plan, "ties": "earlier"}))
    assert load_plan(path).ties == "earlier"
    path.write_text(yaml.safe_dump({**plan, "ties": "first"}))
    with pytest.raises(PlanError, match=r"plan\.yaml: field 'ties': expected one of later, earlier, got 'first'"):
        load_plan(path)


@pytest.mark.parametrize("config", sorted((ROOT / "configs" / "evidence").glob("smollm2_*.yaml")), ids=lambda p: p.name)
def test_the_shipped_matrices_load(config, monkeypatch):
    monkeypatch.chdir(ROOT)  # stage configs are relative to the checkout, as `make evidence` runs them
    plan = load_plan(config)
    assert plan.variants and all(v.config.is_file() for v in plan.variants)
