"""The forward hooks: where each vector lands, row by row, in training forwards and cached generation."""


import pytest
import torch
from steering_helpers import Layer0Probe, first_eos_trim, set_vectors

from brep_rl import SteeringConfig, SteeringVectors
from testing_utils import PROMPTS


def test_zero_vectors_give_bit_identical_logits_and_generations(tiny, tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    base_logits = tiny(**enc).logits
    base_gen = tiny.generate(**enc, max_new_tokens=8, do_sample=False)
    SteeringVectors.attach(tiny, SteeringConfig(mode="bias+prefix", prefix_tokens=3))
    assert torch.equal(tiny(**enc).logits, base_logits)
    assert torch.equal(tiny.generate(**enc, max_new_tokens=8, do_sample=False), base_gen)


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
