"""The searchers of a resumed search: the trials to continue first, then new samples from a searcher told the
finished trials' results."""

from __future__ import annotations

import pytest

from pyseg.distributed.search import METRIC, _search_algorithm
from pyseg.distributed.search_resume import SearchPlan
from pyseg.distributed.search_settings import TuneSettings
from pyseg.distributed.search_space import to_tune_space
from pyseg.distributed.search_state import CONTINUES, ENDED, RUNNING, TrialRecord

SPACE = {"lr0": ("loguniform", [1e-4, 1e-2]), "optimizer": ("fixed", "adamw")}


def plan(finished: int, to_continue: int) -> SearchPlan:
    return SearchPlan(
        finished={f"f{i}": TrialRecord(ENDED, {"lr0": 1e-3 * (i + 1), "optimizer": "adamw"}) for i in range(finished)},
        to_continue={
            f"c{i}": TrialRecord(RUNNING, {"lr0": 5e-3 + i * 1e-4, "optimizer": "adamw"}) for i in range(to_continue)
        },
        finished_points=[({"lr0": 1e-3 * (i + 1), "optimizer": "adamw"}, 0.1 * i) for i in range(finished)],
        new_samples=3,
        epochs_trained=0,
        time_left_s=None,
        budget_spent=None,
    )


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_a_resumed_search_continues_its_trials_first_then_samples_new_values(search):
    if search == "optuna":
        pytest.importorskip("optuna")
    resumed = plan(finished=2, to_continue=2)
    algorithm = _search_algorithm(TuneSettings(search=search, samples=7, seed=0), max_concurrent=10, resumed=resumed)
    algorithm.set_search_properties(METRIC, "max", to_tune_space(SPACE))
    suggested = [algorithm.suggest(f"t{i}") for i in range(5)]
    assert suggested[:2] == [
        {"lr0": 5e-3, "optimizer": "adamw", CONTINUES: "c0"},
        {"lr0": 5.1e-3, "optimizer": "adamw", CONTINUES: "c1"},
    ]
    new = suggested[2:]
    assert all(CONTINUES not in s and 1e-4 <= s["lr0"] <= 1e-2 for s in new)  # Tune adds the fixed values
    # the continued trials end without the inner searcher hearing of them (Optuna knows only its own trials)
    algorithm.on_trial_complete("t0", result={METRIC: 0.5, "lr0": 5e-3})
    algorithm.on_trial_complete("t2", result={METRIC: 0.2, **new[0]})
    if search == "optuna":
        studied = algorithm.searcher.inner._ot_study.trials
        told = [t for t in studied if t.state.name == "COMPLETE"]
        assert sorted(t.params["lr0"] for t in told)[:2] == [1e-3, 2e-3]  # the finished trials, told first
        assert sorted(t.value for t in told) == [0.0, 0.1, 0.2]


def test_new_samples_of_a_resumed_random_search_are_not_its_first_trials_again():
    space = to_tune_space(SPACE)

    def first_new(started: int) -> float:
        algorithm = _search_algorithm(TuneSettings(search="random", samples=8, seed=0), 4, plan(started, 0))
        algorithm.set_search_properties(METRIC, "max", space)
        return algorithm.suggest("t")["lr0"]

    assert first_new(1) != first_new(2)
    assert first_new(1) == first_new(1)  # seeded
