"""User errors and how every `python -m pyseg.X` command answers them.

A user error is something the user can fix: a bad flag value, a missing or malformed file, an unreadable
checkpoint, an unreachable cluster or server. It is raised as a `UserError` (or a subclass) whose message names
the flag, file or value and says what to do; `run_command` turns it into one line on stderr and exit code 2.
Anything else is a bug and keeps its traceback. `PYSEG_DEBUG=1` shows the traceback of a user error too.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class UserError(Exception):
    """A problem with the user's input or environment; the message says what is wrong and what to do."""


class ConfigError(UserError, ValueError):
    """A flag, config file or search-space value outside what is allowed."""


class CheckpointError(UserError, ValueError):
    """A file that is not a readable pyseg checkpoint."""


def debug_enabled() -> bool:
    return os.environ.get("PYSEG_DEBUG", "0") not in ("", "0")


def run_command(prog: str, main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Runs an entry point's main(argv); a UserError becomes `prog: message` on stderr and exit code 2."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started as a background job of a script (`... &` ignores SIGINT): `kill -INT` ends it as Ctrl-C would
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main(argv)
    except KeyboardInterrupt:  # Ctrl-C where the command has nothing to save (train and tune handle their own)
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    except UserError as error:
        if debug_enabled():
            traceback.print_exc()
        print(f"{prog}: {error}", file=sys.stderr)
        return USER_ERROR_EXIT


class CommandParser(argparse.ArgumentParser):
    """The flags of a `python -m pyseg.X` command: no abbreviations (--epoch is not --epochs), and a flag error is
    one line naming the flag and pointing at --help (argparse would print the whole usage first), exit code 2."""

    def __init__(self, prog: str, description: str | None):
        super().__init__(
            prog=prog,
            description=description,
            allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    def error(self, message: str):
        self.exit(USER_ERROR_EXIT, f"{self.prog}: {message} (see {self.prog} --help)\n")
