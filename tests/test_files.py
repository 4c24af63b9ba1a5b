"""pyseg.files: atomic writes keep the usual file mode, stale temporaries are found, YAML errors name the file."""

from __future__ import annotations

import os

import pytest

from pyseg.errors import ConfigError
from pyseg.files import TEMP_MARKER, WriteError, atomic_write_text, read_yaml_mapping, remove_stale_temporaries


def test_an_atomic_write_has_the_mode_of_an_ordinary_file(tmp_path):
    ordinary = tmp_path / "plain.txt"
    ordinary.write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "y")
    assert (tmp_path / "atomic.txt").read_text() == "y"
    assert oct((tmp_path / "atomic.txt").stat().st_mode & 0o777) == oct(ordinary.stat().st_mode & 0o777)


def test_only_pyseg_temporaries_are_removed(tmp_path):
    stale = tmp_path / f".last.pt.abc123{TEMP_MARKER}"
    stale.write_bytes(b"half")
    keep = [tmp_path / ".hidden", tmp_path / "last.pt"]
    for path in keep:
        path.write_bytes(b"k")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in keep)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML: .+ at line 2, column 1; fix the file") as e:
        read_yaml_mapping(bad, "config file", ConfigError)
    assert "\n" not in str(e.value)  # one line, as every user error
    with pytest.raises(ConfigError, match="cannot read config file .*gone.yaml"):
        read_yaml_mapping(tmp_path / "gone.yaml", "config file", ConfigError)
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml_mapping(tmp_path / "empty.yaml", "config file", ConfigError) == {}


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_during_a_write_finishes_the_file_then_interrupts(signame, tmp_path):
    """SIGINT inside torch.save's writer turned into a RuntimeError from torch (exit 1 and a traceback instead of
    Ctrl-C's exit 130): the write now completes, and KeyboardInterrupt comes after it. The same for SIGTERM, which
    pyseg.train turns into KeyboardInterrupt (`kill PID`): raised inside the writer, it crashed the interpreter as
    it exited (exit -6, "PyThreadState_Get: ... the GIL is released")."""
    import signal

    import torch

    from pyseg.files import atomic_write

    path = tmp_path / "state.pt"
    state = {"weights": torch.arange(100_000, dtype=torch.float32)}
    signum = getattr(signal, signame)

    def interrupted_save(file):
        os.kill(os.getpid(), signum)  # delivered while the write goes on
        torch.save(state, file)

    def terminate_as_interrupt(signum, frame):  # pyseg.train's SIGTERM handler
        raise KeyboardInterrupt

    # Python's own handler, as in a command-line run (an in-process Ray Tune run of an earlier test may have left
    # its handler installed in this process)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, terminate_as_interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            atomic_write(path, interrupted_save)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the usual handlers are back
        assert signal.getsignal(signal.SIGTERM) is terminate_as_interrupt
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)
    assert torch.equal(torch.load(path)["weights"], state["weights"])
    assert not list(tmp_path.glob(f"*{TEMP_MARKER}"))


def test_a_full_disk_is_one_line_naming_the_file_and_the_old_file_stays(tmp_path):
    """torch.save on a full disk raises a RuntimeError whose context is ENOSPC: pyseg says the disk is full, names
    the file, and the checkpoint there keeps its previous, loadable version."""
    import torch
    from conftest import small_filesystem

    from pyseg.engine.checkpoint import save_checkpoint

    with small_filesystem("6m") as disk:
        path = disk / "weights" / "last.pt"
        save_checkpoint(path, {"w": torch.ones(1_000_000)})  # 4 MB of 6
        with pytest.raises(WriteError) as error:
            save_checkpoint(path, {"w": torch.full((1_000_000,), 2.0)})
        message = str(error.value)
        assert message.startswith(f"cannot write {path}: no space left on device (the disk is full)")
        assert "\n" not in message and "--resume" in message
        assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(1_000_000))
        assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left


def test_a_read_only_folder_is_one_line_naming_the_file(tmp_path):
    from conftest import small_filesystem

    with small_filesystem("1m", read_only=True) as disk:
        with pytest.raises(WriteError, match=r"cannot write .*results.csv: read-only file system; pick a writable"):
            atomic_write_text(disk / "run" / "results.csv", "epoch\n")
