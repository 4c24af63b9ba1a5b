"""MLflow's UI over a finished pyseg search, checked in a real browser (headless Chromium driven by Selenium).

    python benchmarks/mlflow_ui_check.py [--store runs/mlflow.db] [--experiment pyseg] [--shots DIR]
                                         [--samples 3] [--epochs 2]

Without --store it first runs a 3-trial search on the built-in shapes-seg (2 epochs at 64 px, about 2 minutes on
2 CPUs; --samples and --epochs change that) in a temporary folder. It then starts `mlflow server` on 127.0.0.1
over the store and opens, in Debian's Chromium (packages chromium and chromium-driver; no browser download):

1. the experiment page: it opens as model training (not as a GenAI traces page) and lists the search's run;
2. the best trial's run page: its searched values as params and its per-epoch mask mAP metrics;
3. the compare page of the search's trials: every trial and the searched params lined up.

Each page must show what it promises; screenshots mlflow_experiment.png, mlflow_run.png and mlflow_compare.png go
to --shots (default: the current folder). Exit code 0 when every check passed, 1 when one failed, 2 when Chromium,
its driver or Selenium is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pyseg.distributed.tracking import UI_WORKFLOW  # noqa: E402
from pyseg.distributed.tracking import experiment_url as experiment_page_url  # noqa: E402

SEARCH_FLAGS = ["--imgsz", "64", "--batch", "8", "--workers", "0"]
SEARCH_FLAGS += ["--scheduler", "none", "--device", "cpu", "--threads", "1", "--close-mosaic", "1"]
SPACE = "optimizer: adamw\nlr0: {loguniform: [1.0e-4, 1.0e-2]}\nmosaic: {uniform: [0.0, 1.0]}\n"


class BrowserMissing(RuntimeError):
    """Chromium, chromedriver or Selenium is not installed."""


@dataclass
class SearchRuns:
    """The MLflow runs of one search in a store."""

    experiment_id: str
    parent_id: str
    parent_name: str
    children: list  # mlflow Run objects, best trial first
    searched: list[str]


def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver) paths; BrowserMissing says how to install them."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if not chromium or not driver:
        raise BrowserMissing(
            "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver) and Selenium "
            "(pip install selenium)"
        )
    return chromium, driver


def run_search(project: Path, env: dict[str, str], samples: int = 3, epochs: int = 2) -> Path:
    """A search of `samples` trials of `epochs` epochs logged to project/mlflow.db; returns the store's path."""
    space = project / "space.yaml"
    project.mkdir(parents=True, exist_ok=True)
    space.write_text(SPACE)
    command = [sys.executable, "-m", "pyseg.tune", "--samples", str(samples), "--epochs", str(epochs), *SEARCH_FLAGS]
    command += ["--space", str(space), "--project", str(project)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the search failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return project / "mlflow.db"


def search_runs(store: Path, experiment: str) -> SearchRuns:
    """The latest search (parent run and its children) in the store."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{store.resolve()}")
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise RuntimeError(f"{store} has no experiment {experiment!r}")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags and "pyseg.tune" in r.data.tags]
    if not parents:
        raise RuntimeError(f"{store}: experiment {experiment!r} holds no pyseg search")
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    children.sort(key=lambda r: -max(r.data.metrics.get("mask/map", -1.0), -1.0))
    searched = sorted(k.removeprefix("space.") for k, v in parent.data.params.items() if k.startswith("space."))
    searched = [k for k in searched if not parent.data.params[f"space.{k}"].startswith("fixed")]
    return SearchRuns(found.experiment_id, parent.info.run_id, parent.info.run_name, children, searched)


class MlflowUi:
    """`mlflow server` over a SQLite store on a free port of 127.0.0.1, for the length of a with-block."""

    def __init__(self, store: Path, log: Path):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--workers", "1", "--backend-store-uri", f"sqlite:///{store.resolve()}"]
        self.command, self.log = command, log

    def __enter__(self) -> MlflowUi:
        self.output = open(self.log, "wb")  # noqa: SIM115 (closed in __exit__)
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner: the UI needs none
        self.process = subprocess.Popen(
            self.command, stdout=self.output, stderr=self.output, start_new_session=True, env=env
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server on {self.url} did not answer within 120 s")

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
        self.output.close()


def open_browser(chromium: str, driver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


def page_text(browser, url: str, expected: list[str], timeout: float = 60.0) -> str:
    """Opens url and waits until the page's visible text holds every expected string; returns the text.
    Raises AssertionError naming what is missing when the time is up."""
    from selenium.webdriver.common.by import By

    browser.get(url)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = browser.find_element(By.TAG_NAME, "body").text
        if all(item in text for item in expected):
            return text
        time.sleep(0.5)
    missing = [item for item in expected if item not in text]
    raise AssertionError(f"{url}: the page does not show {missing} within {timeout:.0f} s; it shows: {text[:600]!r}")


def wait_for(browser, selector: str, what: str, timeout: float = 60.0) -> None:
    """Waits until an element matching the CSS selector is on the page (a chart drawn), then a moment more."""
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while not browser.find_elements(By.CSS_SELECTOR, selector):
        if time.monotonic() > deadline:
            raise AssertionError(f"{browser.current_url}: {what} ({selector}) not drawn within {timeout:.0f} s")
        time.sleep(0.5)
    time.sleep(1.0)


def check_ui(store: Path, experiment: str, shots: Path, log: Path) -> list[str]:
    """Runs the three page checks; returns one line per check passed. Raises AssertionError for a failed one."""
    chromium, driver = browser_paths()
    runs = search_runs(store, experiment)
    if len(runs.children) < 2:
        raise AssertionError(f"the search in {store} has {len(runs.children)} trial runs; a comparison needs 2+")
    shots.mkdir(parents=True, exist_ok=True)
    passed = []
    with MlflowUi(store, log) as ui:
        browser = open_browser(chromium, driver)
        try:
            experiment_url = experiment_page_url(ui.url, runs.experiment_id)
            page_text(browser, experiment_url, [experiment, runs.parent_name, "Runs"])
            browser.save_screenshot(str(shots / "mlflow_experiment.png"))
            passed.append(f"experiment page lists the search run {runs.parent_name!r}: {experiment_url}")

            best = runs.children[0]
            run_url = f"{ui.url}/#/experiments/{runs.experiment_id}/runs/{best.info.run_id}?{UI_WORKFLOW}"
            page_text(browser, run_url, [best.info.run_name, *runs.searched, "mask/map"])
            browser.save_screenshot(str(shots / "mlflow_run.png"))
            passed.append(f"best trial's page shows {', '.join(runs.searched)} and mask/map: {run_url}")

            ids = json.dumps([r.info.run_id for r in runs.children])
            query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([runs.experiment_id])})
            compare_url = f"{ui.url}/#/compare-runs?{query}&{UI_WORKFLOW}"
            page_text(browser, compare_url, [*(r.info.run_name for r in runs.children), *runs.searched, "mask/map"])
            wait_for(browser, ".js-plotly-plot .parcoords", "the parallel-coordinates chart")
            browser.save_screenshot(str(shots / "mlflow_compare.png"))
            passed.append(f"compare page lines up {len(runs.children)} trials by {', '.join(runs.searched)}")
        finally:
            browser.quit()
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None, help="an MLflow SQLite store holding a pyseg search")
    parser.add_argument("--experiment", default="pyseg", help="MLflow experiment (default pyseg)")
    parser.add_argument("--shots", type=Path, default=Path("."), help="folder for the screenshots (default .)")
    parser.add_argument("--samples", type=int, default=3, help="trials of the search run without --store (2+)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each of its trials (default 2)")
    args = parser.parse_args(argv)
    if args.samples < 2 or args.epochs < 1:
        parser.error(
            f"--samples must be 2 or more (a comparison) and --epochs 1 or more, got {args.samples}, {args.epochs}"
        )
    try:
        browser_paths()
    except BrowserMissing as error:
        print(f"mlflow_ui_check: {error}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pyseg-ui-") as folder:
        store = args.store
        if store is None:
            print(f"running a {args.samples}-trial search of {args.epochs} epochs on shapes-seg ...", flush=True)
            env = {**os.environ, "TMPDIR": folder, "PYTHONPATH": str(ROOT)}
            env.pop("MLFLOW_TRACKING_URI", None)
            start = time.monotonic()
            store = run_search(Path(folder) / "runs", env, args.samples, args.epochs)
            print(f"search done in {time.monotonic() - start:.0f} s")
        try:
            for line in check_ui(store, args.experiment, args.shots, Path(folder) / "mlflow-server.log"):
                print(f"ok: {line}")
        except AssertionError as error:
            print(f"FAILED: {error}", file=sys.stderr)
            return 1
    print(f"screenshots in {args.shots.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
