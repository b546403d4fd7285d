"""The time budget of `launch/bench.py gpu` (`--budget-s`): how many repeats or steps each section gets.

Sections run in order of value. Before each one the plan is made again from the time actually left: a section
whose smallest form (its fixed start-up plus its fewest units) no longer fits is not started; otherwise it gets the
units that fit beside the smallest forms of the sections after it, between its own least and most. When the
smallest forms of all do not fit, the earlier section is served first and later ones fall out.

The costs are estimates (start-up and one unit, in seconds). A section's own measurement replaces a later one's
guess where it can: the training part's step cost is taken from the ViT-B step the bench timed before it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class SectionCost:
    """Estimated seconds of one section: `fixed_s + units * unit_s`, with `min_units <= units <= max_units`."""

    fixed_s: float
    unit_s: float
    min_units: int = 1
    max_units: int = 1
    unit: str = "repeats"
    """What a unit is (repeats, steps, batches), for the printed line."""

    def seconds(self, units: int) -> float:
        return self.fixed_s + units * self.unit_s

    @property
    def least_s(self) -> float:
        return self.seconds(self.min_units)


@dataclass(frozen=True)
class SectionPlan:
    """What a section was given: its units and the seconds that should take."""

    units: int
    planned_s: float


class Budget:
    """Seconds left of `budget_s` since construction, and the plan of each section in turn."""

    def __init__(
        self, budget_s: float, costs: dict[str, SectionCost], clock: Callable[[], float] = time.perf_counter
    ) -> None:
        """
        Args:
            budget_s: wall seconds for every section together.
            costs: section name -> its estimated cost, in the order the sections run.
            clock: seconds (tests pass a fake one).
        """
        self.budget_s = budget_s
        self.costs = dict(costs)
        self.clock = clock
        self.started = clock()

    def left(self) -> float:
        return self.budget_s - (self.clock() - self.started)

    def update(self, name: str, unit_s: float | None = None, fixed_s: float | None = None) -> None:
        """Replace a guess with a measured cost."""
        cost = self.costs[name]
        if unit_s is not None and math.isfinite(unit_s) and unit_s > 0:
            cost.unit_s = unit_s
        if fixed_s is not None and math.isfinite(fixed_s) and fixed_s > 0:
            cost.fixed_s = fixed_s

    def plan(self, name: str) -> SectionPlan | None:
        """The units `name` gets now, or None when even its smallest form does not fit in the time left."""
        cost, left = self.costs[name], self.left()
        if cost.least_s > left:
            return None
        names = list(self.costs)
        later = sum(self.costs[other].least_s for other in names[names.index(name) + 1 :])
        spare = max(left - later, cost.least_s)
        fitting = math.floor((spare - cost.fixed_s) / cost.unit_s) if cost.unit_s > 0 else cost.max_units
        units = max(cost.min_units, min(cost.max_units, fitting))
        return SectionPlan(units, cost.seconds(units))

    def refusal(self, name: str) -> str:
        """Why `plan(name)` returned None, in words."""
        return f"budget: {max(self.left(), 0.0):.0f} s left, the section needs about {self.costs[name].least_s:.0f} s"
