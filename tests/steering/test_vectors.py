"""SteeringVectors: attach/detach, contexts, trainable parameters, the restraint, precision."""


import pytest
import torch
import torch.nn.functional as F
from steering_helpers import set_vectors

from brep_rl import SteeringConfig, SteeringVectors
from testing_utils import PROMPTS


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


def test_attach_copies_the_callers_config(tiny_llama):
    config = SteeringConfig(mode="bias", layers=[0, 2])
    steer = SteeringVectors.attach(tiny_llama, config)
    assert steer.config is not config and steer.config.hidden_size == 64
    assert (config.hidden_size, config.base_model, config.model_type) == (None, None, None)  # untouched
    steer.detach()
    SteeringVectors.attach(tiny_llama, config).detach()  # the same config serves again


def test_the_penalty_is_computed_in_the_forward_and_reaches_the_gradient(tiny_llama, tokenizer):
    steer = SteeringVectors.attach(tiny_llama, SteeringConfig(penalty=0.5))
    with torch.no_grad():
        steer.bias.normal_(0, 1)
    ids = tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    with torch.no_grad():
        tiny_llama(input_ids=ids)
    assert steer.penalty_term(training=True) == 0.0  # no graph, nothing to add
    tiny_llama(input_ids=ids)
    term = steer.penalty_term(training=True)
    assert torch.allclose(term, 0.5 * steer.bias.pow(2).sum())
    term.backward()
    assert torch.allclose(steer.bias.grad, 2 * 0.5 * steer.bias.detach())
    assert steer.penalty_term(training=True) == 0.0  # taken once
