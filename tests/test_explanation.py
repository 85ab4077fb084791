"""Tests of saliency maps, gradient ascent, layer outputs and their figures on real Keras models."""

from __future__ import annotations

import io

import keras
import numpy as np
import pytest
from matplotlib.figure import Figure

from fer_tasks.config import IMAGE_SIZE
from fer_tasks.explanation import (
    float32_copy,
    gradient_ascent,
    layer_outputs,
    plot_filter_patterns,
    plot_layer_outputs,
    plot_saliency,
    saliency_maps,
)
from fer_tasks.models import build_cnn, build_dnn, to_model_input
from fer_tasks.synthetic import generate_faces


@pytest.fixture(scope="module")
def faces():
    return generate_faces(14, seed=0)


@pytest.fixture(scope="module")
def cnn(faces):
    """A CNN trained for one epoch on 14 synthetic faces, so its weights are not all at init."""
    keras.utils.set_random_seed(0)
    images, labels = faces
    model = build_cnn()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(to_model_input(images), labels, epochs=1, batch_size=7, verbose=0)
    return model


@pytest.fixture
def bfloat16_cnn():
    """A CNN built under the mixed_bfloat16 policy; the global policy is restored afterwards."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(1)
        model = build_cnn()
    finally:
        keras.config.set_dtype_policy(previous)
    return model


def activation_means(model, layer_name, filter_indices, patterns):
    """Mean activation of each filter on its own pattern, float32 (n,)."""
    extractor = keras.Model(model.input, model.get_layer(layer_name).output)
    activations = extractor(patterns[..., np.newaxis], training=False).numpy()
    return np.array([activations[i, :, :, f].mean() for i, f in enumerate(filter_indices)])


def test_model_input_scales_to_unit_range():
    images = np.array([np.zeros((48, 48)), np.full((48, 48), 255)], dtype=np.uint8)

    inputs = to_model_input(images)

    assert inputs.shape == (2, 48, 48, 1)
    assert inputs.dtype == np.float32
    assert inputs[0].max() == 0.0
    assert inputs[1].min() == 1.0


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((2, 48, 48), dtype=np.float32),
        np.zeros((48, 48), dtype=np.uint8),
        np.zeros((2, 48, 48, 1), dtype=np.uint8),
        np.zeros((2, 32, 32), dtype=np.uint8),
    ],
)
def test_model_input_rejects_bad_images(images):
    with pytest.raises(ValueError, match=r"uint8 of shape \(k, 48, 48\)"):
        to_model_input(images)


def test_float32_copy_of_bfloat16_model(bfloat16_cnn, faces):
    images, _ = faces
    assert bfloat16_cnn.get_layer("block1_conv1").compute_dtype == "bfloat16"

    copy = float32_copy(bfloat16_cnn)

    assert {variable.dtype for variable in copy.weights} == {"float32"}
    assert {layer.compute_dtype for layer in copy.layers} == {"float32"}
    inputs = to_model_input(images)
    expected = bfloat16_cnn.predict(inputs, verbose=0)
    actual = copy.predict(inputs, verbose=0)
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, atol=0.02)


def test_float32_copy_is_independent(cnn, faces):
    images, _ = faces
    inputs = to_model_input(images)
    copy = float32_copy(cnn)
    expected = cnn.predict(inputs, verbose=0)
    np.testing.assert_allclose(copy.predict(inputs, verbose=0), expected, atol=1e-6)

    copy.get_layer("predictions").set_weights(
        [np.zeros_like(weight) for weight in copy.get_layer("predictions").get_weights()]
    )

    assert np.abs(cnn.get_layer("predictions").get_weights()[0]).sum() > 0


def test_saliency_maps_shape_and_range(cnn, faces):
    images, _ = faces

    maps, predicted = saliency_maps(cnn, images[:5])

    assert maps.shape == (5, IMAGE_SIZE, IMAGE_SIZE)
    assert maps.dtype == np.float32
    assert np.isfinite(maps).all()
    assert maps.min() >= 0.0
    np.testing.assert_allclose(maps.max(axis=(1, 2)), 1.0)
    assert predicted.shape == (5,)
    assert predicted.dtype == np.int64


def test_saliency_predictions_match_model(cnn, faces):
    images, _ = faces

    _, predicted = saliency_maps(cnn, images)

    expected = cnn.predict(to_model_input(images), verbose=0).argmax(axis=1)
    np.testing.assert_array_equal(predicted, expected)


def test_saliency_maps_differ_across_images(cnn, faces):
    images, _ = faces

    maps, _ = saliency_maps(cnn, images[:4])

    for first in range(4):
        for second in range(first + 1, 4):
            assert not np.allclose(maps[first], maps[second]), (first, second)


def test_saliency_of_bfloat16_model_is_float32(bfloat16_cnn, faces):
    images, _ = faces

    maps, predicted = saliency_maps(bfloat16_cnn, images[:3])

    # The same weights computing in float32 give the same maps; bfloat16 would not.
    expected_maps, expected_predicted = saliency_maps(float32_copy(bfloat16_cnn), images[:3])
    assert maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected_maps, atol=1e-6)
    np.testing.assert_array_equal(predicted, expected_predicted)


def test_saliency_of_dnn(faces):
    images, _ = faces
    keras.utils.set_random_seed(2)

    maps, predicted = saliency_maps(build_dnn(), images[:2])

    assert maps.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert predicted.shape == (2,)


def test_saliency_of_no_images(cnn):
    maps, predicted = saliency_maps(cnn, np.zeros((0, 48, 48), dtype=np.uint8))

    assert maps.shape == (0, IMAGE_SIZE, IMAGE_SIZE)
    assert predicted.shape == (0,)


@pytest.mark.parametrize("layer_name", ["block1_conv1", "block2_conv1", "block3_conv2"])
def test_gradient_ascent_raises_activation(cnn, layer_name):
    filter_indices = [0, 3, 5]
    start = gradient_ascent(cnn, layer_name, filter_indices, steps=0, seed=4)

    patterns = gradient_ascent(cnn, layer_name, filter_indices, steps=15, seed=4)

    before = activation_means(cnn, layer_name, filter_indices, start)
    after = activation_means(cnn, layer_name, filter_indices, patterns)
    assert (after > before).all(), (before, after)


def test_gradient_ascent_shape_and_range(cnn):
    patterns = gradient_ascent(cnn, "block1_conv2", [1, 2], steps=5)

    assert patterns.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert patterns.dtype == np.float32
    assert patterns.min() >= 0.0
    assert patterns.max() <= 1.0


def test_gradient_ascent_start_is_low_amplitude_noise(cnn):
    start = gradient_ascent(cnn, "block1_conv1", [0], steps=0, seed=0)

    assert start.min() >= 0.4
    assert start.max() <= 0.6
    assert start.std() > 0.01


def test_gradient_ascent_seeded(cnn):
    first = gradient_ascent(cnn, "block2_conv2", [0, 1], steps=3, seed=5)
    again = gradient_ascent(cnn, "block2_conv2", [0, 1], steps=3, seed=5)
    other = gradient_ascent(cnn, "block2_conv2", [0, 1], steps=3, seed=6)

    np.testing.assert_allclose(first, again)
    assert not np.allclose(first, other)


def test_gradient_ascent_filters_differ(cnn):
    patterns = gradient_ascent(cnn, "block1_conv1", [0, 1], steps=10)

    assert not np.allclose(patterns[0], patterns[1])


def test_gradient_ascent_of_bfloat16_model(bfloat16_cnn):
    patterns = gradient_ascent(bfloat16_cnn, "block1_conv1", [0], steps=3)

    assert patterns.dtype == np.float32
    assert np.isfinite(patterns).all()


@pytest.mark.parametrize("layer_name", ["block9_conv1", "block1_relu1", "dense"])
def test_gradient_ascent_bad_layer_lists_conv_layers(cnn, layer_name):
    with pytest.raises(ValueError, match="not a Conv2D layer") as error:
        gradient_ascent(cnn, layer_name, [0], steps=1)

    assert "block1_conv1" in str(error.value)
    assert "block3_conv2" in str(error.value)


def test_gradient_ascent_model_without_conv_layers():
    with pytest.raises(ValueError, match="no Conv2D layers"):
        gradient_ascent(build_dnn(), "block1_dense1", [0], steps=1)


@pytest.mark.parametrize(
    ("filter_indices", "message"),
    [
        ([32], "out of range"),
        ([0, -1], "out of range"),
        ([1.5], "not an integer"),
        ([True], "not an integer"),
        ([], "empty"),
    ],
)
def test_gradient_ascent_bad_filter_index(cnn, filter_indices, message):
    with pytest.raises(ValueError, match=message):
        gradient_ascent(cnn, "block1_conv1", filter_indices, steps=1)


def test_gradient_ascent_negative_steps(cnn):
    with pytest.raises(ValueError, match="steps"):
        gradient_ascent(cnn, "block1_conv1", [0], steps=-1)


@pytest.mark.parametrize(
    ("layer_name", "shape"),
    [
        ("block1_conv2", (3, 48, 48, 32)),
        ("block2_relu1", (3, 24, 24, 64)),
        ("block3_pool", (3, 6, 6, 128)),
    ],
)
def test_layer_outputs_shape(cnn, faces, layer_name, shape):
    images, _ = faces

    outputs = layer_outputs(cnn, layer_name, images[:3])

    assert outputs.shape == shape
    assert outputs.dtype == np.float32
    assert np.isfinite(outputs).all()


def test_layer_outputs_match_submodel(cnn, faces):
    images, _ = faces
    submodel = keras.Model(cnn.input, cnn.get_layer("block1_conv1").output)

    outputs = layer_outputs(cnn, "block1_conv1", images[:2])

    expected = submodel.predict(to_model_input(images[:2]), verbose=0)
    np.testing.assert_allclose(outputs, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer_name", ["missing", "dense", "flatten"])
def test_layer_outputs_bad_layer(cnn, faces, layer_name):
    images, _ = faces

    with pytest.raises(ValueError, match="choose one of") as error:
        layer_outputs(cnn, layer_name, images[:1])

    assert "block1_conv1" in str(error.value)


def figure_renders(figure):
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue().startswith(b"\x89PNG")


def test_plot_saliency_axes(cnn, faces):
    images, labels = faces
    maps, predicted = saliency_maps(cnn, images[:3])

    figure = plot_saliency(images[:3], maps, labels[:3], predicted, "cnn")

    assert isinstance(figure, Figure)
    assert len(figure.axes) == 6
    assert figure.axes[0].get_title().startswith("true: ")
    assert figure.axes[1].get_title().startswith("predicted: ")
    assert figure_renders(figure)


def test_plot_saliency_without_labels(cnn, faces):
    images, _ = faces
    maps, predicted = saliency_maps(cnn, images[:2])

    figure = plot_saliency(images[:2], maps, None, predicted, "cnn")

    assert len(figure.axes) == 4
    assert figure.axes[0].get_title() == ""


def test_plot_saliency_length_mismatch(faces):
    images, labels = faces

    with pytest.raises(ValueError, match="maps has 2 entries"):
        plot_saliency(images[:3], np.zeros((2, 48, 48)), labels[:3], [0, 0, 0], "cnn")


def test_plot_filter_patterns_axes():
    patterns = {
        "block1_conv1": np.random.default_rng(0).random((4, 48, 48)),
        "block2_conv1": np.random.default_rng(1).random((3, 48, 48)),
    }

    figure = plot_filter_patterns(patterns, "cnn")

    assert len(figure.axes) == 8
    assert figure.axes[0].get_ylabel() == "block1_conv1"
    assert figure.axes[4].get_ylabel() == "block2_conv1"
    assert not figure.axes[7].axison
    assert figure_renders(figure)


def test_plot_filter_patterns_empty():
    with pytest.raises(ValueError, match="patterns is empty"):
        plot_filter_patterns({}, "cnn")


@pytest.mark.parametrize(("max_filters", "columns"), [(16, 17), (4, 5), (64, 33)])
def test_plot_layer_outputs_axes(cnn, faces, max_filters, columns):
    images, _ = faces
    outputs = layer_outputs(cnn, "block1_conv2", images[:2])

    figure = plot_layer_outputs(images[:2], outputs, "block1_conv2", "cnn", max_filters=max_filters)

    assert len(figure.axes) == 2 * columns
    assert figure_renders(figure)


def test_plot_layer_outputs_bad_arguments(faces):
    images, _ = faces
    outputs = np.zeros((2, 24, 24, 8), dtype=np.float32)

    with pytest.raises(ValueError, match="max_filters"):
        plot_layer_outputs(images[:2], outputs, "block2_conv1", "cnn", max_filters=0)
    with pytest.raises(ValueError, match="outputs of shape"):
        plot_layer_outputs(images[:3], outputs, "block2_conv1", "cnn")
