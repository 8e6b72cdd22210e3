"""Generation backends: sampling maths, backend choice, and llama.cpp against transformers on SmolLM2."""

import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model

from brep_rl import SteeringConfig, SteeringVectors
from brep_rl.arguments import EvalSettings
from brep_rl.data import Problem
from brep_rl.errors import ConfigError
from brep_rl.evaluate import evaluate, read_records
from brep_rl.lora_gguf import export_lora_gguf
from brep_rl.model import gguf_as_f32, smollm2_gguf
from brep_rl.rollout import (
    BackendUnavailable,
    Sampling,
    TransformersBackend,
    generate_each,
    hf,
    make_backend,
    stop_token_ids,
)
from brep_rl.rollout.llama_cpp import LlamaCppBackend
from brep_rl.rollout.sampling import greedy_tokens_on_device
from testing_utils import PROMPTS, make_tiny

MORE_PROMPTS = PROMPTS + [
    "A train travels 60 km in 1.5 hours. What is its average speed?",
    "What is 15% of 80?",
    "Solve for x: 3x + 5 = 20.",
]


def test_auto_uses_transformers_for_a_base_that_is_not_gguf(tiny_llama, tokenizer, caplog):
    backend = make_backend("auto", tiny_llama, tokenizer, "some/hf-folder", [], threads=1)
    assert isinstance(backend, TransformersBackend)
    assert "needs a GGUF base" in caplog.text
    with pytest.raises(BackendUnavailable, match="needs a GGUF base"):
        make_backend("llama.cpp", tiny_llama, tokenizer, "some/hf-folder", [], threads=1)
    with pytest.raises(ValueError, match="expected one of auto, transformers, llama.cpp"):
        make_backend("vllm", tiny_llama, tokenizer, "x", [], threads=1)


def test_auto_uses_transformers_for_a_lora_llama_cpp_cannot_hold(tiny_llama, tokenizer, tmp_path, caplog):
    get_peft_model(make_tiny("llama", len(tokenizer), tokenizer.pad_token_id),
                   LoraConfig(r=4, target_modules=["q_proj"], use_dora=True)).save_pretrained(tmp_path / "dora")
    backend = make_backend("auto", tiny_llama, tokenizer, "smollm2-135m", [], threads=1, adapters=[str(tmp_path / "dora")])
    assert isinstance(backend, TransformersBackend)  # every variant, the base too: paired on one backend
    assert "DoRA's magnitude vectors" in caplog.text
    with pytest.raises(BackendUnavailable, match="DoRA's magnitude vectors"):
        make_backend("llama.cpp", tiny_llama, tokenizer, "smollm2-135m", [], threads=1, adapters=[str(tmp_path / "dora")])


