"""Experiment tracking: the one module that talks to MLflow.

Stages hand each other MLflow run ids and model URIs, never files on a worker's
disk, so any Airflow worker can run any task. Runs are found by their tags (DAG id,
DAG run id, task id), never by name alone, which keeps retries from adding orphans.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from fer_tasks import config as settings

logger = logging.getLogger(__name__)

TAG_DAG_ID = "airflow.dag_id"
TAG_DAG_RUN_ID = "airflow.dag_run_id"
TAG_TASK_ID = "airflow.task_id"
TAG_TRY_NUMBER = "airflow.try_number"
TAG_ROLE = "fer.role"
TAG_MODEL = "fer.model"
TAG_FINGERPRINT = "fer.training_fingerprint"

# Artifact paths inside each model's run: one stage writes them, a later one reads them.
HISTORY_ARTIFACT = "history.json"
ARCHITECTURE_ARTIFACT = "architecture.json"
SUMMARY_ARTIFACT = "model_summary.txt"
EVALUATION_ARTIFACT = "evaluation/evaluation.json"
CONFUSION_TABLE_ARTIFACT = "evaluation/confusion_matrix.csv"
CONFUSION_FIGURE_ARTIFACT = "evaluation/confusion_matrix.png"
PREDICTIONS_ARTIFACT = "predictions/test_predictions.csv"
SALIENCY_ARTIFACT = "explanation/saliency.png"
FILTERS_ARTIFACT = "explanation/filters.png"
ACTIVATIONS_ARTIFACT = "explanation/activations.png"

# A metric batch that takes longer than this to send is reported in the task log.
SLOW_LOGGING_SECONDS = 10.0


@dataclass(frozen=True)
class RunContext:
    """Airflow ids of the task a stage runs in, used to tag its MLflow run."""

    dag_id: str = "fer_pipeline"
    dag_run_id: str = "local"
    task_id: str = "local"
    try_number: int = 1

    def tags(self) -> dict[str, str]:
        return {
            TAG_DAG_ID: self.dag_id,
            TAG_DAG_RUN_ID: self.dag_run_id,
            TAG_TASK_ID: self.task_id,
            TAG_TRY_NUMBER: str(self.try_number),
        }


def client() -> MlflowClient:
    """Return a client for the configured tracking URI, and make it the fluent default."""
    uri = settings.tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def ensure_experiment(name: str) -> str:
    """Return the id of experiment `name`, creating it (with a local artifact root) if needed."""
    tracking = client()
    experiment = tracking.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            tracking.restore_experiment(experiment.experiment_id)
            logger.warning("Restored deleted MLflow experiment %r", name)
        return experiment.experiment_id
    artifact_location = None
    if settings.tracking_uri().startswith(("sqlite:", "file:", "/")):
        artifact_location = f"{settings.artifact_root()}/{name}"
    try:
        experiment_id = tracking.create_experiment(name, artifact_location=artifact_location)
    except mlflow.exceptions.MlflowException as error:
        # Another DAG run started at the same moment may have created it first.
        existing = tracking.get_experiment_by_name(name)
        if existing is None:
            raise
        logger.info("MLflow experiment %r was created by a concurrent run (%s)", name, error.error_code)
        return existing.experiment_id
    logger.info("Created MLflow experiment %r (id %s)", name, experiment_id)
    return experiment_id


def find_runs(experiment_id: str, tags: dict[str, str]) -> list[Any]:
    """Return the active (not deleted) runs of an experiment that carry all `tags`."""
    clauses = [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    return client().search_runs(
        [experiment_id], filter_string=" and ".join(clauses), max_results=100
    )


def start_pipeline_run(
    experiment_name: str,
    context: RunContext,
    params: dict[str, Any],
    metrics: dict[str, float] | None = None,
    tags: dict[str, str] | None = None,
) -> dict:
    """Create (or on a retry, reuse) the parent run of one DAG run.

    Returns `{"experiment_id", "parent_run_id"}`. The parent stays RUNNING until
    `finish_pipeline_run`; the training runs nest under it.
    """
    experiment_id = ensure_experiment(experiment_name)
    tracking = client()
    key = {TAG_DAG_ID: context.dag_id, TAG_DAG_RUN_ID: context.dag_run_id, TAG_ROLE: "parent"}
    existing = find_runs(experiment_id, key)
    if existing:
        run_id = existing[0].info.run_id
        tracking.update_run(run_id, status="RUNNING")
        logger.info("Reusing MLflow parent run %s for DAG run %s", run_id, context.dag_run_id)
    else:
        run = tracking.create_run(
            experiment_id,
            run_name=f"{context.dag_id} {context.dag_run_id}",
            tags={**context.tags(), **(tags or {}), TAG_ROLE: "parent"},
        )
        run_id = run.info.run_id
        for name, value in sorted(params.items()):
            tracking.log_param(run_id, name, _param_value(value))
        for name, value in sorted((metrics or {}).items()):
            tracking.log_metric(run_id, name, float(value))
        logger.info("Created MLflow parent run %s for DAG run %s", run_id, context.dag_run_id)
    return {"experiment_id": experiment_id, "parent_run_id": run_id}


def finish_pipeline_run(parent_run_id: str, status: str = "FINISHED") -> None:
    """Close the parent run with `status` (FINISHED or FAILED)."""
    client().set_terminated(parent_run_id, status=status)
    logger.info("Closed MLflow parent run %s as %s", parent_run_id, status)


def fail_pipeline_runs(dag_id: str, dag_run_id: str) -> None:
    """Close every run of a DAG run that is still RUNNING as FAILED, in any experiment."""
    tracking = client()
    clauses = (
        f"tags.`{TAG_DAG_ID}` = '{dag_id}' and tags.`{TAG_DAG_RUN_ID}` = '{dag_run_id}' "
        "and attributes.status = 'RUNNING'"
    )
    for experiment in tracking.search_experiments():
        for run in tracking.search_runs([experiment.experiment_id], filter_string=clauses):
            tracking.set_terminated(run.info.run_id, status="FAILED")
            logger.warning("Closed MLflow run %s of failed DAG run %s as FAILED", run.info.run_id, dag_run_id)


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)
    return text[:6000]


@contextmanager
def child_run(parent: dict, context: RunContext, model_name: str, resume: bool = False) -> Iterator[str]:
    """Open the one MLflow run of a training task, nested under the parent run.

    An earlier try of the same task (same DAG run and task id) may have left a run.
    With `resume` (the task resumes from a checkpoint) that run is reopened, so the
    metrics of the epochs already done stay with it. Otherwise it is closed as KILLED
    and deleted, and a new run starts. Either way a retry leaves exactly one run.
    The run ends FINISHED when the block exits cleanly and FAILED when it raises.
    """
    tracking = client()
    key = {
        TAG_DAG_ID: context.dag_id,
        TAG_DAG_RUN_ID: context.dag_run_id,
        TAG_TASK_ID: context.task_id,
        TAG_ROLE: "model",
    }
    earlier = find_runs(parent["experiment_id"], key)
    reopened = earlier.pop(0).info.run_id if resume and earlier else None
    for stale in earlier:
        if stale.info.status == "RUNNING":
            tracking.set_terminated(stale.info.run_id, status="KILLED")
        tracking.delete_run(stale.info.run_id)
        logger.warning(
            "Deleted MLflow run %s left by an earlier try of task %s", stale.info.run_id, context.task_id
        )

    if reopened:
        tracking.set_tag(reopened, TAG_TRY_NUMBER, str(context.try_number))
        with mlflow.start_run(run_id=reopened) as run:
            logger.info("Reopened MLflow run %s of an earlier try of task %s", reopened, context.task_id)
            yield run.info.run_id
        return

    tags = {**context.tags(), TAG_ROLE: "model", TAG_MODEL: model_name}
    with mlflow.start_run(
        experiment_id=parent["experiment_id"],
        run_name=model_name,
        parent_run_id=parent["parent_run_id"],
        nested=True,
        tags=tags,
    ) as run:
        logger.info(
            "Opened MLflow run %s for model %s (parent %s)",
            run.info.run_id,
            model_name,
            parent["parent_run_id"],
        )
        yield run.info.run_id


class MetricSender:
    """Send metrics to one MLflow run from a background thread.

    Training hands each epoch's metrics to `send` and goes on at once. When the
    tracking server is unreachable the metrics wait in a queue, and the thread keeps
    retrying with exponential backoff (on top of the MLflow client's own retries)
    for up to `give_up_after` seconds. `close` waits until the queue is empty and
    raises if some metrics could not be sent, so the task fails instead of
    finishing with a gap in its history.
    """

    def __init__(self, run_id: str, give_up_after: float | None = None) -> None:
        self.run_id = run_id
        self.give_up_after = settings.mlflow_outage_seconds() if give_up_after is None else give_up_after
        self._queue: queue.Queue = queue.Queue()
        self._error: str | None = None
        self._client = client()
        self._thread = threading.Thread(target=self._deliver_all, name=f"mlflow-metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    def send(self, metrics: dict[str, float], step: int) -> None:
        """Queue `metrics` for `step`, timestamped now; warn when earlier steps are still waiting."""
        waiting = self._queue.qsize()
        if waiting:
            logger.warning(
                "%d earlier batch(es) of metrics for MLflow run %s are still waiting for the tracking "
                "server; training goes on",
                waiting,
                self.run_id,
            )
        timestamp = int(time.time() * 1000)
        self._queue.put([Metric(name, float(value), timestamp, step) for name, value in metrics.items()])

    def close(self) -> None:
        """Wait until every queued metric is sent; raise RuntimeError if the sender gave up."""
        self._queue.put(None)
        self._thread.join()
        if self._error:
            raise RuntimeError(self._error)

    def _deliver_all(self) -> None:
        while (batch := self._queue.get()) is not None:
            if self._error is None:
                self._deliver(batch)

    def _deliver(self, batch: list[Metric]) -> None:
        step = batch[0].step if batch else 0
        first_failure: float | None = None
        delay = 1.0
        while True:
            started = time.monotonic()
            try:
                self._client.log_batch(self.run_id, metrics=batch)
            except Exception as error:  # any failure to reach the server or store the metrics
                now = time.monotonic()
                if first_failure is None:
                    first_failure = started
                    logger.warning(
                        "MLflow did not accept the metrics of step %d for run %s (%s); they stay buffered "
                        "and are retried for up to %.0f s",
                        step,
                        self.run_id,
                        error,
                        self.give_up_after,
                    )
                if now - first_failure > self.give_up_after:
                    self._error = (
                        f"the MLflow tracking server was unreachable for more than {self.give_up_after:.0f} s, "
                        f"so the metrics of run {self.run_id} from step {step} on were not logged: {error}"
                    )
                    logger.error("%s", self._error)
                    return
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            waited = time.monotonic() - (first_failure if first_failure is not None else started)
            if waited > SLOW_LOGGING_SECONDS:
                logger.warning(
                    "MLflow accepted the metrics of step %d for run %s after %.0f s: the tracking server was "
                    "unreachable or slow meanwhile, and training went on",
                    step,
                    self.run_id,
                    waited,
                )
            return


def logged_steps(run_id: str, key: str) -> set[int]:
    """Return the steps at which run `run_id` has a value of metric `key`."""
    return {metric.step for metric in client().get_metric_history(run_id, key)}


@contextmanager
def resumed_run(run_id: str) -> Iterator[str]:
    """Reopen an existing run to add evaluation results, restoring its status afterwards."""
    tracking = client()
    status = tracking.get_run(run_id).info.status
    with mlflow.start_run(run_id=run_id):
        yield run_id
    if status != RunStatus.to_string(RunStatus.RUNNING):
        tracking.set_terminated(run_id, status=status)


def log_params(params: dict[str, Any]) -> None:
    """Log parameters to the active run, JSON-encoding lists and dicts."""
    mlflow.log_params({name: _param_value(value) for name, value in params.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({name: float(value) for name, value in metrics.items()}, step=step)


def log_json(data: Any, artifact_file: str, run_id: str | None = None) -> None:
    """Store `data` as a JSON artifact of `run_id` (default: the active run)."""
    if run_id is None:
        mlflow.log_dict(data, artifact_file)
    else:
        client().log_dict(run_id, data, artifact_file)


def log_text(text: str, artifact_file: str, run_id: str | None = None) -> None:
    if run_id is None:
        mlflow.log_text(text, artifact_file)
    else:
        client().log_text(run_id, text, artifact_file)


def log_figure(figure: Any, artifact_file: str, run_id: str | None = None) -> None:
    """Store a matplotlib figure as a PNG artifact and close it."""
    if run_id is None:
        mlflow.log_figure(figure, artifact_file)
    else:
        client().log_figure(run_id, figure, artifact_file)
    import matplotlib.pyplot as plt

    plt.close(figure)


def log_file(path: str | Path, artifact_path: str | None = None, run_id: str | None = None) -> None:
    if run_id is None:
        mlflow.log_artifact(str(path), artifact_path)
    else:
        client().log_artifact(run_id, str(path), artifact_path)


def load_json(run_id: str, artifact_file: str) -> Any:
    """Return a JSON artifact of a run as Python data."""
    return mlflow.artifacts.load_dict(f"runs:/{run_id}/{artifact_file}")


def download(run_id: str, artifact_path: str, destination: str | Path) -> Path:
    """Download a run's artifact (file or folder) under `destination`; return its local path."""
    client()
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=artifact_path, dst_path=str(destination)
    )
    return Path(local)


