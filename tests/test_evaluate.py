import json

import pytest
import torch

from brep_rl import SteeringConfig, SteeringVectors
from brep_rl.arguments import EvalSettings, GRPODataArguments
from brep_rl.cli import main as cli_main
from brep_rl.data import Problem, chat_prompt_ids
from brep_rl.errors import ConfigError
from brep_rl.evaluate import evaluate, failed_problems, labelled_paths
from brep_rl.rollout import Sampling, TransformersBackend
from testing_utils import edit_records

PROBLEMS = [Problem(f"p{i}", f"What is {i} + {i}?", str(2 * i)) for i in range(5)]


@pytest.fixture
def artifact(tmp_path, tokenizer):
    from testing_utils import make_tiny

    model = make_tiny("llama", len(tokenizer), tokenizer.pad_token_id)
    steer = SteeringVectors.attach(model, SteeringConfig(mode="bias+prefix"))
    with torch.no_grad():
        steer.bias.normal_(0, 0.5)
        steer.prefix.normal_(0, 0.5)
    return str(steer.save_pretrained(tmp_path / "vec"))


def test_eval_compares_base_and_steered_and_writes_reports(tiny_llama, tokenizer, artifact, tmp_path):
    settings = EvalSettings(samples=2, temperature=1.0, max_new_tokens=6, batch_size=4)
    out = tmp_path / "run"
    summary = evaluate(tiny_llama, tokenizer, settings, [artifact], [0.5, 1.0], out, problems=PROBLEMS, progress=False)
    assert list(summary["models"]) == ["base", "vec@0.5", "vec@1"]
    assert set(summary["paired_vs_base"]) == {"vec@0.5", "vec@1"}
    # later variants are paired with the first steered one too: a stage against the one it builds on
    assert summary["reference"] == "vec@0.5" and set(summary["paired_vs_reference"]) == {"vec@1"}
    assert "Δ vs vec@0.5 (95% CI)" in (out / "summary.md").read_text()
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 5 * 2
    assert set(records[0]) >= {"model", "problem_id", "sample", "prompt", "completion", "extracted", "gold", "correct", "tokens"}
    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 5  # header, rule, 3 models
    assert "| pass@2 | maj@2 |" in table[0] and len({line.count("|") for line in table}) == 1
    assert not hasattr(tiny_llama, "brep_steering")  # artifacts are detached afterwards
    base = [r for r in records if r["model"] == "base"]
    with_zero = evaluate(tiny_llama, tokenizer, settings, [artifact], [0.0], tmp_path / "zero", problems=PROBLEMS,
                         progress=False)
    # scale 0 is the base, and every variant draws with the problem's seed: the same samples
    zero = [json.loads(line) for line in (tmp_path / "zero" / "samples.jsonl").read_text().splitlines()]

    def completions(label):
        return [(r["problem_id"], r["sample"], r["completion"]) for r in zero if r["model"] == label]

    assert completions("vec@0") == completions("base") and len({c for *_, c in completions("base")}) > 5
    assert with_zero["models"]["base"]["mean_tokens"] == pytest.approx(sum(r["tokens"] for r in base) / len(base))


