"""python -m pyseg.submit: run a pyseg command on a Ray cluster as a Ray Job, follow its logs, exit with its status.

Examples:
    python -m pyseg.submit --address http://HEAD:8265 -- tune --data coco128-seg.yaml --gpus-per-trial 1
    python -m pyseg.submit --address http://HEAD:8265 --pip requirements.txt -- train --ray-workers 4 --epochs 100
    python -m pyseg.submit --address http://HEAD:8265 --no-wait -- tune --samples 64

The job runs `python -m pyseg.<command> ...` in a copy of --working-dir (default: this directory, without run
outputs, build folders and .git), with pip packages from --pip installed by Ray when given. Inside the job,
Ray commands reach the cluster by themselves (RAY_ADDRESS is set by Ray Jobs).

Token authentication (Ray 2.60 default): the token is read from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token (copy it from the head node) and sent with every request; pyseg never turns authentication off.
"""

from __future__ import annotations

import argparse
import os
import sys

from pyseg.errors import CommandParser, run_command

COMMANDS = ("tune", "train", "val", "predict")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser("python -m pyseg.submit", __doc__)
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
        help="the cluster's dashboard, http://HEAD:8265 (default $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without following it")
    parser.add_argument(
        "--stop-on-interrupt",
        action="store_true",
        help="Ctrl-C stops the job on the cluster without asking (default: ask on a terminal, else leave it running)",
    )
    parser.add_argument("--working-dir", default=".", help="folder shipped to the cluster (default: .)")
    parser.add_argument("--pip", default="", help="a requirements file (or comma-separated packages) Ray installs")
    parser.add_argument("--job-id", default=None, help="submission id (default: Ray picks one)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- tune|train|val|predict [its flags]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or command[0] not in COMMANDS:
        parser.error(f"give the pyseg command after --, one of {', '.join(COMMANDS)} (e.g. -- tune --samples 8)")
    if not args.address:
        parser.error("--address is required (the cluster's dashboard, e.g. http://HEAD:8265)")
    args.command = command
    return args


def main(argv: list[str] | None = None) -> int:
    """The command line: the job's own exit code (0 when it SUCCEEDED; 1 when it failed without one), 2 for a user
    error here (one line), 130 (Ctrl-C)."""
    return run_command("pyseg.submit", submit_command, argv)


def submit_command(argv: list[str] | None) -> int:
    from pyseg.distributed.jobs import submit_and_follow

    return submit_and_follow(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