def log_keras_model(model: Any, sample_images: Any) -> str:
    """Log a Keras model (Keras 3 format) with a signature to the active run; return its URI.

    Requirements are passed explicitly: inferring them loads the model in a
    subprocess, which took about 15 s per model.
    """
    import keras
    import numpy as np
    import tensorflow as tf
    from mlflow.models import infer_signature

    sample = np.asarray(sample_images, dtype=np.float32)
    signature = infer_signature(sample, np.asarray(model.predict(sample, verbose=0)))
    requirements = [
        f"keras=={keras.__version__}",
        f"tensorflow-cpu=={tf.__version__}",
        f"mlflow=={mlflow.__version__}",
        f"numpy=={np.__version__}",
    ]
    info = mlflow.keras.log_model(
        model, name="model", signature=signature, pip_requirements=requirements
    )
    logger.info("Logged Keras model %s", info.model_uri)
    return info.model_uri


def load_keras_model(model_uri: str) -> Any:
    """Load a Keras model logged by `log_keras_model`."""
    client()
    import mlflow.keras

    return mlflow.keras.load_model(model_uri)


def run_summary(run_id: str) -> dict[str, Any]:
    """Return a run's status, tags and latest metrics as plain data."""
    run = client().get_run(run_id)
    return {
        "run_id": run_id,
        "status": run.info.status,
        "tags": dict(run.data.tags),
        "metrics": dict(run.data.metrics),
        "params": dict(run.data.params),
    }


def metric_history(run_id: str, key: str) -> list[float]:
    """Return the values of a metric ordered by step."""
    history = client().get_metric_history(run_id, key)
    return [metric.value for metric in sorted(history, key=lambda metric: metric.step)]



def register_model(model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register `model_uri` as a new version of `name` (created if needed); return the version."""
    client()
    version = mlflow.register_model(model_uri, name, tags=tags)
    return str(version.version)


def get_alias_version(name: str, alias: str) -> str | None:
    """Return the version that `alias` points at, or None if the alias is not set."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)
    logger.info("Moved alias %r of registered model %s to version %s", alias, name, version)
