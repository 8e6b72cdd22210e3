import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file

from brep_rl.errors import ConfigError
from brep_rl.grpo import SteeringDisabled, SteeringGRPOConfig, check_sampling
from brep_rl.grpo import main as grpo_main
from brep_rl.rollout import BackendUnavailable
from brep_rl.rollout.calculator import calculate
from reward import guarded, reward_failures
from testing_utils import CHAIN, ROOT, edit_records, grpo_args, recorded_rollouts, sft_args


def test_grpo_trains_only_the_vectors_within_the_radius(tiny_model_dir, tmp_path):
    from brep_rl import SteeringVectors, load_base

    base = load_base(str(tiny_model_dir))[0].state_dict()
    trainer = grpo_main(grpo_args(tiny_model_dir, tmp_path / "run"))
    assert trainer.state.global_step == 2 and trainer.ref_model is None  # beta = 0: no reference at all
    assert all(torch.equal(v, base[k]) for k, v in trainer.model.state_dict().items() if not k.startswith("brep_steering"))
    norms = [json.loads(line) for line in (tmp_path / "run" / "norms.jsonl").read_text().splitlines()]
    assert all(max(n["bias"] + n["prefix"]) <= 0.05 + 1e-6 for n in norms)
    assert max(norms[-1]["bias"]) > 0.04  # lr 0.05 pushes them to the bound: the restraint is what holds them
    logged = trainer.state.log_history[0]
    assert {"reward", "frac_reward_zero_std", "bias_norm_max", "verifier/timeouts", "reward_failures"} <= set(logged)
    loaded = SteeringVectors.from_pretrained(tmp_path / "run", load_base(str(tiny_model_dir))[0])
    assert loaded.config.provenance["stage"] == "grpo" and loaded.config.provenance["global_step"] == 2
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert not [p for p in checkpoint.iterdir() if p.name.startswith("model")]  # vectors and optimizer state only
    assert sum(p.stat().st_size for p in checkpoint.iterdir()) < 1_000_000
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "reward" in h] == [1, 2]
    sys.path.insert(0, str(ROOT / "scripts"))
    from plot_run import main as plot_main

    assert plot_main([str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_main([str(tmp_path / "nothing")]) == 2


def test_kl_reference_is_the_same_model_with_steering_disabled(tiny_model_dir, tmp_path):
    trainer = grpo_main(grpo_args(tiny_model_dir, tmp_path / "run", "--beta", "0.1", "--max_steps", "1"))
    ref = trainer.ref_model
    assert isinstance(ref, SteeringDisabled) and ref.policy is trainer.model
    assert list(ref.parameters()) == []  # holds no weights of its own: no second copy of the base
    assert "kl" in trainer.state.log_history[0]
    with torch.no_grad():
        trainer.steer.bias.fill_(0.05)
    ids = torch.randint(3, 1000, (2, 12))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref_logps, _, _ = trainer._get_per_token_logps_and_entropies(ref, ids, mask, 4)
        policy_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4)
        with trainer.steer.disabled():
            base_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 4)
    assert torch.equal(ref_logps, base_logps)
    assert not torch.allclose(ref_logps, policy_logps)


def test_grpo_resume_continues_from_the_last_checkpoint(tiny_model_dir, tmp_path):
    grpo_main(grpo_args(tiny_model_dir, tmp_path / "run", "--max_steps", "1"))
    saved = load_file(tmp_path / "run" / "checkpoint-1" / "steering.safetensors")
    resumed = grpo_main(grpo_args(tiny_model_dir, tmp_path / "run", "--resume_from_checkpoint", "last"))
    assert resumed.state.global_step == 2
    steps = [h["step"] for h in resumed.state.log_history if "loss" in h]
    assert steps == [1, 2]  # step 1 from the checkpoint's history, step 2 trained now
    assert saved["bias"].abs().sum() > 0


def test_a_failing_reward_function_is_counted_not_fatal():
    def broken(prompts=None, completions=(), **kwargs):
        raise RuntimeError("grader crashed")

    before = reward_failures.get("broken", 0)
    assert guarded(broken)(prompts=["p"] * 3, completions=["a", "b", "c"]) == [None, None, None]
    assert reward_failures["broken"] == before + 1


