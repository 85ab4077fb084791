"""Retries: a killed training resumes from its checkpoint, and metrics survive a lost tracking server.

Everything here is real: TensorFlow training in a child process killed with
SIGKILL, a SQLite MLflow store, and an `mlflow server` on 127.0.0.1 that the test
stops and starts again.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fer_tasks.config import PipelineConfig

pytestmark = pytest.mark.slow

TRAIN_SCRIPT = """
import json, logging, sys
from fer_tasks.config import PipelineConfig
from fer_tasks.tracking import RunContext
from fer_tasks.training import train_model

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
config = PipelineConfig.from_params(json.loads(sys.argv[1]))
context = RunContext(dag_run_id="manual__kill", task_id="train_cnn", try_number=int(sys.argv[3]))
print("RESULT " + json.dumps(train_model(config, "cnn", json.loads(sys.argv[2]), context)))
"""

CONFIG = PipelineConfig(
    models=("cnn",), epochs=25, patience=25, batch_size=32, builtin_rows=140, builtin_test_rows=14
)


def _train(parent: dict, try_number: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN_SCRIPT, json.dumps(CONFIG.to_dict()), json.dumps(parent), str(try_number)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )


def _wait_for_checkpoint(latest: Path, process: subprocess.Popen, min_epoch: int, timeout: float = 240) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "training ended before it could be killed:\n" + process.stdout.read()
        if latest.exists():
            epoch = int(latest.read_text().removeprefix("epoch-"))
            if epoch >= min_epoch:
                return epoch
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint of epoch {min_epoch} in {timeout} s")


def test_killed_training_resumes_with_one_run(tracking_store):
    from mlflow.entities import ViewType

    from fer_tasks import tracking
    from fer_tasks.checkpoints import CheckpointStore
    from fer_tasks.tracking import RunContext

    parent = tracking.start_pipeline_run(
        "resume-test", RunContext(dag_run_id="manual__kill", task_id="start_tracking"), {}
    )
    store = CheckpointStore.for_task("fer_pipeline", "manual__kill", "train_cnn")

    first = _train(parent, try_number=1)
    killed_after = _wait_for_checkpoint(store.directory / "LATEST", first, min_epoch=3)
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL

    runs = tracking.find_runs(parent["experiment_id"], {tracking.TAG_TASK_ID: "train_cnn"})
    assert [run.info.status for run in runs] == ["RUNNING"]
    killed_run_id = runs[0].info.run_id

    second = _train(parent, try_number=2)
    output, _ = second.communicate(timeout=600)
    assert second.returncode == 0, output[-3000:]
    resumed = [line for line in output.splitlines() if "Resuming cnn from the checkpoint after epoch" in line]
    assert len(resumed) == 1, output[-3000:]
    resumed_after = int(resumed[0].split("after epoch ")[1].split()[0])
    assert resumed_after >= killed_after
    result = json.loads(output.split("RESULT ", 1)[1])

    every_run = tracking.client().search_runs([parent["experiment_id"]], run_view_type=ViewType.ALL)
    model_runs = [run for run in every_run if run.data.tags.get(tracking.TAG_TASK_ID) == "train_cnn"]
    assert [run.info.run_id for run in model_runs] == [killed_run_id]
    assert model_runs[0].info.status == "FINISHED"
    assert model_runs[0].data.tags[tracking.TAG_TRY_NUMBER] == "2"
    assert result["run_id"] == killed_run_id
    assert result["epochs"] == CONFIG.epochs

    steps = [metric.step for metric in tracking.client().get_metric_history(killed_run_id, "loss")]
    assert sorted(steps) == list(range(1, CONFIG.epochs + 1))
    history = tracking.load_json(killed_run_id, tracking.HISTORY_ARTIFACT)
    assert len(history["history"]["loss"]) == CONFIG.epochs
    assert history["resumed_after_epoch"] == resumed_after
    assert not store.directory.exists()


def test_retry_without_checkpoint_starts_a_new_run(tracking_store):
    from mlflow.entities import ViewType

    from fer_tasks import tracking
    from fer_tasks.tracking import RunContext

    parent = tracking.start_pipeline_run("fresh-test", RunContext(dag_run_id="manual__fresh"), {})
    context = RunContext(dag_run_id="manual__fresh", task_id="train_cnn", try_number=1)
    with pytest.raises(RuntimeError):
        with tracking.child_run(parent, context, "cnn", resume=True):
            raise RuntimeError("lost before the first epoch ended")
    orphan = tracking.client().create_run(
        parent["experiment_id"], tags={**context.tags(), tracking.TAG_ROLE: "model"}
    )
    retry = RunContext(dag_run_id="manual__fresh", task_id="train_cnn", try_number=2)
    with tracking.child_run(parent, retry, "cnn", resume=False) as run_id:
        pass

    every_run = tracking.client().search_runs([parent["experiment_id"]], run_view_type=ViewType.ALL)
    statuses = {
        run.info.run_id: (run.info.status, run.info.lifecycle_stage)
        for run in every_run
        if run.data.tags.get(tracking.TAG_ROLE) == "model"
    }
    assert statuses[run_id] == ("FINISHED", "active")
    assert statuses[orphan.info.run_id] == ("KILLED", "deleted")
    assert [stage for _, stage in statuses.values()].count("active") == 1
    assert [status for status, _ in statuses.values()].count("RUNNING") == 0


@pytest.fixture
def mlflow_server(tmp_path):
    """Start `mlflow server` on a free 127.0.0.1 port; yield start and stop functions."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from run_dag import free_port, stop as stop_process

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--default-artifact-root", (tmp_path / "server-artifacts").as_uri(), "--workers", "1",
    ]
    processes: list[subprocess.Popen] = []

    def start() -> None:
        log = open(tmp_path / f"mlflow-server-{len(processes)}.log", "w")
        processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        _wait_until_up(url, processes[-1])

    def stop() -> None:
        stop_process(processes[-1])

    start()
    try:
        yield url, start, stop
    finally:
        stop()


