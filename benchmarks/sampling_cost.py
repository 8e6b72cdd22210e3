"""What choosing the next token costs the transformers backend per step, SmolLM2's vocabulary (49,152).

Greedy rows: numpy row by row on the CPU (the scores copied there in float64 first) against
`greedy_tokens_on_device`, batched where the scores are; `sample_tokens` takes numpy on the CPU and the batched way
on a GPU, and this says whether that is the faster choice on the machine it runs on. Sampled rows (T = 0.8, with and
without top-p 0.95) always take numpy (a draw needs a cumulative sum, which CUDA has only in a nondeterministic form):
their cost is reported beside. Batches of 16-256 rows. Run alone:  python benchmarks/sampling_cost.py [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np
import torch
from report import write

from brep_rl.rollout import Sampling
from brep_rl.rollout.sampling import greedy_tokens_on_device, sample_token

VOCAB = 49152
REPEATS = 5


def row_by_row(scores: torch.Tensor, sampling: Sampling, rngs: list[np.random.Generator]) -> list[tuple[int, float]]:
    return [sample_token(row, sampling, rng) for row, rng in zip(scores.double().cpu().numpy(), rngs)]


def milliseconds(choose: Callable[[], object]) -> float:
    choose()  # warm-up
    start = time.perf_counter()
    for _ in range(REPEATS):
        choose()
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
        rngs = [np.random.default_rng(i) for i in range(batch)]  # made once per generate call, not per step

        def numpy_way(sampling: Sampling) -> float:
            return milliseconds(lambda: row_by_row(scores, sampling, rngs))

        numpy_ms = numpy_way(Sampling(1))
        # the tokens reach the CPU, as generate's next step needs
        device_ms = milliseconds(lambda: greedy_tokens_on_device(scores)[0].tolist())
        rows.append({"batch": batch, "greedy, numpy row by row, ms": numpy_ms, "greedy, on the device, ms": device_ms,
                     "device / numpy": device_ms / numpy_ms,
                     "T=0.8, numpy, ms": numpy_way(Sampling(1, temperature=0.8)),
                     "T=0.8 top-p 0.95, numpy, ms": numpy_way(Sampling(1, temperature=0.8, top_p=0.95))})
    write(f"sampling_cost-{args.device.split(':')[0]}", f"Choosing the next token, per step, scores on the {args.device}",
          rows, notes=f"Vocabulary {VOCAB}; mean of {REPEATS} steps after a warm-up; torch threads {args.threads}.",
          device=args.device)


if __name__ == "__main__":
    main()
