"""The LoRA reference: refuses rollout backends it cannot use; a saved adapter merges back for the harness."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from brep_rl.lora import load_merged, main
from brep_rl.model import load_base


def test_lora_refuses_an_external_rollout_backend(tmp_path):
    with pytest.raises(ValueError, match=r"--rollout_backend: LoRA rollouts run through TRL's own generation \(auto or transformers\), got 'llama.cpp'"):
        main(["--output_dir", str(tmp_path), "--rollout_backend", "llama.cpp"])


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
