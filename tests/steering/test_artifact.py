"""Artifacts on disk: exact round trips, atomic saves, and every check on load."""

import json

import pytest
import torch
from steering_helpers import set_vectors

from brep_rl import ArtifactError, SteeringConfig, SteeringVectors
from testing_utils import PROMPTS, make_tiny


def test_save_load_round_trip_is_exact(tmp_path, tokenizer):
    model = make_tiny("llama", len(tokenizer), tokenizer.pad_token_id)
    steer = SteeringVectors.attach(model, SteeringConfig(mode="bias+prefix", layers=[0, 2], radius=2.0))
    set_vectors(steer)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    expected = model(**enc).logits
    out = steer.save_pretrained(tmp_path / "vec")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "steering.safetensors", "steering_config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["vec"]  # no temporary folder left behind
    saved = json.loads((out / "steering_config.json").read_text())
    assert (saved["base_model"], saved["hidden_size"], saved["num_hidden_layers"], saved["site"]) == ("tiny-llama", 64, 3, "mlp.down_proj")

    fresh = make_tiny("llama", len(tokenizer), tokenizer.pad_token_id)
    loaded = SteeringVectors.from_pretrained(out, fresh)
    assert torch.equal(loaded.bias, steer.bias) and torch.equal(loaded.prefix, steer.prefix)
    assert loaded.config == steer.config
    assert torch.equal(fresh(**enc).logits, expected)


def test_save_replaces_an_existing_artifact_and_keeps_other_files(tmp_path, tiny_llama):
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig())
    steer.save_pretrained(tmp_path / "vec")
    (tmp_path / "vec" / "checkpoint-1").mkdir()
    set_vectors(steer)
    steer.save_pretrained(tmp_path / "vec")
    assert sorted(p.name for p in (tmp_path / "vec").iterdir()) == ["README.md", "checkpoint-1", "steering.safetensors", "steering_config.json"]
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "vec" / "steering.safetensors")["bias"], steer.bias.detach())


def test_artifact_for_another_model_is_refused(tmp_path, tokenizer):
    small = make_tiny("llama", len(tokenizer), tokenizer.pad_token_id)
    SteeringVectors.attach(small, SteeringConfig()).save_pretrained(tmp_path / "vec")
    wider = make_tiny("llama", len(tokenizer), tokenizer.pad_token_id, hidden=32)
    with pytest.raises(ArtifactError, match=r"hidden_size: artifact 64, model 32"):
        SteeringVectors.from_pretrained(tmp_path / "vec", wider)
    qwen = make_tiny("qwen2", len(tokenizer), tokenizer.pad_token_id)
    with pytest.raises(ArtifactError, match=r"model_type: artifact 'llama', model 'qwen2'"):
        SteeringVectors.from_pretrained(tmp_path / "vec", qwen)
    assert not hasattr(wider, "brep_steering") and not hasattr(qwen, "brep_steering")


def test_a_base_of_the_same_shape_with_other_weights_is_refused_unless_not_strict(tmp_path, tokenizer):
    trained_on = make_tiny("llama", len(tokenizer), tokenizer.pad_token_id, seed=0)
    steer = SteeringVectors.attach(trained_on, SteeringConfig())
    with torch.no_grad():
        steer.bias.fill_(0.5)
    steer.save_pretrained(tmp_path / "vec")
    steer.detach()
    other = make_tiny("llama", len(tokenizer), tokenizer.pad_token_id, seed=1)
    with pytest.raises(ArtifactError, match=r"made for base 'tiny-llama' .*same shapes, other weights.*strict=False"):
        SteeringVectors.from_pretrained(tmp_path / "vec", other)
    assert not hasattr(other, "brep_steering")
    loose = SteeringVectors.from_pretrained(tmp_path / "vec", other, strict=False)
    assert float(loose.bias.min()) == 0.5
    loose.detach()
    # the very base in another dtype still fits
    SteeringVectors.from_pretrained(tmp_path / "vec", trained_on.to(torch.bfloat16)).detach()


def test_missing_and_corrupt_artifacts_fail_clearly(tmp_path, tiny_llama):
    with pytest.raises(ArtifactError, match="artifact folder not found"):
        SteeringVectors.from_pretrained(tmp_path / "nope", tiny_llama)
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(mode="bias+prefix"))
    steer.save_pretrained(tmp_path / "vec")
    steer.detach()
    weights = tmp_path / "vec" / "steering.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(ArtifactError, match="corrupt or not a safetensors file"):
        SteeringVectors.from_pretrained(tmp_path / "vec", tiny_llama)
    weights.unlink()
    with pytest.raises(ArtifactError, match="missing steering.safetensors"):
        SteeringVectors.from_pretrained(tmp_path / "vec", tiny_llama)
    assert not hasattr(tiny_llama, "brep_steering")


def test_tensors_that_do_not_fit_the_config_are_refused(tmp_path, tiny_llama):
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(mode="bias"))
    steer.save_pretrained(tmp_path / "vec")
    steer.detach()
    cfg = json.loads((tmp_path / "vec" / "steering_config.json").read_text())
    cfg["mode"] = "bias+prefix"
    (tmp_path / "vec" / "steering_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match="expected tensors .*'prefix'.* got"):
        SteeringVectors.from_pretrained(tmp_path / "vec", tiny_llama)
    assert not hasattr(tiny_llama, "brep_steering")


def test_relative_difference_is_the_worst_layer_scaled_by_its_own_norm():
    from brep_rl.steering import relative_difference

    want = {"bias": torch.tensor([[3.0, 4.0], [0.0, 10.0]]), "prefix": torch.ones(2, 2)}
    got = {"bias": torch.tensor([[3.0, 4.5], [0.0, 10.0]]), "prefix": torch.ones(2, 2)}
    # layer 0 is off by 0.5 on a norm of 5 (0.1); layer 1, off by the same 0.5, would be 0.05
    got_far = {**got, "bias": torch.tensor([[3.0, 4.5], [0.0, 10.5]])}
    assert relative_difference(got, want) == pytest.approx({"bias": 0.1, "prefix": 0.0})
    assert relative_difference(got_far, want)["bias"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="vectors"):
        relative_difference({"bias": want["bias"]}, want)
