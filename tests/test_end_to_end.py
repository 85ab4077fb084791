"""End to end: real DAG runs, as `make run` starts them, against a temporary MLflow store.

`scripts/run_dag.py` starts an Airflow api-server on 127.0.0.1 and runs the DAG
under the LocalExecutor, so the training tasks run as parallel task processes.
Each run uses its own Airflow home (a migrated SQLite metadata database), MLflow
store, cache and output folder under pytest's temporary directory.
"""

from __future__ import annotations

import csv
import json
import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from conftest import run_airflow_cli

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODELS = ("cnn_aug", "cnn", "dnn")
QUICK_PARAMS = {
    "epochs": 2,
    "batch_size": 32,
    "filters_per_layer": 2,
    "ascent_steps": 3,
    "saliency_images": [0, 1],
    "activation_images": [0],
}


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("airflow")
    run_airflow_cli(["db", "migrate"], _environment(home, home), timeout=600)
    return home


def _environment(airflow_home: Path, workspace: Path) -> dict[str, str]:
    return {
        **os.environ,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "MLFLOW_TRACKING_URI": f"sqlite:///{workspace / 'mlflow.db'}",
        "FER_ARTIFACT_ROOT": (workspace / "mlartifacts").as_uri(),
        "FER_OUTPUT_DIR": str(workspace / "output"),
        "FER_CACHE_DIR": str(workspace / "cache"),
        "FER_BUILTIN_DATA_DIR": str(workspace / "builtin"),
    }


def run_dag(airflow_home: Path, workspace: Path, conf: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "run_dag.py"), "--conf", json.dumps(conf)],
        env=_environment(airflow_home, workspace),
        capture_output=True,
        text=True,
        timeout=1500,
        check=False,
    )
    (workspace / "dag-test.log").write_text(result.stdout + result.stderr)
    return result


def mlflow_runs(workspace: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fer2013")
    assert experiment is not None, "the fer2013 experiment was not created"
    return client, client.search_runs([experiment.experiment_id])


def check_outputs(workspace: Path, expected_test_ids: list[int]) -> dict:
    output = workspace / "output" / "latest"
    assert output.is_symlink(), "output/latest was not created"
    summary = json.loads((output / "summary.json").read_text())
    for name in ("submission.csv", "report.html", "report.md", "summary.json", "figures/curves.png"):
        assert (output / name).is_file(), name
    for model in MODELS:
        assert (output / "submissions" / f"{model}.csv").is_file(), model
        assert (output / "figures" / f"confusion_{model}.png").is_file(), model
    for model in ("cnn_aug", "cnn"):
        assert (output / "figures" / f"saliency_{model}.png").is_file(), model
        assert (output / "figures" / f"filters_{model}.png").is_file(), model
        assert (output / "figures" / f"activations_{model}.png").is_file(), model

    with open(output / "submission.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["id", "label"]
    assert sorted(int(row[0]) for row in rows[1:]) == sorted(expected_test_ids)
    assert all(row[1].isdigit() and 0 <= int(row[1]) <= 6 for row in rows[1:])

    report = (output / "report.html").read_text()
    markdown = (output / "report.md").read_text()
    for model in MODELS:
        assert model in report
        assert model in markdown
    assert list(output.parent.glob("**/*.partial*")) == []
    return summary


def check_mlflow(workspace: Path) -> None:
    client, runs = mlflow_runs(workspace)
    parents = [run for run in runs if run.data.tags.get("fer.role") == "parent"]
    children = [run for run in runs if run.data.tags.get("fer.role") == "model"]
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert sorted(run.data.tags["fer.model"] for run in children) == sorted(MODELS)
    for run in children:
        model = run.data.tags["fer.model"]
        assert run.info.status == "FINISHED", model
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["airflow.task_id"] == f"train_{model}"
        for key in ("loss", "accuracy", "val_loss", "val_accuracy", "epoch_seconds", "val_accuracy_final"):
            assert key in run.data.metrics, (model, key)
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) >= 1
        artifacts = {item.path for item in client.list_artifacts(run.info.run_id)}
        assert {"history.json", "model_summary.txt", "evaluation"} <= artifacts, (model, artifacts)
        logged_models = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                    filter_string=f"source_run_id = '{run.info.run_id}'")
        assert len(logged_models) == 1, model
    parent_artifacts = {item.path for item in client.list_artifacts(parents[0].info.run_id, "report")}
    assert "report/report.html" in parent_artifacts


def training_intervals(airflow_home: Path) -> dict[str, tuple[datetime, datetime]]:
    """Return the start and end of each training task of the latest DAG run."""
    with sqlite3.connect(airflow_home / "airflow.db") as connection:
        rows = connection.execute(
            "SELECT task_id, start_date, end_date FROM task_instance "
            "WHERE task_id LIKE 'train_%' AND run_id = "
            "(SELECT run_id FROM dag_run ORDER BY id DESC LIMIT 1)"
        ).fetchall()
    return {task: (datetime.fromisoformat(start), datetime.fromisoformat(end)) for task, start, end in rows}


