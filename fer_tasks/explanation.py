"""Explanations of a trained model: saliency maps, filter patterns and layer outputs.

The functions take a Keras model and uint8 images of shape (k, 48, 48) and return
numpy arrays or a matplotlib `Figure`. None of them writes files or talks to
MLflow. The stage entry points at the end, `explain_with_saliency` and
`explain_filters`, load the models from MLflow and store the figures there. Gradients are always taken on a float32 copy of the model (see
`float32_copy`), because a model trained under the "mixed_bfloat16" policy
computes in bfloat16, which keeps only 8 bits of mantissa.

Figures are built with the object-oriented `Figure` API and never registered
with pyplot, so no display is needed and nothing has to be closed.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from fer_tasks import tracking
from fer_tasks.config import CLASS_NAMES, CNN_MODEL_NAMES, IMAGE_SIZE, PipelineConfig
from fer_tasks.datasets import load_splits
from fer_tasks.models import conv_layer_names, to_model_input

logger = logging.getLogger(__name__)

# Images per forward pass, which bounds memory for long image lists.
BATCH_SIZE = 64

# Dtype names that a float32 copy replaces with "float32".
REDUCED_PRECISION_DTYPES = frozenset({"float16", "bfloat16", "mixed_float16", "mixed_bfloat16"})


def float32_copy(model: keras.Model) -> keras.Model:
    """Rebuild a Functional or Sequential model under float32 and copy its weights.

    Every layer whose dtype policy is float16, bfloat16 or a mixed policy gets the
    "float32" policy in the copy; other layers keep theirs. The copy shares no
    variables with `model`, so changing it leaves the original untouched.

    Raises:
        ValueError: if a layer is quantized, or a layer of the copy still computes
            in reduced precision (a custom layer that ignores its dtype argument).
    """
    config = _float32_config(model.get_config())
    copy = model.__class__.from_config(config)
    weights = [
        weight.astype(np.float32) if np.issubdtype(weight.dtype, np.floating) else weight
        for weight in (np.asarray(value) for value in model.get_weights())
    ]
    copy.set_weights(weights)

    reduced = [layer.name for layer in copy.layers if layer.compute_dtype in REDUCED_PRECISION_DTYPES]
    if reduced:
        raise ValueError(
            f"layers {reduced} of model {model.name!r} still compute in reduced precision "
            "after rebuilding under float32; give them a dtype argument in their config"
        )
    return copy


def _float32_config(config: Any) -> Any:
    """Return a copy of a serialised model config with reduced-precision dtypes set to float32."""
    if isinstance(config, list):
        return [_float32_config(item) for item in config]
    if not isinstance(config, dict):
        return config

    result = {}
    for key, value in config.items():
        if key == "dtype" and _is_reduced_precision(value):
            result[key] = "float32"
        else:
            result[key] = _float32_config(value)
    return result


def _is_reduced_precision(dtype: Any) -> bool:
    """Tell whether a serialised dtype or dtype policy computes in 16-bit floats."""
    if isinstance(dtype, str):
        return dtype in REDUCED_PRECISION_DTYPES
    if not isinstance(dtype, dict):
        return False
    if dtype.get("class_name") not in ("DTypePolicy", "FloatDTypePolicy"):
        raise ValueError(
            f"cannot make a float32 copy of a layer with dtype policy {dtype.get('class_name')} "
            f"({dtype.get('config')}): quantized models are not supported"
        )
    return dtype.get("config", {}).get("name") in REDUCED_PRECISION_DTYPES


def saliency_maps(model: keras.Model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Compute vanilla-gradient saliency maps for the predicted class of each image.

    The score is the predicted class's logit when the output layer applies a
    softmax, and the output itself otherwise. The logit is used because the
    gradient of a softmax probability vanishes when the probability is near 1.

    Args:
        model: a classifier taking (k, 48, 48, 1) input in [0, 1].
        images: uint8 images of shape (k, 48, 48).

    Returns:
        Maps as float32 (k, 48, 48) in [0, 1], each |d score / d pixel| divided by
        its image's maximum (an all-zero gradient stays zero), and the predicted
        classes as int64 (k,).
    """
    inputs = to_model_input(images)
    if len(inputs) == 0:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32), np.zeros(0, np.int64)
    score_model = float32_copy(model)
    output_layer = score_model.layers[-1]
    if getattr(output_layer, "activation", None) is keras.activations.softmax:
        output_layer.activation = keras.activations.linear

    gradients, predicted = [], []
    for batch in _batches(inputs):
        batch = tf.constant(batch)  # (b, 48, 48, 1)
        with tf.GradientTape() as tape:
            tape.watch(batch)
            scores = score_model(batch, training=False)  # (b, classes)
            classes = tf.argmax(scores, axis=1)  # (b,)
            class_scores = tf.gather(scores, classes, axis=1, batch_dims=1)  # (b,)
        # Images do not interact in inference mode, so the gradient of the sum
        # contains each image's own gradient.
        gradients.append(tape.gradient(class_scores, batch).numpy()[..., 0])
        predicted.append(classes.numpy())

    maps = np.abs(np.concatenate(gradients))  # (k, 48, 48)
    peaks = maps.max(axis=(1, 2), keepdims=True)
    maps = np.divide(maps, peaks, out=np.zeros_like(maps), where=peaks > 0)
    return maps.astype(np.float32), np.concatenate(predicted).astype(np.int64)


