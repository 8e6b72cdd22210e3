"""llama.cpp's own server, given an exported control vector, answers as brep-rl's steered transformers model does.

llama.cpp serves the plain base without a word when it cannot read a control-vector file, so the test also checks
that the answers differ from the base's. The server binary comes from scripts/build_llama_server.sh (run by setup)."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from brep_rl import SteeringVectors
from brep_rl.data import DEFAULT_INSTRUCTION, chat_prompt_ids, load_task
from brep_rl.model import gguf_as_f32, smollm2_gguf
from brep_rl.rollout import Sampling, TransformersBackend
from brep_rl.steering.gguf import export_control_vector
from testing_utils import ROOT

pytestmark = pytest.mark.slow

SERVER = Path(sys.prefix) / "bin" / "llama-server"
ARTIFACT = ROOT / "artifacts" / "smollm2-chain-sum-sft-grpo-dynamic-last"
NEW_TOKENS = 24


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def llama_server(model: Path, control_vector: Path, log: Path):
    port = free_port()
    command = [str(SERVER), "-m", str(model), "--control-vector", str(control_vector), "--host", "127.0.0.1",
               "--port", str(port), "-t", "2", "-c", "1024", "-np", "1"]
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                pytest.fail(f"llama-server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server not ready after 120 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def served_answer(url: str, prompt_ids: list[int]) -> list[int]:
    body = {"prompt": prompt_ids, "n_predict": NEW_TOKENS, "temperature": 0, "top_k": 1, "cache_prompt": False,
            "return_tokens": True}
    request = urllib.request.Request(f"{url}/completion", json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["tokens"]


def test_llama_server_applies_the_exported_control_vector_as_brep_rl_does(smollm2, tmp_path):
    if not SERVER.exists():
        pytest.skip(f"{SERVER} is not built: run `make setup` (scripts/build_llama_server.sh)")
    model, tokenizer = smollm2
    problems = load_task("rg:chain_sum", limit=8, seed=3,
                         rg_config={"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2})
    prompts = chat_prompt_ids(tokenizer, problems, DEFAULT_INSTRUCTION)
    backend = TransformersBackend(model, tokenizer)
    greedy = Sampling(NEW_TOKENS, temperature=0.0)

    def answers(completions: list[list[int]]) -> list[list[int]]:  # without the end-of-turn token
        return [[t for t in ids if t not in backend.stop_ids] for ids in completions]

    base = answers(backend.generate(prompts, 1, greedy).completion_ids)
    steer = SteeringVectors.from_pretrained(ARTIFACT, model)
    try:
        steered = answers(backend.generate(prompts, 1, greedy).completion_ids)
    finally:
        steer.detach()
    vector = export_control_vector(ARTIFACT, tmp_path / "v.gguf")
    with llama_server(gguf_as_f32(smollm2_gguf()), vector, tmp_path / "server.log") as url:
        served = answers([served_answer(url, p) for p in prompts])

    agree = sum(s == t for s, t in zip(served, steered))
    changed = sum(s != b for s, b in zip(served, base))
    report = "\n".join(f"served {tokenizer.decode(s)!r} | brep-rl {tokenizer.decode(t)!r} | base {tokenizer.decode(b)!r}"
                       for s, t, b in zip(served, steered, base))
    assert agree >= 7, f"llama-server agrees with brep-rl on {agree} of 8 prompts:\n{report}"
    assert changed >= 1, f"llama-server answered as the unsteered base on every prompt (vector not applied?):\n{report}"
