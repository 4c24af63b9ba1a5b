"""pyseg.engine.checkpoint: every checkpoint read is integrity-checked (zip CRC32s) and refused in pyseg's own words:
a damaged file names itself and what to use instead, an unsafe pickle is refused without running, and torch's
advice to load with weights_only=False is never passed on."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch
from ultralytics_peer import Payload  # (the module never imports Ultralytics itself)

from pyseg.engine.checkpoint import load_checkpoint, save_checkpoint
from pyseg.errors import CheckpointError


def a_checkpoint(path: Path) -> Path:
    tensor = torch.arange(20000, dtype=torch.float32)  # one large member to damage
    save_checkpoint(path, {"model": {"w": tensor}, "ema": {"w": tensor.clone()}, "config": {}, "names": ["a"]})
    return path


def overwrite_middle_of_largest_member(path: Path, count: int = 4096) -> None:
    """Overwrites `count` bytes in the middle of the file's largest member (as a bad disk or copy would)."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.compress_size)
        start = member.header_offset + 30 + len(member.filename.encode()) + len(member.extra)
    data = bytearray(path.read_bytes())
    middle = start + member.compress_size // 2 - count // 2
    data[middle : middle + count] = os.urandom(count)
    path.write_bytes(bytes(data))


def test_a_corrupted_last_pt_is_refused_naming_it_and_what_to_use_instead(tmp_path):
    """4096 bytes overwritten in the middle of weights/last.pt: before, torch loaded it silently with changed
    values; now the CRC check refuses it, one line, and says pyseg keeps no earlier copy of last.pt."""
    path = a_checkpoint(tmp_path / "run" / "weights" / "last.pt")
    overwrite_middle_of_largest_member(path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    assert "is damaged: its member" in message and "fails its CRC check" in message
    assert "pyseg keeps no earlier copy of last.pt" in message and "weights/best.pt with --weights" in message


def test_a_damaged_best_pt_says_to_copy_it_again(tmp_path):
    path = a_checkpoint(tmp_path / "best.pt")
    overwrite_middle_of_largest_member(path)
    with pytest.raises(CheckpointError, match="best.pt is damaged: .* copy it again"):
        load_checkpoint(path)


def test_a_truncated_last_pt_does_not_advise_using_last_pt(tmp_path):
    path = a_checkpoint(tmp_path / "weights" / "last.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "truncated or damaged" in message and "use runs/NAME/weights/best.pt or last.pt" not in message
    assert "keeps no earlier copy of last.pt" in message


def test_an_unsafe_pickle_is_refused_as_such_without_torchs_advice(tmp_path):
    marker = tmp_path / "MARK"
    path = tmp_path / "last.pt"
    torch.save({"model": Payload(marker), "config": {}, "names": []}, path)
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(path)
    message = str(error.value)
    assert "refused: its pickle calls posix.system, which would run code" in message
    assert "weights_only" not in message and "damaged" not in message
    assert not marker.exists()


def test_an_intact_checkpoint_loads(tmp_path):
    path = a_checkpoint(tmp_path / "last.pt")
    state = load_checkpoint(path)
    assert torch.equal(state["ema"]["w"], torch.arange(20000, dtype=torch.float32))


def test_a_damaged_zip_index_is_one_line(tmp_path):
    """A damaged central directory can claim an unknown compression method (zipfile raises NotImplementedError) or
    encryption (RuntimeError): both are a damaged file, not a traceback."""
    import struct

    for field, value in (("method", 99), ("flags", 0x1)):
        path = a_checkpoint(tmp_path / f"{field}.pt")
        data = bytearray(path.read_bytes())
        entry = data.rfind(b"PK\x01\x02")  # the last central-directory entry
        offset = entry + (10 if field == "method" else 8)
        data[offset : offset + 2] = struct.pack("<H", value)
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError) as error:
            load_checkpoint(path)
        assert "\n" not in str(error.value) and str(path) in str(error.value), error.value
