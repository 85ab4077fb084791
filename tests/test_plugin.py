"""The MLflow links plugin: it loads in Airflow, builds the right URLs, and the api-server serves them."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from run_dag import free_port, start_api_server  # noqa: E402
from run_dag import stop as stop_api_server  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PLUGINS_FOLDER = PROJECT_ROOT / "plugins"
DAGS_FOLDER = PROJECT_ROOT / "dags"
PLUGIN_FILE = PLUGINS_FOLDER / "mlflow_links.py"
MLFLOW_UI_URL = "http://127.0.0.1:5999"

# Loaded in a fresh interpreter through Airflow's plugin manager, as the api-server
# loads it, so modules imported by this test session cannot hide a heavy import.
LOAD_SCRIPT = """
import json, sys
from airflow import plugins_manager
from airflow.dag_processing.dagbag import DagBag

plugins, import_errors = plugins_manager._get_plugins()
links = plugins_manager.get_global_operator_extra_links()
dag = DagBag(dag_folder=sys.argv[1]).dags.get("fer_pipeline")
module = sys.modules.get("mlflow_links")
print(json.dumps({
    "import_errors": {str(key): str(value) for key, value in import_errors.items()},
    "plugins": [plugin.name for plugin in plugins],
    "link_names": [link.name for link in links],
    "link_classes": [type(link).__name__ for link in links],
    "external_views": [view for plugin in plugins for view in plugin.external_views],
    "heavy_modules": sorted(m for m in ("tensorflow", "keras", "mlflow", "sklearn") if m in sys.modules),
    "fer_modules": sorted(m for m in sys.modules if m.startswith("fer_tasks")),
    "dag_task_ids": sorted(task.task_id for task in dag.tasks) if dag else [],
    "linked_task_ids": [*module.TRAINING_TASK_IDS, module.EVALUATION_TASK_ID, module.TRACKING_TASK_ID],
}))
"""


def airflow_environment(home: Path) -> dict[str, str]:
    """Return an Airflow environment in `home` without the AIRFLOW* settings of the calling shell."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    environment.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(PLUGINS_FOLDER),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "FER_MLFLOW_UI_URL": MLFLOW_UI_URL + "/",
        }
    )
    return environment


@pytest.fixture(scope="module")
def plugin():
    """The plugin module, imported from its file as Airflow imports it."""
    spec = importlib.util.spec_from_file_location("mlflow_links_under_test", PLUGIN_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow-home")
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(DAGS_FOLDER)],
        capture_output=True,
        text=True,
        env=airflow_environment(home),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def hash_query(url: str) -> dict[str, list]:
    """Return the JSON values of the query inside a URL's `#/...?...` fragment."""
    fragment = urlsplit(url).fragment
    query = fragment.partition("?")[2]
    return {key: json.loads(values[0]) for key, values in parse_qs(query).items()}


# Loading through Airflow's plugin manager.


def test_plugin_loads_without_errors(loaded):
    assert loaded["import_errors"] == {}
    assert "mlflow_links" in loaded["plugins"]


def test_plugin_registers_global_link(loaded):
    assert loaded["link_names"] == ["MLflow run"]
    assert loaded["link_classes"] == ["MLflowRunLink"]


def test_plugin_registers_nav_entry(loaded):
    views = [view for view in loaded["external_views"] if view["name"] == "MLflow"]
    assert len(views) == 1
    assert views[0]["destination"] == "nav"
    assert views[0]["href"] == MLFLOW_UI_URL
    assert "url_route" not in views[0]


def test_plugin_imports_no_heavy_library(loaded):
    assert loaded["heavy_modules"] == []
    assert set(loaded["fer_modules"]) <= {"fer_tasks", "fer_tasks.config"}


def test_linked_tasks_exist_in_dag(loaded):
    assert set(loaded["linked_task_ids"]) <= set(loaded["dag_task_ids"])


# URL building.


def test_run_url_with_experiment(plugin):
    url = plugin.run_url("http://mlflow.test", "abc123", "7")
    assert url == "http://mlflow.test/#/experiments/7/runs/abc123"


def test_run_url_without_experiment(plugin):
    assert plugin.run_url("http://mlflow.test", "abc123") == "http://mlflow.test/#/runs/abc123"


def test_run_url_escapes_ids(plugin):
    url = plugin.run_url("http://mlflow.test", "a/b", "1 2")
    assert url == "http://mlflow.test/#/experiments/1%202/runs/a%2Fb"


def test_compare_url_lists_runs_and_experiment(plugin):
    url = plugin.compare_url("http://mlflow.test", ["r1", "r2"], "7")
    assert url.startswith("http://mlflow.test/#/compare-runs?")
    assert hash_query(url) == {"runs": ["r1", "r2"], "experiments": ["7"]}


