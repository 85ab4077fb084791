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


def _blob_image(row: int, column: int, size: int = 48) -> np.ndarray:
    """Return a (size, size, 1) float32 image, black but for a bright 2x2 blob at (row, column)."""
    image = np.zeros((size, size, 1), dtype=np.float32)
    image[row : row + 2, column : column + 2] = 1.0
    return image


def _blob_centres(images: np.ndarray) -> np.ndarray:
    """Return the (row, column) centroid of the bright pixels of each image."""
    centres = []
    for image in images[..., 0]:
        rows, columns = np.nonzero(image > 0.5)
        assert rows.size > 0, "the bright blob left the image"
        centres.append((rows.mean(), columns.mean()))
    return np.array(centres)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augmenter_keeps_shape_dtype_and_range(dtype):
    from fer_tasks.augmentation import RandomFlipRotateShift

    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(16, 48, 48, 1)).astype(dtype)
    if dtype == np.float32:
        images /= 255.0
    augmented = np.asarray(RandomFlipRotateShift(seed=0)(images, training=True))
    assert augmented.shape == images.shape
    assert augmented.dtype == images.dtype
    assert augmented.min() >= images.min()
    assert augmented.max() <= images.max()
    # Nearest interpolation only copies input pixels.
    assert set(np.unique(augmented)) <= set(np.unique(images))
    assert not np.array_equal(augmented, images)


def test_augmenter_is_identity_when_not_training():
    from fer_tasks.augmentation import RandomFlipRotateShift

    images = np.random.default_rng(3).random((4, 48, 48, 1), dtype=np.float32)
    layer = RandomFlipRotateShift(seed=0)
    assert np.array_equal(np.asarray(layer(images, training=False)), images)
    assert np.array_equal(np.asarray(layer(images)), images)


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_augmenter_pure_flip_mirrors_width(interpolation):
    from fer_tasks.augmentation import RandomFlipRotateShift

    images = np.random.default_rng(4).random((64, 48, 48, 1), dtype=np.float32)
    layer = RandomFlipRotateShift(rotation_degrees=0.0, shift_fraction=0.0, interpolation=interpolation, seed=1)
    augmented = np.asarray(layer(images, training=True))
    flipped = [np.array_equal(out, np.flip(image, axis=1)) for out, image in zip(augmented, images)]
    kept = [np.array_equal(out, image) for out, image in zip(augmented, images)]
    assert all(was_flipped or was_kept for was_flipped, was_kept in zip(flipped, kept))
    # 64 fair coin flips: fewer than 16 or more than 48 heads has odds below 1 in 10,000.
    assert 16 <= sum(flipped) <= 48


def test_composed_transform_flips_then_shifts():
    import keras

    from fer_tasks.augmentation import compose_transforms

    image = _blob_image(10, 5)
    matrices = compose_transforms(
        flip=np.array([False, True]),
        angle=np.zeros(2, dtype=np.float32),
        shift_x=np.array([3.0, 3.0], dtype=np.float32),
        shift_y=np.array([-2.0, -2.0], dtype=np.float32),
        height=48,
        width=48,
    )
    moved = np.asarray(keras.ops.image.affine_transform(np.stack([image, image]), matrices, interpolation="nearest"))
    assert np.array_equal(moved[0], _blob_image(8, 8))
    # Flipped first: columns 5-6 become 41-42, then the shift moves them to 44-45.
    assert np.array_equal(moved[1], _blob_image(8, 44))


def test_composed_transform_rotates_clockwise_about_centre():
    import keras

    from fer_tasks.augmentation import compose_transforms

    # A 2x2 blob centred 20 pixels right of the image centre (23.5, 23.5).
    image = _blob_image(23, 43)
    matrices = compose_transforms(
        flip=np.array([False]),
        angle=np.array([np.pi / 2], dtype=np.float32),
        shift_x=np.zeros(1, dtype=np.float32),
        shift_y=np.zeros(1, dtype=np.float32),
        height=48,
        width=48,
    )
    rotated = np.asarray(keras.ops.image.affine_transform(image[np.newaxis], matrices, interpolation="nearest"))
    assert np.array_equal(rotated[0], _blob_image(43, 23))


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_augmenter_rotation_stays_within_range(interpolation):
    from fer_tasks.augmentation import RandomFlipRotateShift

    images = np.stack([_blob_image(23, 43)] * 64)
    layer = RandomFlipRotateShift(rotation_degrees=10.0, shift_fraction=0.0, interpolation=interpolation, seed=2)
    centres = _blob_centres(np.asarray(layer(images, training=True)))
    offsets_y = centres[:, 0] - 23.5
    # A flip mirrors the blob to the left side; its distance from the centre stays.
    offsets_x = np.abs(centres[:, 1] - 23.5)
    angles = np.degrees(np.arctan2(offsets_y, offsets_x))
    radii = np.hypot(offsets_x, offsets_y)
    # One pixel at radius 20 spans about 2.9 degrees, so nearest sampling may add that much.
    assert np.abs(angles).max() <= 10.0 + 3.0
    assert np.abs(radii - 20.0).max() <= 1.5
    assert angles.min() < -4.0
    assert angles.max() > 4.0


def test_augmenter_shift_stays_within_range():
    from fer_tasks.augmentation import RandomFlipRotateShift

    images = np.stack([_blob_image(23, 23)] * 64)
    layer = RandomFlipRotateShift(rotation_degrees=0.0, shift_fraction=0.1, seed=3)
    centres = _blob_centres(np.asarray(layer(images, training=True)))
    # The blob sits on the centre, so a flip leaves it in place; shifts reach 4.8 pixels.
    shifts = centres - 23.5
    assert np.abs(shifts).max() <= 4.8 + 0.5
    assert np.abs(shifts[:, 0]).max() >= 2.0
    assert np.abs(shifts[:, 1]).max() >= 2.0


def test_augmenter_rejects_bad_settings():
    from fer_tasks.augmentation import RandomFlipRotateShift

    with pytest.raises(ValueError, match="rotation_degrees"):
        RandomFlipRotateShift(rotation_degrees=-1.0)
    with pytest.raises(ValueError, match="shift_fraction"):
        RandomFlipRotateShift(shift_fraction=1.5)
    with pytest.raises(ValueError, match="interpolation"):
        RandomFlipRotateShift(interpolation="bicubic")


def test_augmenting_uint8_equals_augmenting_scaled():
    from fer_tasks.augmentation import RandomFlipRotateShift

    images = np.random.default_rng(5).integers(0, 256, size=(8, 48, 48, 1), dtype=np.uint8)
    from_uint8 = np.asarray(RandomFlipRotateShift(seed=4)(images, training=True)).astype(np.float32) / 255.0
    from_scaled = np.asarray(RandomFlipRotateShift(seed=4)(images.astype(np.float32) / 255.0, training=True))
    assert np.array_equal(from_uint8, from_scaled)
