"""The `pyseg` command: `pyseg train|val|predict|tune|submit|export [flags]`, the same flags and exit codes as
`python -m pyseg.train` and the others (each subcommand is that module's main)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = ("train", "val", "predict", "tune", "submit", "export")
USAGE = f"usage: pyseg {{{','.join(COMMANDS)}}} [flags]   (pyseg COMMAND --help for its flags)"


def main(argv: list[str] | None = None) -> int:
    """Runs `pyseg COMMAND ...` as `python -m pyseg.COMMAND ...`; exit code 2 and the usage for a wrong command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0] not in COMMANDS:
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"pyseg: {given}; {USAGE}", file=sys.stderr)
        return 2
    return importlib.import_module(f"pyseg.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
