"""Invalid params are rejected before a DAG run exists: by the REST API that the
trigger form posts to, and by scripts/run_dag.py (`make run CONF=...`).

The API test starts a real api-server on 127.0.0.1, the fixture from test_plugin.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_plugin import api_server, request_json  # noqa: F401 - api_server is a fixture

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAG_RUNS = "/api/v2/dags/fer_pipeline/dagRuns"

INVALID_CONFS = [
    pytest.param({"epochs": 0}, "epochs", id="epochs-zero"),
    pytest.param({"epochs": "ten"}, "epochs", id="epochs-string"),
    pytest.param({"epochs": 2.5}, "epochs", id="epochs-fraction"),
    pytest.param({"models": ["resnet"]}, "models", id="unknown-model"),
    pytest.param({"models": []}, "models", id="no-models"),
    pytest.param({"learning_rate": 5}, "learning_rate", id="learning-rate-above-1"),
    pytest.param({"learning_rate": 0}, "learning_rate", id="learning-rate-zero"),
    pytest.param({"validation_fraction": 0.7}, "validation_fraction", id="validation-fraction"),
    pytest.param({"batch_size": 4}, "batch_size", id="batch-size-small"),
    pytest.param({"report_language": "fr"}, "report_language", id="report-language"),
    pytest.param({"skip_bad_rows": "yes"}, "skip_bad_rows", id="skip-bad-rows-string"),
    pytest.param({"train_csv": 5}, "train_csv", id="train-csv-number"),
]


def dag_run_count(base_url: str, token: str) -> int:
    status, body = request_json(base_url, "GET", DAG_RUNS, token=token)
    assert status == 200, body
    return body["total_entries"]


@pytest.mark.slow
@pytest.mark.parametrize(("conf", "param"), INVALID_CONFS)
def test_api_rejects_invalid_param(api_server, conf, param):  # noqa: F811
    base_url, token = api_server
    before = dag_run_count(base_url, token)

    status, body = request_json(base_url, "POST", DAG_RUNS, {"logical_date": None, "conf": conf}, token)

    assert 400 <= status < 500, body
    assert param in str(body)
    assert dag_run_count(base_url, token) == before


@pytest.mark.slow
def test_api_accepts_valid_params(api_server):  # noqa: F811
    base_url, token = api_server
    before = dag_run_count(base_url, token)
    conf = {"epochs": 3, "models": ["cnn"], "learning_rate": 0.01}

    status, body = request_json(base_url, "POST", DAG_RUNS, {"logical_date": None, "conf": conf}, token)

    assert status == 200, body
    assert body["conf"]["epochs"] == 3
    assert dag_run_count(base_url, token) == before + 1


def run_dag_script(conf: dict, home: Path) -> subprocess.CompletedProcess[str]:
    environment = {"AIRFLOW_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "run_dag.py"), "--conf", json.dumps(conf)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("conf", "param"),
    [*INVALID_CONFS, pytest.param({"epoch": 5}, "epoch", id="unknown-key")],
)
def test_run_dag_script_rejects_invalid_conf(tmp_path, conf, param):
    home = tmp_path / "airflow"

    result = run_dag_script(conf, home)

    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert param in result.stderr
    assert "Starting the Airflow api-server" not in result.stdout
    assert not (home / "airflow.db").exists()
