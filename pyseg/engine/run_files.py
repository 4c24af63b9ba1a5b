"""The names a run's outputs go by, in one place: the metric keys of results.csv rows (and of Ray reports and
MLflow) and the checkpoint files in a run's weights/ folder."""

MASK_MAP = "mask/map"  # mask mAP50-95: what best.pt, early stopping, searches and schedulers rank by
MASK_MAP50 = "mask/map50"
BOX_MAP = "box/map"
BOX_MAP50 = "box/map50"
BEST_METRIC = MASK_MAP

WEIGHTS_DIR = "weights"
LAST_CHECKPOINT = "last.pt"  # the latest epoch: what --resume continues
BEST_CHECKPOINT = "best.pt"  # the epoch with the best BEST_METRIC
