"""The Tune callback that keeps a search's record (search.json) current (this module imports Ray)."""

from __future__ import annotations

from ray.tune import Callback

from pyseg.distributed.search_state import ENDED, FAILED, RecordKeeper, trial_folder


class RecordCallback(Callback):
    """Saves every trial's start, end (done, or stopped by the scheduler) and failure in the search's record. A
    trial still running when the search is interrupted stays RUNNING there: --resume continues it."""

    def __init__(self, keeper: RecordKeeper):
        self.keeper = keeper

    def on_trial_start(self, iteration, trials, trial, **info):
        self.keeper.trial_started(trial_folder(trial), trial.config)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.keeper.trial_ended(trial_folder(trial), trial.config, ENDED)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.keeper.trial_ended(trial_folder(trial), trial.config, FAILED)
