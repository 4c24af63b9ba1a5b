"""Ray Jobs: submit a pyseg command to a cluster's dashboard with this directory as its working directory, follow
its logs, stop it on request, and turn its end into an exit code. Imports neither torch nor Ray Train (the job
client alone is loaded when a job is submitted).

Token authentication (Ray 2.60 default): the token is read from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token (copy it from the head node) and sent with every request; pyseg never turns authentication off.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

from pyseg.errors import ConfigError, UserError

# The environment every Ray process of a pyseg run needs as the driver has it: Ray Train workers (ray_train) and
# Ray Jobs (submit_and_follow). The one list for both.
FORWARDED_ENV = (
    "PYSEG_CACHE_DIR",
    "PYSEG_DATASETS_DIR",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)

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


def submit_and_follow(args) -> int:
    """Submits args.command as a Ray Job to args.address and follows it (see pyseg.submit for the flags); the
    job's exit code, or 130 after Ctrl-C."""
    token = use_token_if_available()
    try:
        env = runtime_env(args.working_dir, args.pip)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(args.address)
        job_id = submit_job(client, entrypoint(args.command), env, args.job_id)
    except (AuthenticationError, ConnectionError, OSError, RuntimeError, ValueError) as error:  # refused, 401, ...
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


# A cluster that has just started answers this until its head node's job agent is up: seconds, or more than a
# minute on a busy head.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = 180.0


def submit_job(client, command: str, env: dict, job_id: str | None) -> str:
    """client.submit_job, retried while the cluster says its job agents are not up yet (up to AGENT_WAIT_S)."""
    import time

    deadline = time.monotonic() + AGENT_WAIT_S
    said_so = False
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=env, submission_id=job_id)
        except RuntimeError as error:
            if AGENT_NOT_READY not in str(error) or time.monotonic() > deadline:
                raise
            if not said_so:
                print(f"the cluster's job agent is not up yet; trying again for up to {AGENT_WAIT_S:.0f} s", flush=True)
                said_so = True
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
