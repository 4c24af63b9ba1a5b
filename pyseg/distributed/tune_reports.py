"""A Ray Train callback that hands every report of a trial's training, with its checkpoint, to the trial's driver
(this module imports Ray Train)."""

from __future__ import annotations

from ray.train import UserCallback


class ForwardReports(UserCallback):
    """Runs in Ray Train's controller: puts (rank 0's metrics, the report's checkpoint or None) on a Ray queue,
    which pyseg.distributed.search.report_with_checkpoints reads in the trial's driver and passes on to Tune."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        self.queue.put((dict(metrics[0]), checkpoint))
