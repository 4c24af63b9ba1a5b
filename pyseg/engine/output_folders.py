"""The output folder of every command: --project/--name (then name2, name3, ...), created before the work and
removed again when the work fails and left it empty."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from pyseg.config import check_value
from pyseg.errors import ConfigError


def add_output_arguments(parser: argparse.ArgumentParser, default_name: str) -> None:
    """--project/--name, the output folder of every command (project/name, then name2, name3, ...)."""
    parser.add_argument("--project", default="runs", help="parent folder of output folders (default runs)")
    parser.add_argument("--name", default=default_name, help=f"output folder: project/name (default {default_name})")
    parser.add_argument("--exist-ok", action="store_true", help="write into project/name even if it exists")


def output_dir(args: argparse.Namespace) -> Path:
    """The checked, not yet created output folder of --project/--name/--exist-ok."""
    from pyseg.engine.trainer import unique_run_dir

    check_value("name", args.name)
    return unique_run_dir(args.project, args.name, args.exist_ok)


def make_folder(folder: Path, flags: str) -> None:
    """Creates an output folder; one that cannot be made is a user error naming the flags that chose it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{flags}: cannot create {folder} ({error.strerror}); pick a writable folder") from error


@contextlib.contextmanager
def output_folder(folder: Path, flags: str):
    """Creates folder before the work (make_folder), and removes it again when the work fails and the folder was
    created here and is still empty: a failed command leaves no empty output folder behind."""
    existed = folder.exists()
    make_folder(folder, flags)
    try:
        yield folder
    except BaseException:
        if not existed and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
        raise