def test_bad_grpo_input_fails_before_any_work(tiny_model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):  # found while parsing: one line, exit 2
        grpo_main(grpo_args(tiny_model_dir, tmp_path / "a", "--per_device_train_batch_size", "6"))
    assert "generation_batch_size (6) must be divisible by num_generations (4)" in capsys.readouterr().err
    rows = tmp_path / "rows.jsonl"
    with pytest.raises(ValueError, match=r"rewards: cannot import 'testing_utils:nope'"):
        grpo_main(grpo_args(tiny_model_dir, tmp_path / "c", "--extra_rewards", "testing_utils:nope"))
    rows.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n" + json.dumps({"question": "2+2?"}) + "\n")
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: missing field 'answer'"):
        grpo_main(grpo_args(tiny_model_dir, tmp_path / "b", "--task", str(rows)))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_grpo_starts_from_sft_vectors(tiny_model_dir, tmp_path):
    """The two-stage recipe: SFT, then GRPO --init_from the SFT artifact."""

    from brep_rl.sft import main as sft_main

    sft = sft_main(sft_args(tiny_model_dir, tmp_path / "sft", "--max_steps", "2"))
    config_file = tmp_path / "sft" / "steering_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"base_model": "/elsewhere/model"}))
    mix = {"rg:basic_arithmetic": {"limit": 3, "rg_config": {"min_digits": 1, "max_digits": 1}}}
    grpo = grpo_main(grpo_args(tiny_model_dir, tmp_path / "grpo", "--init_from", str(tmp_path / "sft"), "--learning_rate", "0",
                               "--max_steps", "1", "--radius", "1.0", "--mix", json.dumps(mix), "--seed", "3"))
    assert torch.equal(grpo.steer.bias, sft.steer.bias) and torch.equal(grpo.steer.prefix, sft.steer.prefix)  # lr 0: kept
    saved = json.loads((tmp_path / "grpo" / "steering_config.json").read_text())
    assert saved["base_model"] == str(tiny_model_dir)  # the base this run loaded, not the SFT artifact's old path
    provenance = saved["provenance"]
    assert provenance["stage"] == "grpo" and provenance["previous"]["stage"] == "sft"
    assert provenance["init_from"] == str(tmp_path / "sft")
    assert provenance["mix"] == mix and len(grpo.train_dataset) == 40 + 3  # the mixed task's problems are trained on
    assert provenance["matmul_gflops"] > 0  # the machine's speed, to read the run's wall-clock by
    # what names the problems trained on (and the validation ones after them): a reasoning-gym draw depends on the seed
    assert (provenance["seed"], provenance["offset"], provenance["limit"]) == (3, 0, 40)


def test_grpo_trains_only_on_the_problems_an_eval_run_failed(tiny_model_dir, tokenizer, tmp_path):
    """--train_on_failures: the training set is the problems the run's steered model got wrong, nothing else."""
    from transformers import AutoModelForCausalLM

    from brep_rl import SteeringConfig, SteeringVectors
    from brep_rl.arguments import EvalSettings
    from brep_rl.data import load_task
    from brep_rl.evaluate import evaluate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    steer = SteeringVectors.attach(model, SteeringConfig())
    start = steer.save_pretrained(tmp_path / "start")
    steer.detach()
    settings = EvalSettings(task="rg:chain_sum", split="train", limit=6, rg_config=CHAIN, max_new_tokens=4)
    problems = load_task("rg:chain_sum", "train", 6, rg_config=json.loads(CHAIN))
    run = tmp_path / "run"
    evaluate(model, tokenizer, settings, [str(start)], [1.0], run, problems=problems, progress=False)
    edit_records(run, lambda r: r.update(correct=r["problem_id"] in (problems[0].id, problems[3].id)))  # solved: 2
    grpo = grpo_main(grpo_args(tiny_model_dir, tmp_path / "grpo", "--train_on_failures", str(run), "--max_steps", "1"))
    assert sorted(grpo.train_dataset["answer"]) == sorted(p.answer for i, p in enumerate(problems) if i not in (0, 3))
    provenance = json.loads((tmp_path / "grpo" / "steering_config.json").read_text())["provenance"]
    assert provenance["train_on_failures"] == str(run) and provenance["problems"] == 4
    with pytest.raises(ConfigError, match=r"evaluated other problems than the training set \(rg_config: run"):
        grpo_main(grpo_args(tiny_model_dir, tmp_path / "bad", "--train_on_failures", str(run), "--rg_config", "{}"))
    with pytest.raises(ConfigError, match=r"evaluated other problems than the training set \(seed: run 0, training 1\)"):
        grpo_main(grpo_args(tiny_model_dir, tmp_path / "bad", "--train_on_failures", str(run), "--seed", "1"))


