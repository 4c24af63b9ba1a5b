"""pyseg.submit against a real `ray start --head` on 127.0.0.1 with token authentication."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_port

from pyseg import submit

REPO = Path(__file__).resolve().parents[1]


def test_submit_needs_a_pyseg_command_and_an_address(capsys):
    with pytest.raises(SystemExit):
        submit.parse_args(["--address", "http://127.0.0.1:1", "--", "rm", "-rf"])
    assert "one of tune, train, val, predict" in capsys.readouterr().err
    args = submit.parse_args(["--address", "http://h:8265", "--", "tune", "--samples", "2", "--name", "a b"])
    assert submit.entrypoint(args.command) == "python -m pyseg.tune --samples 2 --name 'a b'"


def test_unreachable_cluster_gets_a_next_step(capsys, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # submit.main may set it; keep it out of later tests
    code = submit.main(["--address", f"http://127.0.0.1:{free_port()}", "--no-wait", "--", "train", "--epochs", "1"])
    assert code == 1
    assert "check --address" in capsys.readouterr().err


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 (token authentication on, as Ray 2.60 sets it up)."""
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("ray_head")
    dashboard = free_port()
    command = ["ray", "start", "--head", "--block", "--num-cpus", "2", "--node-ip-address", "127.0.0.1"]
    command += ["--port", str(free_port()), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard)]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    log = open(root / "head.log", "wb")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True, env=env)
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 120
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL) if process.poll() is None else None
            pytest.fail(f"ray start --head did not come up: {(root / 'head.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers (401 without a token): up
        except OSError:
            time.sleep(0.5)
    yield address
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_training_job_reaches_succeeded_with_the_token_passed_through(ray_head, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("PYSEG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(REPO)
    project = tmp_path / "runs"
    command = ["train", "--data", str(tiny_data), "--epochs", "1", "--imgsz", "64", "--batch", "4", "--workers", "0"]
    command += ["--device", "cpu", "--project", str(project), "--name", "job", "--no-mlflow"]
    result = subprocess.run(
        [sys.executable, "-m", "pyseg.submit", "--address", ray_head, "--", *command],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout and "submitted job" in result.stdout
    assert (project / "job" / "weights" / "last.pt").is_file()

    # A wrong token is refused with a message that says where the right one is.
    bad = subprocess.run(
        [sys.executable, "-m", "pyseg.submit", "--address", ray_head, "--no-wait", "--", *command],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 32},
    )
    assert bad.returncode == 1 and "auth_token" in bad.stderr, bad.stderr[-2000:]
