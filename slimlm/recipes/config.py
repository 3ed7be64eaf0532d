"""The base of every stage config: a small frozen dataclass, validated when it is built."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class StageConfig:
    """Fields shared by all stages."""

    method: ClassVar[str] = ""
    targets: str | None = None  # regex over fully-qualified linear names (e.g. "mlp"); default: every projection of every decoder block
    exclude: str | None = None  # regex of linear names this stage leaves alone, even when 'targets' matches them (e.g. "down_proj")

    def __post_init__(self) -> None:
        for key in ("targets", "exclude"):
            pattern = getattr(self, key)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    self.fail(key, f"is not a valid regular expression ({err})", "write a Python regex such as 'mlp\\.(up|gate)_proj'")

    def selects(self, name: str) -> bool:
        """Whether this stage edits the linear with fully-qualified `name`: matched by 'targets', not by 'exclude'."""
        included = self.targets is None or re.search(self.targets, name) is not None
        return included and (self.exclude is None or re.search(self.exclude, name) is None)

    def fail(self, key: str, problem: str, fix: str) -> None:
        raise SlimlmError(f"{self.method}: '{key}' {problem}", fix)


def check_range(
    config: StageConfig,
    key: str,
    value: float,
    low: float,
    high: float,
    upper_open: bool = False,
) -> None:
    """Refuse a value outside [low, high] (or [low, high)) with a message naming the stage, key and range."""
    too_high = value >= high if upper_open else value > high
    if math.isnan(value) or value < low or too_high:
        closing = ")" if upper_open else "]"
        config.fail(key, f"is {value}, outside [{low}, {high}{closing}", f"set '{key}' within [{low}, {high}{closing}")
