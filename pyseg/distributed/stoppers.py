"""Tune stoppers of pyseg's searches (this module imports Ray)."""

from __future__ import annotations

from ray.tune import Stopper


class TrialEpochBudget(Stopper):
    """Ends the whole search once its trials have reported `budget` epochs in all (each report is one trained
    epoch), so that searches of different kinds can be compared at the same compute. used: the epochs trained
    before (a resumed search's)."""

    def __init__(self, budget: int, used: int = 0):
        self.budget, self.used = budget, used

    def __call__(self, trial_id: str, result: dict) -> bool:
        self.used += 1
        return False

    def stop_all(self) -> bool:
        return self.used >= self.budget
