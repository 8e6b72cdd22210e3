"""The LoRA references: GRPO on llama.cpp rollouts samples and validates with the adapter it trains (exported after
every step) and resumes to the uninterrupted run; it refuses the options only the steering trainer acts on; a saved
adapter merges back for the harness; validation keeps the best adapter as a steering run keeps its best vectors; SFT
trains the adapter alone on a steering SFT run's rows and resumes to the uninterrupted run; the llama.cpp export
refuses what llama.cpp's LoRA adapters cannot hold (it is checked against PEFT on SmolLM2 in tests/rollout)."""

import json
import re

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

import brep_rl.lora
from brep_rl.cli import main as cli_main
from brep_rl.errors import ArtifactError, ConfigError
from brep_rl.lora import load_merged, main, sft_main
from brep_rl.lora_gguf import lora_tensors
from brep_rl.model import load_base
from brep_rl.rollout import Sampling
from brep_rl.validation import ValidationCallback
from testing_utils import CHAIN, lora_grpo_args, rare_hit, sft_args


def test_lora_grpo_on_llama_cpp_samples_from_the_adapter_it_trains(tmp_path):
    main(lora_grpo_args(tmp_path / "run"))
    logs = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
    differences = [row["sampling/sampling_logp_difference/max"] for row in logs if "sampling/sampling_logp_difference/max" in row]
    assert len(differences) == 2  # TRL's importance sampling saw the sampler's log-probs at both steps
    moved = load_file(tmp_path / "run" / "checkpoint-1" / "adapter_model.safetensors")
    assert max(v.abs().max().item() for k, v in moved.items() if "lora_B" in k) > 1e-3  # step 1 changed the policy
    assert differences[1] < 0.05  # ...and step 2 sampled from the changed policy, not the base


def test_validation_on_llama_cpp_measures_the_adapter_of_its_step(tmp_path, monkeypatch):
    gaps = {}

    def measure(self):  # how far llama.cpp's log-probs of a sample are from the live adapter's, at each validation
        prompt = self.prompt_ids[0]
        rollouts = self.backend.generate([prompt], 1, Sampling(8, temperature=1.0, seed=1))
        completion = rollouts.completion_ids[0]
        with torch.no_grad():
            logits = self.trainer.model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        policy = logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        gaps[self.trainer.state.global_step] = (policy - torch.tensor(rollouts.logprobs[0])).abs().max().item()
        return {"accuracy": 0.0, "format": 1.0}

    monkeypatch.setattr(ValidationCallback, "measure", measure)
    main(lora_grpo_args(tmp_path / "run", "--validation_steps", "1", "--validation_limit", "2"))
    assert sorted(gaps) == [0, 1, 2] and max(gaps.values()) < 0.05, gaps


def dynamic_sampling_args(monkeypatch) -> list[str]:
    """Dynamic sampling on a binary reward SmolLM2's short samples earn now and then (the filter reads it too)."""
    monkeypatch.setattr(brep_rl.lora, "reward_function", lambda name, fallback: rare_hit)
    return ["--dynamic_sampling", "true", "--max_refills", "3", "--rewards", "testing_utils:rare_hit"]


def test_lora_grpo_with_dynamic_sampling_trains_on_the_groups_it_scored(tmp_path, monkeypatch):
    main(lora_grpo_args(tmp_path / "run", *dynamic_sampling_args(monkeypatch), "--max_steps", "3"))
    logs = [row for row in json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"] if "reward" in row]
    assert len(logs) == 3
    for log in logs:  # TRL trained on the very groups the filter kept: the same share is without signal
        assert log["frac_reward_zero_std"] == log["dynamic/zero_variance_after"] <= log["dynamic/zero_variance_before"]
    assert any(log["dynamic/zero_variance_after"] < log["dynamic/zero_variance_before"] for log in logs)  # it filtered
    # the refilled groups came from the adapter being trained, as the first draw did
    assert all(log["sampling/sampling_logp_difference/max"] < 0.05 for log in logs[1:])


@pytest.mark.parametrize("dynamic", [False, True], ids=["plain", "dynamic-sampling"])
def test_a_resumed_lora_grpo_run_on_llama_cpp_equals_the_uninterrupted_one(tmp_path, monkeypatch, dynamic):
    extra = dynamic_sampling_args(monkeypatch) if dynamic else []
    main(lora_grpo_args(tmp_path / "whole", *extra))
    main(lora_grpo_args(tmp_path / "cut", *extra, "--max_steps", "1"))  # "killed" after its step-1 checkpoint
    main(lora_grpo_args(tmp_path / "cut", *extra, "--resume_from_checkpoint", "last"))
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    cut = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.allclose(cut[k], whole[k], atol=1e-6) for k in whole)
    step_1 = load_file(tmp_path / "cut" / "checkpoint-1" / "adapter_model.safetensors")
    assert not all(torch.allclose(cut[k], step_1[k]) for k in cut)  # the resumed step trained