def test_auto_without_llama_cpp_installed_uses_transformers(tiny_llama, tokenizer, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    assert isinstance(make_backend("auto", tiny_llama, tokenizer, "smollm2-135m", [], threads=1), TransformersBackend)
    assert "pip install -e '.[fast]'" in caplog.text
    with pytest.raises(BackendUnavailable, match="needs llama-cpp-python"):
        make_backend("llama.cpp", tiny_llama, tokenizer, "smollm2-135m", [], threads=1)


def test_transformers_backend_returns_what_generate_returns(tiny_llama, tokenizer):
    backend = TransformersBackend(tiny_llama, tokenizer)
    ids = [tokenizer(p).input_ids for p in PROMPTS[:2]]
    out = backend.generate(ids, 2, Sampling(5))
    assert out.prompt_ids == [ids[0], ids[0], ids[1], ids[1]] and len(out.completion_ids) == 4
    alone = tiny_llama.generate(torch.tensor([ids[1]]), max_new_tokens=5, do_sample=False)[0, len(ids[1]):].tolist()
    assert out.completion_ids[2][: len(alone)] == alone[: len(out.completion_ids[2])]


def test_only_llama_cpp_runs_a_tool_in_the_loop(tiny_llama, tokenizer):
    ids = [tokenizer(p).input_ids for p in PROMPTS[:2]]
    with pytest.raises(ConfigError, match="needs the llama.cpp backend, not transformers"):
        list(generate_each(TransformersBackend(tiny_llama, tokenizer), ids, 1, Sampling(5), [0, 1], 2, WriteAfter(3, [])))


def test_transformers_backend_samples_with_its_own_seed_and_reports_logprobs(tiny_llama, tokenizer):
    backend = TransformersBackend(tiny_llama, tokenizer)
    ids = [tokenizer(p).input_ids for p in PROMPTS[:2]]
    sampling = Sampling(6, temperature=1.0, seed=11)
    state = torch.random.get_rng_state()
    first = backend.generate(ids, 3, sampling)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is neither used nor reseeded
    torch.manual_seed(123)  # whatever the global state, the call's seed decides
    assert backend.generate(ids, 3, sampling).completion_ids == first.completion_ids
    assert len({tuple(c) for c in first.completion_ids}) > 1
    # each reported log-prob is log softmax of the model's logits at that token
    prompt, completion = ids[0], first.completion_ids[0]
    with torch.no_grad():
        logits = tiny_llama(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1].double()
    expected = torch.log_softmax(logits, -1).gather(1, torch.tensor(completion)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(first.logprobs[0], dtype=torch.float64), expected, atol=1e-4)


def test_greedy_tokens_chosen_the_gpu_way_are_those_the_cpu_way_chooses(tiny_llama, tokenizer, monkeypatch):
    """On a GPU the backend chooses greedy tokens with greedy_tokens_on_device; CI has none, so run it on the CPU."""
    backend = TransformersBackend(tiny_llama, tokenizer)
    ids = [tokenizer(p).input_ids for p in PROMPTS]
    cpu_way = backend.generate(ids, 1, Sampling(8))
    monkeypatch.setattr(hf, "sample_tokens", lambda scores, sampling, rngs: greedy_tokens_on_device(scores))
    gpu_way = backend.generate(ids, 1, Sampling(8))
    assert gpu_way.completion_ids == cpu_way.completion_ids
    assert [len(lp) for lp in gpu_way.logprobs] == [len(c) for c in gpu_way.completion_ids]
    assert sum(gpu_way.logprobs, []) == pytest.approx(sum(cpu_way.logprobs, []), abs=1e-12)


# ---- llama.cpp on the real SmolLM2 ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(smollm2):
    model, tok = smollm2
    backend = LlamaCppBackend(gguf_as_f32(smollm2_gguf()), stop_token_ids(model, tok), threads=2)
    yield backend
    backend.close()


def chat_ids(tok, prompts):
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"] for p in prompts]


def random_vectors(model, mode: str, seed: int, prefix_tokens: int = 4, norm: float = 3.0) -> SteeringVectors:
    config = SteeringConfig(mode=mode, layers=list(range(1, 30)), prefix_tokens=prefix_tokens)
    steer = SteeringVectors.attach(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # the default norm per layer, 3, is enough to change what the model says
        for p in steer.vectors().values():
            p.copy_(torch.randn(p.shape, generator=g) * norm / steer.dim**0.5)
    return steer


def hf_logprobs(model, steer, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Transformers' log-softmax at every completion token, the prompt and the completion in one forward."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad(), steer.window(len(prompt)):
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), -1)


def sampled_logprob_error(model, steer, prompt: list[int], completion: list[int], logprobs: list[float]) -> torch.Tensor:
    """|sampler's log-prob - transformers' log-prob| at every sampled token (temperature 1: the plain log-softmax)."""
    logp = hf_logprobs(model, steer, prompt, completion)
    return (logp[torch.arange(len(completion)), completion] - torch.tensor(logprobs, dtype=torch.float64)).abs()


def recorded_decodes(llama, monkeypatch) -> list[list[tuple[int, int]]]:
    """The (position, sequence id) entries of every llama_decode from now on."""
    decoded: list[list[tuple[int, int]]] = []
    decode = llama._decode
    monkeypatch.setattr(llama, "_decode", lambda entries: (decoded.append([(e[1], e[2]) for e in entries]), decode(entries))[1])
    return decoded


class WriteAfter:
    """A tool that writes `tokens` once the completion has `after` tokens, then bans `banned` for one sample."""

    def __init__(self, after: int, tokens: list[int], banned: set[int] = frozenset()):
        self.after, self.tokens, self.bans = after, tokens, banned

    def __call__(self, completion_ids: list[int]) -> list[int]:
        return list(self.tokens) if len(completion_ids) == self.after else []

    def banned(self, completion_ids: list[int], since_write: int) -> set[int]:
        return set(self.bans) if since_write == 0 else set()


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["bias", "prefix", "bias+prefix"])
def test_llama_cpp_greedy_agrees_with_transformers(smollm2, llama, mode):
    model, tok = smollm2
    steer = random_vectors(model, mode, seed=1)
    try:
        ids = chat_ids(tok, MORE_PROMPTS)
        sampling = Sampling(24)
        reference = TransformersBackend(model, tok).generate(ids, 1, sampling).completion_ids
        llama.sync(steer)
        fast = llama.generate(ids, 1, sampling)
        with steer.disabled():
            llama.sync(steer)
            base = llama.generate(ids, 1, sampling).completion_ids
        assert sum(f != b for f, b in zip(fast.completion_ids, base)) >= 3, "the vectors barely changed the outputs"
        flips = 0
        for prompt, ref, got in zip(ids, reference, fast.completion_ids):
            at = first_divergence(ref, got)
            if at is None:
                assert len(ref) == len(got)
                continue
            flips += 1
            # a flip is allowed only where transformers itself sees a near tie between the two tokens
            logp = hf_logprobs(model, steer, prompt, got[: at + 1])[at]
            assert logp[ref[at]] - logp[got[at]] < 0.1, f"{mode}: diverged at token {at} without a near tie"
        assert flips <= 1, f"{mode}: {flips} of {len(ids)} sequences diverged"
    finally:
        steer.detach()


