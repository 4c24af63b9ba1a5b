"""pyseg.submit against a real `ray start --head` on 127.0.0.1 with token authentication."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import RayHead, free_port, python_env, short_temp_dir

from pyseg import submit
from pyseg.distributed import jobs

REPO = Path(__file__).resolve().parents[1]


def test_submit_needs_a_pyseg_command_and_an_address(capsys):
    with pytest.raises(SystemExit):
        submit.parse_args(["--address", "http://127.0.0.1:1", "--", "rm", "-rf"])
    assert "one of tune, train, val, predict" in capsys.readouterr().err
    args = submit.parse_args(["--address", "http://h:8265", "--", "tune", "--samples", "2", "--name", "a b"])
    assert jobs.entrypoint(args.command) == "python -m pyseg.tune --samples 2 --name 'a b'"


def test_unreachable_cluster_gets_a_next_step(capsys, monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)  # submit.main may set it; keep it out of later tests
    code = submit.main(["--address", f"http://127.0.0.1:{free_port()}", "--no-wait", "--", "train", "--epochs", "1"])
    assert code == 2  # an unreachable cluster is a user error (pyseg.errors): one line, exit 2
    assert "check --address" in capsys.readouterr().err


def test_jobs_get_the_same_forwarded_environment_as_ray_train_workers(tmp_path, monkeypatch):
    import pyseg.distributed.ray_train as ray_train

    assert jobs.FORWARDED_ENV is ray_train.FORWARDED_ENV  # one list, not two that drift apart
    for key in ray_train.FORWARDED_ENV:
        monkeypatch.setenv(key, f"value of {key}")
    monkeypatch.setenv("UNRELATED_SECRET", "x")
    env = jobs.runtime_env(str(tmp_path), "")["env_vars"]
    assert env == {key: f"value of {key}" for key in ray_train.FORWARDED_ENV}
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" in env  # was forwarded to Train workers but not to jobs
    assert {k: v for k, v in ray_train.forwarded_env().items() if k in env} == env


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 (token authentication on, as Ray 2.60 sets it up), its session in a
    private temp dir (nothing under /tmp/ray), stopped with its whole process group."""
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("ray_head")
    with short_temp_dir("pyseg-head-") as temp_dir:
        head = RayHead(root / "head.log", python_env(), temp_dir=temp_dir / "ray", token_path=root / "auth_token")
        try:
            head.wait_until_up()
            yield head.dashboard, root / "auth_token"
        finally:
            head.stop()


@pytest.mark.slow
def test_a_training_job_reaches_succeeded_with_the_token_passed_through(ray_head, tiny_data, tmp_path, monkeypatch):
    import urllib.error
    import urllib.request

    ray_head, token_path = ray_head
    with pytest.raises(urllib.error.HTTPError) as refused:  # the head really wants a token
        urllib.request.urlopen(f"{ray_head}/api/version", timeout=10)
    assert refused.value.code == 401
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
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
    assert bad.returncode == 2 and "auth_token" in bad.stderr, bad.stderr[-2000:]  # a user error: exit 2
