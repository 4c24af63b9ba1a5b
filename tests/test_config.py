"""TrainConfig: CLI flags, --cfg files, unknown keys and wrong types."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml

from pyseg.config import TrainConfig, add_config_arguments, config_from_args, make_config
from pyseg.errors import ConfigError


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_every_key_is_a_flag_and_flags_override_the_cfg_file(tmp_path):
    saved = tmp_path / "args.yaml"
    saved.write_text(yaml.safe_dump({**TrainConfig().to_dict(), "epochs": 7, "lr0": 0.02, "mosaic": 0.5}))
    cfg = parse(["--cfg", str(saved), "--epochs", "3", "--cos-lr", "--fliplr", "0.25", "--amp", "false"])
    assert (cfg.epochs, cfg.lr0, cfg.mosaic, cfg.cos_lr, cfg.fliplr, cfg.amp) == (3, 0.02, 0.5, True, 0.25, False)
    assert parse([]) == TrainConfig()


def test_unknown_keys_and_wrong_types_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="'epoch' \\(did you mean 'epochs'\\?\\)"):
        make_config({"epoch": 3})
    with pytest.raises(ValueError, match="imgsz must be a int"):
        make_config({"imgsz": "big"})
    with pytest.raises(ValueError, match="amp must be true or false"):
        make_config({"amp": "maybe"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        parse(["--cfg", str(bad)])


def test_saved_config_round_trips():
    cfg = make_config({"epochs": 5, "hsv_h": 0.02, "data": "coco128-seg.yaml"})
    assert make_config(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize(
    ("flag", "value", "allowed"),
    [
        ("epochs", 0, ">= 1"),
        ("epochs", -1, ">= 1"),
        ("imgsz", 63, "multiple of 32"),
        ("imgsz", 0, "multiple of 32"),
        ("batch", 0, ">= 1"),
        ("lr0", -1.0, "> 0"),
        ("val_period", 0, ">= 1"),
        ("mosaic", 1.5, "<= 1"),
        ("iou", 0.0, "> 0"),
        ("optimizer", "adam", "sgd, adamw, auto"),
        ("model", "pyseg-x", "pyseg-n"),
        ("device", "gpu", "cuda:N"),
        ("name", "../escaped", "single folder name"),
        ("name", "/abs/path", "single folder name"),
        ("name", "a/b", "single folder name"),
        ("name", "..", "single folder name"),
        ("workers", -2, ">= 0"),
        ("hsv_s", float("nan"), "finite"),
        ("lr0", float("inf"), "finite"),
    ],
)
def test_every_value_is_checked_naming_the_flag_and_what_is_allowed(flag, value, allowed):
    from pyseg.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        make_config({flag: value})
    message = str(caught.value)
    assert f"--{flag.replace('_', '-')}" in message and allowed in message and repr(value) in message


def test_the_same_check_runs_for_cfg_files_and_flags(tmp_path):
    from pyseg.errors import ConfigError

    saved = tmp_path / "best.yaml"
    saved.write_text(yaml.safe_dump({"imgsz": 100}))
    with pytest.raises(ConfigError, match="--imgsz must be a positive multiple of 32.*100"):
        parse(["--cfg", str(saved)])
    with pytest.raises(ConfigError, match="--patience must be >= 0"):
        parse(["--patience", "-3"])
    assert parse(["--cfg", str(saved), "--imgsz", "96"]).imgsz == 96  # a flag overrides the bad file value


def test_retired_mask_ratio_is_read_from_old_files_but_is_no_flag():
    assert make_config({"mask_ratio": 4}) == TrainConfig()
    with pytest.raises(ValueError, match="mask_ratio"):
        make_config({"mask_ratio": 2})
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert "--mask-ratio" not in parser.format_help()


def test_resume_takes_a_checkpoint_path_or_a_bool(tmp_path):
    from pyseg.errors import ConfigError

    last = tmp_path / "runs" / "exp3" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    (last.parent.parent / "args.yaml").write_text("epochs: 3\n")  # inside its run folder
    cfg = parse(["--resume", str(last)])
    assert cfg.resume and cfg.name == "exp3" and cfg.project == str((tmp_path / "runs").resolve())
    outside = tmp_path / "elsewhere" / "last.pt"  # not NAME/weights/last.pt beside NAME/args.yaml
    outside.parent.mkdir()
    outside.write_bytes(b"x")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(["--resume", str(outside), "--project", str(tmp_path / "p")])
    cfg = config_from_args(args)
    assert cfg.resume and args.resume_elsewhere and cfg.project == str(tmp_path / "p") and cfg.name == "train"
    assert parse(["--resume"]).resume and not parse(["--resume", "false"]).resume
    with pytest.raises(ConfigError, match="no such checkpoint"):
        parse(["--resume", str(tmp_path / "missing.pt")])


def test_a_resumed_runs_args_yaml_starts_a_new_run_as_cfg(tmp_path):
    """A resumed run records resume and exist_ok true in args.yaml; as --cfg they are commands, not settings."""
    saved = tmp_path / "args.yaml"
    saved.write_text(yaml.safe_dump({**TrainConfig(epochs=4).to_dict(), "resume": True, "exist_ok": True}))
    cfg = parse(["--cfg", str(saved), "--epochs", "50"])
    assert (cfg.resume, cfg.exist_ok, cfg.epochs) == (False, False, 50)
    assert parse(["--cfg", str(saved), "--exist-ok"]).exist_ok  # as a flag it still counts


def test_a_tilde_means_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = make_config({"project": "~/runs", "weights": "~/w/best.pt"})
    assert cfg.project == str(tmp_path / "runs") and cfg.weights == str(tmp_path / "w" / "best.pt")


def test_each_flags_help_is_the_comment_at_its_default():
    import io

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    text = io.StringIO()
    parser.print_help(text)
    help_text = " ".join(text.getvalue().split())
    assert "--weights WEIGHTS a pyseg or Ultralytics checkpoint to start from" in help_text
    assert "--lr0 LR0 initial learning rate" in help_text and "(default 0.01)" in help_text


@pytest.mark.parametrize(
    "settings, key, value, flag_name",
    [
        ("train", "epochs", 0, "--epochs"),
        ("train", "lr0", float("nan"), "--lr0"),
        ("tune", "samples", 0, "--samples"),
        ("tune", "max_failures", -2, "--max-failures"),
        ("tune", "time_budget", float("inf"), "--time-budget"),
        ("tune", "scheduler", "hyperband", "--scheduler"),
        ("tune", "gpus_per_trial", -0.5, "--gpus-per-trial"),
        ("ray", "workers", 0, "--ray-workers"),
        ("ray", "cpus_per_worker", 0.0, "--cpus-per-worker"),
        ("ray", "min_workers", 0, "--min-workers"),
    ],
)
def test_every_settings_object_refuses_a_bad_value_in_one_message_shape(settings, key, value, flag_name):
    from pyseg.distributed.ray_train import RayScaling
    from pyseg.distributed.search_settings import TuneSettings

    make = {"train": lambda **v: make_config(v), "tune": TuneSettings, "ray": RayScaling}[settings]
    with pytest.raises(ConfigError) as caught:
        make(**{key: value})
    assert re.fullmatch(rf"{re.escape(flag_name)} must be .+, got {re.escape(repr(value))}", str(caught.value))
