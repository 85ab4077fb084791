"""Failures on the `make up` stack: a killed training task, a lost tracking server, runs at once, leaked secrets.

Each test triggers real DAG runs through the REST API on the shared stack of the
`local_stack` fixture and then reads MLflow's REST API, as a user would.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from test_stack import (
    TINY_CONF,
    TRAINING_TASKS,
    mlflow_get,
    mlflow_post,
    request_json,
    task_instances,
    task_log_tail,
    trigger_dag_run,
    wait_for_dag_run,
)

from fer_tasks.report import FAILED_MARKER, run_folder_name

pytestmark = pytest.mark.slow

logger = logging.getLogger(__name__)

# Enough epochs that a training is still running when the test interferes.
LONGER_CONF = {**TINY_CONF, "epochs": 8, "patience": 8, "builtin_rows": 700, "builtin_test_rows": 70}
OUTAGE_SECONDS = 60


def model_runs(stack, dag_run_id: str) -> list[dict]:
    """Return every MLflow run of a DAG run, deleted ones included, with tags as a dict."""
    experiment = mlflow_get(stack, "mlflow/experiments/get-by-name?experiment_name=fer2013")["experiment"]
    runs = mlflow_post(stack, "runs/search", {
        "experiment_ids": [experiment["experiment_id"]],
        "filter": f"tags.`airflow.dag_run_id` = '{dag_run_id}'",
        "run_view_type": "ALL",
        "max_results": 100,
    }).get("runs", [])
    for run in runs:
        run["tags"] = {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}
    return runs


def metric_steps(stack, run_id: str, key: str) -> list[int]:
    history = mlflow_get(stack, f"mlflow/metrics/get-history?run_id={run_id}&metric_key={key}")
    return sorted(int(metric.get("step", 0)) for metric in history.get("metrics", []))


def check_one_finished_run_per_model(stack, dag_run_id: str, tasks: tuple[str, ...] = TRAINING_TASKS) -> list[str]:
    """Assert each trained model has exactly one active FINISHED run and no run is RUNNING; return a summary."""
    runs = model_runs(stack, dag_run_id)
    summary = []
    for run in runs:
        info = run["info"]
        summary.append(f"{run['tags'].get('airflow.task_id')}: {info['status']} ({info['lifecycle_stage']}, "
                       f"try {run['tags'].get('airflow.try_number')}, run {info['run_id']})")
    for task_id in tasks:
        active = [run for run in runs if run["tags"].get("airflow.task_id") == task_id
                  and run["info"]["lifecycle_stage"] == "active"]
        assert [run["info"]["status"] for run in active] == ["FINISHED"], summary
    assert not [run for run in runs if run["info"]["status"] == "RUNNING"], summary
    return summary


def checkpoint_epoch(stack, dag_run_id: str, task_id: str) -> int:
    latest = (Path(stack.settings.environment["FER_CHECKPOINT_DIR"]) / "fer_pipeline"
              / run_folder_name(dag_run_id) / task_id / "LATEST")
    return int(latest.read_text().removeprefix("epoch-")) if latest.exists() else 0


def wait_for_epoch(stack, dag_run_id: str, task_id: str, epoch: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while checkpoint_epoch(stack, dag_run_id, task_id) < epoch:
        assert time.monotonic() < deadline, f"{task_id} wrote no checkpoint of epoch {epoch} in {timeout} s"
        time.sleep(0.5)


def test_killed_training_resumes(local_stack):
    run_id = trigger_dag_run(local_stack, LONGER_CONF)
    wait_for_epoch(local_stack, run_id, "train_cnn", 2)

    instance = task_instances(local_stack, local_stack.airflow_token(), run_id)["train_cnn"]
    pid = instance["pid"]
    stack_pids = {child.pid for child in local_stack.process("scheduler").children(recursive=True)}
    # Only a process that this stack's scheduler started may be killed.
    assert pid in stack_pids, f"task pid {pid} is not a child of the stack's scheduler"
    killed_after = checkpoint_epoch(local_stack, run_id, "train_cnn")
    os.kill(pid, signal.SIGKILL)
    logger.info("Sent SIGKILL to train_cnn (pid %d) after its checkpoint of epoch %d", pid, killed_after)

    wait_for_dag_run(local_stack, run_id)
    instance = task_instances(local_stack, local_stack.airflow_token(), run_id)["train_cnn"]
    assert instance["try_number"] == 2
    log = task_log_tail(local_stack, local_stack.airflow_token(), run_id, instance, characters=200_000)
    resumed = [line for line in log.splitlines() if "Resuming cnn from the checkpoint after epoch" in line]
    print("\n".join(["", *resumed]))
    assert resumed, log[-3000:]
    assert int(resumed[0].split("after epoch ")[1].split()[0]) >= killed_after

    summary = check_one_finished_run_per_model(local_stack, run_id)
    print("\n".join(["MLflow runs after the kill:", *summary]))
    cnn = next(run for run in model_runs(local_stack, run_id)
               if run["tags"].get("airflow.task_id") == "train_cnn" and run["info"]["lifecycle_stage"] == "active")
    assert cnn["tags"]["airflow.try_number"] == "2"
    assert metric_steps(local_stack, cnn["info"]["run_id"], "loss") == list(range(1, LONGER_CONF["epochs"] + 1))
    assert not (Path(local_stack.settings.environment["FER_CHECKPOINT_DIR"]) / "fer_pipeline"
                / run_folder_name(run_id)).exists()


def test_training_survives_mlflow_outage(local_stack):
    conf = {**LONGER_CONF, "models": ["cnn"], "epochs": 10, "patience": 10}
    run_id = trigger_dag_run(local_stack, conf)
    wait_for_epoch(local_stack, run_id, "train_cnn", 1)

    local_stack.stop_service("mlflow")
    stopped_at = time.monotonic()
    logger.info("Stopped the MLflow server during training; starting it again in %d s", OUTAGE_SECONDS)
    try:
        time.sleep(OUTAGE_SECONDS)
        epochs_during_outage = checkpoint_epoch(local_stack, run_id, "train_cnn")
    finally:
        local_stack.start_service("mlflow")
    logger.info("MLflow server back after %.0f s", time.monotonic() - stopped_at)

    wait_for_dag_run(local_stack, run_id)
    assert epochs_during_outage > 1, "training made no progress while MLflow was down"
    instance = task_instances(local_stack, local_stack.airflow_token(), run_id)["train_cnn"]
    assert instance["try_number"] == 1
    log = task_log_tail(local_stack, local_stack.airflow_token(), run_id, instance, characters=200_000)
    outage_lines = [line for line in log.splitlines()
                    if "waiting for the tracking server" in line or "MLflow accepted the metrics" in line
                    or "did not accept the metrics" in line]
    print("\n".join(["", *outage_lines]))
    assert outage_lines, log[-3000:]

    summary = check_one_finished_run_per_model(local_stack, run_id, tasks=("train_cnn",))
    print("\n".join(["MLflow runs after the outage:", *summary]))
    cnn = next(run for run in model_runs(local_stack, run_id) if run["tags"].get("airflow.task_id") == "train_cnn")
    for key in ("loss", "val_accuracy", "epoch_seconds"):
        assert metric_steps(local_stack, cnn["info"]["run_id"], key) == list(range(1, conf["epochs"] + 1)), key


def test_runs_at_once_stay_apart(local_stack):
    conf = {**TINY_CONF, "models": ["dnn"]}
    run_ids = [trigger_dag_run(local_stack, conf) for _ in range(2)]
    waits = [threading.Thread(target=wait_for_dag_run, args=(local_stack, run_id)) for run_id in run_ids]
    for wait in waits:
        wait.start()
    for wait in waits:
        wait.join()

    token = local_stack.airflow_token()
    intervals = []
    for run_id in run_ids:
        status, body = request_json(
            f"{local_stack.airflow_url}/api/v2/dags/fer_pipeline/dagRuns/{quote(run_id, safe='')}", token=token
        )
        assert status == 200, body
        assert body["state"] == "success", body
        intervals.append((body["start_date"], body["end_date"]))
    print(f"\nDAG runs {run_ids} ran at {intervals}")
    assert max(start for start, _ in intervals) < min(end for _, end in intervals), "the two runs did not overlap"

    output_root = Path(local_stack.settings.environment["FER_OUTPUT_DIR"])
    run_ids_seen = set()
    for run_id in run_ids:
        folder = output_root / run_folder_name(run_id)
        summary = (folder / "summary.json").read_text()
        assert f'"dag_run_id": "{run_id}"' in summary
        assert (folder / "submission.csv").exists()
        assert not (folder / FAILED_MARKER).exists()
        runs = model_runs(local_stack, run_id)
        assert {run["tags"].get("fer.role") for run in runs} == {"parent", "model"}
        for run in runs:
            assert run["tags"]["airflow.dag_run_id"] == run_id
            run_ids_seen.add(run["info"]["run_id"])
    assert len(run_ids_seen) == sum(len(model_runs(local_stack, run_id)) for run_id in run_ids)
    assert os.readlink(output_root / "latest") in {run_folder_name(run_id) for run_id in run_ids}


def test_logs_and_reports_hold_no_secret(local_stack):
    # Runs after the other tests of this module, so their logs and reports are on disk.
    secrets = {name: value for name, value in local_stack.secrets().items() if len(str(value)) >= 8}
    secrets["airflow admin password"] = local_stack.credentials().password
    secrets["airflow API token"] = local_stack.airflow_token()
    folders = [local_stack.logs_dir, local_stack.airflow_home / "logs",
               Path(local_stack.settings.environment["FER_OUTPUT_DIR"])]
    scanned = 0
    leaks = []
    for folder in folders:
        for path in folder.rglob("*"):
            if not path.is_file():
                continue
            text = path.read_bytes().decode("utf-8", "replace")
            scanned += 1
            leaks.extend(f"{name} in {path}" for name, value in secrets.items() if str(value) in text)
    print(f"\nscanned {scanned} log and report files for {len(secrets)} secrets")
    assert scanned > 20
    assert not leaks, leaks
