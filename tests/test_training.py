"""Training stage and tracking: input pipeline, splits, and MLflow runs on a real store."""

from __future__ import annotations

import numpy as np
import pytest

from fer_tasks.config import PipelineConfig
from fer_tasks.datasets import validation_indices


def test_head_split_takes_first_rows():
    labels = np.arange(100) % 7
    train, validation = validation_indices(labels, "head", 0.1, seed=0)
    assert validation.tolist() == list(range(10))
    assert train.tolist() == list(range(10, 100))


def test_stratified_split_keeps_class_shares_and_seed():
    labels = np.repeat(np.arange(7), [40, 10, 40, 70, 50, 30, 50])
    train, validation = validation_indices(labels, "stratified", 0.2, seed=3)
    again_train, again_validation = validation_indices(labels, "stratified", 0.2, seed=3)
    assert np.array_equal(validation, again_validation)
    assert np.array_equal(train, again_train)
    assert len(set(train) & set(validation)) == 0
    assert len(train) + len(validation) == len(labels)
    shares = np.bincount(labels[validation], minlength=7) / len(validation)
    expected = np.bincount(labels, minlength=7) / len(labels)
    assert np.allclose(shares, expected, atol=0.02)


def test_stratified_split_differs_across_seeds():
    labels = np.repeat(np.arange(7), 20)
    _, first = validation_indices(labels, "stratified", 0.2, seed=1)
    _, second = validation_indices(labels, "stratified", 0.2, seed=2)
    assert not np.array_equal(first, second)


def test_unknown_split_mode_is_rejected():
    with pytest.raises(ValueError, match="validation_mode must be"):
        validation_indices(np.zeros(10, dtype=int), "random", 0.1, seed=0)


@pytest.mark.parametrize("augment", [False, True])
def test_dataset_keeps_shapes_and_label_order(augment):
    from fer_tasks.training import make_dataset

    images = np.random.default_rng(0).integers(0, 256, size=(10, 48, 48), dtype=np.uint8)
    labels = np.arange(10) % 7
    batches = list(make_dataset(images, labels, 4, shuffle=False, augment=augment, seed=0))
    assert [tuple(batch[0].shape) for batch in batches] == [(4, 48, 48, 1), (4, 48, 48, 1), (2, 48, 48, 1)]
    assert np.concatenate([batch[1].numpy() for batch in batches]).tolist() == labels.tolist()
    pixels = np.concatenate([batch[0].numpy() for batch in batches])
    assert pixels.dtype == np.float32
    assert pixels.min() >= 0.0
    assert pixels.max() <= 1.0


def test_augmentation_changes_images_reproducibly():
    from fer_tasks.training import make_dataset

    images = np.random.default_rng(1).integers(0, 256, size=(8, 48, 48), dtype=np.uint8)
    labels = np.zeros(8, dtype=int)
    plain = next(iter(make_dataset(images, labels, 8, shuffle=False, augment=False, seed=5)))[0].numpy()
    augmented = next(iter(make_dataset(images, labels, 8, shuffle=False, augment=True, seed=5)))[0].numpy()
    assert not np.allclose(plain, augmented)


def test_child_run_replaces_stale_run_of_same_task(tracking_store):
    from fer_tasks import tracking
    from fer_tasks.tracking import RunContext

    parent_context = RunContext(dag_id="fer_pipeline", dag_run_id="manual__1", task_id="start_tracking")
    parent = tracking.start_pipeline_run("retry-test", parent_context, {"epochs": 1})
    context = RunContext(dag_id="fer_pipeline", dag_run_id="manual__1", task_id="train_cnn", try_number=1)
    with pytest.raises(RuntimeError):
        with tracking.child_run(parent, context, "cnn"):
            raise RuntimeError("worker lost")
    retry = RunContext(dag_id="fer_pipeline", dag_run_id="manual__1", task_id="train_cnn", try_number=2)
    with tracking.child_run(parent, retry, "cnn") as run_id:
        tracking.log_metrics({"val_accuracy": 0.5}, step=1)

    runs = tracking.find_runs(
        parent["experiment_id"], {tracking.TAG_TASK_ID: "train_cnn", tracking.TAG_ROLE: "model"}
    )
    assert [run.info.run_id for run in runs] == [run_id]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags[tracking.TAG_TRY_NUMBER] == "2"
    assert runs[0].data.tags["mlflow.parentRunId"] == parent["parent_run_id"]


def test_parent_run_is_reused_on_retry(tracking_store):
    from fer_tasks import tracking
    from fer_tasks.tracking import RunContext

    first = tracking.start_pipeline_run("parent-test", RunContext(dag_run_id="manual__2"), {})
    second = tracking.start_pipeline_run("parent-test", RunContext(dag_run_id="manual__2", try_number=2), {})
    other = tracking.start_pipeline_run("parent-test", RunContext(dag_run_id="manual__3"), {})
    assert first == second
    assert other["parent_run_id"] != first["parent_run_id"]


def test_failed_dag_run_closes_its_running_runs(tracking_store):
    from fer_tasks import tracking
    from fer_tasks.tracking import RunContext

    parent = tracking.start_pipeline_run("failure-test", RunContext(dag_run_id="manual__4"), {})
    tracking.fail_pipeline_runs("fer_pipeline", "manual__4")
    assert tracking.run_summary(parent["parent_run_id"])["status"] == "FAILED"


@pytest.mark.slow
def test_train_model_logs_one_finished_run(tracking_store):
    from fer_tasks import tracking
    from fer_tasks.tracking import RunContext
    from fer_tasks.training import train_model

    config = PipelineConfig(epochs=2, batch_size=32, builtin_rows=280, builtin_test_rows=14)
    context = RunContext(dag_run_id="manual__5", task_id="train_dnn")
    parent = tracking.start_pipeline_run(config.experiment_name, context, config.to_dict())
    result = train_model(config, "dnn", parent, context)

    summary = tracking.run_summary(result["run_id"])
    assert summary["status"] == "FINISHED"
    assert summary["params"]["model"] == "dnn"
    assert summary["params"]["parameters_total"] == str(result["parameters"])
    assert len(tracking.metric_history(result["run_id"], "val_loss")) == result["epochs"]
    assert len(tracking.metric_history(result["run_id"], "epoch_seconds")) == result["epochs"]
    assert summary["tags"][tracking.TAG_TASK_ID] == "train_dnn"
    model = tracking.load_keras_model(result["model_uri"])
    assert model.count_params() == result["parameters"]
    assert 0.0 <= result["val_accuracy"] <= 1.0