def test_a_launch_that_does_not_fit_the_machine_is_refused(tiny_model_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        grpo_main(grpo_args(tiny_model_dir, tmp_path / "a", "--deepspeed", str(tmp_path / "nope.json")))
    assert re.search(r"--deepspeed: config .*nope\.json not found", capsys.readouterr().err)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str((os.cpu_count() or 1) + 1))
    with pytest.raises(SystemExit):
        grpo_main(grpo_args(tiny_model_dir, tmp_path / "b"))
    assert re.search(r"processes on this machine but only \d+ CPU cores", capsys.readouterr().err)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_grpo_with_llama_cpp_rollouts_on_smollm2(tmp_path):
    """Rollouts by llama.cpp, the loss by transformers: the vectors reach llama.cpp after every step."""
    out = tmp_path / "run"
    args = grpo_args("smollm2-135m", out, "--rollout_backend", "llama.cpp", "--max_completion_length", "12",
                     "--radius", "1.0", "--learning_rate", "0.02", "--eval_limit", "4", "--eval_max_new_tokens", "8")
    trainer = grpo_main(args)
    assert trainer.backend.name == "llama.cpp"
    logs = [entry for entry in trainer.state.log_history if "rollout/logp_diff_mean" in entry]
    assert len(logs) == 2 and all(entry["rollout/logp_diff_mean"] < 0.01 for entry in logs)  # sampler = trainer
    # TRL's truncated importance sampling ran on these rollouts: ratios near 1, capped at 3
    assert all(0.5 < entry["sampling/importance_sampling_ratio/mean"] < 1.5 for entry in logs)
    assert all(entry["sampling/importance_sampling_ratio/max"] <= 3.0 for entry in logs)
    saved = load_file(str(out / "steering.safetensors"))
    rows = [layer - 1 for layer in trainer.steer.config.layers]  # llama.cpp's row r is layer r + 1
    pushed = torch.from_numpy(trainer.backend.unsteered[rows])
    assert saved["bias"].abs().max() > 0 and torch.allclose(pushed, saved["bias"])  # the last step's vectors, pushed
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["settings"]["backend"] == "llama.cpp" and summary["models"]["base"]["problems"] == 4


@pytest.mark.slow
def test_grpo_with_the_calculator_trains_only_on_what_the_policy_wrote(tmp_path, monkeypatch):
    """Rollouts with the calculator in the loop: the results it wrote reach TRL as env_mask 0 (out of the loss)."""
    rollouts = recorded_rollouts(monkeypatch)
    out = tmp_path / "run"
    # the GSM8K SFT vectors write "16 * 3 = 48"-style lines within a few tokens
    trainer = grpo_main(["--model", "smollm2-135m", "--init_from", str(ROOT / "artifacts" / "smollm2-gsm8k"),
                         "--task", "gsm8k", "--split", "fit", "--limit", "8", "--rollout_backend", "llama.cpp",
                         "--calculator", "true", "--per_device_train_batch_size", "8", "--num_generations", "2",
                         "--max_completion_length", "40", "--max_steps", "2", "--save_steps", "2", "--learning_rate",
                         "0.001", "--eval_limit", "0", "--output_dir", str(out), "--disable_tqdm", "true",
                         "--temperature", "0.7", "--logging_steps", "1"])
    tokenizer = trainer.processing_class
    writes = 0
    for output in rollouts:
        for ids, mask in zip(output["completion_ids"], output["env_mask"]):
            assert len(mask) == len(ids)
            for start in (i for i, m in enumerate(mask) if m == 0 and (i == 0 or mask[i - 1])):
                end = next((i for i in range(start, len(mask)) if mask[i]), len(mask))
                before = tokenizer.decode(ids[:start])
                assert before.endswith("=")  # written right after an expression and "="
                result = calculate(before[: before.rfind("=")].rsplit("\n", 1)[-1])
                # the masked run: the result, then the one or two draws the tool restricted (no digit running on)
                run = tokenizer.decode(ids[start:end]).lstrip(" ")
                if end == len(ids) and len(run) <= len(result):  # cut by max_completion_length
                    assert result.startswith(run)
                else:
                    assert run.startswith(result) and not run[len(result):].lstrip(".,")[:1].isdigit()
                writes += 1
    assert writes >= 3
    # TRL counted only the policy's own tokens: it received the masks
    logs = [entry for entry in trainer.state.log_history if "completions/mean_length" in entry]
    assert [entry["completions/mean_length"] for entry in logs] == pytest.approx(
        [sum(map(sum, output["env_mask"])) / len(output["env_mask"]) for output in rollouts])
    assert all(entry["rollout/logp_diff_mean"] < 0.01 for entry in logs)  # written tokens left out of the comparison


