"""The `make up` stack: PostgreSQL, MLflow server and Airflow on 127.0.0.1, one real DAG run, a browser login.

The slow tests share one stack (the `local_stack` fixture in conftest.py) and one
DAG run on tiny built-in data, triggered through Airflow's REST API as a user
would. The browser test drives headless Chromium through the real login form.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
import urllib.request
import zipfile
from datetime import datetime
from io import BytesIO
from pathlib import Path
from urllib.parse import quote

import psutil
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from stack import Stack, StackError, StackSettings, free_port, request_json  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHECK_OUTPUT_DIR = PROJECT_ROOT / "output" / "stack-check"
MODELS = ("cnn_aug", "cnn", "dnn")
TRAINING_TASKS = tuple(f"train_{model}" for model in MODELS)
# Tiny built-in data and one epoch: the run checks the wiring, not the accuracy.
TINY_CONF = {
    "epochs": 1,
    "batch_size": 32,
    "builtin_rows": 140,
    "builtin_test_rows": 14,
    "saliency_images": [0],
    "filter_layers": ["block1_conv2"],
    "filters_per_layer": 1,
    "ascent_steps": 2,
    "activation_images": [0],
}
DAG_RUN_TIMEOUT_SECONDS = 1200
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

logger = logging.getLogger(__name__)


# Without running services: settings, secrets, ports and pids.


def test_settings_reject_equal_ports():
    with pytest.raises(StackError, match="ports must differ"):
        StackSettings(airflow_port=8080, mlflow_port=8080, postgres_port=15432)


def test_settings_reject_low_parallelism():
    with pytest.raises(StackError, match="parallelism must be at least 3"):
        StackSettings(parallelism=2)


def test_secrets_are_private_and_stable(tmp_path):
    stack = Stack(tmp_path)
    first = stack.secrets()
    login = stack.credentials()
    assert Stack(tmp_path).secrets() == first
    assert Stack(tmp_path).credentials() == login
    assert len(set(first.values())) == len(first)
    assert login.username == "admin"
    assert len(login.password) >= 20
    for path in (stack.secrets_file, stack.passwords_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_up_rejects_port_in_use(tmp_path):
    with socket_on_free_port() as taken:
        settings = StackSettings(airflow_port=taken, mlflow_port=free_port(), postgres_port=free_port())
        stack = Stack(tmp_path / "state", settings)
        with pytest.raises(StackError, match=f"already in use on 127.0.0.1: {taken} for Airflow"):
            stack.up()
    assert stack.running_services() == []
    assert not (tmp_path / "state" / "postgres").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL changes user only when the stack runs as root")
def test_up_as_root_rejects_unreachable_folder(tmp_path):
    # pytest's base temporary folder has mode 0700, so the PostgreSQL user cannot enter it.
    settings = StackSettings(airflow_port=free_port(), mlflow_port=free_port(), postgres_port=free_port())
    stack = Stack(tmp_path / "state", settings)
    with pytest.raises(StackError, match="cannot enter .* Choose a state folder"):
        stack.up()
    assert stack.running_services() == []


def test_down_skips_reused_pid(tmp_path):
    """A recorded pid whose start time differs belongs to another program and is left alone."""
    other = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        record = {"pid": other.pid, "create_time": psutil.Process(other.pid).create_time() - 100}
        state = {"settings": {}, "processes": {"mlflow": record}}
        (tmp_path / "stack.json").write_text(json.dumps(state))
        stack = Stack(tmp_path)
        assert stack.process("mlflow") is None
        assert stack.down() == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_down_without_state_stops_nothing(tmp_path):
    assert Stack(tmp_path).down() == []


class socket_on_free_port:
    """Hold a listening socket on a free port of 127.0.0.1 for the length of a `with` block."""

    def __enter__(self) -> int:
        import socket

        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        return self.socket.getsockname()[1]

    def __exit__(self, *exception) -> None:
        self.socket.close()


# The running stack.


def stack_processes(stack: Stack) -> list[psutil.Process]:
    processes = []
    for service in stack.running_services():
        process = stack.process(service)
        processes.extend([process, *process.children(recursive=True)])
    return processes


@pytest.mark.slow
def test_stack_runs_every_service(local_stack):
    report = local_stack.status()
    assert all(report["services"].values()), report
    assert report["health"] == {
        "mlflow": "healthy",
        "airflow metadatabase": "healthy",
        "airflow scheduler": "healthy",
        "airflow dag_processor": "healthy",
    }


@pytest.mark.slow
def test_stack_listens_on_loopback_only(local_stack):
    listening = {}
    for process in stack_processes(local_stack):
        try:
            connections = process.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN:
                listening[(connection.laddr.ip, connection.laddr.port)] = process.name()
    ports = {port for _, port in listening}
    settings = local_stack.settings
    assert {settings.airflow_port, settings.mlflow_port, settings.postgres_port} <= ports, listening
    assert {address for address, _ in listening} == {"127.0.0.1"}, listening


@pytest.mark.slow
def test_stack_requires_login(local_stack):
    status, _ = request_json(f"{local_stack.airflow_url}/api/v2/dags")
    assert status == 401
    status, _ = request_json(
        f"{local_stack.airflow_url}/auth/token", "POST", {"username": "admin", "password": "wrong-password"}
    )
    assert status == 401


@pytest.mark.slow
def test_stack_restarts_mlflow_alone(local_stack):
    airflow_pids = {service: local_stack.process(service).pid for service in ("api-server", "scheduler")}
    local_stack.stop_service("mlflow")
    assert local_stack.process("mlflow") is None
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{local_stack.mlflow_url}/health", timeout=5)
    local_stack.start_service("mlflow")
    with urllib.request.urlopen(f"{local_stack.mlflow_url}/health", timeout=5) as response:
        assert response.status == 200
    assert {service: local_stack.process(service).pid for service in airflow_pids} == airflow_pids


# One DAG run through the REST API.


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def task_instances(stack: Stack, token: str, run_id: str) -> dict[str, dict]:
    path = f"/api/v2/dags/fer_pipeline/dagRuns/{quote(run_id, safe='')}/taskInstances"
    status, body = request_json(stack.airflow_url + path, token=token)
    assert status == 200, body
    return {instance["task_id"]: instance for instance in body["task_instances"]}


def task_log_tail(stack: Stack, token: str, run_id: str, instance: dict, characters: int = 4000) -> str:
    path = (f"/api/v2/dags/fer_pipeline/dagRuns/{quote(run_id, safe='')}/taskInstances/"
            f"{instance['task_id']}/logs/{max(instance['try_number'], 1)}?full_content=true")
    status, body = request_json(stack.airflow_url + path, token=token)
    if status != 200 or not isinstance(body, dict):
        return f"(log not available: {status} {str(body)[:500]})"
    lines = []
    for entry in body.get("content", []):
        if not isinstance(entry, dict):
            lines.append(str(entry))
            continue
        lines.append(entry.get("event", ""))
        # The exception of a failed task comes as structured fields next to "Task failed with exception".
        for error in entry.get("error_detail") or []:
            lines.append(f"  {error.get('exc_type')}: {error.get('exc_value')}")
    return "\n".join(lines)[-characters:]


def describe_failure(stack: Stack, token: str, run_id: str, state: str) -> str:
    instances = task_instances(stack, token, run_id)
    states = {task_id: instance["state"] for task_id, instance in instances.items()}
    failed = [instance for instance in instances.values() if instance["state"] in ("failed", "upstream_failed")]
    message = [f"DAG run {run_id} ended as {state!r}; task states: {states}"]
    for instance in failed:
        if instance["state"] == "failed":
            message.append(f"--- log tail of {instance['task_id']}:\n{task_log_tail(stack, token, run_id, instance)}")
    return "\n".join(message)


def trigger_dag_run(stack: Stack, conf: dict) -> str:
    """Unpause fer_pipeline and trigger a run with `conf` through the REST API; return its run id."""
    token = stack.airflow_token()
    base = stack.airflow_url
    status, body = request_json(f"{base}/api/v2/dags/fer_pipeline", "PATCH", {"is_paused": False}, token)
    assert status == 200, body
    status, body = request_json(
        f"{base}/api/v2/dags/fer_pipeline/dagRuns", "POST", {"logical_date": None, "conf": conf}, token
    )
    assert status == 200, body
    return body["dag_run_id"]


def wait_for_dag_run(stack: Stack, run_id: str, timeout: float = DAG_RUN_TIMEOUT_SECONDS) -> float:
    """Poll a DAG run until it succeeds and return its minutes; fail the test with the failed tasks' logs."""
    started = time.monotonic()
    deadline = started + timeout
    state = "queued"
    while state not in ("success", "failed") and time.monotonic() < deadline:
        time.sleep(5)
        # Tokens expire, so long waits ask for a new one.
        token = stack.airflow_token()
        path = f"/api/v2/dags/fer_pipeline/dagRuns/{quote(run_id, safe='')}"
        status, body = request_json(stack.airflow_url + path, token=token)
        assert status == 200, body
        state = body["state"]
    minutes = (time.monotonic() - started) / 60
    if state != "success":
        reason = "timed out" if state not in ("success", "failed") else "failed"
        pytest.fail(f"DAG run {reason} after {minutes:.1f} min.\n" + describe_failure(stack, token, run_id, state))
    logger.info("DAG run %s succeeded in %.1f min", run_id, minutes)
    return minutes


