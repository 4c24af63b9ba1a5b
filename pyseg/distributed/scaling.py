"""How many Ray Train workers a training has and what each holds: RayScaling, checked as config values are.
Importable without torch or Ray (a bad --ray-workers is refused before either loads)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pyseg.config import at_least, check_rules, unset_or
from pyseg.errors import ConfigError

# What each scaling setting may be (config's rule style), and the flags that set them where the field is named
# otherwise.
SCALING_RULES: dict[str, tuple] = {
    "workers": at_least(1),
    "gpus_per_worker": unset_or(at_least(0)),
    "cpus_per_worker": at_least(0, strictly=True),
    "max_failures": at_least(-1, note="(-1: unlimited)"),
    "min_workers": unset_or(at_least(1)),
}
SCALING_FLAGS = {"workers": "--ray-workers"}


@dataclass
class RayScaling:
    """Workers of one training: count, resources per worker, the cluster, and restarts after failures."""

    workers: int = 1
    gpus_per_worker: float | None = None  # None: 1 when the cluster has a GPU for every worker, else 0 (CPU)
    cpus_per_worker: float = 1.0
    address: str | None = None  # None: RAY_ADDRESS or a new local Ray; "auto": the running cluster; or a URL
    max_failures: int = 2  # worker-group restarts from the last checkpoint (-1 = unlimited)
    min_workers: int | None = None  # elastic: after a node is lost, go on with as few as this (None: always workers)

    def __post_init__(self):
        check_rules(vars(self), SCALING_RULES, SCALING_FLAGS)
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ConfigError(f"--min-workers must be <= --ray-workers {self.workers}, got {self.min_workers}")

    def resolved(self) -> RayScaling:
        """A copy with gpus_per_worker decided from the connected cluster's GPUs when it was left unset."""
        if self.gpus_per_worker is not None:
            return self
        import ray

        gpus = ray.cluster_resources().get("GPU", 0)
        return dataclasses.replace(self, gpus_per_worker=1.0 if gpus >= self.workers else 0.0)

    def resources_per_worker(self) -> dict[str, float]:
        resources = {"CPU": self.cpus_per_worker}
        if self.gpus_per_worker:
            resources["GPU"] = self.gpus_per_worker
        return resources

    def num_workers(self) -> int | tuple[int, int]:
        """Ray Train's num_workers: a count, or (min, max) for elastic training."""
        if self.min_workers is None or self.min_workers == self.workers:
            return self.workers
        return (self.min_workers, self.workers)
