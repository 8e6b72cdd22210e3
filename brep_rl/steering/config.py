"""SteeringConfig: what to steer, where, and how hard it may push."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brep_rl.errors import ConfigError
from brep_rl.files import to_json

MODES = ("bias", "prefix", "bias+prefix")
INITS = ("zeros", "normal")
CONFIG_NAME = "steering_config.json"
# a bias on this site adds straight into the layer's output: a llama.cpp control vector (the only site it can apply)
CONTROL_VECTOR_SITE = "mlp.down_proj"


@dataclass
class SteeringConfig:
    """How steering vectors attach to a model.

    site: submodule of every decoder layer whose output is steered. `mlp.down_proj` adds straight
        into the residual stream (a llama.cpp control vector on that layer); `mlp.up_proj` is BREP's.
    layers: decoder-layer indices to steer; None steers all of them.
    mode: `bias` (every position), `prefix` (prompt + first `prefix_tokens` answer tokens, BREP),
        or `bias+prefix` (both, as two separate vectors).
    radius: the norm restraint. None: unrestrained. Otherwise `project()` puts each layer's vector
        back in the L2 ball of this radius; with `radius_relative` the radius is a multiple of the
        site's median output norm on that layer (`site_norms`, measured by `calibrate`).
    penalty: weight of an optional L2 penalty (sum of squared norms) that trainers add to the loss.
    init: `zeros` (the steered model starts as the base) or `normal` with std `init_std`.
    base_model, hidden_size, num_hidden_layers, model_type, base_fingerprint: filled in on attach; checked on load
        (the fingerprint: a few weights of the base, so vectors for one model refuse another of the same shape).
    provenance: free-form record of how the vectors were trained (trainer, data, steps, ...).
    """

    site: str = CONTROL_VECTOR_SITE
    layers: list[int] | None = None
    mode: str = "bias"
    prefix_tokens: int = 8
    radius: float | None = None
    radius_relative: bool = False
    site_norms: list[float] | None = None
    penalty: float = 0.0
    init: str = "zeros"
    init_std: float = 0.01
    base_model: str | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    model_type: str | None = None
    base_fingerprint: list[float] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def uses_bias(self) -> bool:
        return self.mode in ("bias", "bias+prefix")

    @property
    def uses_prefix(self) -> bool:
        return self.mode in ("prefix", "bias+prefix")

    def control_vector_obstacle(self) -> str | None:
        """Why a llama.cpp control vector (added to a layer's output, from layer 1 on) cannot carry these vectors, or
        None when it can. Export, the model card and the llama.cpp backend each turn it into their own error."""
        if self.site != CONTROL_VECTOR_SITE:
            return (f"a llama.cpp control vector is added to a layer's output, i.e. on steering site "
                    f"{CONTROL_VECTOR_SITE!r}; these vectors are on {self.site!r}, inside the layer")
        if self.layers is None or 0 in self.layers:
            return "llama.cpp control vectors cannot act on layer 0 (they start at layer 1): steer layers 1 and up"
        return None

    def validate(self) -> None:
        def fail(name: str, expected: str, got: Any) -> None:
            raise ConfigError(f"SteeringConfig.{name}: expected {expected}, got {got!r}")

        if not isinstance(self.site, str) or not self.site:
            fail("site", "a submodule path such as 'mlp.down_proj'", self.site)
        if self.mode not in MODES:
            fail("mode", f"one of {', '.join(map(repr, MODES))}", self.mode)
        if isinstance(self.prefix_tokens, bool) or not isinstance(self.prefix_tokens, int) or self.prefix_tokens < 0:
            fail("prefix_tokens", "an integer >= 0", self.prefix_tokens)
        if self.layers is not None:
            if not isinstance(self.layers, (list, tuple)) or not self.layers:
                fail("layers", "None (all layers) or a non-empty list of layer indices", self.layers)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in self.layers):
                fail("layers", "non-negative integer layer indices", self.layers)
            if len(set(self.layers)) != len(self.layers):
                fail("layers", "distinct layer indices", self.layers)
            self.layers = sorted(self.layers)
        if self.radius is not None and not (isinstance(self.radius, (int, float)) and math.isfinite(self.radius) and self.radius > 0):
            fail("radius", "None (no restraint) or a finite number > 0", self.radius)
        if self.radius_relative and self.radius is None:
            fail("radius", "a number when radius_relative is true", self.radius)
        if not isinstance(self.penalty, (int, float)) or self.penalty < 0:
            fail("penalty", "a number >= 0", self.penalty)
        if self.init not in INITS:
            fail("init", f"one of {', '.join(map(repr, INITS))}", self.init)
        if not isinstance(self.init_std, (int, float)) or self.init_std < 0:
            fail("init_std", "a number >= 0", self.init_std)
        if self.base_fingerprint is not None and not (
            isinstance(self.base_fingerprint, list) and all(isinstance(v, (int, float)) for v in self.base_fingerprint)
        ):
            fail("base_fingerprint", "None or a list of numbers", self.base_fingerprint)
        if self.site_norms is not None and self.layers is not None and len(self.site_norms) != len(self.layers):
            fail("site_norms", f"one norm per steered layer ({len(self.layers)})", self.site_norms)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> SteeringConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown SteeringConfig field(s) {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**data)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(to_json(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> SteeringConfig:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: steering config not found")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))
