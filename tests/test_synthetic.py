"""Tests of the built-in synthetic data set: arrays, CSV files, reuse and learnability."""

from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest

from fer_tasks.config import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, PIXEL_COUNT
from fer_tasks.synthetic import (
    MANIFEST_FILE,
    TEST_FILE,
    TEST_LABELS_FILE,
    TRAIN_FILE,
    generate_faces,
    write_builtin_dataset,
)


def read_course_csv(path, key_column):
    """Parse a course-format CSV into keys (int64) and images (uint8, (n, 48, 48))."""
    with open(path, newline="") as file:
        reader = csv.reader(file)
        header = next(reader)
        rows = list(reader)
    assert header == [key_column, "feature"]
    keys = np.array([int(row[0]) for row in rows], dtype=np.int64)
    pixels = np.array([row[1].split(" ") for row in rows], dtype=np.int64)
    assert pixels.shape == (len(rows), PIXEL_COUNT)
    assert pixels.min() >= 0
    assert pixels.max() <= 255
    return keys, pixels.astype(np.uint8).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)


def test_faces_shapes_and_dtypes():
    images, labels = generate_faces(30, seed=3)

    assert images.shape == (30, IMAGE_SIZE, IMAGE_SIZE)
    assert images.dtype == np.uint8
    assert labels.shape == (30,)
    assert labels.dtype == np.int64
    assert set(labels.tolist()) <= set(range(NUM_CLASSES))


def test_faces_same_seed_identical():
    first_images, first_labels = generate_faces(40, seed=7)
    second_images, second_labels = generate_faces(40, seed=7)

    np.testing.assert_array_equal(first_images, second_images)
    np.testing.assert_array_equal(first_labels, second_labels)


def test_faces_differ_across_seeds():
    first_images, _ = generate_faces(40, seed=7)
    second_images, _ = generate_faces(40, seed=8)

    assert not np.array_equal(first_images, second_images)


def test_faces_span_several_chunks_deterministically():
    # 1,100 images cross two chunk boundaries.
    many_images, many_labels = generate_faces(1100, seed=5)
    again_images, _ = generate_faces(1100, seed=5)

    np.testing.assert_array_equal(many_images, again_images)
    assert len(np.unique(many_images.reshape(1100, -1), axis=0)) == 1100
    assert np.bincount(many_labels, minlength=NUM_CLASSES).tolist() == [158] * 1 + [157] * 6


@pytest.mark.parametrize("count", [1, 7, 50, 701])
def test_faces_classes_balanced(count):
    _, labels = generate_faces(count, seed=0)

    sizes = np.bincount(labels, minlength=NUM_CLASSES)
    assert sizes.sum() == count
    assert sizes.max() - sizes.min() <= 1


def test_faces_labels_shuffled():
    _, labels = generate_faces(70, seed=0)

    assert not np.array_equal(labels, np.arange(70) % NUM_CLASSES)


def test_faces_zero_count():
    images, labels = generate_faces(0, seed=0)

    assert images.shape == (0, IMAGE_SIZE, IMAGE_SIZE)
    assert labels.shape == (0,)


@pytest.mark.parametrize(("count", "seed"), [(-1, 0), (5, -1)])
def test_faces_invalid_arguments(count, seed):
    with pytest.raises(ValueError, match="must be"):
        generate_faces(count, seed)


def test_faces_have_contrast_and_use_range():
    images, _ = generate_faces(200, seed=1)

    per_image_std = images.reshape(200, -1).std(axis=1)
    assert per_image_std.min() > 10
    assert images.min() < 30
    assert images.max() > 225


def test_surprise_mouth_darker_than_neutral():
    images, labels = generate_faces(700, seed=2)
    # The mouth lies about 11 pixels below the face centre: rows 32-39, columns 20-27.
    mouth = images[:, 32:40, 20:28].reshape(len(images), -1).astype(np.float64)
    relative_mouth = mouth.mean(axis=1) / images.reshape(len(images), -1).mean(axis=1)

    surprise = relative_mouth[labels == CLASS_NAMES.index("Surprise")].mean()
    neutral = relative_mouth[labels == CLASS_NAMES.index("Neutral")].mean()
    assert surprise < neutral - 0.1


def test_faces_generation_speed():
    started = time.perf_counter()
    generate_faces(4200, seed=0)
    elapsed = time.perf_counter() - started

    assert elapsed < 10.0


def test_builtin_dataset_round_trip(tmp_path):
    train_path, test_path = write_builtin_dataset(tmp_path, train_rows=35, test_rows=15, seed=4)

    assert train_path == tmp_path / TRAIN_FILE
    assert test_path == tmp_path / TEST_FILE
    train_labels, train_images = read_course_csv(train_path, "label")
    expected_images, expected_labels = generate_faces(35, seed=4)
    np.testing.assert_array_equal(train_images, expected_images)
    np.testing.assert_array_equal(train_labels, expected_labels)

    test_ids, test_images = read_course_csv(test_path, "id")
    assert test_ids.tolist() == list(range(15))
    assert test_images.shape == (15, IMAGE_SIZE, IMAGE_SIZE)