@pytest.fixture(scope="module")
def finished_run(local_stack) -> dict:
    """Trigger fer_pipeline with tiny data through the REST API and wait until the run succeeds."""
    run_id = trigger_dag_run(local_stack, TINY_CONF)
    minutes = wait_for_dag_run(local_stack, run_id)
    instances = task_instances(local_stack, local_stack.airflow_token(), run_id)
    return {"run_id": run_id, "minutes": minutes, "instances": instances}


@pytest.mark.slow
def test_dag_run_trains_in_parallel(finished_run):
    instances = finished_run["instances"]
    assert all(instance["state"] == "success" for instance in instances.values()), {
        task_id: instance["state"] for task_id, instance in instances.items()
    }
    intervals = {task: (parse_time(instances[task]["start_date"]), parse_time(instances[task]["end_date"]))
                 for task in TRAINING_TASKS}
    latest_start = max(start for start, _ in intervals.values())
    earliest_end = min(end for _, end in intervals.values())
    lines = [f"DAG run {finished_run['run_id']} succeeded in {finished_run['minutes']:.1f} min"]
    for task, (start, end) in intervals.items():
        lines.append(f"{task:14s} {start.isoformat(timespec='milliseconds')} -> "
                     f"{end.isoformat(timespec='milliseconds')} ({(end - start).total_seconds():.1f} s)")
    overlap = (earliest_end - latest_start).total_seconds()
    lines.append(f"all three trainings ran at once for {overlap:.1f} s "
                 f"(from {latest_start.isoformat(timespec='milliseconds')} "
                 f"to {earliest_end.isoformat(timespec='milliseconds')})")
    CHECK_OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    (CHECK_OUTPUT_DIR / "training-intervals.txt").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    for line in lines:
        logger.info(line)
    assert latest_start < earliest_end, "the training tasks did not overlap:\n" + "\n".join(lines)


