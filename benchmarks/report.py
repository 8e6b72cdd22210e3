"""Write a benchmark's results as JSON + a markdown table under benchmarks/results/."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path

import torch

from brep_rl.files import write_json
from brep_rl.training import matmul_gflops

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "date": date.today().isoformat(),
            "matmul_gflops": matmul_gflops(seconds=1.0)}


def write(name: str, title: str, rows: list[dict], notes: str = "", **meta) -> Path:
    RESULTS.mkdir(exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **meta, "rows": rows}
    write_json(RESULTS / f"{name}.json", payload)
    columns = list(rows[0])
    lines = [f"# {title}", "", f"Machine: {payload['machine']}", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if notes:
        lines += ["", notes]
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
