"""Weights to start from or evaluate: a pyseg checkpoint or an Ultralytics one, read without running code.

load_weights(path) tells the two apart, reads either, and returns the model's name, class names and tensors;
build_from_weights makes the model, for the file's class count or another one (class layers then start new).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from pyseg.config import canonical_model_name, make_config
from pyseg.errors import CheckpointError, ConfigError


@dataclass
class Weights:
    """A checkpoint's model: name (as build_model takes it), class names, state dict (float32 for imports)."""

    path: Path
    kind: str  # "pyseg" | "ultralytics"
    model_name: str
    names: list[str]
    state_dict: dict[str, Tensor]
    config: dict | None  # the pyseg TrainConfig it was trained with (pyseg checkpoints only)
    imgsz: int | None  # the image size it was trained at, when the file says
    data: str | None = None  # the dataset it was trained on, when the file says and it is still there

    @property
    def nc(self) -> int:
        return len(self.names)


def load_weights(path: str | Path) -> Weights:
    """The weights of a pyseg checkpoint (its EMA when it has one) or of an Ultralytics YOLO11/YOLOv8-seg .pt file.

    CheckpointError (one line: which file, what is wrong, what to do) for a missing, damaged, foreign or unsafe file.
    """
    from pyseg.engine.checkpoint import ANY_WEIGHTS, load_checkpoint
    from pyseg.models.ultralytics_import import WHERE_FROM, is_ultralytics_file, read_ultralytics_checkpoint

    path = Path(path).expanduser()
    if not path.exists() and path.suffix != ".pt" and canonical_model_name(path.name):
        raise CheckpointError(
            f"--weights {path}: no such file; {path.name} is a model name: train it from scratch with --model "
            f"{canonical_model_name(path.name)}, or give its weights file"
        )
    if not path.exists() and (canonical_model_name(path.stem) or "").startswith("yolo"):
        raise CheckpointError(f"{path}: no such file. {WHERE_FROM}")
    if path.is_file() and is_ultralytics_file(path):
        imported = read_ultralytics_checkpoint(path)
        data = imported.data if imported.data and Path(imported.data).expanduser().is_file() else None
        return Weights(
            path, "ultralytics", imported.model_name, imported.names, imported.state_dict, None, imported.imgsz, data
        )
    state = load_checkpoint(path, wanted=ANY_WEIGHTS)
    config = dict(state["config"])
    name = canonical_model_name(str(state.get("model_name") or config.get("model") or "pyseg-n"))
    if name is None:
        raise CheckpointError(f"{path}: its model {state.get('model_name')!r} is not one pyseg builds")
    imgsz = config.get("imgsz")
    tensors = {
        key.removeprefix("module.").removeprefix("_orig_mod."): value
        for key, value in (state.get("ema") or state["model"]).items()
    }
    return Weights(
        path, "pyseg", name, list(state["names"]), tensors, config, imgsz if isinstance(imgsz, int) else None
    )


def build_from_weights(weights: Weights, nc: int | None = None) -> tuple[nn.Module, str]:
    """(model with the weights loaded, a line saying what was loaded). With nc other than the file's class count,
    every tensor but the class layers is transferred and the class layers start new."""
    from pyseg.models.seg_model import build_model

    nc = weights.nc if nc is None else nc
    model = build_model(weights.model_name, nc)
    own = model.state_dict()
    loaded = {k: v for k, v in weights.state_dict.items() if k in own and own[k].shape == v.shape}
    new = [k for k in own if k not in loaded]
    stray = [k for k in weights.state_dict if k not in loaded]
    if nc == weights.nc and (new or stray):
        raise CheckpointError(
            f"{weights.path}: {len(new)} of the {weights.model_name} tensors have no match in the file "
            f"(first: {(new or stray)[0]}); it is not a {weights.model_name} checkpoint pyseg can read"
        )
    misplaced = [k for k in new + stray if "class_branches" not in k]
    if misplaced:  # another class count changes only the class layers
        raise CheckpointError(
            f"{weights.path}: {misplaced[0]} does not fit {weights.model_name} with nc={nc}; the file is damaged or "
            "of another architecture"
        )
    model.load_state_dict(loaded, strict=False)
    total = len(weights.state_dict)
    if nc == weights.nc:
        return model, f"weights {weights.path}: {weights.model_name}, loaded {len(loaded)}/{total} tensors"
    return model, (
        f"weights {weights.path}: {weights.model_name}, transferred {len(loaded)}/{total} tensors; class layers new "
        f"for nc={nc} (the file has nc={weights.nc})"
    )


def load_model(weights: str | Path, device: torch.device):
    """(model with the checkpoint's EMA weights, its TrainConfig, class names) from a pyseg checkpoint or an
    Ultralytics one (whose config is pyseg's defaults with its model and image size)."""
    loaded = load_weights(weights)
    if loaded.config is not None:
        try:
            cfg = make_config(loaded.config)
        except ConfigError as error:  # a value stored in the file, not a flag the user gave
            stored = str(error).removeprefix("--")  # it names a key of the file, not a flag
            raise CheckpointError(f"{weights}: the training config stored in it is invalid ({stored})") from error
    else:
        recorded = {"imgsz": loaded.imgsz, "data": loaded.data}  # what the Ultralytics file says, where it does
        cfg = make_config({"model": loaded.model_name, **{k: v for k, v in recorded.items() if v}})
    model, _ = build_from_weights(loaded)
    return model.to(device).eval(), cfg, loaded.names
