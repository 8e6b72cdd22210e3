"""sample_token: one token from one row of logits, as both backends choose it; sample_tokens: the same for a batch."""

import numpy as np
import pytest
import torch
from transformers import TopKLogitsWarper, TopPLogitsWarper

from brep_rl.rollout import Sampling
from brep_rl.rollout.sampling import filter_logits, greedy_tokens_on_device, sample_token, sample_tokens, sequence_rngs


def test_greedy_picks_the_argmax_and_reports_its_log_softmax():
    logits = np.array([1.0, 3.0, 2.0])
    token, logprob = sample_token(logits, Sampling(4), np.random.default_rng(0))
    assert token == 1
    assert logprob == pytest.approx(float(torch.log_softmax(torch.tensor(logits), 0)[1]))


def test_sampling_draws_from_the_tempered_softmax():
    logits = np.array([0.0, 1.0, 2.0, -1.0])
    sampling = Sampling(4, temperature=0.7)
    rng = np.random.default_rng(0)
    draws = [sample_token(logits, sampling, rng) for _ in range(20000)]
    expected = torch.softmax(torch.tensor(logits) / 0.7, 0).numpy()
    counts = np.bincount([t for t, _ in draws], minlength=4) / len(draws)
    assert np.abs(counts - expected).max() < 0.015
    assert all(lp == pytest.approx(np.log(expected[t])) for t, lp in draws[:50])


def test_top_k_and_top_p_restrict_the_candidates():
    logits = np.array([3.0, 2.9, 0.0, -5.0])
    rng = np.random.default_rng(0)
    assert {sample_token(logits, Sampling(4, temperature=1.0, top_k=2), rng)[0] for _ in range(300)} == {0, 1}
    # the two best hold ~0.93 of the mass: top_p 0.9 keeps exactly them
    assert {sample_token(logits, Sampling(4, temperature=1.0, top_p=0.9), rng)[0] for _ in range(300)} == {0, 1}
    assert {sample_token(logits, Sampling(4, temperature=1.0, top_p=0.3), rng)[0] for _ in range(100)} == {0}


@pytest.mark.parametrize("top_k, top_p", [(0, 0.9), (50, 1.0), (50, 0.9), (5, 0.5), (200, 0.95), (1, 0.3)])
def test_top_k_then_top_p_keeps_what_transformers_warpers_keep(top_k, top_p):
    generator = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    for _ in range(20):
        logits = torch.randn(1, 1000, dtype=torch.float64, generator=generator) * 3
        scores = logits.clone()
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        expected = torch.isfinite(scores[0]).numpy()
        kept = np.isfinite(filter_logits(logits[0].numpy(), top_k, top_p))
        assert (kept == expected).all(), (int(kept.sum()), int(expected.sum()))


def test_top_p_measures_mass_within_what_top_k_kept():
    # after top-k 2 the two best hold all the mass between them (0.5 each): top-p 0.5 keeps one, not both
    logits = np.array([2.0, 2.0 - 1e-9, 1.9, 1.8, 1.7])
    assert np.isfinite(filter_logits(logits, top_k=2, top_p=0.5)).sum() == 1


def test_a_seeded_generator_repeats_its_draws_and_leaves_the_global_rng_alone():
    logits = np.random.default_rng(1).normal(size=50)
    sampling = Sampling(4, temperature=1.0, top_p=0.9)
    state = torch.random.get_rng_state()
    first = [sample_token(logits, sampling, np.random.default_rng(7))[0] for _ in range(5)]
    rng = np.random.default_rng(7)
    again = [sample_token(logits, sampling, rng)[0] for _ in range(5)]
    assert first == [again[0]] * 5 and len(set(again)) > 1
    assert torch.equal(torch.random.get_rng_state(), state)


def test_each_completion_draws_from_a_generator_keyed_by_its_prompt_seed_and_index():
    sampling = Sampling(4, temperature=1.0, seed=3)

    def draws(rngs):
        return [rng.random() for rng in rngs]

    together = draws(sequence_rngs(sampling, 2, 3, seeds=[11, 12]))
    assert draws(sequence_rngs(sampling, 1, 3, seeds=[12])) == together[3:]  # a prompt alone draws what it drew in company
    assert len(set(together)) == 6  # every completion its own stream
    unseeded = draws(sequence_rngs(sampling, 2, 3))
    assert unseeded == draws(sequence_rngs(Sampling(4, seed=3), 2, 3)) and unseeded != together  # (sampling.seed, p, j)
    with pytest.raises(ValueError, match="2 prompts, 1 seeds"):
        sequence_rngs(sampling, 2, 3, seeds=[11])


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 0, 0.9), (0.8, 50, 1.0),
                                                       (1.0, 20, 0.8), (0.7, 1, 1.0)])
def test_a_batch_chooses_what_each_row_alone_chooses_with_the_same_draws(temperature, top_k, top_p):
    sampling = Sampling(4, temperature=temperature, top_k=top_k, top_p=top_p)
    scores = torch.randn(16, 3000, generator=torch.Generator().manual_seed(top_k), dtype=torch.float32) * 3
    one_by_one = [np.random.default_rng([5, i]) for i in range(16)]
    batched = [np.random.default_rng([5, i]) for i in range(16)]
    for _ in range(25):
        expected = [sample_token(row, sampling, rng) for row, rng in zip(scores.numpy(), one_by_one)]
        tokens, logprobs = sample_tokens(scores, sampling, batched)
        assert tokens.tolist() == [token for token, _ in expected]
        assert logprobs.tolist() == [logprob for _, logprob in expected]
    assert [rng.random() for rng in one_by_one] == [rng.random() for rng in batched]  # the same number of draws


def test_greedy_on_a_device_chooses_the_argmax_and_its_log_softmax_as_numpy_does():
    """The path a GPU takes for greedy rows, run on the CPU (CI has no GPU)."""
    scores = torch.randn(16, 3000, generator=torch.Generator().manual_seed(0)) * 3
    scores[0, :2] = scores[0].max() + 1  # a tie for the argmax: both take the first
    tokens, logprobs = greedy_tokens_on_device(scores)
    expected = [sample_token(row, Sampling(4), np.random.default_rng(0)) for row in scores.numpy()]
    assert tokens.tolist() == [token for token, _ in expected] and tokens[0] == 0
    assert logprobs.tolist() == pytest.approx([logprob for _, logprob in expected], abs=1e-12)
