import json

import pytest
import torch
import torch.nn.functional as F

from brep_rl import ArtifactError, SteeringConfig, SteeringVectors
from brep_rl.model import decoder_layers
from conftest import PROMPTS, make_tiny


def set_vectors(steer, scale=0.5, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in steer.vectors().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


class Layer0Probe:
    """Records, for every forward call, which positions got a steering delta at layer 0's site.

    Steering only adds to site outputs, so at layer 0 the site's input is the unsteered one and
    output - linear(input) is exactly what steering added there.
    """

    def __init__(self, model, site="mlp.down_proj"):
        self.deltas = []
        module = decoder_layers(model)[0].get_submodule(site)
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        self.deltas.append((output - F.linear(inputs[0], module.weight, module.bias)).detach())

    def masks(self):
        return [d.abs().sum(-1) > 0 for d in self.deltas]

    def remove(self):
        self.handle.remove()


def first_eos_trim(tokens, eos):
    tokens = tokens.tolist()
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def test_zero_vectors_give_bit_identical_logits_and_generations(tiny, tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    base_logits = tiny(**enc).logits
    base_gen = tiny.generate(**enc, max_new_tokens=8, do_sample=False)
    SteeringVectors.attach(tiny, SteeringConfig(mode="bias+prefix", prefix_tokens=3))
    assert torch.equal(tiny(**enc).logits, base_logits)
    assert torch.equal(tiny.generate(**enc, max_new_tokens=8, do_sample=False), base_gen)


def test_disabled_scaled_and_detach_give_the_base(tiny, tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    base = tiny(**enc).logits
    steer = SteeringVectors.attach(tiny, SteeringConfig(mode="bias+prefix"))
    set_vectors(steer)
    steered = tiny(**enc).logits
    assert not torch.allclose(steered, base)
    with steer.disabled():
        assert torch.equal(tiny(**enc).logits, base)
    with steer.scaled(0.0):
        assert torch.equal(tiny(**enc).logits, base)
    with steer.scaled(2.0):
        assert not torch.allclose(tiny(**enc).logits, steered)
    assert torch.equal(tiny(**enc).logits, steered)  # contexts restore
    steer.detach()
    assert not hasattr(tiny, "brep_steering")
    assert torch.equal(tiny(**enc).logits, base)


def test_only_the_vectors_are_trainable_and_get_gradients(tiny, tokenizer):
    steer = SteeringVectors.attach(tiny, SteeringConfig(mode="bias+prefix"))
    trainable = [n for n, p in tiny.named_parameters() if p.requires_grad]
    assert trainable == ["brep_steering.bias", "brep_steering.prefix"]
    assert all(p.dtype == torch.float32 for p in steer.parameters())
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    loss = tiny(**enc, labels=enc.input_ids).loss
    loss.backward()
    assert steer.bias.grad is not None and steer.bias.grad.abs().sum() > 0
    assert steer.prefix.grad is not None and steer.prefix.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in tiny.named_parameters() if not n.startswith("brep_steering"))


def test_prefix_window_on_right_padded_training_batch(tiny, tokenizer):
    """Each row: prompt positions + first k answer positions, from its own prompt length; padding gets nothing."""
    k = 3
    steer = SteeringVectors.attach(tiny, SteeringConfig(mode="prefix", prefix_tokens=k))
    set_vectors(steer)
    tokenizer.padding_side = "right"
    try:
        prompts = [tokenizer(p).input_ids for p in PROMPTS]
        answers = [tokenizer(a).input_ids for a in [" 42, because twelve plus thirty", " 7", " fifty six is the answer here"]]
        rows = [p + a for p, a in zip(prompts, answers)]
        enc = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    finally:
        tokenizer.padding_side = "left"
    starts = torch.tensor([len(p) for p in prompts])
    probe = Layer0Probe(tiny)
    with torch.no_grad(), steer.window(starts):
        tiny(**enc)
    probe.remove()
    got = probe.masks()[0]
    columns = torch.arange(enc.input_ids.shape[1])
    expected = enc.attention_mask.bool() & (columns[None, :] < starts[:, None] + k)
    assert torch.equal(got, expected)
    # and the delta there is the prefix vector of layer 0
    assert torch.allclose(probe.deltas[0][expected], steer.prefix[0].detach().expand(int(expected.sum()), -1), atol=1e-5)


@pytest.mark.parametrize("mode", ["prefix", "bias", "bias+prefix"])
def test_window_during_left_padded_cached_generation(tiny, tokenizer, mode):
    """Prefill: every real prompt token; decode step j feeds answer token j-1, steered by prefix iff j-1 < k."""
    k = 2
    steer = SteeringVectors.attach(tiny, SteeringConfig(mode=mode, prefix_tokens=k))
    set_vectors(steer)
    if steer.bias is not None:
        with torch.no_grad():
            steer.bias.zero_()  # so the probe sees the prefix term alone
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    probe = Layer0Probe(tiny)
    with torch.no_grad():
        tiny.generate(**enc, max_new_tokens=k + 3, do_sample=False, min_new_tokens=k + 3)
    probe.remove()
    masks = probe.masks()
    assert len(masks) == k + 3  # one prefill + k + 2 decode steps
    if mode == "bias":
        assert all(not m.any() for m in masks)
        return
    assert torch.equal(masks[0], enc.attention_mask.bool())
    for step, mask in enumerate(masks[1:]):
        assert mask.shape == (len(PROMPTS), 1)
        assert bool(mask.all()) == (step < k) and bool(mask.any()) == (step < k), f"decode step {step}"


def test_bias_covers_every_real_token_and_no_padding(tiny, tokenizer):
    steer = SteeringVectors.attach(tiny, SteeringConfig(mode="bias"))
    set_vectors(steer)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    probe = Layer0Probe(tiny)
    with torch.no_grad():
        tiny(**enc)
    probe.remove()
    assert torch.equal(probe.masks()[0], enc.attention_mask.bool())


def test_left_padded_batch_generates_what_each_row_generates_alone(tiny, tokenizer):
    steer = SteeringVectors.attach(tiny, SteeringConfig(mode="bias+prefix", prefix_tokens=2))
    set_vectors(steer, scale=0.3)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        batch = tiny.generate(**enc, max_new_tokens=10, do_sample=False)[:, enc.input_ids.shape[1]:]
        with steer.disabled():
            base = tiny.generate(**enc, max_new_tokens=10, do_sample=False)[:, enc.input_ids.shape[1]:]
    assert not torch.equal(batch, base), "vectors too weak to test anything"
    for i, prompt in enumerate(PROMPTS):
        alone_enc = tokenizer([prompt], return_tensors="pt")
        with torch.no_grad():
            alone = tiny.generate(**alone_enc, max_new_tokens=10, do_sample=False)[0, alone_enc.input_ids.shape[1]:]
        eos = tiny.generation_config.eos_token_id
        assert first_eos_trim(batch[i], eos) == first_eos_trim(alone, eos), f"row {i}"


def test_training_batch_rows_match_rows_alone(tiny, tokenizer):
    steer = SteeringVectors.attach(tiny, SteeringConfig(mode="bias+prefix", prefix_tokens=2))
    set_vectors(steer, scale=0.3)
    rows = [tokenizer(p).input_ids for p in PROMPTS]
    starts = [len(r) - 3 for r in rows]  # pretend the last 3 tokens are the answer
    tokenizer.padding_side = "right"
    try:
        enc = tokenizer.pad({"input_ids": rows}, return_tensors="pt")
    finally:
        tokenizer.padding_side = "left"
    with torch.no_grad(), steer.window(starts):
        batch = tiny(**enc).logits
    for i, row in enumerate(rows):
        with torch.no_grad(), steer.window([starts[i]]):
            alone = tiny(input_ids=torch.tensor([row])).logits[0]
        assert torch.allclose(batch[i, : len(row)], alone, atol=1e-4), f"row {i}"


def test_cached_generation_equals_uncached_recompute(tiny, tokenizer):
    """The window inferred from the cache equals an explicit window on the full sequence."""
    steer = SteeringVectors.attach(tiny, SteeringConfig(mode="bias+prefix", prefix_tokens=3))
    set_vectors(steer, scale=0.3)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    width = enc.input_ids.shape[1]
    with torch.no_grad():
        cached = tiny.generate(**enc, max_new_tokens=6, do_sample=False, min_new_tokens=6)
        ids, mask = enc.input_ids, enc.attention_mask
        for _ in range(6):  # greedy decoding by full recompute, no cache
            with steer.window(width):
                logits = tiny(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(cached, ids)


def test_window_rejects_wrong_batch_size(tiny_llama, tokenizer):
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(mode="prefix"))
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="got 2 response starts for a batch of 3 rows"), steer.window([1, 2]):
        tiny_llama(**enc)


def test_save_load_round_trip_is_exact(tmp_path, tokenizer):
    model = make_tiny("llama", len(tokenizer), tokenizer.pad_token_id)
    steer = SteeringVectors.attach(model, SteeringConfig(mode="bias+prefix", layers=[0, 2], radius=2.0))
    set_vectors(steer)
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    expected = model(**enc).logits
    out = steer.save_pretrained(tmp_path / "vec")
    assert sorted(p.name for p in out.iterdir()) == ["steering.safetensors", "steering_config.json"]
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
    assert sorted(p.name for p in (tmp_path / "vec").iterdir()) == ["checkpoint-1", "steering.safetensors", "steering_config.json"]
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


def test_unknown_site_and_layer_list_what_exists(tiny_llama):
    with pytest.raises(ValueError, match=r"site 'mlp.gate' does not exist .*available sites: .*mlp.down_proj"):
        SteeringVectors.attach(tiny_llama, SteeringConfig(site="mlp.gate"))
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist: the model has 3 decoder layers \(0..2\)"):
        SteeringVectors.attach(tiny_llama, SteeringConfig(layers=[0, 5]))
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(site="mlp.up_proj"))
    assert steer.dim == 128  # BREP's placement: the MLP's inner width
    with pytest.raises(ValueError, match="already has steering vectors attached"):
        SteeringVectors.attach(tiny_llama, SteeringConfig())