def _wait_until_up(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"mlflow server exited with code {process.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"mlflow server at {url} did not answer within {timeout} s")


def test_metrics_survive_server_outage(mlflow_server, monkeypatch, caplog):
    from fer_tasks import tracking

    url, start, stop = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    # Fail fast inside the MLflow client, so that the sender's own backoff is what waits.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_id = tracking.client().create_run(tracking.ensure_experiment("outage-test")).info.run_id

    caplog.set_level(logging.INFO, logger="fer_tasks.tracking")
    sender = tracking.MetricSender(run_id, give_up_after=120)
    sender.send({"loss": 1.0}, step=1)
    time.sleep(2)
    stop()
    for step in (2, 3, 4):
        sender.send({"loss": 1.0 / step}, step=step)
        time.sleep(1)
    time.sleep(10)
    start()
    sender.close()

    steps = sorted(metric.step for metric in tracking.client().get_metric_history(run_id, "loss"))
    assert steps == [1, 2, 3, 4]
    messages = [record.getMessage() for record in caplog.records]
    assert any("did not accept the metrics of step 2" in message for message in messages), messages
    assert any("accepted the metrics of step 2" in message for message in messages), messages
    assert any("still waiting for the tracking server" in message for message in messages), messages


def test_metric_sender_gives_up_after_limit(mlflow_server, monkeypatch):
    from fer_tasks import tracking

    url, _, stop = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    run_id = tracking.client().create_run(tracking.ensure_experiment("give-up-test")).info.run_id
    stop()

    sender = tracking.MetricSender(run_id, give_up_after=3)
    sender.send({"loss": 1.0}, step=1)
    with pytest.raises(RuntimeError, match=f"unreachable for more than 3 s, so the metrics of run {run_id}"):
        sender.close()


def test_failed_run_is_marked_and_closed(tracking_store):
    from fer_tasks import files, report, tracking
    from fer_tasks.tracking import RunContext

    context = RunContext(dag_run_id="manual__broken", task_id="train_cnn")
    parent = tracking.start_pipeline_run("failure-test", context, {})
    child = tracking.client().create_run(parent["experiment_id"], tags={**context.tags(), tracking.TAG_ROLE: "model"})
    output_root = tracking_store / "output"
    files.write_text(output_root / "manual__earlier" / "summary.json", "{}")
    files.replace_symlink(output_root / "latest", "manual__earlier")
    files.write_text(output_root / "manual__broken" / "submissions" / "cnn.csv", "id,label\n")

    report.mark_run_failed("fer_pipeline", "manual__broken")

    assert (output_root / "manual__broken" / report.FAILED_MARKER).read_text().startswith("DAG run manual__broken failed")
    assert os.readlink(output_root / "latest") == "manual__earlier"
    for run_id in (parent["parent_run_id"], child.info.run_id):
        assert tracking.client().get_run(run_id).info.status == "FAILED"