def test_lora_grpo_on_llama_cpp_refuses_zero3(tmp_path, monkeypatch):
    monkeypatch.setattr(brep_rl.lora, "zero3_enabled", lambda trainer: True)
    with pytest.raises(ConfigError, match=r"--rollout_backend llama.cpp with a LoRA needs every rank to hold the whole "
                                          r"adapter, which ZeRO-3 shards"):
        main(lora_grpo_args(tmp_path / "run"))


def test_lora_refuses_the_options_its_trainer_would_ignore(tmp_path):
    with pytest.raises(ConfigError, match=r"^--demonstrations, --solutions: the LoRA reference is TRL's GRPO \(with "
                                          r"dynamic sampling at most\), which would ignore them"):
        main(["--output_dir", str(tmp_path / "x"), "--dynamic_sampling", "true", "--demonstrations", "true",
              "--solutions", "stepwise"])
    with pytest.raises(ConfigError, match=r"^--dynamic_sampling with a LoRA needs llama.cpp rollouts"):
        main(["--output_dir", str(tmp_path / "x"), "--dynamic_sampling", "true", "--rollout_backend", "transformers",
              "--model", "smollm2-135m"])
    with pytest.raises(ConfigError, match=r"^--curriculum: .* would ignore it;"):
        main(["--output_dir", str(tmp_path / "x"), "--curriculum", "chain_sum"])
    assert not (tmp_path / "x").exists()  # refused before the output folder is claimed


