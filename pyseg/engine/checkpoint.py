"""Checkpoints: written atomically (pyseg.files.atomic_write), read with torch.load(weights_only=True)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pyseg.engine.run_files import BEST_CHECKPOINT, LAST_CHECKPOINT, WEIGHTS_DIR
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


PYSEG_FILES = "runs/NAME/weights/best.pt or last.pt"
ANY_WEIGHTS = "a pyseg checkpoint (runs/NAME/weights/best.pt) or an Ultralytics YOLO11/YOLOv8-seg .pt"


def load_checkpoint(path: str | Path, map_location="cpu", wanted: str = PYSEG_FILES) -> dict:
    """Reads a pyseg checkpoint (no code is executed: weights_only=True) after checking the CRC32 of every member
    of its zip archive; CheckpointError says what is wrong and what to use instead (wanted: what the caller
    accepts, named in the messages)."""
    from pyseg.models.pickle_records import check_torch_zip, refused_globals

    path = Path(path)
    if path.is_dir():
        inside = next((p for p in (path / WEIGHTS_DIR / BEST_CHECKPOINT, path / BEST_CHECKPOINT) if p.is_file()), None)
        hint = f"did you mean {inside}?" if inside else f"give a .pt file ({wanted})"
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file; {hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; give {wanted}")
    check_torch_zip(path, "a checkpoint", instead=instead_of(path, wanted))
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - classes it names, an unsupported pickle: said below, in pyseg's words
        from pyseg.models.ultralytics_import import is_ultralytics_file

        if is_ultralytics_file(path):
            from pyseg.models.ultralytics_import import read_ultralytics_checkpoint

            read_ultralytics_checkpoint(path)  # a bad one is refused as such, not recommended to --weights
            raise CheckpointError(
                f"{path} is an Ultralytics checkpoint, not a pyseg one: start from it with --weights {path} "
                "(--resume continues only the last.pt of a pyseg run)"
            ) from error
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - a pickle torch cannot even scan
            names = []
        refused = refused_globals(names)
        if refused:
            raise CheckpointError(
                f"{path}: refused: its pickle calls {', '.join(sorted(refused)[:4])}, which would run code when "
                "unpickled; nothing was run. Use a checkpoint that pyseg.train wrote"
            ) from error
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        if names:
            what = f"its pickle names {', '.join(sorted(names)[:3])}"
        elif "PytorchStreamReader" in first_line or "inline_container" in first_line:
            what = "a zip archive that torch.save did not write, or whose index is damaged"
        else:
            what = first_line[:120]
        raise CheckpointError(f"{path} is not a checkpoint pyseg reads ({what}); give {wanted}") from error
    missing = [key for key in CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"{path} is a torch file but not a pyseg checkpoint (no {', '.join(missing)}); give {wanted}"
        )
    return state


def instead_of(path: Path, wanted: str = PYSEG_FILES) -> str:
    """What to use instead of a damaged checkpoint file, by its name."""
    if path.name == LAST_CHECKPOINT:
        return (
            "pyseg keeps no earlier copy of last.pt: start a new run from this run's weights/best.pt with --weights, "
            "or from a weights/epochN.pt (kept with --save-period N)"
        )
    return f"copy it again, or give another file ({wanted})"
