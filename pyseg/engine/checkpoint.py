"""Checkpoints: written atomically (pyseg.files.atomic_write), read with torch.load(weights_only=True)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pyseg.errors import CheckpointError
from pyseg.files import atomic_write

CHECKPOINT_KEYS = ("model", "config", "names")  # what every pyseg checkpoint holds


def rng_state() -> dict:
    """RNG states in types torch.load(weights_only=True) accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Writes state to path so that path is always either the old or the new complete file."""
    atomic_write(path, lambda file: torch.save(state, file))


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Reads a pyseg checkpoint (no code is executed: weights_only=True); CheckpointError says what is wrong."""
    path = Path(path)
    if path.is_dir():
        inside = next((p for p in (path / "weights" / "best.pt", path / "best.pt") if p.is_file()), None)
        hint = f"did you mean {inside}?" if inside else "give a .pt file (runs/NAME/weights/best.pt or last.pt)"
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file; {hint}")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; give a pyseg .pt file (runs/NAME/weights/best.pt or last.pt)"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, not a zip, not torch, unsafe pickle: one answer
        from pyseg.models.ultralytics_import import is_ultralytics_file

        if is_ultralytics_file(path):
            raise CheckpointError(
                f"{path} is an Ultralytics checkpoint, not a pyseg one: start from it with --weights {path} "
                "(--resume continues only the last.pt of a pyseg run)"
            ) from error
        raise CheckpointError(
            f"{path} is not a readable pyseg checkpoint ({_load_problem(path, error)}): use "
            "runs/NAME/weights/best.pt or last.pt"
        ) from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is a torch file but not a pyseg checkpoint (no {', '.join(missing)}); pyseg reads the "
            "weights/best.pt and last.pt that pyseg.train writes"
        )
    return state


ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def _load_problem(path: Path, error: Exception) -> str:
    """Why torch.load failed, in words: torch's own message for a damaged torch file is often a bare number."""
    with open(path, "rb") as file:
        head = file.read(len(ZIP_MAGIC))
    if not head:
        return "an empty file"
    if head != ZIP_MAGIC:
        return "not a file torch.save wrote"
    first_line = (str(error).splitlines() or [""])[0][:200]
    return f"a damaged or truncated torch file: {first_line or type(error).__name__}"
