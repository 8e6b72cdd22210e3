"""The llama.cpp backend: the GGUF base with the steering vectors as llama.cpp control vectors, pushed again after
every update (a few KB, never the model). It runs an fp32 copy of the GGUF (`gguf_as_f32`): the weights transformers
runs, so the two agree to float rounding (a quantised file would add llama.cpp's int8 activations: greedy outputs
then part at near ties within a few dozen tokens). On 2 CPU cores it generates ~3x faster than `generate` at 16
sequences.

Why a bias on `mlp.down_proj` of layer l is a llama.cpp control vector: that projection adds straight into the
residual stream, so its bias is a vector added to the layer's output, which is what a control vector is.
llama.cpp's control-vector buffer starts at layer 1, so layer 0 cannot be steered there. The LoRA reference runs here
as a llama.cpp LoRA adapter (`use_lora`, the file brep_rl/lora_gguf.py writes), with the base's weights untouched.

The running sequences are decoded together, one llama.cpp batch per step, one sequence id (KV stream) each; when a
prompt's sequences are done the next prompt takes their streams (continuous batching). The prefix window is
reproduced exactly: with a window, prompts start in waves (the next ones once all running ones are done), so all
running sequences sit at the same answer position, and the control vector is switched from bias + prefix to bias
alone once the first `prefix_tokens` answer tokens have been fed, keeping the KV cache.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from brep_rl.errors import BackendUnavailable, ConfigError
from brep_rl.rollout.base import Rollouts, Sampling, Tool
from brep_rl.rollout.sampling import sample_token, sequence_rngs
from brep_rl.steering import SteeringConfig, SteeringVectors

# Architectures whose llama.cpp graph adds the control vector to each layer's output and whose HF layers add
# mlp.down_proj's output straight into the residual stream (not true of e.g. Gemma, which norms it first).
LLAMA_CPP_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")


class LlamaCppBackend:
    """llama.cpp on the GGUF file of the base; steering as control vectors, sequences decoded together."""

    name = "llama.cpp"

    def __init__(self, gguf: str | Path, stop_ids: set[int], threads: int):
        try:
            import llama_cpp
            from llama_cpp import _logger
        except ImportError:
            raise BackendUnavailable("the llama.cpp backend needs llama-cpp-python: pip install -e '.[fast]'") from None
        _logger.set_verbose(False)
        self.lib = llama_cpp
        self.gguf = Path(gguf)
        self.stop_ids = set(stop_ids)
        self.threads = threads
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.llama_model = llama_cpp.llama_model_load_from_file(str(self.gguf).encode(), params)
        if not self.llama_model:
            raise BackendUnavailable(f"{self.gguf}: llama.cpp could not load this GGUF file")
        self.n_embd = llama_cpp.llama_model_n_embd(self.llama_model)
        self.n_layer = llama_cpp.llama_model_n_layer(self.llama_model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llama_model))
        self.ctx = None
        self.ctx_shape = (0, 0, 0)  # (sequences, tokens per sequence, tokens per decode) of the current context
        self.steered: np.ndarray | None = None  # [n_layer - 1, n_embd] control vectors: bias + prefix (window)
        self.unsteered: np.ndarray | None = None  # bias alone (after the window)
        self.prefix_tokens = 0
        self._applied: np.ndarray | None = None
        self.lora = None  # a llama.cpp LoRA adapter (use_lora), applied to every context

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_free(self.ctx)
            self.ctx = None
        self.use_lora(None)
        if self.llama_model:
            self.lib.llama_model_free(self.llama_model)
            self.llama_model = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # at interpreter exit the library may already be gone
            pass

    # ---- steering --------------------------------------------------------------------------------------

    def check(self, config: SteeringConfig) -> None:
        """Refuse vectors llama.cpp cannot apply exactly (the message says what to do instead)."""
        if config.model_type not in LLAMA_CPP_ARCHITECTURES:
            raise BackendUnavailable(f"llama.cpp rollouts support model types {', '.join(LLAMA_CPP_ARCHITECTURES)}; "
                                     f"this model is {config.model_type!r}: use the transformers backend")
        if (obstacle := config.control_vector_obstacle()) is not None:
            raise BackendUnavailable(f"{obstacle}: use the transformers backend")
        if (config.hidden_size, config.num_hidden_layers) != (self.n_embd, self.n_layer):
            raise BackendUnavailable(f"{self.gguf}: {self.n_layer} layers x {self.n_embd} dims, but the vectors are for "
                                     f"{config.num_hidden_layers} x {config.hidden_size}: not the same base model")

    def sync(self, steer: SteeringVectors | None) -> None:
        """Copy the vectors as they are now (scale and disabled() included) into the control-vector buffers."""
        rows = self.n_layer - 1  # row r is layer r + 1
        bias = np.zeros((rows, self.n_embd), dtype=np.float32)
        window = np.zeros((rows, self.n_embd), dtype=np.float32)
        self.prefix_tokens = 0
        if steer is not None and steer.enabled:
            self.check(steer.config)
            rows_of = [layer - 1 for layer in steer.layer_ids]
            tensors = steer.state_tensors()
            if "bias" in tensors:
                bias[rows_of] = tensors["bias"].numpy() * steer.scale
            window[:] = bias
            if "prefix" in tensors:
                window[rows_of] += tensors["prefix"].numpy() * steer.scale
                self.prefix_tokens = steer.config.prefix_tokens
        self.unsteered, self.steered = bias, window
        self._applied = None

    def _apply(self, vectors: np.ndarray) -> None:
        if self._applied is vectors:
            return
        if not vectors.any():
            status = self.lib.llama_set_adapter_cvec(self.ctx, None, 0, self.n_embd, -1, -1)
        else:
            data = vectors.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            status = self.lib.llama_set_adapter_cvec(self.ctx, data, vectors.size, self.n_embd, 1, self.n_layer - 1)
        if status != 0:
            raise RuntimeError(f"llama.cpp refused the control vector (status {status})")
        self._applied = vectors

    def use_lora(self, adapter: str | Path | None) -> None:
        """Generate with this llama.cpp LoRA adapter (a GGUF, see brep_rl.lora_gguf) from now on; None: without."""
        if self.lora:
            if self.ctx:  # off the context before it is freed
                self.lib.llama_set_adapters_lora(self.ctx, None, 0, None)
            self.lib.llama_adapter_lora_free(self.lora)
            self.lora = None
        if adapter is not None:
            self.lora = self.lib.llama_adapter_lora_init(self.llama_model, str(adapter).encode())
            if not self.lora:
                raise BackendUnavailable(f"{adapter}: llama.cpp could not load this LoRA adapter for {self.gguf.name}")
        if self.ctx:
            self._attach_lora()

    def _attach_lora(self) -> None:
        if self.lora:
            status = self.lib.llama_set_adapters_lora(self.ctx, (self.lib.llama_adapter_lora_p_ctypes * 1)(self.lora), 1,
                                                      (ctypes.c_float * 1)(1.0))
        else:
            status = self.lib.llama_set_adapters_lora(self.ctx, None, 0, None)
        if status != 0:
            raise RuntimeError(f"llama.cpp refused the LoRA adapter (status {status})")

    # ---- generation ------------------------------------------------------------------------------------

    def _context(self, sequences: int, tokens: int, batch: int) -> None:
        """A context with a KV stream of at least `tokens` cells for each of `sequences` sequences, taking `batch`
        tokens per decode call (grown, never shrunk)."""
        have_seqs, have_tokens, have_batch = self.ctx_shape
        if self.ctx and sequences <= have_seqs and tokens <= have_tokens and batch <= have_batch:
            self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
            return
        if self.ctx:
            self.lib.llama_free(self.ctx)
        sequences, tokens = max(sequences, have_seqs), max(-(-tokens // 256) * 256, have_tokens)
        batch = max(512, sequences, batch, have_batch)
        params = self.lib.llama_context_default_params()
        params.n_ctx = sequences * tokens
        params.n_batch = params.n_ubatch = batch
        params.n_seq_max = sequences
        params.kv_unified = False  # one KV stream per sequence: a token attends to its own sequence only
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self.ctx = self.lib.llama_init_from_model(self.llama_model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {sequences} sequences x {tokens} tokens")
        self.ctx_shape = (sequences, tokens, batch)
        self._applied = None
        self._attach_lora()

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """One llama_decode of (token, position, sequence id, wants logits) entries."""
        batch = self.lib.llama_batch_init(len(entries), 0, 1)
        try:
            for i, (token, pos, seq, logits) in enumerate(entries):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, logits
            batch.n_tokens = len(entries)
            status = self.lib.llama_decode(self.ctx, batch)
        finally:
            self.lib.llama_batch_free(batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} ({len(entries)} tokens)")

    def _logits(self, index: int) -> np.ndarray:
        pointer = self.lib.llama_get_logits_ith(self.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float64)  # a copy: the buffer is reused

    def _compact(self, active: list[int], slot: dict[int, int], memory) -> list[int]:
        """Move the caches of the sequences still running into streams 0..len(active)-1 (updating `slot`) and return
        them in stream order. llama.cpp decodes a contiguous run of streams several times faster than as many
        scattered ones (SmolLM2, 2 threads: 32 of 64 streams take 103 ms contiguous, 810 ms every other one), and
        sequences stop at different lengths."""
        holes = sorted(set(range(len(active))) - {slot[s] for s in active})
        movers = [s for s in active if slot[s] >= len(active)]
        for hole, s in zip(holes, movers):
            self.lib.llama_memory_seq_rm(memory, hole, -1, -1)
            self.lib.llama_memory_seq_cp(memory, slot[s], hole, -1, -1)  # a whole-stream copy, done before the next decode
            slot[s] = hole
        return sorted(active, key=slot.__getitem__)

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: Sampling,
                 seeds: list[int] | None = None, tool: Tool | None = None) -> Rollouts:
        start = time.perf_counter()
        groups = dict(self.generate_each(prompt_ids, n, sampling, seeds, tool=tool))
        rows = [groups[p] for p in range(len(prompt_ids))]
        return Rollouts([c for r in rows for c in r.prompt_ids], [c for r in rows for c in r.completion_ids],
                        [lp for r in rows for lp in r.logprobs], time.perf_counter() - start,
                        [m for r in rows for m in r.tool_mask] if tool is not None else None)

    def generate_each(self, prompt_ids: list[list[int]], n: int, sampling: Sampling, seeds: list[int] | None = None,
                      running: int | None = None, tool: Tool | None = None) -> Iterator[tuple[int, Rollouts]]:
        """(index of a prompt, its `n` completions) as each prompt's sequences finish, decoding at most `running`
        sequences at once (default: all, up to the 256 a llama.cpp context holds). Continuous batching: the next
        prompt starts as soon as `n` streams are free. With a prefix window every running sequence must sit at the
        same answer position, so the next prompts start together once all running ones are done (lockstep waves).
        `tool` (e.g. the Calculator) sees each completion after every sampled token and may write the next tokens for
        it; a written token is fed like a sampled one, with log-prob 0 (it was certain), and counts toward
        max_new_tokens. The tokens sampled right after a write are drawn from outside `tool.banned(...)`, until it
        bans nothing. Rollouts.tool_mask marks both kinds 0 (not the policy's own choice), the rest 1."""
        if not prompt_ids:  # e.g. a resumed evaluation with nothing left to do
            return
        if self.steered is None:
            self.sync(None)
        total = len(prompt_ids) * n
        most = self.lib.llama_max_parallel_sequences() // n * n  # a context holds at most 256 KV streams
        if not most:
            raise ConfigError(f"llama.cpp decodes at most {self.lib.llama_max_parallel_sequences()} sequences at once: "
                              f"{n} samples of one prompt do not fit (use fewer, or the transformers backend)")
        capacity = min(total, most, total if running is None else max(n, running // n * n))
        longest = max(map(len, prompt_ids))
        self._context(capacity, longest + sampling.max_new_tokens, longest)
        memory = self.lib.llama_get_memory(self.ctx)
        rngs = sequence_rngs(sampling, len(prompt_ids), n, seeds)
        completions: list[list[int]] = [[] for _ in range(total)]
        logprobs: list[list[float]] = [[] for _ in range(total)]
        written: list[list[int]] = [[] for _ in range(total)]  # tokens the tool wrote, still to be fed
        since_write: list[int | None] = [None] * total  # tokens sampled since the tool's last write ended
        sampled: list[list[int]] = [[] for _ in range(total)]  # per token: 1 the policy's, 0 the tool's
        left = [n] * len(prompt_ids)  # sequences of each prompt still running
        slot: dict[int, int] = {}  # the llama.cpp sequence id (KV stream) that holds each running sequence's cache
        active: list[int] = []  # running sequences in stream order (streams 0..len-1)
        next_logits: dict[int, np.ndarray] = {}
        waiting = 0  # the next prompt to start
        clock = time.perf_counter()
        while waiting < len(prompt_ids) or active:
            if not active or self.prefix_tokens == 0:
                self._apply(self.steered if self.prefix_tokens > 0 else self.unsteered)  # prompts are in the window
                while waiting < len(prompt_ids) and len(active) + n <= capacity:
                    # prefill the prompt once, then share its cache with the rest of its group
                    prompt, first = prompt_ids[waiting], len(active)
                    self.lib.llama_memory_seq_rm(memory, first, -1, -1)  # what a finished sequence left there
                    self._decode([(t, i, first, i == len(prompt) - 1) for i, t in enumerate(prompt)])
                    logits = self._logits(len(prompt) - 1)
                    for j in range(n):
                        s = waiting * n + j
                        if j:
                            self.lib.llama_memory_seq_rm(memory, first + j, -1, -1)
                            self.lib.llama_memory_seq_cp(memory, first, first + j, -1, -1)
                        slot[s], next_logits[s] = first + j, logits
                        active.append(s)
                    waiting += 1
            feed = []
            for s in active:
                from_tool, banned = bool(written[s]), None
                if from_tool:
                    token, logprob = written[s].pop(0), 0.0
                    since_write[s] = 0
                else:
                    logits = next_logits[s]
                    banned = tool.banned(completions[s], since_write[s]) if since_write[s] is not None else None
                    if banned:
                        logits = logits.copy()  # shared by a prompt's group after prefill
                        logits[list(banned)] = -np.inf
                        since_write[s] += 1
                    else:
                        since_write[s] = None  # the tool bans nothing more after this write
                    token, logprob = sample_token(logits, sampling, rngs[s])
                completions[s].append(token)
                logprobs[s].append(logprob)
                if tool is not None:
                    sampled[s].append(0 if from_tool or banned else 1)  # a restricted draw is not the policy's own
                    if not from_tool:
                        written[s] = tool(completions[s])
                if token not in self.stop_ids and len(completions[s]) < sampling.max_new_tokens:
                    feed.append(s)
                    continue
                p = s // n
                left[p] -= 1
                if not left[p]:
                    rows = range(p * n, (p + 1) * n)
                    now = time.perf_counter()
                    yield p, Rollouts([prompt_ids[p]] * n, [completions[r] for r in rows], [logprobs[r] for r in rows],
                                      now - clock, [sampled[r] for r in rows] if tool is not None else None)
                    clock = now
            active = self._compact(feed, slot, memory)
            if not active:
                continue
            # each fed token sits at answer position len - 1; the window case has all of them at the same one
            self._apply(self.steered if len(completions[active[0]]) - 1 < self.prefix_tokens else self.unsteered)
            self._decode([(completions[s][-1], len(prompt_ids[s // n]) + len(completions[s]) - 1, slot[s], True)
                          for s in active])
            next_logits = {s: self._logits(i) for i, s in enumerate(active)}
