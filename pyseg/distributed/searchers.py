"""The search algorithms of a resumed search (this module imports Ray): the trials to continue first, then new
samples from a random or TPE searcher that has been told the finished trials' results."""

from __future__ import annotations

import numpy as np
from ray.tune.search import Searcher
from ray.tune.search.sample import Domain

from pyseg.distributed.search_state import CONTINUES


class RandomSearch(Searcher):
    """Samples every Tune domain of the search space independently at random, from a seeded numpy generator."""

    def __init__(self, seed: int, metric: str | None = None, mode: str | None = None):
        super().__init__(metric=metric, mode=mode)
        self._space: dict | None = None
        self._rng = np.random.default_rng(seed)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        if self._space is not None:
            return False
        self._space = config
        self._metric, self._mode = metric or self._metric, mode or self._mode
        return True

    def suggest(self, trial_id: str) -> dict:
        return {
            key: value.sample(random_state=self._rng) if isinstance(value, Domain) else value
            for key, value in self._space.items()
        }

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # random sampling learns nothing from results

    def add_evaluated_point(self, parameters: dict, value: float, **kwargs) -> None:
        pass


class ContinuedSearch(Searcher):
    """A resumed search's searcher: first each trial to continue, with its recorded values and the folder it
    continues in (config[CONTINUES]); then what inner suggests. inner is told the finished trials' results first
    (finished: [(values, metric)], when it models results, as Optuna's TPE does) and only ever hears about the
    trials it suggested itself."""

    def __init__(self, inner: Searcher, continued: dict[str, dict], finished: list[tuple[dict, float]] = ()):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner = inner
        self._to_continue = list(continued.items())  # [(folder, values)]
        self._finished = list(finished)
        self._continuing: set[str] = set()  # Tune trial ids of the continued trials

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        accepted = self.inner.set_search_properties(metric, mode, config, **spec)
        self._metric, self._mode = self.inner.metric, self.inner.mode
        searched = [key for key, value in config.items() if isinstance(value, Domain)]
        for values, metric_value in self._finished:
            self.inner.add_evaluated_point({key: values[key] for key in searched if key in values}, metric_value)
        self._finished = []
        return accepted

    def suggest(self, trial_id: str) -> dict | None:
        if self._to_continue:
            folder, values = self._to_continue.pop(0)
            self._continuing.add(trial_id)
            return {**values, CONTINUES: folder}
        return self.inner.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._continuing:
            self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._continuing:
            self.inner.on_trial_complete(trial_id, result=result, error=error)