def test_dag_run_on_builtin_data(airflow_home, tmp_path):
    conf = {**QUICK_PARAMS, "builtin_rows": 420, "builtin_test_rows": 70}
    result = run_dag(airflow_home, tmp_path, conf)
    assert result.returncode == 0, (tmp_path / "dag-test.log").read_text()[-6000:]
    summary = check_outputs(tmp_path, list(range(70)))
    assert set(summary["models"]) == set(MODELS)
    check_mlflow(tmp_path)

    intervals = training_intervals(airflow_home)
    assert set(intervals) == {f"train_{model}" for model in MODELS}
    latest_start = max(start for start, _ in intervals.values())
    earliest_end = min(end for _, end in intervals.values())
    assert latest_start < earliest_end, f"training tasks did not overlap: {intervals}"

    submission_model = summary["submission_model"]
    assert submission_model["model"] == summary["best_model"]
    assert submission_model["version"] == "1"
    assert submission_model["promoted_to_champion"] is True
    assert "Model registry" in (tmp_path / "output" / "latest" / "report.md").read_text()

    first_output = (tmp_path / "output" / "latest").resolve()
    rerun = run_dag(airflow_home, tmp_path, conf)
    log = (tmp_path / "dag-test.log").read_text()
    assert rerun.returncode == 0, log[-6000:]
    assert "Skipping training: data, settings and code match" in log
    assert "Training cnn" not in log
    assert (tmp_path / "output" / "latest").resolve() == first_output


def test_dag_run_on_sample_files(airflow_home, tmp_path, fer_data_dir):
    train, test = fer_data_dir / "sample_train.csv", fer_data_dir / "sample_test.csv"
    conf = {**QUICK_PARAMS, "train_csv": str(train), "test_csv": str(test)}
    result = run_dag(airflow_home, tmp_path, conf)
    assert result.returncode == 0, (tmp_path / "dag-test.log").read_text()[-6000:]
    with open(test, newline="") as handle:
        expected_ids = [int(row["id"]) for row in csv.DictReader(handle)]
    check_outputs(tmp_path, expected_ids)
    check_mlflow(tmp_path)


def test_dag_run_rejects_bad_input_before_training(airflow_home, tmp_path):
    bad_train = tmp_path / "train.csv"
    pixels = " ".join(["128"] * 2304)
    bad_train.write_text(f"label,feature\n3,{pixels}\n9,{pixels}\n")
    test_file = tmp_path / "test.csv"
    test_file.write_text(f"id,feature\n0,{pixels}\n")
    result = run_dag(airflow_home, tmp_path, {**QUICK_PARAMS, "train_csv": str(bad_train), "test_csv": str(test_file)})
    log = (tmp_path / "dag-test.log").read_text()

    assert result.returncode != 0
    assert "train.csv line 3" in log
    assert "'9'" in log
    assert "Training cnn" not in log
    output = tmp_path / "output"
    assert not (output / "latest").exists()
    assert not any(output.glob("*/submission.csv"))


REJECTED_IN_DAG = ["train-gz-corrupt", "test-duplicated-id", "fer2013-class-only-in-test-rows"]


@pytest.mark.parametrize("case_name", REJECTED_IN_DAG)
def test_rejected_file_leaves_no_run_output(airflow_home, tmp_path, case_name):
    from test_bad_input import CASES, write_inputs

    from fer_tasks.report import run_folder_name

    case = next(case for case in CASES if case.name == case_name)
    folder = tmp_path / "input"
    folder.mkdir()
    inputs = write_inputs(folder, case, case.content())
    output = tmp_path / "output"
    earlier_run = output / "earlier_run"
    earlier_run.mkdir(parents=True)
    (output / "latest").symlink_to("earlier_run")
    conf = {**QUICK_PARAMS, "train_csv": inputs.config.train_csv, "test_csv": inputs.config.test_csv}

    result = run_dag(airflow_home, tmp_path, conf)
    log = (tmp_path / "dag-test.log").read_text()

    assert result.returncode != 0
    location = f"{inputs.path} line {case.line}:" if case.line else f"{inputs.path}:"
    assert location in log
    assert case.fragment in log
    assert "Training cnn" not in log
    with sqlite3.connect(airflow_home / "airflow.db") as connection:
        (run_id, state) = connection.execute(
            "SELECT run_id, state FROM dag_run ORDER BY id DESC LIMIT 1"
        ).fetchone()
        trained = connection.execute(
            "SELECT COUNT(*) FROM task_instance WHERE run_id = ? AND task_id LIKE 'train_%' "
            "AND state = 'success'", (run_id,)
        ).fetchone()[0]
    assert state == "failed"
    assert trained == 0
    assert not (output / run_folder_name(run_id)).exists()
    assert sorted(path.name for path in output.iterdir()) == ["earlier_run", "latest"]
    assert os.readlink(output / "latest") == "earlier_run"