def test_builtin_answer_key_matches_test_set(tmp_path):
    write_builtin_dataset(tmp_path, train_rows=21, test_rows=14, seed=0)

    with open(tmp_path / TEST_LABELS_FILE, newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["id", "label"]
    ids = [int(row[0]) for row in rows[1:]]
    labels = np.array([int(row[1]) for row in rows[1:]])
    assert ids == list(range(14))
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [2] * NUM_CLASSES


def test_builtin_test_images_differ_from_train(tmp_path):
    train_path, test_path = write_builtin_dataset(tmp_path, train_rows=50, test_rows=50, seed=0)

    _, train_images = read_course_csv(train_path, "label")
    _, test_images = read_course_csv(test_path, "id")
    train_rows = {image.tobytes() for image in train_images}
    assert not any(image.tobytes() in train_rows for image in test_images)


def test_builtin_files_byte_identical_for_seed(tmp_path):
    write_builtin_dataset(tmp_path / "first", train_rows=20, test_rows=10, seed=9)
    write_builtin_dataset(tmp_path / "second", train_rows=20, test_rows=10, seed=9)

    for name in (TRAIN_FILE, TEST_FILE, TEST_LABELS_FILE, MANIFEST_FILE):
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()


def test_builtin_files_differ_across_seeds(tmp_path):
    write_builtin_dataset(tmp_path / "first", train_rows=20, test_rows=10, seed=1)
    write_builtin_dataset(tmp_path / "second", train_rows=20, test_rows=10, seed=2)

    first = (tmp_path / "first" / TRAIN_FILE).read_bytes()
    assert first != (tmp_path / "second" / TRAIN_FILE).read_bytes()


def test_builtin_manifest_records_digests(tmp_path):
    write_builtin_dataset(tmp_path, train_rows=14, test_rows=7, seed=3)

    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert manifest["train_rows"] == 14
    assert manifest["test_rows"] == 7
    assert manifest["seed"] == 3
    assert sorted(manifest["sha256"]) == sorted([TRAIN_FILE, TEST_FILE, TEST_LABELS_FILE])


def test_builtin_reuses_identical_files(tmp_path):
    write_builtin_dataset(tmp_path, train_rows=14, test_rows=7, seed=3)
    # An atomic rewrite replaces the file, so an unchanged inode means no rewrite.
    inodes = {name: (tmp_path / name).stat().st_ino for name in (TRAIN_FILE, TEST_FILE, MANIFEST_FILE)}

    write_builtin_dataset(tmp_path, train_rows=14, test_rows=7, seed=3)

    for name, inode in inodes.items():
        assert (tmp_path / name).stat().st_ino == inode, name


def test_builtin_rewrites_changed_file(tmp_path):
    write_builtin_dataset(tmp_path, train_rows=14, test_rows=7, seed=3)
    original = (tmp_path / TEST_FILE).read_bytes()
    (tmp_path / TEST_FILE).write_text("id,feature\n")

    write_builtin_dataset(tmp_path, train_rows=14, test_rows=7, seed=3)

    assert (tmp_path / TEST_FILE).read_bytes() == original


def test_builtin_rewrites_for_new_arguments(tmp_path):
    write_builtin_dataset(tmp_path, train_rows=14, test_rows=7, seed=3)

    write_builtin_dataset(tmp_path, train_rows=21, test_rows=7, seed=3)

    labels, _ = read_course_csv(tmp_path / TRAIN_FILE, "label")
    assert len(labels) == 21
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["train_rows"] == 21


def test_builtin_leaves_no_temporary_files(tmp_path):
    write_builtin_dataset(tmp_path, train_rows=7, test_rows=7, seed=0)

    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == sorted([TRAIN_FILE, TEST_FILE, TEST_LABELS_FILE, MANIFEST_FILE])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"train_rows": 0}, "train_rows"),
        ({"test_rows": 0}, "test_rows"),
        ({"seed": -1}, "seed"),
    ],
)
def test_builtin_invalid_arguments(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        write_builtin_dataset(tmp_path, **arguments)


@pytest.mark.slow
def test_cnn_learns_synthetic_faces():
    import keras

    from fer_tasks.models import build_cnn

    keras.utils.set_random_seed(0)
    train_images, train_labels = generate_faces(1400, seed=1)
    validation_images, validation_labels = generate_faces(350, seed=2)
    # (n, 48, 48) uint8 -> (n, 48, 48, 1) float32 in [0, 1]
    train_inputs = train_images[..., np.newaxis].astype(np.float32) / 255.0
    validation_inputs = validation_images[..., np.newaxis].astype(np.float32) / 255.0

    model = build_cnn()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    # Batches of 8 give 525 steps, enough for BatchNormalization's moving
    # statistics (momentum 0.99) to settle. With batches of 32 the validation
    # accuracy stayed at chance for the first 3 epochs.
    history = model.fit(
        train_inputs,
        train_labels,
        validation_data=(validation_inputs, validation_labels),
        epochs=3,
        batch_size=8,
        verbose=0,
    )

    assert history.history["val_accuracy"][-1] >= 0.5
