"""The end of a search: tune_results.csv (every trial's best epoch, best first), best.yaml, the best checkpoint and
the pictures, from the search's record and each trial's own results.csv."""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from pyseg.config import TrainConfig
from pyseg.distributed.search_state import ENDED, FAILED, SearchRecord
from pyseg.distributed.search_view import abbreviate, format_value, legend, ranked_table
from pyseg.distributed.storage import Storage
from pyseg.engine.run_files import BEST_CHECKPOINT, BOX_MAP, MASK_MAP50, WEIGHTS_DIR
from pyseg.engine.run_files import BEST_METRIC as METRIC
from pyseg.engine.trainer import parse_number, read_results
from pyseg.files import atomic_write_text

TRIALS = "trials"  # the trials' run folders, in the search's folder


@dataclass
class TuneSummary:
    experiment_dir: Path
    results_csv: Path
    best_config: Path | None
    best_checkpoint: Path | None
    best_trial: str | None
    best_metric: float | None
    rows: list[dict]
    unfinished: int = 0  # trials neither done nor failed: the search was interrupted or ran out of budget
    pictures: list[Path] = dataclasses.field(default_factory=list)  # tune_curves.png, tune_params.png, ...
    tracking_uri: str | None = None  # the MLflow store the trials were logged to
    mlflow_experiment_id: str | None = None
    budget_spent: str | None = None  # "time" or "epoch" when that budget ended the search (else None)
    samples: int = 0  # trials the search samples in all
    epochs: int = 0  # epochs per trial


def summarize(
    record: SearchRecord,
    base: TrainConfig,
    searched: list[str],
    experiment_dir: Path,
    trials_dir: Path,
    samples: int,
    kept: Storage | None = None,
    legend_shown: bool = False,
) -> TuneSummary:
    """tune_results.csv (best epoch of every trial of the record, sorted by mask mAP50-95), best.yaml and the best
    checkpoint (with kept, the storage of the search: copied from there, its URI printed)."""
    rows, ended = [], 0
    for trial_id, trial in record.trials.items():
        history = read_results(trials_dir / trial_id / "results.csv")  # the trial's own rows, one per epoch
        best = best_epoch(history)
        epochs = len(history)
        ended += trial.status in (ENDED, FAILED) or epochs >= base.epochs
        row = {
            "trial": trial_id,
            # STOPPED: fewer epochs than asked, stopped early by the scheduler or by an interruption
            "status": "ERROR" if trial.status == FAILED else "TERMINATED" if epochs == base.epochs else "STOPPED",
            "epochs": epochs,
            METRIC: best.get(METRIC),
            MASK_MAP50: best.get(MASK_MAP50),
            BOX_MAP: best.get(BOX_MAP),
            "best_epoch": best.get("epoch"),
        }
        row.update({key: trial.config.get(key) for key in searched})
        row["run_dir"] = str(trials_dir / trial_id)
        row["_config"] = trial.config
        rows.append(row)
    rows.sort(key=lambda r: -1.0 if r[METRIC] is None or math.isnan(r[METRIC]) else r[METRIC], reverse=True)
    columns = [c for c in (rows[0] if rows else {"trial": None}) if not c.startswith("_")]
    results_csv = experiment_dir / "tune_results.csv"
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(results_csv, table.getvalue())
    if not legend_shown:  # the live view printed it when it started
        print(legend(abbreviate(searched)))
    print(ranked_table(rows, searched))

    best_config = best_checkpoint = best_trial = best_metric = None
    if rows and rows[0][METRIC] is not None:
        best = rows[0]
        best_trial, best_metric = best["trial"], best[METRIC]
        best_run = base.updated(**best["_config"], name=f"{experiment_dir.name}-best", exist_ok=False, resume=False)
        best_config = experiment_dir / "best.yaml"
        header = (
            f"# best trial {best_trial} of {experiment_dir} (mask mAP50-95 {best_metric:.4f}); "
            f"python -m pyseg.train --cfg {best_config}\n"
        )
        atomic_write_text(best_config, header + yaml.safe_dump(best_run.to_dict(), sort_keys=False))
        candidate = Path(best["run_dir"]) / WEIGHTS_DIR / BEST_CHECKPOINT
        stored = kept.child(TRIALS, best_trial, WEIGHTS_DIR, BEST_CHECKPOINT) if kept else None
        if stored is not None and stored.exists():
            stored.download_file(candidate)
        best_checkpoint = candidate if candidate.is_file() else None
        values = ", ".join(f"{key} {format_value(best.get(key))}" for key in searched)
        print(
            f"best trial {best_trial}: mask mAP50-95 {best_metric:.4f}, mAP50 {best['mask/map50'] or 0:.4f} at epoch "
            f"{best['best_epoch']}" + (f"; {values}" if values else "")
        )
        print(f"best config: {best_config}")
        if stored is not None and best_checkpoint is not None:
            print(f"best checkpoint: {stored.display} (copied to {best_checkpoint})")
        else:
            print(f"best checkpoint: {best_checkpoint or 'not on this machine (see the trial folder on its node)'}")
    print(f"all trials: {results_csv}")
    pictures = search_pictures(rows, searched, base.epochs, experiment_dir)
    if pictures:
        print(f"pictures: {', '.join(str(p) for p in pictures)}")
    unfinished = max(samples - ended, 0)  # interrupted, or never started
    return TuneSummary(
        experiment_dir, results_csv, best_config, best_checkpoint, best_trial, best_metric, rows, unfinished, pictures,
        samples=samples, epochs=base.epochs,
    )  # fmt: skip


def best_epoch(history: list[dict]) -> dict:
    """The results.csv row (as numbers) with the highest METRIC, the first of equals; {} when none has one."""
    best, best_value = {}, None
    for row in history:
        value = parse_number(row.get(METRIC))
        if value is not None and not math.isnan(value) and (best_value is None or value > best_value):
            best, best_value = row, value
    return {key: parse_number(value) for key, value in best.items()}


def search_pictures(rows: list[dict], searched: list[str], epochs: int, experiment_dir: Path) -> list[Path]:
    """tune_curves.png, tune_params.png and the best trial's val_predictions.jpg, in the search folder."""
    from pyseg.engine.search_plots import CURVES_FILE, PARAMS_FILE, plot_search_curves, plot_search_params

    pictures = [plot_search_curves(rows, epochs, experiment_dir / CURVES_FILE)]
    params = plot_search_params(rows, searched, experiment_dir / PARAMS_FILE)
    pictures += [params] if params else []
    if rows and rows[0].get("run_dir"):
        predictions = Path(rows[0]["run_dir"]) / "val_predictions.jpg"
        if predictions.is_file():
            copy = experiment_dir / "best_val_predictions.jpg"
            shutil.copyfile(predictions, copy)
            pictures.append(copy)
    return pictures
