"""Model definitions: layer structure and parameter counts."""

from __future__ import annotations

import pytest

from fer_tasks.config import CNN_CONV_LAYERS, NUM_CLASSES
from fer_tasks.models import build_cnn, build_dnn, build_model, conv_layer_names

CNN_PARAMETERS = 1_270_543


def test_cnn_has_about_1_27_million_parameters():
    assert build_cnn().count_params() == CNN_PARAMETERS


def test_dnn_parameters_within_one_percent_of_cnn():
    cnn = build_cnn().count_params()
    dnn = build_dnn().count_params()
    assert abs(dnn - cnn) / cnn <= 0.01


def test_cnn_block_structure():
    types = [type(layer).__name__ for layer in build_cnn().layers[1:]]
    block = ["Conv2D", "Activation", "Conv2D", "Activation", "BatchNormalization", "MaxPooling2D", "Dropout"]
    assert types[: 3 * len(block)] == block * 3
    assert types[3 * len(block) :] == ["Flatten", "Dense", "Dropout", "Dense"]


def test_dnn_block_structure():
    types = [type(layer).__name__ for layer in build_dnn().layers[1:]]
    block = ["Dense", "Dense", "BatchNormalization", "Dropout"]
    assert types == ["Flatten", *block * 4, "Dense"]


def test_conv_layer_names_match_config():
    assert conv_layer_names(build_cnn()) == list(CNN_CONV_LAYERS)


@pytest.mark.parametrize("name", ["cnn_aug", "cnn", "dnn"])
def test_models_output_seven_probabilities(name):
    model = build_model(name)
    assert model.name == name
    assert model.output_shape == (None, NUM_CLASSES)
    assert model.layers[-1].get_config()["activation"] == "softmax"


def test_unknown_model_name_is_rejected():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
