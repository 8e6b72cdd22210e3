"""What choosing the next token costs the transformers backend per step: numpy row by row on the CPU (the scores
copied there in float64 first) against `sample_tokens_on_device`, batched where the scores are.

SmolLM2's vocabulary (49,152), batches of 16-256 rows, greedy and sampled (T = 0.8, with and without top-p 0.95).
`sample_tokens` takes the numpy way on the CPU and the batched way on a GPU; this says whether that is the faster
choice on the machine it runs on. Run alone:  python benchmarks/sampling_cost.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from report import write

from brep_rl.rollout import Sampling
from brep_rl.rollout.sampling import sample_token, sample_tokens_on_device

VOCAB = 49152
REPEATS = 5


def row_by_row(scores: torch.Tensor, sampling: Sampling, rngs: list[np.random.Generator]) -> list[tuple[int, float]]:
    return [sample_token(row, sampling, rng) for row, rng in zip(scores.double().cpu().numpy(), rngs)]


def milliseconds(choose, scores: torch.Tensor, sampling: Sampling) -> float:
    rngs = [np.random.default_rng(i) for i in range(len(scores))]
    choose(scores, sampling, rngs)  # warm-up
    if scores.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(REPEATS):
        result = choose(scores, sampling, rngs)
        if isinstance(result, tuple):
            result[0].tolist()  # the tokens reach the CPU, as generate's next step needs
    return (time.perf_counter() - start) / REPEATS * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="where the scores live: cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for batch in (16, 128, 256):
        scores = (torch.randn(batch, VOCAB, generator=torch.Generator().manual_seed(batch)) * 3).to(args.device)
        for name, sampling in {"greedy": Sampling(1), "T=0.8": Sampling(1, temperature=0.8),
                               "T=0.8, top-p 0.95": Sampling(1, temperature=0.8, top_p=0.95)}.items():
            numpy_ms = milliseconds(row_by_row, scores, sampling)
            batched_ms = milliseconds(sample_tokens_on_device, scores, sampling)
            rows.append({"batch": batch, "sampling": name, "numpy row by row, ms": numpy_ms,
                         "batched on the device, ms": batched_ms, "batched / numpy": batched_ms / numpy_ms})
    write(f"sampling_cost-{args.device.split(':')[0]}", f"Choosing the next token, per step, scores on the {args.device}",
          rows, notes=f"Vocabulary {VOCAB}; mean of {REPEATS} steps after a warm-up; torch threads {args.threads}.",
          device=args.device)


if __name__ == "__main__":
    main()