def test_mlflow_ui_url_default(plugin, monkeypatch):
    monkeypatch.delenv("FER_MLFLOW_UI_URL", raising=False)
    assert plugin.mlflow_ui_url() == "http://127.0.0.1:5000"


def test_mlflow_ui_url_strips_trailing_slash(plugin, monkeypatch):
    monkeypatch.setenv("FER_MLFLOW_UI_URL", "http://example.test:5123/mlflow/")
    assert plugin.mlflow_ui_url() == "http://example.test:5123/mlflow"


TRACKING = {"experiment_id": "7", "parent_run_id": "parent"}
CNN_RUN = {"model": "cnn", "run_id": "run-cnn", "val_accuracy": 0.5}
DNN_RUN = {"model": "dnn", "run_id": "run-dnn", "val_accuracy": 0.4}


@pytest.mark.parametrize(
    ("task_id", "return_values", "expected"),
    [
        ("train_cnn", {"start_tracking": TRACKING, "train_cnn": CNN_RUN}, "B/#/experiments/7/runs/run-cnn"),
        ("train_cnn", {"train_cnn": CNN_RUN}, "B/#/runs/run-cnn"),
        ("train_cnn", {"start_tracking": TRACKING}, ""),
        ("train_cnn", {"start_tracking": TRACKING, "train_cnn": None}, ""),
        ("train_cnn", {"start_tracking": TRACKING, "train_cnn": "run-cnn"}, ""),
        ("train_cnn", {"start_tracking": TRACKING, "train_cnn": {"run_id": 5}}, ""),
        ("train_dnn", {"start_tracking": TRACKING, "train_cnn": CNN_RUN}, ""),
        ("evaluate_models", {"start_tracking": TRACKING}, ""),
        ("evaluate_models", {"start_tracking": TRACKING, "train_dnn": DNN_RUN}, "B/#/experiments/7/runs/run-dnn"),
        ("evaluate_models", {"train_cnn": CNN_RUN, "train_dnn": DNN_RUN}, "B/#/runs/run-cnn"),
        ("validate_data", {"start_tracking": TRACKING, "train_cnn": CNN_RUN}, ""),
        ("write_report", {"start_tracking": TRACKING, "train_cnn": CNN_RUN}, ""),
    ],
)
def test_link_for_task(plugin, task_id, return_values, expected):
    assert plugin.link_for_task(task_id, return_values, "B") == expected


def test_link_for_evaluation_compares_runs(plugin):
    return_values = {"start_tracking": TRACKING, "train_dnn": DNN_RUN, "train_cnn": CNN_RUN}
    url = plugin.link_for_task("evaluate_models", return_values, "B")
    # Runs follow the DAG's model order (cnn_aug, cnn, dnn), not the XCom order.
    assert hash_query(url) == {"runs": ["run-cnn", "run-dnn"], "experiments": ["7"]}


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ('{"run_id": "r"}', {"run_id": "r"}),
        (b'{"run_id": "r"}', {"run_id": "r"}),
        ({"run_id": "r"}, {"run_id": "r"}),
        ("not json", "not json"),
        (None, None),
    ],
)
def test_decode_xcom_value(plugin, stored, expected):
    assert plugin._decode(stored) == expected


def test_get_link_skips_other_dags_without_database(plugin, monkeypatch):
    def fail(*arguments):
        raise AssertionError("the database must not be read for tasks that have no link")

    monkeypatch.setattr(plugin, "load_return_values", fail)
    link = plugin.MLflowRunLink()
    for dag_id, task_id in (("other_dag", "train_cnn"), ("fer_pipeline", "validate_data")):
        ti_key = SimpleNamespace(dag_id=dag_id, task_id=task_id, run_id="run-1", map_index=-1)
        assert link.get_link(None, ti_key=ti_key) == ""


def test_get_link_reads_return_values_of_its_run(plugin, monkeypatch):
    requests = []

    def load(dag_id, run_id, task_ids):
        requests.append((dag_id, run_id, tuple(task_ids)))
        return {"start_tracking": TRACKING, "train_cnn": CNN_RUN}

    monkeypatch.setattr(plugin, "load_return_values", load)
    monkeypatch.setenv("FER_MLFLOW_UI_URL", "http://ui.test/")
    ti_key = SimpleNamespace(dag_id="fer_pipeline", task_id="train_cnn", run_id="run-1", map_index=-1)
    assert plugin.MLflowRunLink().get_link(None, ti_key=ti_key) == "http://ui.test/#/experiments/7/runs/run-cnn"
    assert requests == [("fer_pipeline", "run-1", ("start_tracking", "train_cnn_aug", "train_cnn", "train_dnn"))]