@pytest.mark.slow
def test_a_tool_writes_tokens_the_model_then_continues_from(smollm2, llama):
    model, tok = smollm2
    steer = random_vectors(model, "bias", seed=2)

    def generate(tool=None):
        groups = dict(llama.generate_each(ids, 1, Sampling(16), None, None, tool))
        return [groups[p].completion_ids[0] for p in range(len(ids))], [groups[p].logprobs[0] for p in range(len(ids))]

    try:
        ids = chat_ids(tok, MORE_PROMPTS[:3])
        llama.sync(steer)
        written = tok.encode(" 1234 apples", add_special_tokens=False)
        end = 3 + len(written)
        free, _ = generate()
        tool = WriteAfter(3, written)
        completions, logprobs = generate(tool)
        for prompt, before, completion, logprob in zip(ids, free, completions, logprobs):
            assert completion[:3] == before[:3] and completion[3:end] == written and len(completion) == 16
            assert logprob[3:end] == [0.0] * len(written)
            # the model continued from everything fed, the written tokens included: its log-probs are transformers'
            error = sampled_logprob_error(model, steer, prompt, completion, logprob)[end:]
            assert error.max() < 0.05
        # a banned token is not sampled right after the write: the best of the others is
        tool.bans = {completion[end] for completion in completions}
        for prompt, completion in zip(ids, generate(tool)[0]):
            logp = hf_logprobs(model, steer, prompt, completion)[end]
            assert completion[end] not in tool.bans
            logp[list(tool.bans)] = -torch.inf
            assert completion[end] == int(logp.argmax())
    finally:
        steer.detach()


@pytest.mark.slow
def test_llama_cpp_switches_the_prefix_window_at_the_right_token(smollm2, llama):
    model, tok = smollm2
    k = 4
    steer = random_vectors(model, "prefix", seed=2, prefix_tokens=k, norm=15.0)  # strong: one token's worth shows
    try:
        prompt = chat_ids(tok, PROMPTS[:1])[0]
        llama.sync(steer)
        out = llama.generate([prompt], 1, Sampling(12, temperature=1.0, seed=3))
        completion, sampled = out.completion_ids[0], torch.tensor(out.logprobs[0], dtype=torch.float64)
        assert len(completion) > k + 2

        def error(prefix_tokens: int) -> torch.Tensor:
            steer.config.prefix_tokens = prefix_tokens
            logp = hf_logprobs(model, steer, prompt, completion)
            return (logp[torch.arange(len(completion)), completion] - sampled).abs()

        correct, late, early = error(k), error(k + 1), error(k - 1)
        assert correct.max() < 0.05  # float rounding at every token, both sides of the switch
        # a window one token too long (short) first differs at the prediction after the extra (missing) token,
        # and there llama.cpp's numbers are far from it: the switch happened exactly after k answer tokens
        assert torch.equal(late[: k + 1], correct[: k + 1]) and torch.equal(early[:k], correct[:k])
        assert late[k + 1] > 0.2 and early[k] > 0.2
    finally:
        steer.detach()


