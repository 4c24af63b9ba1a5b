"""Files pyseg writes and reads everywhere: atomic writes (a reader sees the old or the new file, never half of
one) and YAML mappings read with an error that names the file."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import yaml

from pyseg.errors import UserError

KILL_AT_ENV = "PYSEG_TEST_KILL_AT"  # tests: "POINT:N" ends the process (os._exit) the Nth time POINT is reached
TEMP_PREFIX = "."  # temporaries are hidden files: .NAME.<random>
TEMP_MARKER = ".pyseg-tmp"  # ... ending in this, so that stale ones can be told from the user's files


class WriteError(UserError, OSError):
    """A file pyseg could not write because of the machine (a full disk, a read-only or foreign folder); the
    file at that path, if any, is unchanged."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # picklable: a Ray worker's error reaches the driver
        return type(self), (self.errno, self.message)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], *, durable: bool = True) -> None:
    """Calls write(file) on a temporary beside path, then renames it over path.

    durable: fsync the file and its folder, so that the rename survives a power cut (checkpoints, results).
    A killed process leaves at most a `.NAME.*.pyseg-tmp` file, which `remove_stale_temporaries` clears.
    Raises WriteError (one line: the file, the reason, what to do) when the machine refuses the write: a full
    disk, a folder that is not writable; path then keeps its previous version.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with interrupts_deferred():  # Ctrl-C inside torch.save's writer became a RuntimeError (and a traceback)
            _write_and_replace(path, write, durable)
    except Exception as error:
        cause = _os_error_in(error)
        if cause is None or cause.errno not in _MACHINE_ERRORS:
            raise
        raise WriteError(cause.errno, f"cannot write {path}: {_MACHINE_ERRORS[cause.errno]}") from error


_MACHINE_ERRORS = {  # errno -> what it means and what to do
    errno.ENOSPC: "no space left on device (the disk is full); the file keeps its previous version: free space, "
    "then continue (train: --resume)",
    errno.EDQUOT: "disk quota exceeded; the file keeps its previous version: free space, then continue (train: "
    "--resume)",
    errno.EACCES: "permission denied; pick a writable --project (or --out), or fix the folder's permissions",
    errno.EPERM: "operation not permitted; pick a writable --project (or --out), or fix the folder's permissions",
    errno.EROFS: "read-only file system; pick a writable --project (or --out)",
    errno.ENAMETOOLONG: "file name too long; pick a shorter --name or --project",
}


def _os_error_in(error: BaseException) -> OSError | None:
    """The OSError an exception is or was raised from (torch's writer turns a full disk into a RuntimeError
    whose context is the OSError), or None."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
        seen += 1
    return None


def _write_and_replace(path: Path, write: Callable[[BinaryIO], None], durable: bool) -> None:
    handle, temp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", suffix=TEMP_MARKER, dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            if durable:
                os.fsync(file.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        kill_point(f"write:{path.name}")
        os.replace(temp, path)
        if durable:
            directory = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def interrupts_deferred():
    """Ctrl-C (SIGINT), and SIGTERM where a Python handler takes it (pyseg.train's `kill PID`), inside the block
    take effect when the block ends: the block finishes, then the handler that was in place runs (Python's SIGINT
    handler raises KeyboardInterrupt). Only the main thread receives signals; elsewhere, and where SIGINT is
    ignored, the block runs as it is. (A KeyboardInterrupt raised inside torch.save's writer became a RuntimeError,
    or left a writer that crashed the interpreter as it exited.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signal.SIGINT: signal.getsignal(signal.SIGINT)}
    if previous[signal.SIGINT] in (signal.SIG_IGN, None):
        yield
        return
    if callable(signal.getsignal(signal.SIGTERM)):
        previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
    received: list[tuple] = []
    for signum in previous:
        signal.signal(signum, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            signum, frame = received[0]
            if callable(previous[signum]):
                previous[signum](signum, frame)
            else:  # SIG_DFL would end the process: end it as Python's own handler would
                raise KeyboardInterrupt


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_kill_point_counts: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Test instrumentation for interruptions: with PYSEG_TEST_KILL_AT=name:N the process dies here (os._exit(9),
    like kill -9: no cleanup, no flush) the Nth time it passes. Points: write:<file> (temporary written, not yet
    renamed), train-end, validation, epoch-end. A no-op unless the variable names this point."""
    wanted = os.environ.get(KILL_AT_ENV, "")
    if not wanted.startswith(f"{name}:"):
        return
    _kill_point_counts[name] = _kill_point_counts.get(name, 0) + 1
    if str(_kill_point_counts[name]) == wanted.rpartition(":")[2]:
        os._exit(9)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = True) -> None:
    atomic_write(path, lambda file: file.write(text.encode()), durable=durable)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Deletes the temporaries that killed atomic writes left in folder; returns what it deleted."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(TEMP_PREFIX) and p.name.endswith(TEMP_MARKER)]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def read_yaml_mapping(path: str | Path, what: str, error: type[UserError] = UserError) -> dict:
    """The mapping in a YAML file (empty file: {}); raises `error` naming `what` and the file otherwise."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as cause:
        raise error(f"cannot read {what} {path}: {cause.strerror or cause}") from cause
    except (yaml.YAMLError, UnicodeDecodeError) as cause:
        raise error(f"{what} {path} is not valid YAML: {_yaml_problem(cause)}; fix the file") from cause
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{what} {path} must hold a mapping of keys to values, got {type(raw).__name__}")
    return raw


def _yaml_problem(cause: Exception) -> str:
    """A YAML parse error in one line: 'PROBLEM at line L, column C' (PyYAML's own text spans several lines)."""
    mark = getattr(cause, "problem_mark", None)
    problem = getattr(cause, "problem", None) or " ".join(str(cause).split())
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


LOCK_FILE = ".pyseg.lock"  # in a run's or a search's folder while a process trains it


class FolderInUseError(UserError):
    """Another process holds a folder's lock: it is training that run or search right now."""


class FolderLock:
    """An exclusive lock on folder (its LOCK_FILE, with the holder's pid), taken at once or refused: two processes
    never train the same run or search. The operating system releases it when the holder dies, however."""

    def __init__(self, folder: str | Path, what: str):
        import fcntl

        self.path = Path(folder) / LOCK_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.handle = open(self.path, "a+")  # noqa: SIM115 (held until release)
        except OSError:  # a read-only or foreign folder: nobody can train into it, and the write says why
            self.handle = None
            return
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip()
            self.handle.close()
            raise FolderInUseError(
                f"{what} {Path(folder)} is in use by another pyseg process"
                + (f" (pid {holder})" if holder.isdigit() else "")
                + ": wait for it to end, or stop it, then try again"
            ) from None
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def release(self) -> None:
        """Removes the lock file and releases the lock (the folder is left as it was found)."""
        if self.handle is not None and not self.handle.closed:
            self.path.unlink(missing_ok=True)
            self.handle.close()