def test_eval_compares_lora_adapters_on_the_same_problems_and_takes_them_off_again(tiny_llama, tokenizer, artifact, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from testing_utils import make_tiny

    for seed, name in [(1, "lora-a"), (2, "vec")]:  # "vec" is the steering artifact's label too
        torch.manual_seed(seed)
        adapter = get_peft_model(make_tiny("llama", len(tokenizer), tokenizer.pad_token_id),
                                 LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        adapter.save_pretrained(tmp_path / name)
    loras = [f"adapter-a={tmp_path / 'lora-a'}", str(tmp_path / "vec")]
    ids = torch.tensor([[1, 5, 9, 13]])
    before = tiny_llama(ids).logits
    settings = EvalSettings(max_new_tokens=6, batch_size=4)
    out = tmp_path / "run"
    summary = evaluate(tiny_llama, tokenizer, settings, [artifact], None, out, problems=PROBLEMS, progress=False, loras=loras)
    assert list(summary["models"]) == ["base", "vec", "adapter-a", loras[1]]  # a taken label: the adapter's path
    assert set(summary["paired_vs_reference"]) == {"adapter-a", loras[1]}  # each against the steering artifact
    assert torch.equal(tiny_llama(ids).logits, before)  # the plain model again
    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert "pass@" not in table[0] and len({line.count("|") for line in table}) == 1  # one sample: no pass@1 column
    assert not any("lora" in name for name, _ in tiny_llama.named_modules())
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]

    def completions(label):
        return [r["completion"] for r in records if r["model"] == label]

    with_adapter = PeftModel.from_pretrained(make_tiny("llama", len(tokenizer), tokenizer.pad_token_id), tmp_path / "lora-a").eval()
    expected = TransformersBackend(with_adapter, tokenizer).generate(
        chat_prompt_ids(tokenizer, PROBLEMS, settings.instruction), 1, Sampling(6))
    assert completions("adapter-a") == tokenizer.batch_decode(expected.completion_ids, skip_special_tokens=True)
    assert completions("adapter-a") != completions("base")
    with pytest.raises(ConfigError, match=r"--lora .*vec-missing: not a PEFT adapter folder"):
        evaluate(tiny_llama, tokenizer, settings, [artifact], None, tmp_path / "bad", problems=PROBLEMS, progress=False,
                 loras=[str(tmp_path / "vec-missing")])
    assert not (tmp_path / "bad" / "samples.jsonl").exists()  # refused before anything was generated


def test_eval_is_deterministic_and_resumes_after_a_kill(tiny_llama, tokenizer, tmp_path, monkeypatch):
    settings = EvalSettings(samples=2, temperature=1.0, max_new_tokens=6, batch_size=4)
    first = tmp_path / "a"
    evaluate(tiny_llama, tokenizer, settings, [], None, first, problems=PROBLEMS, progress=False)
    lines = (first / "samples.jsonl").read_text().splitlines()
    second = tmp_path / "b"
    evaluate(tiny_llama, tokenizer, settings, [], None, second, problems=PROBLEMS, progress=False)

    def without_timing(text):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()]

    assert without_timing((second / "samples.jsonl").read_text()) == without_timing("\n".join(lines))  # same seed, same samples

    # simulate a kill: the last batch (2 problems x 2 samples) is lost, the line before it cut short
    (first / "samples.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])
    calls = []
    backend = TransformersBackend(tiny_llama, tokenizer)
    real_generate = backend.generate
    monkeypatch.setattr(backend, "generate", lambda ids, *a: calls.append(len(ids)) or real_generate(ids, *a))
    evaluate(tiny_llama, tokenizer, settings, [], None, first, problems=PROBLEMS, progress=False, backend=backend)
    assert calls == [2]  # problems 3 and 4 only: p3 lost a sample, p4 both
    records = [json.loads(line) for line in (first / "samples.jsonl").read_text().splitlines()]  # every line whole again
    assert sorted((r["problem_id"], r["sample"]) for r in records) == [(f"p{i}", s) for i in range(5) for s in range(2)]
    # each problem is seeded by itself: the resumed run holds the uninterrupted run's samples
    key = lambda r: (r["problem_id"], r["sample"])  # noqa: E731
    assert sorted(without_timing("\n".join(json.dumps(r) for r in records)), key=key) == sorted(without_timing("\n".join(lines)), key=key)


def test_sampled_eval_draws_the_same_samples_whatever_the_batch_size(tiny_llama, tokenizer, tmp_path):
    def samples(batch_size: int) -> list[tuple[str, int, str]]:
        settings = EvalSettings(samples=2, temperature=1.0, max_new_tokens=6, batch_size=batch_size)
        evaluate(tiny_llama, tokenizer, settings, [], None, tmp_path / str(batch_size), problems=PROBLEMS, progress=False)
        records = [json.loads(line) for line in (tmp_path / str(batch_size) / "samples.jsonl").read_text().splitlines()]
        return sorted((r["problem_id"], r["sample"], r["completion"]) for r in records)

    one_problem_a_call = samples(2)
    assert len({c for _, _, c in one_problem_a_call}) > 5  # sampled apart, not all the same text
    assert samples(10) == one_problem_a_call


def test_resume_with_other_settings_is_refused(tiny_llama, tokenizer, tmp_path):
    evaluate(tiny_llama, tokenizer, EvalSettings(max_new_tokens=4), [], None, tmp_path, problems=PROBLEMS[:1], progress=False)
    with pytest.raises(ValueError, match=r"other settings \(max_new_tokens: 4 -> 5\)"):
        evaluate(tiny_llama, tokenizer, EvalSettings(max_new_tokens=5), [], None, tmp_path, problems=PROBLEMS[:1], progress=False)


def test_a_run_written_before_a_setting_existed_resumes_at_its_default(tiny_llama, tokenizer, tmp_path):
    settings = EvalSettings(max_new_tokens=4)
    evaluate(tiny_llama, tokenizer, settings, [], None, tmp_path, problems=PROBLEMS[:1], progress=False)
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["calculator"] is False
    del run["calculator"]  # as an evaluation from before --calculator wrote it
    (tmp_path / "run.json").write_text(json.dumps(run))
    evaluate(tiny_llama, tokenizer, settings, [], None, tmp_path, problems=PROBLEMS[:1], progress=False)
    with pytest.raises(ValueError, match=r"other settings \(calculator: False -> True\)"):
        evaluate(tiny_llama, tokenizer, EvalSettings(max_new_tokens=4, calculator=True), [], None, tmp_path,
                 problems=PROBLEMS[:1], progress=False)


def test_the_calculator_needs_the_llama_cpp_backend(tiny_llama, tokenizer):
    with pytest.raises(ConfigError, match="--calculator\) needs the llama.cpp backend"):
        evaluate(tiny_llama, tokenizer, EvalSettings(max_new_tokens=4, calculator=True), problems=PROBLEMS[:1],
                 progress=False)


def test_resume_refuses_records_of_a_changed_artifact(tiny_llama, tokenizer, artifact, tmp_path):
    settings = EvalSettings(max_new_tokens=3)
    evaluate(tiny_llama, tokenizer, settings, [artifact], None, tmp_path / "run", problems=PROBLEMS[:2], progress=False)
    evaluate(tiny_llama, tokenizer, settings, [artifact], None, tmp_path / "run", problems=PROBLEMS[:2], progress=False)  # same: fine
    steer = SteeringVectors.from_pretrained(artifact, tiny_llama)
    with torch.no_grad():
        steer.bias.mul_(2)
    steer.save_pretrained(artifact)  # retrained in place, same folder name
    steer.detach()
    with pytest.raises(ValueError, match=r"vec changed since .*samples.jsonl was written"):
        evaluate(tiny_llama, tokenizer, settings, [artifact], None, tmp_path / "run", problems=PROBLEMS[:2], progress=False)


def test_artifacts_are_labelled_by_folder_path_where_names_repeat_or_as_given(tmp_path):
    for run in ("a", "b"):
        (tmp_path / run / "best").mkdir(parents=True)
    a, b = str(tmp_path / "a" / "best"), str(tmp_path / "b" / "best")
    assert labelled_paths([a]) == ([a], ["best"])
    assert labelled_paths([a, b]) == ([a, b], [a, b])
    assert labelled_paths([f"sft={a}", b]) == ([a, b], ["sft", "best"])
    (tmp_path / "x=y").mkdir()  # an existing folder is a path, "=" or not
    assert labelled_paths([str(tmp_path / "x=y")]) == ([str(tmp_path / "x=y")], ["x=y"])
    assert labelled_paths([a], "--lora", taken={"best"}) == ([a], [a])  # a steering row's name: the path
    for clash in ([f"sft={a}", f"sft={b}"], [f"base={a}"]):
        with pytest.raises(ConfigError, match="--steering: label.* give each one a label of its own as LABEL=PATH"):
            labelled_paths(clash)
    with pytest.raises(ConfigError, match="--lora: label\\(s\\) 'vec' name more than one model"):
        labelled_paths([f"vec={a}"], "--lora", taken={"vec"})


def test_a_given_label_names_the_rows_and_records(tiny_llama, tokenizer, artifact, tmp_path):
    settings = EvalSettings(max_new_tokens=2)
    summary = evaluate(tiny_llama, tokenizer, settings, [f"pick={artifact}"], None, tmp_path / "run",
                       problems=PROBLEMS[:2], progress=False)
    assert set(summary["models"]) == {"base", "pick"} and "pick" in summary["paired_vs_base"]
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {(r["model"], r["artifact"]) for r in records} == {("base", None), ("pick", artifact)}


def test_summary_json_is_strict_json_with_null_for_undefined_bounds(tiny_llama, tokenizer, artifact, tmp_path):
    settings = EvalSettings(samples=2, temperature=1.0, max_new_tokens=4, batch_size=4)
    evaluate(tiny_llama, tokenizer, settings, [artifact], None, tmp_path / "one", problems=PROBLEMS[:1], progress=False)

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    summary = json.loads((tmp_path / "one" / "summary.json").read_text(), parse_constant=refuse)
    assert summary["paired_vs_base"]["vec"]["low"] is None  # one problem: the interval is undefined, not -Infinity


def test_settings_validation():
    with pytest.raises(ValueError, match="greedy decoding gives identical samples"):
        EvalSettings(samples=4, temperature=0)


def test_cli_reports_bad_input_clearly(tmp_path, capsys, artifact):
    assert cli_main(["eval", "--task", "gsm9k"]) == 2
    assert "unknown task 'gsm9k'" in capsys.readouterr().err
    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"question": "q"}\n')
    assert cli_main(["eval", "--task", str(bad)]) == 2
    assert "rows.jsonl:1: missing field 'answer'" in capsys.readouterr().err