@pytest.mark.slow
def test_sampled_groups_share_the_prompt_cache_and_report_the_sampling_logprobs(smollm2, llama):
    model, tok = smollm2
    steer = random_vectors(model, "bias", seed=4)
    try:
        prompts = chat_ids(tok, PROMPTS[:2])
        llama.sync(steer)
        sampling = Sampling(10, temperature=1.0, seed=7)
        out = llama.generate(prompts, 4, sampling)
        assert out.prompt_ids == [prompts[0]] * 4 + [prompts[1]] * 4
        assert len(set(map(tuple, out.completion_ids))) > 4  # the copies of a prompt sample apart
        assert llama.generate(prompts, 4, sampling).completion_ids == out.completion_ids  # seeded
        for prompt, completion, logprobs in zip(out.prompt_ids, out.completion_ids, out.logprobs):
            error = sampled_logprob_error(model, steer, prompt, completion, logprobs)
            assert error.mean() < 0.01 and error.max() < 0.05  # float rounding; a lost prompt cache costs nats
    finally:
        steer.detach()


@pytest.mark.slow
def test_sequences_that_stop_early_hand_their_streams_to_those_still_running(smollm2, llama, monkeypatch):
    model, tok = smollm2
    steer = random_vectors(model, "bias", seed=6)
    try:
        ids = chat_ids(tok, MORE_PROMPTS)
        llama.sync(steer)
        sampling = Sampling(16, temperature=1.0, seed=8)
        free = llama.generate(ids, 2, sampling).completion_ids
        # stop at tokens the free run sampled at different depths, so that sequences end at different steps
        monkeypatch.setattr(llama, "stop_ids", {free[0][2], free[3][6], free[6][10]})
        decoded = recorded_decodes(llama, monkeypatch)
        out = llama.generate(ids, 2, sampling)
        assert len({len(c) for c in out.completion_ids}) >= 3
        steps = decoded[len(ids):]  # after one prefill call per prompt
        assert len({len(entries) for entries in steps}) >= 3
        assert all([seq for _, seq in entries] == list(range(len(entries))) for entries in steps)  # streams 0..m-1
        for prompt, completion, logprobs in zip(out.prompt_ids, out.completion_ids, out.logprobs):
            error = sampled_logprob_error(model, steer, prompt, completion, logprobs)
            assert error.max() < 0.05  # each sequence continued from its own cache after the moves
    finally:
        steer.detach()


@pytest.mark.slow
def test_continuous_batching_starts_a_prompt_when_streams_free_and_samples_what_one_call_samples(smollm2, llama, monkeypatch):
    model, tok = smollm2
    steer = random_vectors(model, "bias", seed=9)
    try:
        ids = chat_ids(tok, MORE_PROMPTS)
        seeds = [100 + p for p in range(len(ids))]
        llama.sync(steer)
        sampling = Sampling(12, temperature=1.0, seed=0)
        together = llama.generate(ids, 2, sampling, seeds)
        monkeypatch.setattr(llama, "stop_ids", {together.completion_ids[0][3], together.completion_ids[5][7]})
        together = llama.generate(ids, 2, sampling, seeds)  # now sequences stop at several lengths
        decoded = recorded_decodes(llama, monkeypatch)
        groups = dict(llama.generate_each(ids, 2, sampling, seeds, running=4))
        assert sorted(groups) == list(range(len(ids)))
        assert list(llama.generate_each([], 2, sampling, [], running=4)) == []  # a resumed eval with nothing left
        for p, group in groups.items():  # per-sequence seeds: the same samples as all prompts in one batch
            assert group.completion_ids == together.completion_ids[2 * p : 2 * p + 2]
            for completion, logprobs in zip(group.completion_ids, group.logprobs):
                error = sampled_logprob_error(model, steer, ids[p], completion, logprobs)
                assert error.max() < 0.05  # each continued from its own prompt's cache, not a stale stream
        prefills = [i for i, entries in enumerate(decoded) if entries[0][0] == 0]
        steps = [entries for entries in decoded if entries[0][0] > 0]
        assert all(len(entries) <= 4 for entries in steps)
        assert prefills[-1] > prefills[0] + 2 and any(decoded[i - 1][0][0] > 0 for i in prefills)  # refilled mid-run
        assert all([seq for _, seq in entries] == list(range(len(entries))) for entries in steps)
    finally:
        steer.detach()


