"""How a search runs: the settings of `python -m pyseg.tune` (its search flags), checked as config values are."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from pyseg.config import at_least, check_rules, one_of, unset_or
from pyseg.distributed.scaling import RayScaling
from pyseg.distributed.search_options import DEFAULT_SEARCH, SCHEDULERS, SEARCHES
from pyseg.errors import ConfigError


@dataclass
class TuneSettings:
    """How a search runs (python -m pyseg.tune flags)."""

    samples: int = 16
    scheduler: str = "asha"  # asha | pbt | none
    search: str | None = None  # optuna (Optuna's TPE) | random; None: DEFAULT_SEARCH, random under PBT
    workers_per_trial: int = 1
    gpus_per_trial: float | None = None  # in total per trial, split over its workers; None: 1 per worker with GPUs
    cpus_per_worker: float = 1.0
    max_concurrent: int = 0  # 0 = as many as the cluster's CPUs (or GPUs) allow
    time_budget: float = 0.0  # seconds, 0 = none
    address: str | None = None
    resume: bool = False
    name: str = "tune"
    grace_period: int = 0  # ASHA: epochs before a trial can be stopped (0 = max(1, epochs // 10))
    progress_every_s: float = 30.0  # in a log (not a terminal): seconds between status lines
    verbose: bool = False  # show Ray's and Tune's own output (worker logs, warnings, Tune's tables)
    epoch_budget: int = 0  # stop the search after this many trial-epochs in all (0 = none): equal-compute comparisons
    seed: int = 0  # the search's sampler (random or TPE); the trials' own seed is the config's
    max_failures: int = 2  # restarts of a trial's workers from its last checkpoint (a lost node, a crash)
    perturbation_interval: int = 0  # PBT: epochs between exploit/explore steps (0 = max(1, epochs // 5))
    storage: str = ""  # a URI (s3://...) that keeps the search when nodes share no disk; "" = the project folder
    # a trial of one worker drives a TorchTrainer too, instead of training in its own process (bench_scaling's
    # baseline: the start-up that costs)
    torch_trainer_per_trial: bool = False

    def __post_init__(self):
        if self.search is None:
            self.search = "random" if self.scheduler == "pbt" else DEFAULT_SEARCH
        check_rules(vars(self), SETTINGS_RULES)
        if self.scheduler == "pbt" and self.search != "random":
            raise ConfigError(
                "--scheduler pbt samples its first population at random and then evolves it: leave out --search "
                "(or give --search random)"
            )
        if self.search == "optuna" and importlib.util.find_spec("optuna") is None:
            raise ConfigError("--search optuna needs Optuna: pip install optuna (or leave out --search)")

    def scaling(self) -> RayScaling:
        gpus = None if self.gpus_per_trial is None else self.gpus_per_trial / self.workers_per_trial
        return RayScaling(
            self.workers_per_trial, gpus, self.cpus_per_worker, self.address, max_failures=self.max_failures
        )


# What each search setting may be (config's rule style: (allowed, what)); fields not named here take any value.
SETTINGS_RULES: dict[str, tuple] = {
    "samples": at_least(1),
    "scheduler": one_of(SCHEDULERS),
    "search": one_of(SEARCHES),
    "workers_per_trial": at_least(1),
    "gpus_per_trial": unset_or(at_least(0)),
    "cpus_per_worker": at_least(0, strictly=True),
    "max_concurrent": at_least(0),
    "time_budget": at_least(0),
    "grace_period": at_least(0),
    "progress_every_s": at_least(0),
    "epoch_budget": at_least(0),
    "max_failures": at_least(-1, note="(-1: unlimited)"),
    "perturbation_interval": at_least(0),
}