# A real api-server: the plugin's entries in /api/v2/plugins and the resolved links.


def request_json(base_url: str, method: str, path: str, body=None, token: str | None = None):
    """Send one request to the test api-server and return (status, decoded JSON body)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base_url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def run_airflow(arguments: list[str], environment: dict[str, str], log_path: Path) -> None:
    airflow = str(Path(sys.executable).with_name("airflow"))
    with open(log_path, "w") as log:
        result = subprocess.run(
            [airflow, *arguments], env=environment, stdout=log, stderr=subprocess.STDOUT, timeout=300, check=False
        )
    assert result.returncode == 0, f"airflow {' '.join(arguments)} failed:\n{log_path.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def api_server(tmp_path_factory):
    """Start `airflow api-server` on 127.0.0.1 with the plugin, the DAG and a migrated SQLite database.

    Yields (base URL, bearer token). Authentication is the simple auth manager with
    a passwords file written beforehand, as docker-compose.yaml sets it up.
    """
    home = tmp_path_factory.mktemp("airflow-api-home")
    password = secrets.token_hex(16)
    passwords_file = home / "passwords.json"
    passwords_file.write_text(json.dumps({"admin": password}))
    environment = {
        **airflow_environment(home),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords_file),
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32),
    }
    run_airflow(["db", "migrate"], environment, home / "db-migrate.log")
    run_airflow(["dags", "reserialize"], environment, home / "dags-reserialize.log")

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = start_api_server(environment, port, home / "api-server.log")
    try:
        status, body = request_json(base_url, "POST", "/auth/token", {"username": "admin", "password": password})
        assert status == 201, body
        yield base_url, body["access_token"]
    finally:
        stop_api_server(server)


@pytest.fixture(scope="module")
def dag_run(api_server) -> str:
    """Create a DAG run and store the return values that finished tasks would leave."""
    base_url, token = api_server
    run_id = "plugin_test_run"
    status, body = request_json(
        base_url, "POST", "/api/v2/dags/fer_pipeline/dagRuns", {"dag_run_id": run_id, "logical_date": None}, token
    )
    assert status == 200, body
    for task_id, value in (("start_tracking", TRACKING), ("train_cnn", CNN_RUN), ("train_dnn", DNN_RUN)):
        path = f"/api/v2/dags/fer_pipeline/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries"
        status, body = request_json(base_url, "POST", path, {"key": "return_value", "value": value}, token)
        assert status == 201, body
    return run_id


def extra_links(api_server, run_id: str, task_id: str) -> dict:
    base_url, token = api_server
    path = f"/api/v2/dags/fer_pipeline/dagRuns/{run_id}/taskInstances/{task_id}/links"
    status, body = request_json(base_url, "GET", path, token=token)
    assert status == 200, body
    return body["extra_links"]


@pytest.mark.slow
def test_api_lists_plugin(api_server):
    base_url, token = api_server
    status, body = request_json(base_url, "GET", "/api/v2/plugins", token=token)
    assert status == 200, body
    plugins = {plugin["name"]: plugin for plugin in body["plugins"]}
    assert "mlflow_links" in plugins
    assert plugins["mlflow_links"]["global_operator_extra_links"] == ["<mlflow_links.MLflowRunLink object>"]
    views = plugins["mlflow_links"]["external_views"]
    assert [(view["name"], view["destination"], view["href"]) for view in views] == [("MLflow", "nav", MLFLOW_UI_URL)]


@pytest.mark.slow
def test_api_resolves_training_link(api_server, dag_run):
    links = extra_links(api_server, dag_run, "train_cnn")
    assert links == {"MLflow run": f"{MLFLOW_UI_URL}/#/experiments/7/runs/run-cnn"}


@pytest.mark.slow
def test_api_resolves_evaluation_link(api_server, dag_run):
    url = extra_links(api_server, dag_run, "evaluate_models")["MLflow run"]
    assert url.startswith(f"{MLFLOW_UI_URL}/#/compare-runs?")
    assert hash_query(url) == {"runs": ["run-cnn", "run-dnn"], "experiments": ["7"]}


@pytest.mark.slow
def test_api_has_no_link_before_training_returns(api_server, dag_run):
    assert extra_links(api_server, dag_run, "train_cnn_aug") == {"MLflow run": None}


@pytest.mark.slow
def test_api_has_no_link_for_other_tasks(api_server, dag_run):
    assert extra_links(api_server, dag_run, "validate_data") == {"MLflow run": None}