@pytest.mark.slow
def test_more_sequences_than_a_llama_cpp_context_holds_run_in_turns(smollm2, llama, monkeypatch):
    # a context holds at most 256 KV streams: 3 prompts x 100 samples (validation's limit x samples) run as 2 + 1
    _, tok = smollm2
    ids = chat_ids(tok, MORE_PROMPTS[:3])
    llama.sync(None)
    sampling = Sampling(3, temperature=1.0, seed=0)
    decoded = recorded_decodes(llama, monkeypatch)
    together = llama.generate(ids, 100, sampling, seeds=[7, 8, 9])
    assert max(len(entries) for entries in decoded) == 200  # two prompts' streams, then the third's
    for p, seed in enumerate([7, 8, 9]):  # per-sequence seeds: what each prompt samples on its own
        assert together.completion_ids[100 * p : 100 * (p + 1)] == llama.generate([ids[p]], 100, sampling, [seed]).completion_ids
    with pytest.raises(ConfigError, match="at most 256 sequences at once: 300 samples of one prompt do not fit"):
        llama.generate(ids[:1], 300, sampling)


@pytest.mark.slow
def test_with_a_prefix_window_prompts_start_in_waves_and_the_window_stays_exact(smollm2, llama, monkeypatch):
    model, tok = smollm2
    steer = random_vectors(model, "bias+prefix", seed=10, prefix_tokens=3, norm=10.0)
    try:
        ids = chat_ids(tok, MORE_PROMPTS)
        llama.sync(steer)
        sampling = Sampling(10, temperature=1.0, seed=0)
        free = llama.generate(ids[:1], 1, sampling).completion_ids[0]
        monkeypatch.setattr(llama, "stop_ids", {free[4]})  # some sequences stop early, freeing streams
        decoded = recorded_decodes(llama, monkeypatch)
        groups = dict(llama.generate_each(ids, 1, sampling, list(range(len(ids))), running=3))
        for p, group in groups.items():
            completion, logprobs = group.completion_ids[0], group.logprobs[0]
            error = sampled_logprob_error(model, steer, ids[p], completion, logprobs)  # window: prompt + 3 tokens
            assert error.max() < 0.05
        assert len({len(g.completion_ids[0]) for g in groups.values()}) >= 2  # some stopped before others
        assert all(len(entries) <= 3 for entries in decoded if entries[0][0] > 0)
        assert sum(entries[0][0] == 0 for entries in decoded) == len(ids)  # every prompt prefilled once
    finally:
        steer.detach()


@pytest.mark.slow
def test_vectors_take_effect_only_when_synced(smollm2, llama):
    model, tok = smollm2
    steer = SteeringVectors.attach(model, SteeringConfig(layers=list(range(1, 30))))
    try:
        ids = chat_ids(tok, PROMPTS)
        sampling = Sampling(16)
        llama.sync(steer)
        zero = llama.generate(ids, 1, sampling).completion_ids
        with steer.disabled():
            llama.sync(steer)
            assert llama.generate(ids, 1, sampling).completion_ids == zero  # zero vectors are the base
        llama.sync(steer)
        with torch.no_grad():  # what an optimizer step does: change the parameters in place
            steer.bias.copy_(torch.randn(steer.bias.shape, generator=torch.Generator().manual_seed(5)) * 3 / steer.dim**0.5)
        assert llama.generate(ids, 1, sampling).completion_ids == zero  # not pushed yet
        llama.sync(steer)
        moved = llama.generate(ids, 1, sampling).completion_ids
        assert moved != zero
        reference = TransformersBackend(model, tok).generate(ids, 1, sampling).completion_ids
        assert sum(first_divergence(a, b) is None for a, b in zip(moved, reference)) >= 2
    finally:
        steer.detach()