def mlflow_post(stack: Stack, path: str, body: dict) -> dict:
    status, response = request_json(f"{stack.mlflow_url}/api/2.0/mlflow/{path}", "POST", body)
    assert status == 200, response
    return response


def mlflow_get(stack: Stack, path: str) -> dict:
    status, response = request_json(f"{stack.mlflow_url}/api/2.0/{path}")
    assert status == 200, response
    return response


@pytest.fixture(scope="module")
def mlflow_runs(local_stack, finished_run) -> dict:
    """The MLflow runs of the finished DAG run, read from the server's REST API, keyed by role."""
    experiment = mlflow_get(local_stack, "mlflow/experiments/get-by-name?experiment_name=fer2013")["experiment"]
    runs = mlflow_post(local_stack, "runs/search", {
        "experiment_ids": [experiment["experiment_id"]],
        "filter": f"tags.`airflow.dag_run_id` = '{finished_run['run_id']}'",
        "max_results": 100,
    })["runs"]
    by_role: dict[str, list] = {}
    for run in runs:
        tags = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
        run["tags"] = tags
        run["metrics"] = {metric["key"]: metric["value"] for metric in run["data"].get("metrics", [])}
        by_role.setdefault(tags.get("fer.role"), []).append(run)
    return {"experiment": experiment, **by_role}


@pytest.mark.slow
def test_mlflow_has_parent_and_three_children(mlflow_runs):
    parents = mlflow_runs.get("parent", [])
    children = mlflow_runs.get("model", [])
    assert len(parents) == 1, parents
    assert parents[0]["info"]["status"] == "FINISHED"
    assert sorted(run["tags"]["fer.model"] for run in children) == sorted(MODELS)
    for run in children:
        model = run["tags"]["fer.model"]
        assert run["info"]["status"] == "FINISHED", model
        assert run["tags"]["mlflow.parentRunId"] == parents[0]["info"]["run_id"], model
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds"):
            assert key in run["metrics"], (model, key, sorted(run["metrics"]))
        # Artifacts go through the server, not to a path on the worker.
        assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/"), run["info"]["artifact_uri"]


