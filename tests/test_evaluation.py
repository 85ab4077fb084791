"""Unit tests of fer_tasks.evaluation with tiny inline data and a tiny real Keras model."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from fer_tasks.config import CLASS_NAMES, NUM_CLASSES
from fer_tasks.evaluation import (
    classification_metrics,
    confused_pairs,
    confusion_matrix_normalised,
    confusion_table,
    plot_confusion_matrix,
    predict_probabilities,
)


@pytest.fixture(scope="module")
def first_pixel_model():
    """A softmax model whose class-0 logit is 10 times the first pixel, all others 0.

    An input scaled to [0, 1] with a white first pixel gives class 0 the probability
    e^10 / (e^10 + 6), and a black one gives uniform probabilities.
    """
    keras = pytest.importorskip("keras")
    model = keras.Sequential(
        [
            keras.Input((48, 48, 1)),
            keras.layers.Flatten(),
            keras.layers.Dense(7, activation="softmax"),
        ]
    )
    kernel = np.zeros((48 * 48, 7), dtype=np.float32)
    kernel[0, 0] = 10.0
    model.layers[-1].set_weights([kernel, np.zeros(7, dtype=np.float32)])
    return model


def test_predict_probabilities_shape_and_scaling(first_pixel_model):
    images = np.zeros((5, 48, 48), dtype=np.uint8)
    images[0, 0, 0] = 255

    probabilities = predict_probabilities(first_pixel_model, images, batch_size=2)

    assert probabilities.shape == (5, NUM_CLASSES)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    expected_first = math.exp(10) / (math.exp(10) + 6)
    assert probabilities[0, 0] == pytest.approx(expected_first, rel=1e-4)
    np.testing.assert_allclose(probabilities[1], np.full(7, 1 / 7), rtol=1e-5)


def test_predict_probabilities_batch_size_invariant(first_pixel_model):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(9, 48, 48), dtype=np.uint8)

    small_batches = predict_probabilities(first_pixel_model, images, batch_size=2)
    one_batch = predict_probabilities(first_pixel_model, images)

    np.testing.assert_allclose(small_batches, one_batch, rtol=1e-5)


def test_predict_probabilities_empty_input(first_pixel_model):
    probabilities = predict_probabilities(first_pixel_model, np.zeros((0, 48, 48), dtype=np.uint8))

    assert probabilities.shape == (0, NUM_CLASSES)
    assert probabilities.dtype == np.float32


@pytest.mark.parametrize(
    ("images", "batch_size", "message"),
    [
        (np.zeros((2, 48, 48, 1), dtype=np.uint8), 256, "shape"),
        (np.zeros((2, 24, 24), dtype=np.uint8), 256, "shape"),
        (np.zeros((2, 48, 48), dtype=np.float32), 256, "uint8"),
        (np.zeros((2, 48, 48), dtype=np.uint8), 0, "batch_size"),
    ],
)
def test_predict_probabilities_bad_input(first_pixel_model, images, batch_size, message):
    with pytest.raises(ValueError, match=message):
        predict_probabilities(first_pixel_model, images, batch_size=batch_size)


def test_classification_metrics_known_values():
    labels = [0, 0, 1, 2, 3, 3]
    predicted = [0, 1, 1, 2, 3, 0]

    result = classification_metrics(labels, predicted)

    assert result["accuracy"] == pytest.approx(4 / 6)
    # Classes 0-3 occur. Their F1 scores are 1/2, 2/3, 1 and 2/3.
    assert result["macro_f1"] == pytest.approx((1 / 2 + 2 / 3 + 1 + 2 / 3) / 4)
    assert result["per_class"]["Angry"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    )
    assert result["per_class"]["Disgust"] == pytest.approx(
        {"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1}
    )
    assert result["per_class"]["Happy"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )


def test_classification_metrics_all_classes_present():
    result = classification_metrics([0, 1], [0, 1])

    assert list(result["per_class"]) == list(CLASS_NAMES)
    for name, values in result["per_class"].items():
        assert set(values) == {"precision", "recall", "f1", "support"}, name
    assert result["per_class"]["Neutral"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
    }
    assert isinstance(result["per_class"]["Angry"]["support"], int)


def test_classification_metrics_json_ready():
    result = classification_metrics(np.array([0, 3, 6]), np.array([0, 3, 5]))

    assert json.loads(json.dumps(result)) == result


@pytest.mark.parametrize(
    ("labels", "predicted", "message"),
    [
        ([0, 1], [0], "same length"),
        ([], [], "empty"),
        ([0, 7], [0, 1], "class indices"),
        ([0, 1], [-1, 1], "class indices"),
        ([0.0, 1.0], [0, 1], "integer"),
        ([[0, 1]], [[0, 1]], "1-D"),
    ],
)
def test_classification_metrics_bad_input(labels, predicted, message):
    with pytest.raises(ValueError, match=message):
        classification_metrics(labels, predicted)


def test_confusion_matrix_known_rows():
    labels = [0, 0, 0, 0, 1, 1, 3]
    predicted = [0, 0, 0, 2, 1, 3, 3]

    matrix = confusion_matrix_normalised(labels, predicted)

    assert matrix.shape == (7, 7)
    expected = np.zeros((7, 7))
    expected[0, 0] = 0.75
    expected[0, 2] = 0.25
    expected[1, 1] = 0.5
    expected[1, 3] = 0.5
    expected[3, 3] = 1.0
    np.testing.assert_allclose(matrix, expected)


def test_confusion_matrix_empty_class_row_is_zero():
    matrix = confusion_matrix_normalised([0, 1, 1], [0, 1, 0])

    for empty_class in range(2, 7):
        assert not np.isnan(matrix[empty_class]).any()
        np.testing.assert_array_equal(matrix[empty_class], np.zeros(7))
    np.testing.assert_allclose(matrix[:2].sum(axis=1), [1.0, 1.0])


def test_confused_pairs_threshold_is_inclusive():
    # Fear (2): 17 of 20 right and 3 predicted as Sad (4), which is exactly 0.15.
    labels = [2] * 20 + [0] * 10
    predicted = [2] * 17 + [4] * 3 + [0] * 8 + [5] * 2
    matrix = confusion_matrix_normalised(labels, predicted)

    pairs = confused_pairs(matrix, threshold=0.15)

    assert pairs == [
        {"true": "Angry", "predicted": "Surprise", "rate": pytest.approx(0.2)},
        {"true": "Fear", "predicted": "Sad", "rate": pytest.approx(0.15)},
    ]


def test_confused_pairs_order_and_exclusions():
    matrix = np.zeros((7, 7))
    matrix[0, 0] = 0.9  # the diagonal never counts
    matrix[1, 5] = 0.1499
    matrix[3, 6] = 0.4
    matrix[6, 3] = 0.25
    matrix[4, 2] = 0.15

    pairs = confused_pairs(matrix)

    assert [(pair["true"], pair["predicted"]) for pair in pairs] == [
        ("Happy", "Neutral"),
        ("Neutral", "Happy"),
        ("Sad", "Fear"),
    ]
    assert [pair["rate"] for pair in pairs] == [0.4, 0.25, 0.15]
    assert all(isinstance(pair["rate"], float) for pair in pairs)


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_confused_pairs_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        confused_pairs(np.zeros((7, 7)), threshold=threshold)


@pytest.mark.parametrize("function", [confused_pairs, confusion_table])
def test_matrix_functions_reject_bad_shape(function):
    with pytest.raises(ValueError, match="shape"):
        function(np.zeros((6, 7)))


def test_confusion_table_labels_and_csv():
    matrix = np.arange(49, dtype=float).reshape(7, 7) / 100

    table = confusion_table(matrix)
    written = io.StringIO()
    table.to_csv(written)
    read_back = pd.read_csv(io.StringIO(written.getvalue()), index_col=0)

    assert list(table.index) == list(CLASS_NAMES)
    assert list(table.columns) == list(CLASS_NAMES)
    assert table.loc["Fear", "Sad"] == pytest.approx(matrix[2, 4])
    assert written.getvalue().startswith("true,Angry,")
    np.testing.assert_allclose(read_back.to_numpy(), matrix)


def test_plot_confusion_matrix_labels_and_values():
    matrix = confusion_matrix_normalised([0, 1, 2, 3, 4, 5, 6, 6], [0, 1, 2, 3, 4, 5, 6, 3])

    figure = plot_confusion_matrix(matrix, "Validation <cnn>")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    axes = figure.axes[0]
    cell_texts = [text.get_text() for text in axes.texts]

    assert isinstance(figure, Figure)
    assert axes.get_title() == "Validation <cnn>"
    assert axes.get_xlabel() == "Predicted class"
    assert axes.get_ylabel() == "True class"
    assert [label.get_text() for label in axes.get_xticklabels()] == list(CLASS_NAMES)
    assert [label.get_text() for label in axes.get_yticklabels()] == list(CLASS_NAMES)
    assert len(cell_texts) == 49
    assert cell_texts.count("0.50") == 2
    assert buffer.getvalue().startswith(b"\x89PNG")
