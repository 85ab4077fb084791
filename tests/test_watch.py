"""The watch DAG: an Asset event only when the training file's content changes."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
from conftest import run_airflow_cli

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HEADER = "label,feature\n"


def write_training_file(path: Path, rows: int) -> None:
    pixels = " ".join(["100"] * 2304)
    path.write_text(HEADER + "".join(f"{row % 7},{pixels}\n" for row in range(rows)))


def test_watch_emits_event_only_on_change(tmp_path):
    training_file = tmp_path / "train.csv"
    write_training_file(training_file, 7)
    environment = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "FER_TRAIN_CSV": str(training_file),
    }
    run_airflow_cli(["db", "migrate"], environment)
    run_airflow_cli(["dags", "reserialize"], environment)
    run_airflow_cli(["dags", "unpause", "fer_pipeline"], environment)

    first = run_airflow_cli(["dags", "test", "fer_training_data_watch"], environment)
    unchanged = run_airflow_cli(["dags", "test", "fer_training_data_watch"], environment)
    write_training_file(training_file, 14)
    changed = run_airflow_cli(["dags", "test", "fer_training_data_watch"], environment)

    assert "is unchanged" not in first.stdout + first.stderr
    assert "is unchanged" in unchanged.stdout + unchanged.stderr
    assert "is unchanged" not in changed.stdout + changed.stderr
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as connection:
        events = connection.execute("SELECT source_task_id FROM asset_event").fetchall()
        queued = connection.execute("SELECT target_dag_id FROM asset_dag_run_queue").fetchall()
    assert events == [("detect_change",), ("detect_change",)]
    assert queued == [("fer_pipeline",)]
