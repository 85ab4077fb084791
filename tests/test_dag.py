"""DAG integrity: the file imports cleanly, stays light at parse time, and has the right shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fer_tasks.config import DEFAULTS, PipelineConfig

DAGS_FOLDER = Path(__file__).resolve().parent.parent / "dags"
TRAINING_TASKS = {"train_cnn_aug", "train_cnn", "train_dnn"}
FAN_IN_TASKS = {"evaluate_models", "compute_saliency", "visualize_filters"}

# Parsed in a fresh interpreter, so modules imported by this test session cannot
# hide a heavy import made by the DAG file.
PARSE_SCRIPT = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("fer_pipeline")
print(json.dumps({
    "import_errors": {str(k): str(v) for k, v in bag.import_errors.items()},
    "dag_ids": sorted(bag.dags),
    "heavy_modules": sorted(m for m in ("tensorflow", "keras", "mlflow", "sklearn") if m in sys.modules),
    "upstream": {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks} if dag else {},
    "params": {k: dag.params.get_param(k).schema for k in dag.params} if dag else {},
    "defaults": {k: dag.params[k] for k in dag.params} if dag else {},
    "descriptions": {k: dag.params.get_param(k).description for k in dag.params} if dag else {},
    "doc_md": dag.doc_md if dag else "",
    "catchup": dag.catchup if dag else None,
    "max_active_runs": dag.max_active_runs if dag else None,
    "retries": {t.task_id: t.retries for t in dag.tasks} if dag else {},
    "schedule": repr(dag.timetable) if dag else "",
    "watch_outlets": [
        [asset.name for asset in task.outlets] for task in bag.dags["fer_training_data_watch"].tasks
    ] if "fer_training_data_watch" in bag.dags else [],
}))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow-home")
    environment = {**os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    result = subprocess.run(
        [sys.executable, "-c", PARSE_SCRIPT, str(DAGS_FOLDER)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_dag_imports_without_errors(parsed):
    assert parsed["import_errors"] == {}
    assert parsed["dag_ids"] == ["fer_pipeline", "fer_training_data_watch"]


def test_schedule_is_weekly_or_asset_update(parsed):
    assert "AssetOrTime" in parsed["schedule"]
    assert "0 0 * * 0" in parsed["schedule"]
    assert "fer_training_data" in parsed["schedule"]


def test_watch_dag_updates_the_training_asset(parsed):
    assert parsed["watch_outlets"] == [["fer_training_data"]]


def test_model_is_registered_before_the_report(parsed):
    upstream = parsed["upstream"]
    assert "evaluate_models" in upstream["register_model"]
    assert "register_model" in upstream["write_report"]


def test_dag_parse_imports_no_heavy_library(parsed):
    assert parsed["heavy_modules"] == []


def test_training_tasks_are_independent(parsed):
    upstream = parsed["upstream"]
    for task_id in TRAINING_TASKS:
        assert upstream[task_id] == ["start_tracking"]


def test_every_fan_in_task_waits_for_all_training(parsed):
    upstream = parsed["upstream"]
    for task_id in FAN_IN_TASKS | {"register_model", "write_report"}:
        assert TRAINING_TASKS <= set(upstream[task_id]), task_id


def test_report_is_the_last_task(parsed):
    upstream = parsed["upstream"]
    assert FAN_IN_TASKS <= set(upstream["write_report"])
    downstream_of_report = [task for task, parents in upstream.items() if "write_report" in parents]
    assert downstream_of_report == []


def test_data_is_validated_before_tracking_starts(parsed):
    assert parsed["upstream"]["validate_data"] == []
    assert parsed["upstream"]["start_tracking"] == ["validate_data"]


def test_dag_settings(parsed):
    assert parsed["catchup"] is False
    assert parsed["max_active_runs"] == 1
    assert "# FER pipeline" in parsed["doc_md"]
    assert all(retries >= 1 for retries in parsed["retries"].values())


def test_every_param_has_title_description_and_type(parsed):
    for name, schema in parsed["params"].items():
        assert schema.get("title"), name
        assert parsed["descriptions"][name], name
        assert schema.get("type"), name


def test_params_cover_every_config_field(parsed):
    assert set(parsed["params"]) == set(DEFAULTS.to_dict())


def test_param_defaults_match_config_defaults(parsed):
    assert PipelineConfig.from_params(parsed["defaults"]) == DEFAULTS


def test_numeric_params_have_limits(parsed):
    for name, schema in parsed["params"].items():
        if schema["type"] in ("integer", "number"):
            assert "minimum" in schema or "exclusiveMinimum" in schema, name
