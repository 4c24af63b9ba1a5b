"""TrainConfig: CLI flags, --cfg files, unknown keys and wrong types."""

from __future__ import annotations

import argparse

import pytest
import yaml

from pyseg.config import TrainConfig, add_config_arguments, config_from_args, make_config


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
