"""python -m pyseg.submit against a two-node Ray cluster: the job's working directory reaches both nodes, logs
stream, Ctrl-C stops the job when asked to, and the exit code is the job's own."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_process_group, python_env, ray_cluster

from pyseg.distributed import jobs

REPO = Path(__file__).resolve().parents[1]

ray = pytest.importorskip("ray")


def test_a_finished_job_gives_its_own_exit_code():
    assert jobs.job_exit_code("SUCCEEDED", 0) == 0
    assert jobs.job_exit_code("FAILED", 2) == 2  # the job's user error stays a user error
    assert jobs.job_exit_code("FAILED", None) == 1 and jobs.job_exit_code("SUCCEEDED", None) == 0


def test_submitting_waits_for_a_new_clusters_job_agents_but_not_for_other_errors(monkeypatch):
    class Cluster:
        def __init__(self, answers):
            self.answers, self.calls = list(answers), 0

        def submit_job(self, **kwargs):
            self.calls += 1
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    monkeypatch.setattr("time.sleep", lambda s: None)
    not_ready = RuntimeError("Request failed with status code 500: No available agent to submit job, please try again")
    starting = Cluster([not_ready, not_ready, "raysubmit_1"])
    assert jobs.submit_job(starting, "python -m pyseg.tune", {}, None) == "raysubmit_1" and starting.calls == 3
    refused = Cluster([RuntimeError("Request failed with status code 401: Unauthorized"), "never"])
    with pytest.raises(RuntimeError, match="Unauthorized"):
        jobs.submit_job(refused, "python -m pyseg.tune", {}, None)
    assert refused.calls == 1


def test_ctrl_c_asks_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert jobs.ask_to_stop("raysubmit_1")
    monkeypatch.setattr("builtins.input", lambda prompt: "")
    assert not jobs.ask_to_stop("raysubmit_1")  # no by default

    def second_ctrl_c(prompt):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", second_ctrl_c)
    assert not jobs.ask_to_stop("raysubmit_1")
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)
    assert not jobs.ask_to_stop("raysubmit_1")  # no terminal: the job goes on


@pytest.mark.slow
def test_submitted_jobs_train_on_both_nodes_stop_on_ctrl_c_and_exit_with_their_own_code(
    tiny_data, tmp_path, private_cache
):
    train = ["train", "--data", str(tiny_data), "--imgsz", "64", "--batch", "4", "--workers", "0", "--device", "cpu"]
    train += ["--threads", "1", "--close-mosaic", "1", "--warmup-epochs", "0.5", "--no-mlflow"]
    train += ["--project", str(tmp_path / "runs")]
    on_both_nodes = ["--ray-workers", "2", "--cpus-per-worker", "1"]
    env = python_env(RAY_ADDRESS=None, PYTHONUNBUFFERED="1")
    with ray_cluster(head_cpus=1, worker_cpus=1) as nodes:
        dashboard = "http://" + nodes.head_node.address_info["webui_url"]
        from ray.job_submission import JobSubmissionClient
        from ray.util.state import list_actors

        client = JobSubmissionClient(dashboard)

        def submitted(*args: str, **kwargs) -> subprocess.CompletedProcess:
            command = [sys.executable, "-m", "pyseg.submit", "--address", dashboard, *args]
            return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, **kwargs)

        # A 2-worker training: one worker per node (1 CPU each), the job's code shipped to both.
        done = submitted(
            "--job-id", "two-nodes", "--", *train, *on_both_nodes, "--epochs", "2", "--name", "job", timeout=600
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "job two-nodes: SUCCEEDED" in done.stdout
        assert "2/2" in done.stdout  # the training's epoch lines streamed back
        workers = list_actors(
            address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=100
        )
        assert {actor.node_id for actor in workers} == {node["NodeID"] for node in ray.nodes() if node["Alive"]}
        assert (tmp_path / "runs" / "job" / "results.csv").read_text().count("\n") == 3  # header + 2 epochs

        # The job's own exit code: a bad flag is its user error (2), said in its log.
        bad = submitted("--job-id", "bad-flag", "--", *train, "--epochs", "-1", "--name", "bad", timeout=300)
        assert bad.returncode == 2, bad.stdout[-3000:] + bad.stderr[-3000:]
        assert "--epochs" in bad.stdout and "job bad-flag: FAILED" in bad.stdout

        # Ctrl-C with --stop-on-interrupt stops the job on the cluster; without it (no terminal) the job goes on.
        # (These jobs train in their driver process: what is tested is the client, and Ray Train costs a minute.)
        for flag, job_id, expected in (("--stop-on-interrupt", "stopped", "STOPPED"), (None, "left", "RUNNING")):
            args = [*([flag] if flag else []), "--job-id", job_id, "--", *train, "--epochs", "200", "--name", job_id]
            log = tmp_path / f"{job_id}.log"
            with open(log, "w") as output:
                process = subprocess.Popen(
                    [sys.executable, "-m", "pyseg.submit", "--address", dashboard, *args],
                    stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=REPO,
                    start_new_session=True,
                )  # fmt: skip
                try:
                    deadline = time.monotonic() + 300
                    while "1/200" not in log.read_text():  # the first epoch's line has streamed back
                        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                        time.sleep(0.5)
                    process.send_signal(signal.SIGINT)
                    code = process.wait(timeout=120)
                finally:
                    kill_process_group(process, grace_s=5)
            text = log.read_text()
            assert code == 130, text[-3000:]
            status = str(client.get_job_status(job_id).value)
            assert status == expected, text[-3000:]
            if expected == "STOPPED":
                assert f"job {job_id}: STOPPED" in text
            else:
                assert f"ray job stop {job_id} --address {dashboard}" in text
                client.stop_job(job_id)
                jobs.wait_until_ended(client, job_id)