def test_saved_adapter_merges_into_the_base(tmp_path, tiny_model_dir):
    model, _ = load_base(str(tiny_model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        expected = peft_model(ids).logits
        merged, _ = load_merged(str(tiny_model_dir), tmp_path / "adapter")
        plain, _ = load_base(str(tiny_model_dir))
        assert torch.allclose(merged(ids).logits, expected, atol=1e-4)
        assert not torch.allclose(plain(ids).logits, expected, atol=1e-4)  # the adapter does change the outputs


def test_validation_keeps_the_adapter_of_the_best_step(tmp_path, tiny_model_dir, monkeypatch):
    scripted = iter([0.1, 0.5, 0.3])  # steps 0, 1, 2: step 1 is the best
    monkeypatch.setattr(ValidationCallback, "measure", lambda self: {"accuracy": next(scripted), "format": 1.0})
    out = tmp_path / "lora"
    main(["--model", str(tiny_model_dir), "--task", "rg:chain_sum", "--rg_config", CHAIN, "--limit", "40",
          "--per_device_train_batch_size", "4", "--num_generations", "4", "--max_completion_length", "6",
          "--max_steps", "2", "--save_steps", "1", "--learning_rate", "0.05", "--lora_r", "4", "--eval_limit", "0",
          "--temperature", "1.0", "--disable_tqdm", "true", "--output_dir", str(out),
          "--validation_steps", "1", "--validation_limit", "4",
          "--extra_rewards", "testing_utils:text_length", "--allow_reward_imports", "true"])  # a reward that varies
    rows = [json.loads(line) for line in (out / "validation.jsonl").read_text().splitlines()]
    assert [(r["step"], r["accuracy"]) for r in rows] == [(0, 0.1), (1, 0.5), (2, 0.3)]
    best = load_file(out / "best" / "adapter_model.safetensors")
    at_step_1 = load_file(out / "checkpoint-1" / "adapter_model.safetensors")
    last = load_file(out / "adapter_model.safetensors")
    assert best.keys() == at_step_1.keys()
    assert all(torch.equal(best[k], at_step_1[k]) for k in best)
    assert not all(torch.equal(best[k], last[k]) for k in best)  # the run went on past the best step
    load_merged(str(tiny_model_dir), out / "best")  # the harness can load it


def lora_sft_args(model_dir, out, *extra):
    """The steering SFT tests' short run, less the options of steering vectors."""
    args = sft_args(model_dir, out, *extra)
    for flag in ("--mode", "--radius"):
        i = args.index(flag)
        del args[i : i + 2]
    return args


def test_lora_sft_trains_the_adapter_alone_and_the_harness_loads_it(tmp_path, tiny_model_dir, capsys):
    base = {k: v.clone() for k, v in load_base(str(tiny_model_dir))[0].state_dict().items()}
    trainer = sft_main(lora_sft_args(tiny_model_dir, tmp_path / "run"))
    before, after = map(float, re.search(r"held-out SFT loss \(4 gsm8k train problems never trained on\): "
                                         r"base (\S+) -> LoRA (\S+)", capsys.readouterr().out).groups())
    assert after < before
    trained = trainer.model.get_base_model().state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in trained.items() if "lora_" not in k}
    assert frozen.keys() == base.keys() and all(torch.equal(v, base[k]) for k, v in frozen.items())
    assert trainer.state.global_step == 4 and (tmp_path / "run" / "adapter_model.safetensors").is_file()
    merged, _ = load_merged(str(tiny_model_dir), tmp_path / "run")  # what `brep-rl eval --lora` runs
    plain, _ = load_base(str(tiny_model_dir))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert not torch.allclose(merged(ids).logits, plain(ids).logits, atol=1e-4)


def test_a_resumed_lora_sft_run_equals_the_uninterrupted_one(tmp_path, tiny_model_dir):
    sft_main(lora_sft_args(tiny_model_dir, tmp_path / "whole"))
    sft_main(lora_sft_args(tiny_model_dir, tmp_path / "cut", "--max_steps", "2"))  # "killed" after its step-2 checkpoint
    resumed = sft_main(lora_sft_args(tiny_model_dir, tmp_path / "cut", "--resume_from_checkpoint", "last"))
    assert resumed.state.global_step == 4
    whole = load_file(tmp_path / "whole" / "adapter_model.safetensors")
    cut = load_file(tmp_path / "cut" / "adapter_model.safetensors")
    assert whole.keys() == cut.keys() and all(torch.allclose(cut[k], whole[k], atol=1e-6) for k in whole)
    assert not all(torch.allclose(cut[k], load_file(tmp_path / "cut" / "checkpoint-2" / "adapter_model.safetensors")[k])
                   for k in cut)  # the resumed steps trained


def test_lora_sft_refuses_self_solutions_before_claiming_the_output(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"^--solutions self: rejection sampling draws from the steering vectors"):
        sft_main(lora_sft_args(tiny_model_dir, tmp_path / "x", "--solutions", "self"))
    assert not (tmp_path / "x").exists()


def test_the_llama_cpp_export_refuses_what_a_llama_cpp_lora_cannot_hold(tmp_path, tiny_model_dir):
    model, _ = load_base(str(tiny_model_dir))
    config = model.config
    adapters = {
        "dora": LoraConfig(r=4, target_modules=["q_proj"], use_dora=True),
        "embedding": LoraConfig(r=4, target_modules=["embed_tokens"]),
        "saved-module": LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "plain": LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    }
    for name, lora in adapters.items():
        get_peft_model(load_base(str(tiny_model_dir))[0], lora).save_pretrained(tmp_path / name)
    with pytest.raises(ArtifactError, match="DoRA's magnitude vectors, which llama.cpp's LoRA adapters do not hold"):
        lora_tensors(tmp_path / "dora", config)
    with pytest.raises(ArtifactError, match=r"tensor '.*embed_tokens[.a-z_]*' has no llama.cpp counterpart"):
        lora_tensors(tmp_path / "embedding", config)
    with pytest.raises(ArtifactError, match="fully trained copies of whole modules"):
        lora_tensors(tmp_path / "saved-module", config)
    with pytest.raises(ArtifactError, match="not a PEFT adapter folder"):
        lora_tensors(tmp_path, config)
    config.model_type = "gemma"
    with pytest.raises(ArtifactError, match="supports model types llama, mistral, not 'gemma'"):
        lora_tensors(tmp_path / "plain", config)
    config.model_type = "llama"
    tensors = lora_tensors(tmp_path / "plain", config)
    layers = config.num_hidden_layers
    assert len(tensors) == 2 * 7 * layers  # lora_a and lora_b of the 7 linear weights of every layer
    saved = load_file(tmp_path / "plain" / "adapter_model.safetensors")
    down = "base_model.model.model.layers.0.mlp.down_proj"
    assert torch.equal(torch.from_numpy(tensors["blk.0.ffn_down.weight.lora_a"]), saved[f"{down}.lora_A.weight"])
    assert torch.allclose(torch.from_numpy(tensors["blk.0.ffn_down.weight.lora_b"]), saved[f"{down}.lora_B.weight"] * 4)  # 16 / 4


def test_brep_rl_export_writes_a_lora_adapter_as_a_llama_cpp_lora(tmp_path, tiny_model_dir, capsys):
    import gguf

    get_peft_model(load_base(str(tiny_model_dir))[0], LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
                   ).save_pretrained(tmp_path / "adapter")
    assert cli_main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.gguf"), "--model", str(tiny_model_dir),
                     "--scale", "0.5"]) == 0
    assert "serve it: llama-server -m BASE.gguf --lora " in capsys.readouterr().out
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert (reader.fields["general.type"].contents(), reader.fields["adapter.type"].contents()) == ("adapter", "lora")
    assert reader.fields["general.architecture"].contents() == "llama"
    written = {t.name: np.asarray(t.data).reshape(t.shape[::-1]) for t in reader.tensors}
    expected = lora_tensors(tmp_path / "adapter", load_base(str(tiny_model_dir))[0].config, scale=0.5)
    assert written.keys() == expected.keys() and all(np.array_equal(written[k], v) for k, v in expected.items())
    assert cli_main(["export", str(tmp_path / "adapter"), "--out", str(tmp_path / "b.gguf"), "--bias_only", "true"]) != 0
    assert "is a LoRA adapter, not steering vectors" in capsys.readouterr().err