@pytest.mark.slow
def test_end_to_end_eval_on_smollm2(tmp_path, capsys):
    """The CLI on the real model: base vs a steered artifact, 4 problems each, greedy."""
    from brep_rl import load_base

    model, _ = load_base("smollm2-135m")
    steer = SteeringVectors.attach(model, SteeringConfig(mode="bias"))
    with torch.no_grad():
        steer.bias.normal_(0, 0.05)
    steer.save_pretrained(tmp_path / "vec")
    steer.detach()
    code = cli_main(["eval", "--task", "gsm8k", "--limit", "4", "--max-new-tokens", "24", "--batch-size", "4",
                     "--steering", str(tmp_path / "vec"), "--output", str(tmp_path / "run")])
    assert code == 0
    out = capsys.readouterr().out
    assert "| base | 4 |" in out and "| vec | 4 |" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["models"]["base"]["tokens_per_s"] > 0 and "vec" in summary["paired_vs_base"]


def test_layers_ablation_is_the_artifact_with_only_those_layers(tiny_llama, tokenizer, artifact, tmp_path):
    steer = SteeringVectors.from_pretrained(artifact, tiny_llama)
    kept = steer.layer_ids[-1]
    trained = {name: p.detach().clone() for name, p in steer.vectors().items()}
    with steer.restricted([kept]):
        assert all(not p[:-1].any() and torch.equal(p[-1], trained[name][-1]) for name, p in steer.vectors().items())
        only = steer.save_pretrained(tmp_path / "only")
    assert all(torch.equal(p, trained[name]) for name, p in steer.vectors().items())  # restored afterwards
    steer.detach()

    settings = EvalSettings(max_new_tokens=8, batch_size=4)

    def completions(path, artifacts, specs):
        summary = evaluate(tiny_llama, tokenizer, settings, artifacts, None, path, problems=PROBLEMS, progress=False,
                           layer_specs=specs)
        records = [json.loads(line) for line in (path / "samples.jsonl").read_text().splitlines()]
        return summary, {m: [r["completion"] for r in records if r["model"] == m] for m in summary["models"]}

    summary, ablation = completions(tmp_path / "ablation", [artifact], ["all", str(kept)])
    assert list(summary["models"]) == ["base", "vec[all]", f"vec[{kept}]"]
    assert summary["models"][f"vec[{kept}]"]["layers"] == [kept]
    _, reference = completions(tmp_path / "reference", [str(only)], None)
    assert ablation[f"vec[{kept}]"] == reference["only"]
    assert ablation["vec[all]"] != ablation[f"vec[{kept}]"]  # the other layers did steer


