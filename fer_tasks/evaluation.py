"""Evaluation of a trained classifier: probabilities, metrics and the confusion matrix.

The metric and figure functions are pure: they neither talk to MLflow nor write
files. `evaluate_trained_models` is the stage entry point that the DAG calls: it
loads each model from MLflow and stores the results in that model's run. Labels and
predictions are integer class indices 0-6 in the order of `CLASS_NAMES`. Figures are built with
matplotlib's object-oriented `Figure` API, so no pyplot state or GUI backend is used.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn import metrics

from fer_tasks import tracking
from fer_tasks.config import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, PipelineConfig
from fer_tasks.datasets import load_splits
from fer_tasks.models import to_model_input

logger = logging.getLogger(__name__)

CLASS_INDICES = list(range(NUM_CLASSES))


def predict_probabilities(model: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Predict class probabilities for uint8 images with a Keras model.

    Args:
        model: a Keras model that takes (batch, 48, 48, 1) images scaled to [0, 1].
        images: uint8 array of shape (n, 48, 48) with pixel values 0-255.
        batch_size: images per `model.predict` batch.

    Returns:
        float32 array of shape (n, 7), one row of class probabilities per image.

    Raises:
        ValueError: on a wrong shape or dtype, or a batch size below 1.
    """
    expected_shape = (IMAGE_SIZE, IMAGE_SIZE)
    if images.ndim != 3 or images.shape[1:] != expected_shape:
        raise ValueError(
            f"images must have shape (n, {IMAGE_SIZE}, {IMAGE_SIZE}), got {images.shape}"
        )
    if images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 pixel values 0-255, got dtype {images.dtype}. "
            "Pass the raw pixels, because this function scales them itself"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(images) == 0:
        return np.empty((0, NUM_CLASSES), dtype=np.float32)

    probabilities = np.asarray(
        model.predict(to_model_input(images), batch_size=batch_size, verbose=0)
    )
    if probabilities.shape != (len(images), NUM_CLASSES):
        raise ValueError(
            f"model output must have shape ({len(images)}, {NUM_CLASSES}), "
            f"got {probabilities.shape}"
        )
    return probabilities.astype(np.float32, copy=False)


def _validate_labels(labels: Any, predicted: Any) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    predicted = np.asarray(predicted)
    if labels.ndim != 1 or predicted.ndim != 1:
        raise ValueError(
            f"labels and predicted must be 1-D, got shapes {labels.shape} and {predicted.shape}"
        )
    if len(labels) != len(predicted):
        raise ValueError(
            "labels and predicted must have the same length, "
            f"got {len(labels)} and {len(predicted)}"
        )
    if len(labels) == 0:
        raise ValueError("labels is empty: metrics need at least one sample")
    for name, values in (("labels", labels), ("predicted", predicted)):
        if not np.issubdtype(values.dtype, np.integer):
            raise ValueError(f"{name} must contain integer class indices, got dtype {values.dtype}")
        if values.min() < 0 or values.max() >= NUM_CLASSES:
            raise ValueError(
                f"{name} must be class indices 0-{NUM_CLASSES - 1}, "
                f"got values from {values.min()} to {values.max()}"
            )
    return labels, predicted


def classification_metrics(labels: Any, predicted: Any) -> dict[str, Any]:
    """Compute accuracy, macro F1 and per-class precision, recall, F1 and support.

    Every one of the seven classes appears under "per_class". A class without samples
    or predictions gets 0.0 where the metric is undefined (`zero_division=0`).
    The macro F1 averages over the classes that occur in `labels` or `predicted`
    (scikit-learn's default), so a class absent from both does not count as 0.

    Returns:
        JSON-ready dict: {"accuracy": float, "macro_f1": float,
        "per_class": {class name: {"precision", "recall", "f1", "support"}}}.
    """
    labels, predicted = _validate_labels(labels, predicted)
    precision, recall, f1, support = metrics.precision_recall_fscore_support(
        labels, predicted, labels=CLASS_INDICES, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[index]),
            "recall": float(recall[index]),
            "f1": float(f1[index]),
            "support": int(support[index]),
        }
        for index, name in enumerate(CLASS_NAMES)
    }
    return {
        "accuracy": float(metrics.accuracy_score(labels, predicted)),
        "macro_f1": float(metrics.f1_score(labels, predicted, average="macro", zero_division=0)),
        "per_class": per_class,
    }


def confusion_matrix_normalised(labels: Any, predicted: Any) -> np.ndarray:
    """Compute the (7, 7) confusion matrix with each row divided by its true-class count.

    Rows are true classes and columns predicted classes, both in `CLASS_NAMES` order,
    so each row with samples sums to 1. A class without samples gives a row of zeros.
    """
    labels, predicted = _validate_labels(labels, predicted)
    counts = metrics.confusion_matrix(labels, predicted, labels=CLASS_INDICES).astype(np.float64)
    row_totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, row_totals, out=np.zeros_like(counts), where=row_totals > 0)


def _validate_matrix(matrix: Any) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (NUM_CLASSES, NUM_CLASSES):
        raise ValueError(
            f"confusion matrix must have shape ({NUM_CLASSES}, {NUM_CLASSES}), got {matrix.shape}"
        )
    return matrix


