"""Population based training (`pyseg.tune --scheduler pbt`): what PBT may change, the bounds it must keep, and a
real 4-trial PBT search in which trials continue other trials' checkpoints with perturbed values."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import tiny_config

from pyseg.distributed.search import run_tune
from pyseg.distributed.search_settings import TuneSettings
from pyseg.distributed.search_space import (
    SearchSpace,
    SearchSpaceError,
    clip_to_space,
    load_search_space,
    pbt_mutations,
)
from pyseg.distributed.tracking import TrackingConfig


def test_pbt_keeps_perturbed_values_inside_the_space():
    space = {
        "lr0": ("loguniform", [1e-4, 1e-2]),
        "mosaic": ("uniform", [0.5, 1.0]),
        "close_mosaic": ("randint", [0, 5]),
        "optimizer": ("choice", ["sgd", "adamw"]),
        "nbs": ("fixed", 16),
    }
    perturbed = {"lr0": 1.2e-2, "mosaic": 1.2, "close_mosaic": 4.8, "optimizer": "adamw", "nbs": 16}
    assert clip_to_space(perturbed, space) == {
        "lr0": 1e-2,
        "mosaic": 1.0,
        "close_mosaic": 4,  # randint excludes its high
        "optimizer": "adamw",
        "nbs": 16,
    }
    inside = {"lr0": 3e-3, "mosaic": 0.6, "close_mosaic": 2, "optimizer": "sgd", "nbs": 16}
    assert clip_to_space(inside, space) == inside


def test_pbt_changes_only_what_a_training_can_change_between_epochs():
    space = SearchSpace(
        {
            "lr0": ("loguniform", [1e-4, 1e-2]),
            "mosaic": ("uniform", [0.5, 1.0]),
            "imgsz": ("choice", [64, 96]),
            "optimizer": ("fixed", "adamw"),
        },
        Path("space.yaml"),
    )
    assert set(pbt_mutations(space)) == {"lr0", "mosaic"}  # not the input size, not a fixed value
    frozen = SearchSpace({"imgsz": ("choice", [64, 96]), "lr0": ("fixed", 1e-3)}, Path("frozen.yaml"))
    with pytest.raises(SearchSpaceError, match="frozen.yaml searches nothing PBT can change.*lr0"):
        pbt_mutations(frozen)


def test_pbt_samples_its_population_at_random():
    assert TuneSettings(scheduler="pbt").search == "random"
    with pytest.raises(ValueError, match="--scheduler pbt samples its first population at random"):
        TuneSettings(scheduler="pbt", search="optuna")


def tune_checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint_*"))


@pytest.mark.slow
def test_a_pbt_search_continues_better_trials_checkpoints_with_perturbed_values(
    tiny_data, tmp_path, local_ray, private_cache
):
    space_path = tmp_path / "space.yaml"
    space_path.write_text("optimizer: adamw\nlr0: {loguniform: [1.0e-3, 1.0e-2]}\nmosaic: {uniform: [0.5, 1.0]}\n")
    space = load_search_space(space_path)
    base = tiny_config(tiny_data, tmp_path, epochs=5, name="unused")
    # PBT compares a population that trains at the same time: all 4 trials at once (half a CPU each)
    settings = TuneSettings(
        samples=4, scheduler="pbt", perturbation_interval=2, name="pbt", cpus_per_worker=0.5, progress_every_s=0
    )
    summary = run_tune(base, space, settings, TrackingConfig(enabled=False))

    assert len(summary.rows) == 4 and all(row["status"] == "TERMINATED" for row in summary.rows), summary.rows
    experiment = summary.experiment_dir
    # PBT's record: [exploiting trial, donor, their epochs, donor's config, the new (perturbed) config] per exploit
    # (at epoch 2 or 4; the run ends at 5)
    exploits = [json.loads(line) for line in (experiment / "pbt_global.txt").read_text().splitlines()]
    assert exploits, "no trial exploited another"
    for *_, new_config in exploits:
        assert 1e-3 <= new_config["lr0"] <= 1e-2 and 0.5 <= new_config["mosaic"] <= 1.0, new_config
    exploited = [row for row in summary.rows if (experiment / f"pbt_policy_{row['trial']}.txt").is_file()]
    assert exploited, [path.name for path in experiment.iterdir()]
    for row in exploited:  # it went on with the values of its last exploit
        last = json.loads((experiment / f"pbt_policy_{row['trial']}.txt").read_text().splitlines()[-1])
        assert math.isclose(row["lr0"], last[-1]["lr0"]) and math.isclose(row["mosaic"], last[-1]["mosaic"])
    for row in summary.rows:
        run_dir = Path(row["run_dir"])
        with open(run_dir / "results.csv", newline="") as f:
            assert [int(r["epoch"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5], row["trial"]
        # what the trial trained with last is what Tune holds as its config
        trained = yaml.safe_load((run_dir / "args.yaml").read_text())
        assert math.isclose(trained["lr0"], row["lr0"]) and math.isclose(trained["mosaic"], row["mosaic"])
        # Tune holds the checkpoints PBT exploits: those of the perturbation steps (epochs 2, 4) and the last
        assert 1 <= len(tune_checkpoints(experiment / row["trial"])) <= 3
        assert not (run_dir / "weights" / ".incoming").exists()