def plot_saliency(
    images: np.ndarray,
    maps: np.ndarray,
    labels: Sequence[int] | np.ndarray | None,
    predicted: Sequence[int] | np.ndarray,
    model_name: str,
) -> Figure:
    """Plot each image beside its saliency map, one row per image.

    The image's title names the true class (omitted when `labels` is None), the
    map's title the predicted class, in red when the prediction is wrong.
    """
    count = len(images)
    if count == 0:
        raise ValueError("images is empty: pass at least one image")
    for name, values in (("maps", maps), ("labels", labels), ("predicted", predicted)):
        if values is not None and len(values) != count:
            raise ValueError(f"{name} has {len(values)} entries but images has {count}")

    figure = Figure(figsize=(4.2, 2.2 * count), layout="constrained")
    axes = figure.subplots(count, 2, squeeze=False)
    for row in range(count):
        image_axes, map_axes = axes[row]
        image_axes.imshow(images[row], cmap="gray", vmin=0, vmax=255)
        if labels is not None:
            image_axes.set_title(f"true: {CLASS_NAMES[labels[row]]}", fontsize=9)
        map_axes.imshow(maps[row], cmap="inferno", vmin=0.0, vmax=1.0)
        wrong = labels is not None and labels[row] != predicted[row]
        map_axes.set_title(
            f"predicted: {CLASS_NAMES[predicted[row]]}", fontsize=9, color="red" if wrong else "black"
        )
        image_axes.axis("off")
        map_axes.axis("off")
    figure.suptitle(f"Saliency maps: {model_name}")
    return figure


def gradient_ascent(
    model: keras.Model,
    layer_name: str,
    filter_indices: Iterable[int],
    *,
    steps: int = 40,
    step_size: float = 10.0,
    seed: int = 0,
) -> np.ndarray:
    """Find an input pattern that maximises each filter's mean activation.

    Each image starts as seeded uniform noise in [0.4, 0.6]. Each step adds
    `step_size` times the image's L2-normalised gradient of the filter's mean
    activation and clips the image to [0, 1], the model's input range.

    NOTE: The first Conv2D layer is linear in its input, so its mean activation
    grows with the mean pixel value times the kernel's weight sum. Its patterns
    therefore come out as uniform white or black images with edge effects, and
    only deeper layers give textures.

    Args:
        model: a model with Conv2D layers.
        layer_name: the name of one of its Conv2D layers.
        filter_indices: the filters to visualise, each in [0, filters).
        steps: number of gradient steps, at least 0 (0 returns the start noise).
        step_size: L2 norm of each step over one 48x48 image.
        seed: seed of the start noise.

    Returns:
        float32 images (len(filter_indices), 48, 48) in [0, 1].
    """
    if steps < 0:
        raise ValueError(f"steps must be at least 0, got {steps}")
    float32_model = float32_copy(model)
    layer = _conv_layer(float32_model, layer_name)
    indices = _checked_filter_indices(filter_indices, layer)
    extractor = keras.Model(float32_model.input, layer.output)

    rng = np.random.default_rng(seed)
    start = rng.uniform(0.4, 0.6, size=(len(indices), IMAGE_SIZE, IMAGE_SIZE, 1))
    patterns = tf.Variable(start.astype(np.float32))  # (n, 48, 48, 1)
    index_tensor = tf.constant(indices)

    def mean_activation() -> tf.Tensor:
        activations = extractor(patterns, training=False)  # (n, h, w, filters)
        selected = tf.gather(activations, index_tensor, axis=3, batch_dims=1)  # (n, h, w)
        return tf.reduce_mean(selected, axis=[1, 2])  # (n,)

    start_activation = mean_activation().numpy()
    for _ in range(steps):
        with tf.GradientTape() as tape:
            activation = mean_activation()
        gradients = tf.math.l2_normalize(tape.gradient(activation, patterns), axis=[1, 2, 3])
        patterns.assign(tf.clip_by_value(patterns + step_size * gradients, 0.0, 1.0))

    logger.info(
        "Gradient ascent on %s filters %s: mean activation %.3f -> %.3f over %d steps",
        layer_name,
        indices,
        float(start_activation.mean()),
        float(mean_activation().numpy().mean()),
        steps,
    )
    return patterns.numpy()[..., 0]


