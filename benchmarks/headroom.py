"""Headroom before RL: pass@k of the base and of steering artifacts on a task, at a few temperatures.

GRPO learns only from groups with mixed rewards: where pass@k (k = the group size) is far above pass@1, sampling
finds right answers the policy does not prefer yet, and RL has something to amplify.

    python benchmarks/headroom.py --task rg:chain_sum --rg_config '{"min_terms": 2, "max_terms": 2, ...}' \
        --steering artifacts/smollm2-chain-sum-sft --limit 100 --samples 16 --temperatures 0.7,1.0

Writes benchmarks/results/headroom-<name>.{json,md}; per-sample records go to runs/headroom/<name>-T<t>/ (re-running
resumes). Run it alone: it uses every core.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from report import write

from brep_rl import load_base
from brep_rl.arguments import EvalSettings
from brep_rl.data import Problem, chain_sum_kind, json_mapping, load_task
from brep_rl.evaluate import evaluate, read_records
from brep_rl.metrics import pass_at_k


def tier(problem: Problem) -> str:
    """GSM8K problems by the calculator steps of their reference solution (1, 2, 3, 4+); chain_sum by what the sum
    asks (data.chain_sum_kind); other tasks: all."""
    steps = problem.meta.get("steps")
    if steps is not None:
        return "4+" if steps >= 4 else str(steps)
    return chain_sum_kind(problem) or "all"


def pass_at_ks(records: list[dict], ks: list[int], tiers: dict[str, str]) -> list[dict]:
    """One row per (model, tier), and per model over all tiers when there are several: problems, mean per-sample
    accuracy and unbiased pass@k, from per-sample records."""
    correct: dict[tuple[str, str], dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    several = len(set(tiers.values())) > 1
    for r in records:
        for group in (tiers[r["problem_id"]], "all") if several else (tiers[r["problem_id"]],):
            correct[(r["model"], group)][r["problem_id"]].append(bool(r["correct"]))
    rows = []
    for (model, group), problems in sorted(correct.items()):
        n = min(len(v) for v in problems.values())
        row = {"model": model, "tier": group, "problems": len(problems),
               "per sample": sum(sum(v) / len(v) for v in problems.values()) / len(problems)}
        for k in ks:
            if k <= n:
                row[f"pass@{k}"] = sum(pass_at_k(len(v), sum(v), k) for v in problems.values()) / len(problems)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="names the results file")
    parser.add_argument("--task", default="rg:chain_sum")
    parser.add_argument("--split", default="test")
    parser.add_argument("--rg_config", default=None)
    parser.add_argument("--steering", action="append", default=[])
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--per_tier", type=int, default=None, help="GSM8K: this many problems of each step tier")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--ks", default="1,4,16")
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=128,
                        help="sequences decoded at once; at least 2x --samples lets a problem start while another ends")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    model, tokenizer = load_base("smollm2-135m")
    problems = load_task(args.task, args.split, None if args.per_tier else args.limit, rg_config=json_mapping(args.rg_config))
    if args.per_tier:  # the first problems of each tier, in file order
        by_tier: dict[str, list[Problem]] = defaultdict(list)
        for p in problems:
            if len(by_tier[tier(p)]) < args.per_tier:
                by_tier[tier(p)].append(p)
        problems = [p for group in sorted(by_tier) for p in by_tier[group]]
    tiers = {p.id: tier(p) for p in problems}
    rows = []
    for temperature in map(float, args.temperatures.split(",")):
        settings = EvalSettings(task=args.task, split=args.split, limit=len(problems), samples=args.samples,
                                temperature=temperature, max_new_tokens=args.max_new_tokens, rg_config=args.rg_config,
                                batch_size=args.batch_size)
        output = Path("runs/headroom") / f"{args.name}-T{temperature}"
        start = time.perf_counter()
        evaluate(model, tokenizer, settings, args.steering, [1.0], output, problems=problems)
        records = read_records(output / "samples.jsonl")
        rows += [{"temperature": temperature, **row} for row in pass_at_ks(records, ks, tiers)]
        print(f"T={temperature}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    write(f"headroom-{args.name}", f"Headroom: pass@k on {args.task} ({args.split}, n={len(problems)}, "
          f"{args.samples} samples, {args.max_new_tokens} tokens)", rows,
          notes="pass@k unbiased (Chen et al. 2021) from the samples of each problem; `per sample` = mean accuracy.",
          task=args.task, rg_config=args.rg_config, steering=args.steering, threads=args.threads,
          batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
