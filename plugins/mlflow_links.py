"""Airflow plugin that links the FER pipeline to the MLflow UI.

- An "MLflow run" button on the task instances of `train_<model>` opens the MLflow
  run of that training. On `evaluate_models` it opens MLflow's comparison of the
  runs that it evaluated, because the evaluation writes into those runs.
- An "MLflow" entry in the Airflow navigation bar opens the MLflow UI.

The button is a global operator extra link, so the DAG's TaskFlow tasks need no
change. The api-server resolves it from the XCom return values of `start_tracking`
(`experiment_id`) and of the training tasks (`run_id`). Other tasks get no URL,
so the Airflow UI shows no button for them, though Airflow 3.3.2 still shows an
empty "Extra Links" heading there.

The browser opens these URLs, so `FER_MLFLOW_UI_URL` must be the address that the
browser reaches (http://127.0.0.1:5000 by default), not the tracking URI that the
workers use. This module imports nothing from `fer_tasks` beyond its configuration,
so loading it never pulls in TensorFlow, Keras or MLflow.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

from fer_tasks.config import MODEL_NAMES

logger = logging.getLogger(__name__)

DEFAULT_MLFLOW_UI_URL = "http://127.0.0.1:5000"
DAG_ID = "fer_pipeline"
TRACKING_TASK_ID = "start_tracking"
EVALUATION_TASK_ID = "evaluate_models"
# The DAG names its training tasks after the models, in this order.
TRAINING_TASK_IDS = tuple(f"train_{model_name}" for model_name in MODEL_NAMES)
RETURN_VALUE_KEY = "return_value"


def mlflow_ui_url() -> str:
    """Return the MLflow UI address from `FER_MLFLOW_UI_URL`, without a trailing slash."""
    return (os.environ.get("FER_MLFLOW_UI_URL") or DEFAULT_MLFLOW_UI_URL).rstrip("/")


def run_url(base_url: str, run_id: str, experiment_id: str | None = None) -> str:
    """Build the MLflow UI URL of one run.

    Without an experiment id the URL uses MLflow's `#/runs/<run id>` route, which
    the UI of MLflow 3.17.2 redirects to the run's page in its experiment.
    """
    if experiment_id:
        return f"{base_url}/#/experiments/{quote(str(experiment_id), safe='')}/runs/{quote(run_id, safe='')}"
    return f"{base_url}/#/runs/{quote(run_id, safe='')}"


def compare_url(base_url: str, run_ids: Iterable[str], experiment_id: str) -> str:
    """Build the MLflow UI URL that compares `run_ids` side by side.

    The compare page takes JSON lists of run ids and experiment ids in its query.
    """
    runs = quote(json.dumps(list(run_ids), separators=(",", ":")), safe="")
    experiments = quote(json.dumps([str(experiment_id)], separators=(",", ":")), safe="")
    return f"{base_url}/#/compare-runs?runs={runs}&experiments={experiments}"


def link_for_task(task_id: str, return_values: Mapping[str, Any], base_url: str) -> str:
    """Return the MLflow URL for a task of the FER DAG, or "" when there is none yet.

    Args:
        task_id: the task whose button is being resolved.
        return_values: XCom return values of the same DAG run, keyed by task id.
        base_url: the MLflow UI address that the browser reaches.
    """
    tracking = return_values.get(TRACKING_TASK_ID)
    experiment_id = tracking.get("experiment_id") if isinstance(tracking, Mapping) else None

    if task_id in TRAINING_TASK_IDS:
        run_id = _run_id(return_values.get(task_id))
        return run_url(base_url, run_id, experiment_id) if run_id else ""

    if task_id == EVALUATION_TASK_ID:
        run_ids = [_run_id(return_values.get(training)) for training in TRAINING_TASK_IDS]
        run_ids = [run_id for run_id in run_ids if run_id]
        if not run_ids:
            return ""
        if len(run_ids) == 1 or not experiment_id:
            # MLflow's compare page needs the experiment id, so without it the
            # button opens the first run only.
            return run_url(base_url, run_ids[0], experiment_id)
        return compare_url(base_url, run_ids, experiment_id)

    return ""


def _run_id(return_value: Any) -> str | None:
    """Return the `run_id` of a training task's return value, if it has one."""
    if isinstance(return_value, Mapping) and isinstance(return_value.get("run_id"), str):
        return return_value["run_id"]
    return None


def _decode(value: Any) -> Any:
    """Return an XCom value as Python data. The database may return JSON text."""
    if isinstance(value, bytes | str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def load_return_values(dag_id: str, run_id: str, task_ids: Iterable[str]) -> dict[str, Any]:
    """Read the XCom return values of `task_ids` in one DAG run from the metadata database.

    Runs in the api-server, which has database access. Task code would use the
    Task SDK instead.
    """
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    query = XComModel.get_many(
        run_id=run_id,
        key=RETURN_VALUE_KEY,
        dag_ids=dag_id,
        task_ids=list(task_ids),
        map_indexes=-1,
    ).with_only_columns(XComModel.task_id, XComModel.value)
    with create_session() as session:
        rows = session.execute(query).all()
    return {task_id: _decode(value) for task_id, value in rows}


class MLflowRunLink(BaseOperatorLink):
    """The "MLflow run" button on the training and evaluation tasks of the FER DAG."""

    name = "MLflow run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        if ti_key.dag_id != DAG_ID or ti_key.task_id not in (*TRAINING_TASK_IDS, EVALUATION_TASK_ID):
            return ""
        return_values = load_return_values(
            ti_key.dag_id, ti_key.run_id, (TRACKING_TASK_ID, *TRAINING_TASK_IDS)
        )
        url = link_for_task(ti_key.task_id, return_values, mlflow_ui_url())
        if not url:
            logger.debug(
                "No MLflow run recorded yet for task %s of DAG run %s", ti_key.task_id, ti_key.run_id
            )
        return url


class MLflowLinksPlugin(AirflowPlugin):
    """Register the "MLflow run" button and the "MLflow" navigation entry."""

    name = "mlflow_links"
    global_operator_extra_links = [MLflowRunLink()]
    # Without a `url_route` the UI opens `href` as a plain link, not in an iframe,
    # because `mlflow server` sends X-Frame-Options: SAMEORIGIN by default.
    external_views = [
        {
            "name": "MLflow",
            "href": mlflow_ui_url(),
            "destination": "nav",
            "nav_top_level": True,
        }
    ]