def test_project_keeps_every_vector_inside_the_radius(tiny_llama, tokenizer):
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(mode="bias+prefix", radius=0.7))
    set_vectors(steer, scale=1.0)
    inside = steer.bias.detach().clone()
    with torch.no_grad():
        inside[0] *= 0.1 / inside[0].norm()  # one row already inside the ball is left alone
        steer.bias.copy_(inside)
    steer.project()
    for norms in steer.norms().values():
        assert (norms <= 0.7 + 1e-6).all()
    assert torch.allclose(steer.norms()["prefix"], torch.full((3,), 0.7), atol=1e-6)
    assert torch.equal(steer.bias[0], inside[0])
    # direction is kept
    assert torch.allclose(F.cosine_similarity(steer.bias[1:], inside[1:], dim=-1), torch.ones(2), atol=1e-6)


def test_relative_radius_needs_and_uses_calibration(tiny_llama, tokenizer):
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(radius=0.1, radius_relative=True))
    set_vectors(steer, scale=5.0)
    with pytest.raises(ValueError, match="call steer.calibrate"):
        steer.project()
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    site_norms = steer.calibrate(enc.input_ids, enc.attention_mask)
    assert len(site_norms) == 3 and all(n > 0 for n in site_norms)
    steer.project()
    assert torch.allclose(steer.norms()["bias"], 0.1 * torch.tensor(site_norms), rtol=1e-5)


def test_penalty_is_the_weighted_squared_norm(tiny_llama):
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(mode="bias+prefix", penalty=0.5))
    set_vectors(steer)
    expected = 0.5 * (steer.bias.pow(2).sum() + steer.prefix.pow(2).sum())
    assert torch.allclose(steer.penalty(), expected)


def test_vectors_stay_fp32_when_the_model_is_cast(tiny_llama, tokenizer):
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig())
    set_vectors(steer)
    tiny_llama.to(torch.bfloat16)
    assert steer.bias.dtype == torch.float32
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert tiny_llama(**enc).logits.dtype == torch.bfloat16
