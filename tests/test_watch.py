"""The watch DAG: an Asset event only when the training file's content changes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HEADER = "label,feature\n"


def write_training_file(path: Path, rows: int) -> None:
    pixels = " ".join(["100"] * 2304)
    path.write_text(HEADER + "".join(f"{row % 7},{pixels}\n" for row in range(rows)))


def airflow(arguments: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


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
    airflow(["db", "migrate"], environment)
    airflow(["dags", "reserialize"], environment)
    airflow(["dags", "unpause", "fer_pipeline"], environment)

    first = airflow(["dags", "test", "fer_training_data_watch"], environment)
    unchanged = airflow(["dags", "test", "fer_training_data_watch"], environment)
    write_training_file(training_file, 14)
    changed = airflow(["dags", "test", "fer_training_data_watch"], environment)

    assert "is unchanged" not in first.stdout + first.stderr
    assert "is unchanged" in unchanged.stdout + unchanged.stderr
    assert "is unchanged" not in changed.stdout + changed.stderr
    with sqlite3.connect(tmp_path / "airflow" / "airflow.db") as connection:
        events = connection.execute("SELECT source_task_id FROM asset_event").fetchall()
        queued = connection.execute("SELECT target_dag_id FROM asset_dag_run_queue").fetchall()
    assert events == [("detect_change",), ("detect_change",)]
    assert queued == [("fer_pipeline",)]
