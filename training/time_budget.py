"""train.time_budget_min: a run that must end within a wall-clock budget, counted across restarts."""

from __future__ import annotations

import time
from typing import Optional

# The steps timed (after warm-up) to fit the LR schedule into the budget, and the share of the budget
# left for steps (the rest: validation, checkpoints, the final save).
CALIBRATION_STEPS = (10, 30)
BUDGET_SHARE_FOR_STEPS = 0.9


def steps_within_budget(step: int, seconds_left: float, per_step: float) -> int:
    """The last step that fits in seconds_left at per_step seconds a step, leaving a share for the rest."""
    return step + max(0, int(seconds_left * BUDGET_SHARE_FOR_STEPS / per_step))


class TimeBudget:
    """train.time_budget_min, counted on a monotonic clock and across restarts: each checkpoint records the
    seconds used so far, and a resumed run starts from there."""

    def __init__(self, minutes: Optional[float], used_before: float = 0.0):
        self.limit_s = minutes * 60 if minutes else None
        self.used_before = used_before
        self.start = time.monotonic()

    @property
    def limited(self) -> bool:
        return self.limit_s is not None

    def used(self) -> float:
        return self.used_before + time.monotonic() - self.start

    def left(self) -> float:
        return self.limit_s - self.used() if self.limited else float("inf")

    def spent(self) -> bool:
        return self.limited and self.used() > self.limit_s