def test_the_calculator_needs_llama_cpp_rollouts(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="--calculator writes into the rollouts"):
        grpo_main(grpo_args(tiny_model_dir, tmp_path / "a", "--calculator", "true", "--rollout_backend", "transformers"))


def test_llama_cpp_rollouts_refuse_what_they_cannot_do(tiny_model_dir, tmp_path):
    with pytest.raises(BackendUnavailable, match="needs a GGUF base"):
        grpo_main(grpo_args(tiny_model_dir, tmp_path / "a", "--rollout_backend", "llama.cpp"))
    with pytest.raises(ValueError, match="does not implement repetition_penalty=1.2"):
        check_sampling(SteeringGRPOConfig(output_dir=str(tmp_path / "b"), repetition_penalty=1.2), FakeBackend())


class FakeBackend:
    name = "fake"


def test_the_loss_forward_runs_each_prompt_once_and_equals_the_plain_forward(tiny_model_dir, tmp_path):
    from trl import GRPOTrainer

    trainer = grpo_main(grpo_args(tiny_model_dir, tmp_path / "run", "--max_steps", "1"))
    steer = trainer.steer
    with torch.no_grad():
        for p in steer.vectors().values():
            p.copy_(torch.randn(p.shape) * 0.5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g) for n in (7, 4)]  # two prompts, left-padded to 7
    ids = torch.stack([torch.cat([torch.full((7 - len(p),), 2), p]) for p in prompts for _ in range(3)])
    mask = torch.stack([torch.cat([torch.zeros(7 - len(p)), torch.ones(len(p))]) for p in prompts for _ in range(3)]).long()
    completions = torch.randint(3, 1000, (6, 5), generator=g)
    completion_mask = torch.ones(6, 5, dtype=torch.long)
    completion_mask[1, 3:] = 0  # a completion that ended early (right padding)
    ids, mask = torch.cat([ids, completions], 1), torch.cat([mask, completion_mask], 1)

    forwards = []
    handle = trainer.model.register_forward_pre_hook(lambda m, a, k: forwards.append(k["input_ids"].shape), with_kwargs=True)
    shared, shared_entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, 5, compute_entropy=True)
    handle.remove()
    assert forwards == [torch.Size([2, 6]), torch.Size([6, 6])]  # 2 distinct prompts once, then 6 x (last prompt token + 5)
    (shared * completion_mask).sum().backward()
    shared_grads = {n: p.grad.clone() for n, p in steer.vectors().items()}
    steer.zero_grad()
    with steer.window(7):
        plain, plain_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, 5,
                                                                                 compute_entropy=True)
    (plain * completion_mask).sum().backward()
    valid = completion_mask.bool()
    assert torch.allclose(shared[valid], plain[valid], atol=1e-5)
    assert torch.allclose(shared_entropy[valid], plain_entropy[valid], atol=1e-5)
    for name, p in steer.vectors().items():
        assert torch.allclose(shared_grads[name], p.grad, atol=1e-5), name


def test_the_penalty_changes_the_grpo_update(tiny_model_dir, tmp_path):
    from brep_rl import SteeringConfig, SteeringVectors, load_base

    start = SteeringVectors.attach(load_base(str(tiny_model_dir))[0], SteeringConfig(mode="bias+prefix", layers=[1, 2]))
    with torch.no_grad():
        start.bias.fill_(0.02)
        start.prefix.fill_(-0.02)
    start.save_pretrained(tmp_path / "start")
    runs = {}
    for name, penalty in (("plain", "0"), ("penalised", "100")):
        trainer = grpo_main(grpo_args(tiny_model_dir, tmp_path / name, "--max_steps", "1", "--radius", "10",
                                      "--init_from", str(tmp_path / "start"), "--penalty", penalty))
        runs[name] = trainer.steer.state_tensors()["bias"]
    assert not torch.equal(runs["plain"], runs["penalised"])
