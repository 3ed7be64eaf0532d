"""Multiple-choice knapsack by dynamic programming: per knob one option, least total proxy KL within a byte budget.

dp[b] = the least Σ cost of the knobs seen so far using at most b units; adding a knob with options (cost c_o,
size w_o) gives dp'[b] = min_o dp[b − w_o] + c_o. One pass over the knobs answers every budget up to the
largest at once: backtracking from dp[b] gives the optimum for b. Sizes are rounded *up* to units of
ceil(capacity / resolution) bytes, so every answer fits its budget in exact bytes; the answer is exact on the
rounded sizes (at most one unit per knob away from the exact optimum's bytes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_RESOLUTION = 20_000  # units the largest budget is split into


@dataclass
class KnapsackTable:
    unit: int  # bytes per unit
    best: np.ndarray  # (capacity + 1,) least total cost within b units
    choices: np.ndarray  # (groups, capacity + 1) option index chosen for each group at each remaining capacity
    widths: list[np.ndarray]  # per group, each option's size in units

    def solve(self, budget: int) -> list[int] | None:
        """One option index per group with Σ size ≤ budget bytes and the least Σ cost; None if nothing fits."""
        b = min(budget // self.unit, len(self.best) - 1)
        if b < 0 or not np.isfinite(self.best[b]):
            return None
        picks = []
        for group in range(len(self.widths) - 1, -1, -1):
            option = int(self.choices[group, b])
            picks.append(option)
            b -= int(self.widths[group][option])
        return picks[::-1]


def knapsack(
    costs: list[np.ndarray], sizes: list[np.ndarray], capacity: int, resolution: int = DEFAULT_RESOLUTION
) -> KnapsackTable:
    """Tabulate the multiple-choice knapsack for every budget up to `capacity` bytes (see the module docstring)."""
    unit = max(1, -(-capacity // resolution))
    cap = capacity // unit
    best = np.zeros(cap + 1)  # no group yet: cost 0 at any capacity
    choices = np.full((len(costs), cap + 1), -1, dtype=np.int32)
    widths = []
    for group, (cost, size) in enumerate(zip(costs, sizes)):
        width = -(-np.asarray(size, dtype=np.int64) // unit)
        widths.append(width)
        new = np.full(cap + 1, np.inf)
        for option in np.argsort(cost, kind="stable"):
            w = int(width[option])
            if w > cap:
                continue
            candidate = np.full(cap + 1, np.inf)
            candidate[w:] = best[: cap + 1 - w] + cost[option]
            better = candidate < new
            new[better] = candidate[better]
            choices[group, better] = option
        best = new
    return KnapsackTable(unit, best, choices, widths)