def confused_pairs(matrix: Any, threshold: float = 0.15) -> list[dict[str, Any]]:
    """List the off-diagonal cells of a normalised confusion matrix at or above `threshold`.

    Returns:
        [{"true": class name, "predicted": class name, "rate": float}, ...], highest
        rate first. Equal rates keep the row-major order of the matrix.
    """
    matrix = _validate_matrix(matrix)
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")

    pairs = [
        {
            "true": CLASS_NAMES[true],
            "predicted": CLASS_NAMES[guess],
            "rate": float(matrix[true, guess]),
        }
        for true in range(NUM_CLASSES)
        for guess in range(NUM_CLASSES)
        if true != guess and matrix[true, guess] >= threshold
    ]
    pairs.sort(key=lambda pair: pair["rate"], reverse=True)
    return pairs


def confusion_table(matrix: Any) -> pd.DataFrame:
    """Wrap a (7, 7) confusion matrix in a DataFrame labelled with class names, for CSV."""
    matrix = _validate_matrix(matrix)
    table = pd.DataFrame(matrix, index=list(CLASS_NAMES), columns=list(CLASS_NAMES))
    table.index.name = "true"
    table.columns.name = "predicted"
    return table


def plot_confusion_matrix(matrix: Any, title: str) -> Figure:
    """Draw a normalised confusion matrix as a heatmap with each cell's rate written in it.

    The colour scale is fixed to [0, 1], so figures of different models compare directly.
    """
    matrix = _validate_matrix(matrix)
    figure = Figure(figsize=(7.0, 6.0), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="Share of the true class")

    for true in range(NUM_CLASSES):
        for guess in range(NUM_CLASSES):
            value = matrix[true, guess]
            # Dark cells get white text so the number stays readable.
            colour = "white" if value > 0.5 else "black"
            axes.text(
                guess, true, f"{value:.2f}", ha="center", va="center", color=colour, fontsize=9
            )

    axes.set_xticks(CLASS_INDICES, labels=CLASS_NAMES, rotation=45, ha="right")
    axes.set_yticks(CLASS_INDICES, labels=CLASS_NAMES)
    axes.set_xlabel("Predicted class")
    axes.set_ylabel("True class")
    axes.set_title(title)
    return figure


def evaluate_trained_models(config: PipelineConfig, trained: list[dict]) -> dict[str, dict]:
    """Evaluate each trained model and store the results in its MLflow run.

    Logs validation metrics, test accuracy where test labels are known, the
    confusion matrix (figure and CSV) and the test-set predictions that the
    report turns into submissions. Returns the headline numbers per model.
    """
    splits = load_splits(config)
    results: dict[str, dict] = {}
    for run in trained:
        model = tracking.load_keras_model(run["model_uri"])
        predicted = predict_probabilities(model, splits.validation_images).argmax(axis=1)
        metrics = classification_metrics(splits.validation_labels, predicted)
        matrix = confusion_matrix_normalised(splits.validation_labels, predicted)
        pairs = confused_pairs(matrix, config.confusion_threshold)
        test_accuracy = {
            name: float(np.mean(predict_probabilities(model, images).argmax(axis=1) == labels))
            for name, (images, labels) in splits.labelled_tests.items()
        }
        test_predicted = predict_probabilities(model, splits.test_images).argmax(axis=1)
        submission = pd.DataFrame({"id": splits.test_ids, "label": test_predicted.astype(np.int64)})

        with tracking.resumed_run(run["run_id"]):
            tracking.log_metrics(
                {
                    "val_accuracy_final": metrics["accuracy"],
                    "val_macro_f1": metrics["macro_f1"],
                    **{f"test_{name}_accuracy": value for name, value in test_accuracy.items()},
                    **{
                        f"val_f1_{class_name}": values["f1"]
                        for class_name, values in metrics["per_class"].items()
                    },
                }
            )
            tracking.log_json(
                {
                    "validation": metrics,
                    "confusion": matrix.tolist(),
                    "confused_pairs": pairs,
                    "test_accuracy": test_accuracy,
                },
                tracking.EVALUATION_ARTIFACT,
            )
            tracking.log_text(confusion_table(matrix).to_csv(), tracking.CONFUSION_TABLE_ARTIFACT)
            tracking.log_figure(
                plot_confusion_matrix(matrix, f"{run['model']}: validation confusion (row-normalised)"),
                tracking.CONFUSION_FIGURE_ARTIFACT,
            )
            tracking.log_text(submission.to_csv(index=False), tracking.PREDICTIONS_ARTIFACT)
        logger.info(
            "Evaluated %s: val_accuracy %.4f, macro F1 %.4f, test accuracy %s, confused pairs %s",
            run["model"],
            metrics["accuracy"],
            metrics["macro_f1"],
            test_accuracy or "n/a (no test labels)",
            [f"{pair['true']}->{pair['predicted']} {pair['rate']:.2f}" for pair in pairs],
        )
        results[run["model"]] = {
            "val_accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "test_accuracy": test_accuracy,
            "confused_pairs": pairs,
        }
    return results
