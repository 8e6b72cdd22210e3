"""JSON the project writes: strict (no NaN or Infinity: null where a number is undefined) and written atomically."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def strict(data: Any) -> Any:
    """`data` with every non-finite float replaced by None, so that any JSON reader accepts it."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: strict(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict(v) for v in data]
    return data


def to_json(data: Any, **kwargs: Any) -> str:
    return json.dumps(strict(data), allow_nan=False, **kwargs)


def write_text(path: str | Path, text: str) -> None:
    """Write beside the destination, then rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    write_text(path, to_json(data, indent=2, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    write_text(path, "".join(to_json(row) + "\n" for row in rows))