def test_layers_the_artifact_does_not_steer_are_refused(tiny_llama, tokenizer, artifact, capsys):
    with pytest.raises(ConfigError, match=r"--layers 9: .* does not steer layers \[9\]"):
        evaluate(tiny_llama, tokenizer, EvalSettings(max_new_tokens=2), [artifact], None, None, problems=PROBLEMS,
                 progress=False, layer_specs=["9"])
    with pytest.raises(SystemExit):
        cli_main(["eval", "--steering", artifact, "--layers", "first"])
    assert "--layers: expected 'all' or indices" in capsys.readouterr().err


def _mark_right(run, label, problem_id, sample=0):
    def edit(r):
        if (r["model"], r["problem_id"], r["sample"]) == (label, problem_id, sample):
            r["correct"] = True

    edit_records(run, edit)


def test_failed_problems_are_those_the_model_got_wrong_in_every_sample(tiny_llama, tokenizer, artifact, tmp_path):
    settings = EvalSettings(samples=2, temperature=1.0, max_new_tokens=4, batch_size=4)
    run = tmp_path / "run"
    evaluate(tiny_llama, tokenizer, settings, [artifact], [1.0], run, problems=PROBLEMS[:4], progress=False)
    _mark_right(run, "vec", "p1", sample=1)  # right once in two samples: solved
    _mark_right(run, "base", "p2")  # the base's records do not count
    # what `brep-rl grpo --train_on_failures` compares with the run: for GSM8K no reasoning-gym config, though GRPO's
    # default rg_config is chain_sum's
    task = GRPODataArguments(task=settings.task, split=settings.split).source()
    assert [p.id for p in failed_problems(PROBLEMS, run, None, task)] == ["p0", "p2", "p3"]  # p4 was not evaluated
    with pytest.raises(ConfigError, match=r"evaluated other problems than the training set \(split: run 'test', training 'train'\)"):
        failed_problems(PROBLEMS, run, None, task | {"split": "train"})
    with pytest.raises(ConfigError, match=r"no records of model 'nope' \(models there: base, vec\)"):
        failed_problems(PROBLEMS, run, "nope", task)
    with pytest.raises(ConfigError, match="not an eval run"):
        failed_problems(PROBLEMS, tmp_path, None, task)
    for problem_id in ("p0", "p2", "p3"):
        _mark_right(run, "vec", problem_id)
    with pytest.raises(ConfigError, match="got every training problem it was evaluated on right"):
        failed_problems(PROBLEMS, run, "vec", task)
    with (run / "samples.jsonl").open("a") as f:
        f.write('{"model": "vec", "problem_id": "p0", "sam')  # an eval killed mid-line: read as a resume would
    with pytest.raises(ConfigError, match="got every training problem it was evaluated on right"):
        failed_problems(PROBLEMS, run, "vec", task)