@pytest.mark.slow
def test_mlflow_serves_model_artifacts(local_stack, mlflow_runs):
    experiment_id = mlflow_runs["experiment"]["experiment_id"]
    for run in mlflow_runs["model"]:
        model = run["tags"]["fer.model"]
        run_id = run["info"]["run_id"]
        listing = mlflow_get(local_stack, f"mlflow/artifacts/list?run_id={run_id}")
        assert {"history.json", "model_summary.txt"} <= {item["path"] for item in listing["files"]}, model

        logged = mlflow_post(local_stack, "logged-models/search", {
            "experiment_ids": [experiment_id], "filter": f"source_run_id = '{run_id}'",
        })["models"]
        assert len(logged) == 1, (model, logged)
        artifact_uri = logged[0]["info"]["artifact_uri"]
        assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri
        artifact_path = artifact_uri.removeprefix("mlflow-artifacts:/").lstrip("/")
        files = mlflow_get(local_stack, f"mlflow-artifacts/artifacts?path={quote(artifact_path + '/data')}")["files"]
        sizes = {item["path"]: item.get("file_size") for item in files}
        assert "model.keras" in sizes, (model, sizes)

        url = f"{local_stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/{artifact_path}/data/model.keras"
        with urllib.request.urlopen(url, timeout=60) as response:
            content = response.read()
        assert len(content) == sizes["model.keras"], model
        # A .keras file is a zip archive with the model's config and weights.
        with zipfile.ZipFile(BytesIO(content)) as archive:
            assert {"config.json", "model.weights.h5"} <= set(archive.namelist()), model
        with urllib.request.urlopen(f"{local_stack.mlflow_url}/api/2.0/mlflow-artifacts/artifacts/"
                                    f"{artifact_path}/MLmodel", timeout=30) as response:
            assert b"keras" in response.read(), model
        assert (local_stack.artifacts_dir / artifact_path / "data" / "model.keras").is_file(), model


# The Airflow UI in headless Chromium.


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} not found; install the Debian packages chromium and "
                    "chromium-driver (apt-get install --no-install-recommends chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_ui_shows_graph_and_mlflow_link(local_stack, finished_run, mlflow_runs, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    wait = WebDriverWait(browser, 60)
    login = local_stack.credentials()
    base = local_stack.airflow_url

    browser.get(f"{base}/")
    wait.until(expected_conditions.url_contains("/auth/login"))
    # The login page is a React app: the URL changes before its form is drawn.
    username = wait.until(expected_conditions.visibility_of_element_located((By.CSS_SELECTOR, "input[name=username]")))
    username.send_keys(login.username)
    browser.find_element(By.CSS_SELECTOR, "input[name=password]").send_keys(login.password)
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda driver: "/auth/login" not in driver.current_url)

    run_id = finished_run["run_id"]
    browser.get(f"{base}/dags/fer_pipeline/runs/{quote(run_id, safe='')}/tasks/train_cnn/details")
    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, "button[aria-label^='Show Graph']")))
    browser.find_element(By.CSS_SELECTOR, "button[aria-label^='Show Graph']").click()
    # The graph draws one node per task; wait for all ten and for the task's link button.
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, ".react-flow__node")) >= 10)
    link = wait.until(expected_conditions.visibility_of_element_located(
        (By.XPATH, "//a[normalize-space(.)='MLflow run']")))
    time.sleep(1)  # the graph's fit-to-view animation

    CHECK_OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    screenshot = CHECK_OUTPUT_DIR / "airflow-graph-mlflow-link.png"
    assert browser.save_screenshot(str(screenshot)), screenshot
    print(f"\nScreenshot of the graph and the MLflow run link: {screenshot}")

    cnn_run = next(run for run in mlflow_runs["model"] if run["tags"]["fer.model"] == "cnn")
    expected = (f"{local_stack.mlflow_url}/#/experiments/{mlflow_runs['experiment']['experiment_id']}"
                f"/runs/{cnn_run['info']['run_id']}")
    assert link.get_attribute("href") == expected
    graph_labels = {node.text.split("\n")[0] for node in browser.find_elements(By.CSS_SELECTOR, ".react-flow__node")}
    assert set(TRAINING_TASKS) <= graph_labels, graph_labels
