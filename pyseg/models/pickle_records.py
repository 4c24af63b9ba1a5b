"""Reading a torch file written by another program without running anything from it.

torch.load(weights_only=True) rebuilds tensors and plain containers only. Every other class or function the file
names (ultralytics.*, torch.nn.* modules, numpy scalars, ...) is registered for that one load as an inert
PickledRecord subclass: "calling" it or building it stores its arguments and state, nothing else. A name that only a
pickle meant to run code would use (os.system, builtins.eval, subprocess.*, ...) is refused before loading.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pyseg.errors import CheckpointError

# names of modules whose classes become inert records; anything else a file names is refused
RECORDED_MODULE_PREFIXES = (
    "ultralytics.",
    "torch.nn.",
    "torch._utils.",
    "torch.optim.",
    "collections.",
    "numpy.",
    "pathlib.",
    "datetime.",
    "types.",
    "copyreg.",
    "_codecs.",
    "argparse.",
    "enum.",
)
RECORDED_BUILTINS = frozenset({"set", "frozenset", "slice", "range", "complex", "bytearray", "bytes", "object"})


class PickledRecord:
    """An object of a class the file names, as data: `source` (the class's full name), `args` (what it was
    built or called with) and `state` (what the pickle set on it: for a torch module, its __dict__)."""

    source = ""

    def __new__(cls, *args: Any, **kwargs: Any):
        record = object.__new__(cls)
        record.args, record.kwargs, record.state = args, kwargs, None
        return record

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # everything was stored by __new__

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @property
    def class_name(self) -> str:
        """The class's own name: 'Conv' for 'ultralytics.nn.modules.conv.Conv'."""
        return self.source.rsplit(".", 1)[-1]

    def attribute(self, name: str, default: Any = None) -> Any:
        """An attribute set on the object (its state dict's entry), or default."""
        state = self.state[0] if isinstance(self.state, tuple) and self.state else self.state
        return state.get(name, default) if isinstance(state, dict) else default

    def __repr__(self) -> str:
        return f"<record of {self.source}>"


def refused_globals(names: list[str]) -> list[str]:
    """The names a pyseg load will not turn into records: anything outside RECORDED_MODULE_PREFIXES and the
    data builtins (os.system, builtins.eval, builtins.getattr, subprocess.Popen, ...)."""
    refused = []
    for name in names:
        module, _, attribute = name.rpartition(".")
        if module in ("builtins", "__builtin__"):
            if attribute not in RECORDED_BUILTINS:
                refused.append(name)
        elif not name.startswith(RECORDED_MODULE_PREFIXES):
            refused.append(name)
    return refused


def _record_class(full_name: str) -> type[PickledRecord]:
    return type(full_name.rsplit(".", 1)[-1], (PickledRecord,), {"source": full_name, "__module__": __name__})


def load_as_records(path: Path, what: str) -> Any:
    """The object a torch file holds, every non-tensor class in it an inert PickledRecord.

    path must be a zip archive that torch.save wrote, with intact members (CRC checked); `what` names the
    expected kind of file in error messages ('an Ultralytics checkpoint'). CheckpointError says what is wrong.
    """
    check_torch_zip(path, what)
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as error:  # noqa: BLE001 - any unparseable pickle is one answer
        raise CheckpointError(
            f"{path} is not {what} pyseg can read safely (its pickle uses operations beyond tensors and plain data: "
            f"{str(error).splitlines()[0][:160]}); nothing was run"
        ) from error
    refused = refused_globals(names)
    if refused:
        raise CheckpointError(
            f"{path}: refused: its pickle calls {', '.join(sorted(refused)[:4])}, which would run code when "
            "unpickled; nothing was run. Use a checkpoint from a source you trust"
        )
    placeholders = [(_record_class(name), name) for name in names]
    try:
        with torch.serialization.safe_globals(placeholders):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a damaged member, an unsupported opcode: one answer
        raise CheckpointError(
            f"{path} is not {what} pyseg can read ({str(error).splitlines()[0][:200]}); nothing was run"
        ) from error


def check_torch_zip(path: Path, what: str, instead: str = "download or copy it again") -> None:
    """A CheckpointError unless path is a zip archive whose members' CRC32s all match (torch.save writes one).

    what names the expected kind of file ('a pyseg checkpoint'); instead says what to do about a bad one.
    """
    head = b""
    try:
        with open(path, "rb") as file:
            head = file.read(4)
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error, NotImplementedError, RuntimeError) as error:
        # (a damaged central directory can claim an unknown compression method or encryption)
        if not head:
            kind = "an empty file"
        elif head != b"PK\x03\x04":
            kind = "not a file torch.save wrote"
        else:
            kind = f"a truncated or damaged torch file ({str(error).splitlines()[0][:120]})"
        raise CheckpointError(f"{path} is not {what}: {kind}; {instead}") from error
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: its member {damaged} fails its CRC check; {instead}")


def module_tensors(record: Any, prefix: str = "") -> Iterator[tuple[str, Tensor, PickledRecord]]:
    """(name, tensor, owning record) of every parameter and persistent buffer under a recorded torch module, in
    state_dict order and naming ('model.0.conv.weight')."""
    if not isinstance(record, PickledRecord):
        return
    parameters = record.attribute("_parameters") or {}
    buffers = record.attribute("_buffers") or {}
    transient = record.attribute("_non_persistent_buffers_set") or set()
    for name, tensor in list(parameters.items()) + [(n, b) for n, b in buffers.items() if n not in transient]:
        if isinstance(tensor, torch.Tensor):
            yield prefix + name, tensor, record
    for name, child in (record.attribute("_modules") or {}).items():
        yield from module_tensors(child, f"{prefix}{name}.")


def module_records(record: Any, prefix: str = "") -> Iterator[tuple[str, PickledRecord]]:
    """(path, record) of a recorded torch module and every module under it; the root's path is ''."""
    if not isinstance(record, PickledRecord):
        return
    yield prefix.rstrip("."), record
    for name, child in (record.attribute("_modules") or {}).items():
        yield from module_records(child, f"{prefix}{name}.")
