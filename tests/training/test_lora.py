"""The LoRA reference: refuses rollout backends it cannot use and the options only the steering trainer acts on; a
saved adapter merges back for the harness; validation keeps the best adapter as a steering run keeps its best
vectors."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from brep_rl.errors import ConfigError
from brep_rl.lora import load_merged, main
from brep_rl.model import load_base
from brep_rl.validation import ValidationCallback
from testing_utils import CHAIN


def test_lora_refuses_an_external_rollout_backend(tmp_path):
    with pytest.raises(ValueError, match=r"--rollout_backend: LoRA rollouts run through TRL's own generation \(auto or transformers\), got 'llama.cpp'"):
        main(["--output_dir", str(tmp_path), "--rollout_backend", "llama.cpp"])


def test_lora_refuses_the_options_plain_trl_would_ignore(tmp_path):
    with pytest.raises(ConfigError, match=r"^--dynamic_sampling, --demonstrations, --solutions: the LoRA reference is "
                                          r"plain TRL GRPO, which would ignore them"):
        main(["--output_dir", str(tmp_path / "x"), "--dynamic_sampling", "true", "--demonstrations", "true",
              "--solutions", "stepwise"])
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
