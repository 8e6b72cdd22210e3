"""Some kinds of chain_sum problems only, as a JSONL task for `brep-rl grpo --task FILE`: train where the policy's
headroom is (benchmarks/headroom.py by kind) instead of on problems it already gets right.

    python scripts/chain_sum_subset.py --kinds subtraction "negative result" --out runs/data/chain_sum_subtractions.jsonl

Reads the first --limit train-split problems of the config (the ones the rg:chain_sum runs draw from) and keeps
those of the given kinds (brep_rl.data.chain_sum_kind), with their reasoning-gym ids.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from brep_rl.arguments import CHAIN_SUM_2X2
from brep_rl.data import CHAIN_SUM_KINDS, chain_sum_kind, json_mapping, load_task
from brep_rl.files import write_jsonl


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", required=True, choices=CHAIN_SUM_KINDS)
    parser.add_argument("--rg_config", default=CHAIN_SUM_2X2)
    parser.add_argument("--limit", type=int, default=4000, help="train problems read (before keeping the kinds)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    problems = load_task("rg:chain_sum", "train", args.limit, rg_config=json_mapping(args.rg_config))
    kinds = [chain_sum_kind(p) for p in problems]
    kept = [p for p, kind in zip(problems, kinds, strict=True) if kind in args.kinds]
    write_jsonl(args.out, [{"id": p.id, "question": p.question, "answer": p.answer} for p in kept])
    print(f"{args.out}: {len(kept)} of {len(problems)} problems ({dict(Counter(kinds))})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