def _conv_layer(model: keras.Model, layer_name: str) -> keras.layers.Conv2D:
    names = conv_layer_names(model)
    if layer_name not in names:
        available = f"choose one of {names}" if names else "it has no Conv2D layers"
        raise ValueError(
            f"layer {layer_name!r} is not a Conv2D layer of model {model.name!r}: {available}"
        )
    return model.get_layer(layer_name)


def _checked_filter_indices(filter_indices: Iterable[int], layer: keras.layers.Conv2D) -> list[int]:
    indices = list(filter_indices)
    if not indices:
        raise ValueError(f"filter_indices is empty: pass at least one filter of layer {layer.name!r}")
    for index in indices:
        if not isinstance(index, numbers.Integral) or isinstance(index, bool):
            raise ValueError(f"filter index {index!r} is not an integer")
        if not 0 <= index < layer.filters:
            raise ValueError(
                f"filter index {index} is out of range for layer {layer.name!r}, "
                f"which has filters 0 to {layer.filters - 1}"
            )
    return [int(index) for index in indices]


def plot_filter_patterns(patterns: dict[str, np.ndarray], model_name: str) -> Figure:
    """Plot gradient-ascent patterns, one row per layer, each pattern with its own contrast."""
    if not patterns:
        raise ValueError("patterns is empty: pass at least one layer's patterns")
    columns = max(len(layer_patterns) for layer_patterns in patterns.values())

    figure = Figure(figsize=(1.2 * columns + 0.6, 1.3 * len(patterns) + 0.4), layout="constrained")
    axes = figure.subplots(len(patterns), columns, squeeze=False)
    for row, (layer_name, layer_patterns) in enumerate(patterns.items()):
        for column, cell in enumerate(axes[row]):
            cell.set_xticks([])
            cell.set_yticks([])
            if column >= len(layer_patterns):
                cell.axis("off")
                continue
            cell.imshow(layer_patterns[column], cmap="gray")
        axes[row, 0].set_ylabel(layer_name, fontsize=9)
    figure.suptitle(f"Filter patterns by gradient ascent: {model_name}")
    return figure


def layer_outputs(model: keras.Model, layer_name: str, images: np.ndarray) -> np.ndarray:
    """Compute a layer's feature maps, float32 (k, h, w, channels), for uint8 images (k, 48, 48)."""
    inputs = to_model_input(images)
    float32_model = float32_copy(model)
    feature_map_layers = [
        layer.name
        for layer in float32_model.layers
        if not isinstance(layer, keras.layers.InputLayer) and len(layer.output.shape) == 4
    ]
    if layer_name not in feature_map_layers:
        raise ValueError(
            f"layer {layer_name!r} of model {model.name!r} is missing or does not output "
            f"feature maps (batch, height, width, channels): choose one of {feature_map_layers}"
        )

    extractor = keras.Model(float32_model.input, float32_model.get_layer(layer_name).output)
    outputs = [extractor(batch, training=False).numpy() for batch in _batches(inputs)]
    if not outputs:
        return np.zeros((0, *extractor.output.shape[1:]), np.float32)
    return np.concatenate(outputs).astype(np.float32)


