"""Pipeline configuration: defaults, conversion from params and rejected values."""

from __future__ import annotations

import pytest

from fer_tasks.config import DEFAULTS, PipelineConfig


def test_from_params_round_trips_to_dict():
    assert PipelineConfig.from_params(DEFAULTS.to_dict()) == DEFAULTS


def test_from_params_ignores_unknown_keys_and_converts_lists():
    config = PipelineConfig.from_params({"models": ["cnn"], "epochs": 3, "unrelated": 1})
    assert config.models == ("cnn",)
    assert config.epochs == 3


def test_empty_paths_select_builtin_data():
    assert DEFAULTS.uses_builtin_data
    assert not PipelineConfig(train_csv="train.csv", test_csv="test.csv").uses_builtin_data


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"models": ("cnn", "resnet")}, "models must be a non-empty subset"),
        ({"models": ()}, "models must be a non-empty subset"),
        ({"validation_mode": "random"}, "validation_mode must be"),
        ({"validation_fraction": 0.0}, "validation_fraction must be in"),
        ({"validation_fraction": 0.6}, "validation_fraction must be in"),
        ({"report_language": "fr"}, "report_language must be one of"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"test_csv": "test.csv"}, "test_csv is set but train_csv is empty"),
        ({"filter_layers": ("block9_conv1",)}, "unknown CNN layer"),
        ({"activation_layer": "dense"}, "unknown CNN layer"),
    ],
)
def test_invalid_values_are_rejected(values, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig(**values)
