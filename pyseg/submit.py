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
import asyncio
import os
import shlex
import sys
from pathlib import Path

from pyseg.distributed.ray_train import FORWARDED_ENV  # the same environment as Ray Train workers get
from pyseg.errors import CommandParser, ConfigError, UserError, run_command

COMMANDS = ("tune", "train", "val", "predict")
EXCLUDES = [
    ".git",
    "runs",
    "build",
    "mlruns",
    "mlflow.db",
    "mlartifacts",
    "benchmarks/out",
    "*.egg-info",
    "__pycache__",
]


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


def use_token_if_available() -> bool:
    """Turns on token mode for the client when a token is at hand and the mode is unset; True if a token is used."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return False
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token")).expanduser()
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        return True
    return False


def runtime_env(working_dir: str, pip: str) -> dict:
    folder = Path(working_dir).expanduser().resolve()
    if not folder.is_dir():
        raise ValueError(f"--working-dir {working_dir}: not a folder")
    env = {"working_dir": str(folder), "excludes": EXCLUDES}
    if pip:
        requirements = Path(pip).expanduser()
        env["pip"] = str(requirements.resolve()) if requirements.is_file() else [p for p in pip.split(",") if p]
    forwarded = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    if forwarded:
        env["env_vars"] = forwarded
    return env


def entrypoint(command: list[str]) -> str:
    return f"python -m pyseg.{command[0]} {shlex.join(command[1:])}".rstrip()


async def follow_logs(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command line: the job's own exit code (0 when it SUCCEEDED; 1 when it failed without one), 2 for a user
    error here (one line), 130 (Ctrl-C)."""
    return run_command("pyseg.submit", submit_command, argv)


def submit_command(argv: list[str] | None) -> int:
    args = parse_args(argv)
    token = use_token_if_available()
    try:
        env = runtime_env(args.working_dir, args.pip)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        job_id = submit_job(client, entrypoint(args.command), env, args.job_id)
    except Exception as error:  # connection refused, 401, bad runtime env: all end here with a next step
        hint = (
            "the cluster refused the token: use the head node's ~/.ray/auth_token (or $RAY_AUTH_TOKEN)"
            if "nauthorized" in str(error) or "401" in str(error)
            else "check --address (the dashboard, port 8265) and that the cluster is up (ray status on the head)"
        )
        if "nauthorized" in str(error) and not token:
            hint = "the cluster wants a token: copy the head node's ~/.ray/auth_token here or set RAY_AUTH_TOKEN"
        raise UserError(f"cannot submit to {args.address}: {' '.join(str(error)[:500].split())}; {hint}") from error
    print(f"submitted job {job_id}: {entrypoint(args.command)}", flush=True)
    follow = f"ray job logs --follow {job_id} --address {args.address}"
    if args.no_wait:
        print(f"follow it with: {follow}\nstop it with: ray job stop {job_id} --address {args.address}")
        return 0
    try:
        asyncio.run(follow_logs(client, job_id))
    except KeyboardInterrupt:
        if args.stop_on_interrupt or ask_to_stop(job_id):
            client.stop_job(job_id)
            status = wait_until_ended(client, job_id)
            print(f"\njob {job_id}: {status}", file=sys.stderr)
        else:
            stop = f"ray job stop {job_id} --address {args.address}"
            print(f"\nstopped following; the job goes on. {follow}   or stop it: {stop}", file=sys.stderr)
        return 130
    info = client.get_job_info(job_id)
    status = str(getattr(info.status, "value", info.status))
    print(f"job {job_id}: {status}" + (f" ({info.message})" if info.message and status != "SUCCEEDED" else ""))
    return job_exit_code(status, info.driver_exit_code)


# A cluster that has just started answers this until its nodes' job agents are up (seconds).
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 60.0


def submit_job(client, command: str, env: dict, job_id: str | None) -> str:
    """client.submit_job, retried while the cluster says its job agents are not up yet (up to AGENT_WAIT_S)."""
    import time

    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=env, submission_id=job_id)
        except RuntimeError as error:
            if AGENT_NOT_READY not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def job_exit_code(status: str, driver_exit_code: int | None) -> int:
    """This command's exit code for a finished job: the job's own (its driver's), else 0 SUCCEEDED and 1 otherwise."""
    if driver_exit_code is not None:
        return driver_exit_code
    return 0 if status == "SUCCEEDED" else 1


def ask_to_stop(job_id: str) -> bool:
    """On a terminal: asks whether to stop the job (no by default; a second Ctrl-C or end of input is no)."""
    if not sys.stdin.isatty():
        return False
    try:
        answer = input(f"\nstop job {job_id} on the cluster? [y/N] ")
    except (KeyboardInterrupt, EOFError):
        return False
    return answer.strip().lower() in ("y", "yes")


def wait_until_ended(client, job_id: str, timeout_s: float = 60.0) -> str:
    """The job's status once it is no longer running (STOPPED, or what it reached first), or after timeout_s."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        found = client.get_job_status(job_id)
        status = str(getattr(found, "value", found))
        if status not in ("PENDING", "RUNNING") or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


if __name__ == "__main__":
    sys.exit(main())
