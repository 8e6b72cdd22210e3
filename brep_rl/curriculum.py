"""A curriculum for GRPO: levels of problems, raised when the rolling training accuracy over the last `window` groups
is above `raise_above` and lowered when it is below `lower_below` (0.70 / 0.10, as reasoning-gym's training configs
do). The levels: reasoning-gym's own curriculum (e.g. chain_sum: terms 2, 3, ... and digits 1, 2, ...), or for
`gsm8k` the calculator-step tiers of its `fit` split, fewest steps first (level k: problems of at most k + 1 steps).

The trainer keeps drawing batches from its dataset as usual; each group's prompt is then replaced by a problem of
the current level (train split, drawn by a generator fixed by the step and rank), so the rest of TRL is unchanged.
Held-out evaluation stays on fixed configs.
"""

from __future__ import annotations

import random
from collections import deque
from typing import Any

from brep_rl.data import Problem, in_split, rg_problem
from brep_rl.errors import ConfigError


class Curriculum:
    def __init__(self, name: str, window: int = 32, raise_above: float = 0.7, lower_below: float = 0.1,
                 start_level: int = 0, pool: int = 256):
        if not 0 <= lower_below < raise_above <= 1:
            raise ConfigError(f"curriculum thresholds: expected 0 <= lower < raise <= 1, got {lower_below}, {raise_above}")
        self.levels = GSM8KTiers() if name == "gsm8k" else ReasoningGymLevels(name, pool)
        self.name = name
        self.window = deque(maxlen=window)
        self.raise_above, self.lower_below = raise_above, lower_below
        self.level = 0
        self.set_level(start_level)

    @property
    def max_level(self) -> int:
        return self.levels.max_level

    def set_level(self, level: int) -> None:
        self.level = max(0, min(level, self.max_level))

    def problems(self) -> list[Problem]:
        return self.levels.problems(self.level)

    def draw(self, count: int, seed: int) -> list[Problem]:
        rng = random.Random(seed)
        pool = self.problems()
        return [pool[rng.randrange(len(pool))] for _ in range(count)]

    def record(self, group_accuracies: list[float]) -> int:
        """Add the accuracy of finished groups; move a level when the full window says so. Returns the level."""
        self.window.extend(group_accuracies)
        if len(self.window) == self.window.maxlen:
            mean = sum(self.window) / len(self.window)
            if mean > self.raise_above and self.level < self.max_level:
                self.set_level(self.level + 1)
                self.window.clear()
            elif mean < self.lower_below and self.level > 0:
                self.set_level(self.level - 1)
                self.window.clear()
        return self.level

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the level and the accuracy of the latest groups, oldest first."""
        return {"level": self.level, "window": list(self.window)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.set_level(int(state["level"]))
        self.window.clear()
        self.window.extend(state["window"])


class ReasoningGymLevels:
    """reasoning-gym's curriculum: its global level sets every attribute (terms, digits, ...) at once."""

    def __init__(self, name: str, pool: int):
        from reasoning_gym.factory import create_curriculum, has_curriculum

        if not has_curriculum(name):
            raise ConfigError(f"--curriculum: reasoning-gym has no curriculum for {name!r} (or use gsm8k)")
        self.name, self.pool_size = name, pool
        self.rg = create_curriculum(name)
        self.max_level = max(len(a.levels) for a in self.rg.attributes.values()) - 1
        self.pools: dict[int, list[Problem]] = {}

    def config(self, level: int) -> dict[str, Any]:
        """The reasoning-gym config of a level (without seed and size)."""
        self.rg.set_global_level(level)
        generated = vars(self.rg.generate_configuration({"seed": 0, "size": 1}))
        return {k: v for k, v in generated.items() if k not in ("seed", "size")}

    def problems(self, level: int) -> list[Problem]:
        """A pool of train-split problems of the level (made once per level)."""
        if level not in self.pools:
            import reasoning_gym

            dataset = reasoning_gym.create_dataset(self.name, seed=1000 + level, size=self.pool_size * 6, **self.config(level))
            pool = []
            for index, entry in enumerate(dataset):
                if in_split(entry["question"], "train"):
                    pool.append(rg_problem(entry, f"rg-{self.name}-L{level}-{index}"))
                if len(pool) == self.pool_size:
                    break
            self.pools[level] = pool
        return self.pools[level]


class GSM8KTiers:
    """GSM8K `fit` (train minus validation) by calculator steps: level k holds the problems of at most k + 1 steps."""

    max_level = 3  # 1, <= 2, <= 3, all

    def __init__(self):
        from brep_rl.data import load_task

        self.all = load_task("gsm8k", "fit")

    def problems(self, level: int) -> list[Problem]:
        return [p for p in self.all if level == self.max_level or p.meta["steps"] <= level + 1]
