"""Vectors that leave brep-rl: llama.cpp control vectors out and in, baked-in weights, blends, the logit lens."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from brep_rl import ArtifactError, SteeringConfig, SteeringVectors
from brep_rl.analysis import blend, logit_lens, merge_into_weights
from brep_rl.cli import main
from brep_rl.steering.gguf import export_control_vector, read_control_vector
from testing_utils import PROMPTS, make_tiny


def artifact(model, path, mode="bias", layers=(1, 2), site="mlp.down_proj", value=None, seed=0):
    steer = SteeringVectors.attach(model, SteeringConfig(mode=mode, layers=list(layers), site=site))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in steer.vectors().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 if value is None else torch.full(p.shape, value))
    steer.save_pretrained(path)
    steer.detach()
    return path


def test_export_then_import_gives_the_same_vectors(tiny_llama, tmp_path):
    art = artifact(tiny_llama, tmp_path / "vec")
    out = export_control_vector(art, tmp_path / "v.gguf", scale=2.0)
    hint, vectors = read_control_vector(out)
    assert hint == "llama" and list(vectors) == [1, 2]
    assert all(v.dtype == np.float32 and v.ndim == 1 for v in vectors.values())  # what llama.cpp reads
    original = SteeringVectors.from_pretrained(art, tiny_llama)
    expected = original.bias.detach().clone() * 2
    original.detach()
    imported = SteeringVectors.from_gguf(out, tiny_llama)
    assert imported.layer_ids == [1, 2] and torch.equal(imported.bias.detach(), expected)


def test_export_refuses_what_llama_cpp_would_apply_differently(tiny_llama, tmp_path):
    prefix = artifact(tiny_llama, tmp_path / "bp", mode="bias+prefix")
    with pytest.raises(ArtifactError, match=r"applies a control vector at every position.*--bias-only"):
        export_control_vector(prefix, tmp_path / "x.gguf")
    assert list(read_control_vector(export_control_vector(prefix, tmp_path / "b.gguf", bias_only=True))[1]) == [1, 2]
    with pytest.raises(ArtifactError, match=r"these vectors are on 'mlp.up_proj', inside the layer"):
        export_control_vector(artifact(tiny_llama, tmp_path / "up", site="mlp.up_proj"), tmp_path / "y.gguf")
    with pytest.raises(ArtifactError, match="cannot act on layer 0"):
        export_control_vector(artifact(tiny_llama, tmp_path / "l0", layers=(0, 1)), tmp_path / "z.gguf")
    with pytest.raises(ArtifactError, match="not a GGUF file"):
        (tmp_path / "junk.gguf").write_bytes(b"junk")
        read_control_vector(tmp_path / "junk.gguf")


def test_merged_weights_generate_what_the_steered_model_generates(tiny_llama, tokenizer, tmp_path):
    art = artifact(tiny_llama, tmp_path / "vec", layers=(0, 1, 2))
    merged = AutoModelForCausalLM.from_pretrained(merge_into_weights(tiny_llama, tokenizer, art, tmp_path / "merged"))
    steer = SteeringVectors.from_pretrained(art, tiny_llama)
    ids = tokenizer(PROMPTS[:1], return_tensors="pt").input_ids
    steered = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False)
    with steer.disabled():
        base = tiny_llama.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(merged.generate(ids, max_new_tokens=12, do_sample=False), steered)
    assert not torch.equal(base, steered)
    with pytest.raises(ArtifactError, match="prefix vector acts on the prompt"):
        steer.detach()
        merge_into_weights(tiny_llama, tokenizer, artifact(tiny_llama, tmp_path / "p", mode="prefix"), tmp_path / "m2")


def test_blend_is_the_weighted_sum_and_refuses_misfits(tiny_llama, tmp_path):
    a = artifact(tiny_llama, tmp_path / "a", value=1.0)
    b = artifact(tiny_llama, tmp_path / "b", value=3.0)
    assert main(["blend", str(a), str(b), "--weights", "0.25,0.75", "--out", str(tmp_path / "c")]) == 0
    blended = SteeringVectors.from_pretrained(tmp_path / "c", tiny_llama)
    assert torch.allclose(blended.bias.detach(), torch.full_like(blended.bias, 2.5))
    blended.detach()
    # extrapolation, as in the docs: a + 2 x (b - a) = 5, the negative weight written in the = form
    assert main(["blend", str(a), str(b), "--weights=-1,2", "--out", str(tmp_path / "x2")]) == 0
    extrapolated = SteeringVectors.from_pretrained(tmp_path / "x2", tiny_llama)
    assert torch.allclose(extrapolated.bias.detach(), torch.full_like(extrapolated.bias, 5.0))
    extrapolated.detach()
    # no weights: the checkpoint average (`make grpo-soup`), each member named in the provenance
    c = artifact(tiny_llama, tmp_path / "c5", value=5.0)
    assert main(["blend", str(a), str(b), str(c), "--out", str(tmp_path / "mean")]) == 0
    mean = SteeringVectors.from_pretrained(tmp_path / "mean", tiny_llama)
    assert torch.allclose(mean.bias.detach(), torch.full_like(mean.bias, 3.0))
    assert [m["artifact"] for m in mean.config.provenance["blend"]] == [str(a), str(b), str(c)]
    mean.detach()
    other = artifact(tiny_llama, tmp_path / "d", layers=(1,))
    with pytest.raises(ArtifactError, match="do not fit together"):
        blend([a, other], [0.5, 0.5], tmp_path / "e")


def test_logit_lens_finds_the_token_a_vector_points_at(tokenizer):
    model = make_tiny("llama", len(tokenizer), tokenizer.pad_token_id)
    token = tokenizer.convert_tokens_to_ids("Ġseven") if "Ġseven" in tokenizer.get_vocab() else 1234
    vectors = model.get_output_embeddings().weight[token].detach()[None] * 10
    rows = logit_lens(model, tokenizer, vectors, [3], top=5)
    assert rows[0]["layer"] == 3 and rows[0]["promotes"][0][0] == tokenizer.decode([token])
    assert len(rows[0]["demotes"]) == 5


def test_saved_artifacts_carry_a_model_card(tiny_llama, tmp_path):
    card = (artifact(tiny_llama, tmp_path / "vec") / "README.md").read_text()
    assert "base_model: tiny-llama" in card and "SteeringVectors.from_pretrained" in card
    assert "brep-rl export THIS_FOLDER --out vectors.gguf" in card
    for name, kwargs in {"up": {"site": "mlp.up_proj"}, "l0": {"layers": (0, 1)}}.items():
        card = (artifact(tiny_llama, tmp_path / name, **kwargs) / "README.md").read_text()
        assert "SteeringVectors.from_pretrained" in card and "brep-rl export" not in card  # llama.cpp cannot apply them
