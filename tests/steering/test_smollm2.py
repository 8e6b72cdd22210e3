"""Integration tests of the steering core on the real SmolLM2-135M-Instruct."""

import pytest
import torch

from brep_rl import SteeringConfig, SteeringVectors
from testing_utils import PROMPTS, ROOT

pytestmark = pytest.mark.slow


@pytest.fixture
def steered(smollm2):
    model, tok = smollm2
    steer = SteeringVectors.attach(model, SteeringConfig(mode="bias+prefix", prefix_tokens=8))
    yield model, tok, steer
    steer.detach()


def chat(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True) for p in prompts]
    return tok(texts, return_tensors="pt", padding=True)


def test_zero_vectors_are_bit_identical_on_smollm2(smollm2, steered):
    model, tok, steer = steered
    enc = chat(tok, PROMPTS)
    with torch.no_grad():
        steered_logits = model(**enc).logits
        with steer.disabled():
            base_logits = model(**enc).logits
    assert torch.equal(steered_logits, base_logits)


def test_steered_batch_rows_generate_as_alone_on_smollm2(steered):
    model, tok, steer = steered
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a vector of norm ~2 per layer: enough to change what the model says
        steer.bias.copy_(torch.randn(steer.bias.shape, generator=g) * 2 / steer.dim**0.5)
        steer.prefix.copy_(torch.randn(steer.prefix.shape, generator=g) * 4 / steer.dim**0.5)
    enc = chat(tok, PROMPTS)
    width = enc.input_ids.shape[1]
    with torch.no_grad():
        batch = model.generate(**enc, max_new_tokens=16, do_sample=False)[:, width:]
        with steer.disabled():
            base = model.generate(**enc, max_new_tokens=16, do_sample=False)[:, width:]
    assert not torch.equal(batch, base), "the vectors did not change the generations"
    for i, prompt in enumerate(PROMPTS):
        alone_enc = chat(tok, [prompt])
        with torch.no_grad():
            alone = model.generate(**alone_enc, max_new_tokens=16, do_sample=False)[0, alone_enc.input_ids.shape[1]:]
        row = batch[i].tolist()
        alone = alone.tolist()
        n = min(len(alone), len(row))
        assert row[:n] == alone[:n], f"row {i}: {tok.decode(row)!r} vs alone {tok.decode(alone)!r}"


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "artifacts").iterdir() if p.is_dir()))
def test_the_shipped_artifacts_load_on_smollm2_and_get_the_backend_that_can_apply_them(smollm2, name):
    from brep_rl.rollout import TransformersBackend, make_backend
    from brep_rl.rollout.llama_cpp import LlamaCppBackend

    model, tok = smollm2
    artifact = ROOT / "artifacts" / name
    steer = SteeringVectors.from_pretrained(artifact, model)
    try:
        assert steer.layer_ids == list(range(1, 30)) and float(steer.norms()["bias"].max()) > 0.1
        # llama.cpp applies vectors on a layer's output only; those inside the MLP (mlp.up_proj) need transformers
        expected = LlamaCppBackend if steer.config.control_vector_obstacle() is None else TransformersBackend
        assert isinstance(make_backend("auto", model, tok, "smollm2-135m", [steer.config], threads=2), expected)
    finally:
        steer.detach()