@pytest.mark.slow
def test_llama_cpp_refuses_what_it_cannot_apply(smollm2, llama):
    model, tok = smollm2
    for config, message in [
        (SteeringConfig(layers=[0, 1]), "cannot act on layer 0"),
        (SteeringConfig(layers=[1, 2], site="mlp.up_proj"), "steering site 'mlp.down_proj'"),
    ]:
        steer = SteeringVectors.attach(model, config)
        try:
            with pytest.raises(BackendUnavailable, match=message):
                llama.sync(steer)
            with pytest.raises(BackendUnavailable, match=message):
                make_backend("llama.cpp", model, tok, "smollm2-135m", [steer.config], threads=2)
            assert isinstance(make_backend("auto", model, tok, "smollm2-135m", [steer.config], threads=2), TransformersBackend)
        finally:
            steer.detach()


def gentle_lora(model, tmp_path, seed: int):
    """A random LoRA r4 on every linear layer of `model` (in place: call .unload()), saved to tmp_path/"adapter";
    small enough that SmolLM2 still writes sentences, large enough to change them."""
    torch.manual_seed(seed)
    adapted = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    adapted.save_pretrained(tmp_path / "adapter")
    return adapted.eval()


@pytest.mark.slow
def test_a_lora_on_llama_cpp_gives_the_log_probs_peft_gives(smollm2, llama, tmp_path):
    model, tok = smollm2
    ids = chat_ids(tok, MORE_PROMPTS[:6])
    sampling = Sampling(16, temperature=1.0, seed=4)
    adapted = gentle_lora(model, tmp_path, seed=0)
    try:
        llama.sync(None)
        llama.use_lora(export_lora_gguf(tmp_path / "adapter", tmp_path / "adapter.gguf", model.config))
        with_lora = llama.generate(ids, 1, sampling)
        llama.use_lora(None)
        without = llama.generate(ids, 1, sampling)
        assert sum(a != b for a, b in zip(with_lora.completion_ids, without.completion_ids)) >= 3, "the adapter changed little"
        for prompt, completion, logprobs in zip(ids, with_lora.completion_ids, with_lora.logprobs):
            with torch.no_grad():
                logits = adapted(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
            logp = torch.log_softmax(logits.double(), -1)[torch.arange(len(completion)), completion]
            error = (logp - torch.tensor(logprobs, dtype=torch.float64)).abs()
            assert error.max() < 0.05, "llama.cpp's adapter is not PEFT's (rows of q/k, scaling)"
    finally:
        llama.use_lora(None)
        adapted.unload()


@pytest.mark.slow
def test_eval_runs_a_lora_on_llama_cpp_as_transformers_runs_it_and_takes_it_off_again(smollm2, llama, tmp_path):
    model, tok = smollm2
    problems = [Problem(f"p{i}", q, "0") for i, q in enumerate(MORE_PROMPTS[:4])]
    settings = EvalSettings(max_new_tokens=12)
    gentle_lora(model, tmp_path, seed=1).unload()
    loras = [f"lora={tmp_path / 'adapter'}"]
    llama.sync(None)
    base_before = llama.generate(chat_ids(tok, MORE_PROMPTS[:4]), 1, Sampling(12)).completion_ids
    completions = {}
    for backend in (llama, TransformersBackend(model, tok)):
        evaluate(model, tok, settings, output=tmp_path / backend.name, problems=problems, progress=False,
                 backend=backend, loras=loras)
        records = read_records(tmp_path / backend.name / "samples.jsonl")
        completions[backend.name] = {(r["model"], r["problem_id"]): r["completion"] for r in records}
    fast, reference = completions["llama.cpp"], completions["transformers"]
    assert sum(fast["lora", p.id] == reference["lora", p.id] for p in problems) >= 3  # a near tie may part one
    assert sum(fast["lora", p.id] != fast["base", p.id] for p in problems) >= 2  # the adapter was on
    assert llama.lora is None  # and taken off again
    assert llama.generate(chat_ids(tok, MORE_PROMPTS[:4]), 1, Sampling(12)).completion_ids == base_before