def plot_layer_outputs(
    images: np.ndarray,
    outputs: np.ndarray,
    layer_name: str,
    model_name: str,
    max_filters: int = 16,
) -> Figure:
    """Plot each image followed by its first `max_filters` feature maps, one row per image."""
    if max_filters < 1:
        raise ValueError(f"max_filters must be at least 1, got {max_filters}")
    if len(images) == 0 or len(images) != len(outputs) or np.ndim(outputs) != 4:
        raise ValueError(
            f"expected k >= 1 images and outputs of shape (k, height, width, channels), "
            f"got {len(images)} images and outputs of shape {np.shape(outputs)}"
        )
    shown_filters = min(max_filters, outputs.shape[3])

    figure_size = (1.1 * (shown_filters + 1) + 0.4, 1.3 * len(images) + 0.5)
    figure = Figure(figsize=figure_size, layout="constrained")
    axes = figure.subplots(len(images), shown_filters + 1, squeeze=False)
    for row, image in enumerate(images):
        axes[row, 0].imshow(image, cmap="gray", vmin=0, vmax=255)
        for channel in range(shown_filters):
            axes[row, channel + 1].imshow(outputs[row, :, :, channel], cmap="viridis")
        for cell in axes[row]:
            cell.axis("off")
    axes[0, 0].set_title("input", fontsize=8)
    for channel in range(shown_filters):
        axes[0, channel + 1].set_title(f"filter {channel}", fontsize=8)
    figure.suptitle(f"Outputs of {layer_name}: {model_name}")
    return figure


def _batches(inputs: np.ndarray) -> Iterable[np.ndarray]:
    for start in range(0, len(inputs), BATCH_SIZE):
        yield inputs[start : start + BATCH_SIZE]


# Stage entry points: the DAG's compute_saliency and visualize_filters tasks.

def _validation_images(config_indices: tuple[int, ...], splits, param: str) -> tuple[np.ndarray, np.ndarray]:
    count = len(splits.validation_labels)
    invalid = [index for index in config_indices if not 0 <= index < count]
    if invalid:
        raise ValueError(
            f"{param} {invalid} out of range: the validation set has {count} images, "
            f"so use indices 0..{count - 1}"
        )
    indices = np.asarray(config_indices, dtype=np.int64)
    return splits.validation_images[indices], splits.validation_labels[indices]


def _cnn_runs(trained: list[dict]) -> list[dict]:
    runs = [run for run in trained if run["model"] in CNN_MODEL_NAMES]
    if not runs:
        logger.info("No CNN was trained in this run; nothing to explain")
    return runs


def explain_with_saliency(config: PipelineConfig, trained: list[dict]) -> dict[str, dict]:
    """Compute saliency maps for the chosen validation images with each CNN.

    Stores one figure per model in its MLflow run and returns the artifact paths.
    """
    splits = load_splits(config)
    images, labels = _validation_images(config.saliency_images, splits, "saliency_images")
    artifacts: dict[str, dict] = {}
    for run in _cnn_runs(trained):
        model = tracking.load_keras_model(run["model_uri"])
        maps, predicted = saliency_maps(model, images)
        figure = plot_saliency(images, maps, labels, predicted, run["model"])
        tracking.log_figure(figure, tracking.SALIENCY_ARTIFACT, run_id=run["run_id"])
        logger.info("Saliency maps of %d images for %s stored in run %s", len(images), run["model"], run["run_id"])
        artifacts[run["model"]] = {"saliency": tracking.SALIENCY_ARTIFACT, "run_id": run["run_id"]}
    return {"saliency": artifacts}


def explain_filters(config: PipelineConfig, trained: list[dict]) -> dict[str, dict]:
    """Visualise filters by gradient ascent and show a layer's outputs, for each CNN."""
    splits = load_splits(config)
    images, _ = _validation_images(config.activation_images, splits, "activation_images")
    artifacts: dict[str, dict] = {}
    for run in _cnn_runs(trained):
        model = tracking.load_keras_model(run["model_uri"])
        patterns = {
            layer: gradient_ascent(
                model, layer, range(config.filters_per_layer), steps=config.ascent_steps, seed=config.seed
            )
            for layer in config.filter_layers
        }
        tracking.log_figure(plot_filter_patterns(patterns, run["model"]), tracking.FILTERS_ARTIFACT, run_id=run["run_id"])
        outputs = layer_outputs(model, config.activation_layer, images)
        tracking.log_figure(
            plot_layer_outputs(images, outputs, config.activation_layer, run["model"]),
            tracking.ACTIVATIONS_ARTIFACT,
            run_id=run["run_id"],
        )
        logger.info(
            "Filter patterns of %s and outputs of %s for %s stored in run %s",
            list(config.filter_layers), config.activation_layer, run["model"], run["run_id"],
        )
        artifacts[run["model"]] = {
            "filters": tracking.FILTERS_ARTIFACT, "activations": tracking.ACTIVATIONS_ARTIFACT, "run_id": run["run_id"]
        }
    return {"filters": artifacts}
