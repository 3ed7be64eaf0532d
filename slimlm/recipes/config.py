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

    def __post_init__(self) -> None:
        if self.targets is not None:
            try:
                re.compile(self.targets)
            except re.error as err:
                self.fail("targets", f"is not a valid regular expression ({err})", "write a Python regex such as 'mlp\\.(up|gate)_proj'")

    def selects(self, name: str) -> bool:
        """Whether this stage edits the linear with fully-qualified `name`."""
        return self.targets is None or re.search(self.targets, name) is not None

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
