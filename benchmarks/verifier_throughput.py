"""Verifier throughput and behaviour on pathological inputs, with the wall-clock timeout mechanism on.

Checks/s for plain numbers (compared in-process), LaTeX that needs math-verify (worker processes), and a mix
like a GRPO batch; then how long pathological completions take and what they score. Target: >= 800 checks/s.
Run alone: python benchmarks/verifier_throughput.py
"""

from __future__ import annotations

import time

from report import write

from reward import Verifier, extract_answer


def distinct_latex(n: int) -> tuple[list[str], list[str]]:
    """n distinct (gold, prediction) pairs that need math-verify, about half of them equal.

    Distinct on purpose: a repeated pair measures a cache (math-verify's or a future one of ours), not checks.
    """
    golds, predictions = [], []
    for i in range(n):
        a, b, right = i // 4 + 2, (i // 4) % 7 + 3, i % 8 < 4
        gold, prediction = [
            (f"\\frac{{{a}}}{{{b}}}", f"{a / b if right else a / b + 1:.12g}"),
            (f"x^2+{a}", f"{a}+x^2" if right else f"{a}-x^2"),
            (f"{a}\\%", f"{a if right else a + 1}"),
            (f"\\sqrt{{{a}}}/{b}", f"\\frac{{\\sqrt{{{a}}}}}{{{b if right else b + 1}}}"),
        ][i % 4]
        golds.append(gold)
        predictions.append(prediction)
    return golds, predictions


def rate(verifier: Verifier, golds: list[str], predictions: list[str]) -> float:
    verifier.check(golds[:4], predictions[:4])  # workers started before timing
    start = time.perf_counter()
    verifier.check(golds, predictions)
    return len(golds) / (time.perf_counter() - start)


def main() -> None:
    rows = []
    with Verifier(timeout=5.0, workers=2) as v:
        numbers = ([str(i) for i in range(2000)], [f"{i}.0" if i % 2 else str(i + 1) for i in range(2000)])
        latex = distinct_latex(600)
        mixed = (numbers[0][:180] + latex[0][:20], numbers[1][:180] + latex[1][:20])
        for name, (golds, preds) in {"plain numbers (in-process)": numbers, "LaTeX via math-verify (2 workers, distinct pairs)": latex,
                                     "GRPO-like mix: 90% numbers, 10% LaTeX": mixed}.items():
            rows.append({"inputs": name, "checks": len(golds), "checks/s": rate(v, golds, preds), "seconds": "", "score": ""})
    pathological = {
        "nested \\sqrt x3000": "\\sqrt{" * 3000 + "}" * 3000,
        "1 MB of digits": "1" * 1_000_000,
        "\\boxed{} with 10k terms": "\\boxed{" + "+".join(["x"] * 10_000) + "}",
        "deep braces x5000": "{" * 5000 + "1" + "}" * 5000,
    }
    with Verifier(timeout=2.0, workers=2) as v:
        for name, completion in pathological.items():
            start = time.perf_counter()
            answer = extract_answer(completion)
            score = v.check(["2"], [answer])[0]
            rows.append({"inputs": f"pathological: {name}", "checks": 1, "checks/s": "", "seconds": time.perf_counter() - start,
                         "score": int(score)})
        timeouts = v.stats.timeouts
    write("verifier_throughput", "Verifier throughput (timeout on) and pathological inputs", rows,
          notes=f"Timeout 2 s for the pathological rows ({timeouts} of them timed out, scored 0 and were counted). "
                "Target >= 800 checks/s. The LaTeX pairs are distinct: math-verify caches its last 20 parses, so repeated "
                "pairs would time that cache (4 pairs repeated 50 times read 660 checks/s).")


if __name__ == "__main__":
    main()
