"""Speed settings: precision resolution, thread counts, the fused batch norm and the benchmark's helpers."""

from __future__ import annotations

import gzip

import numpy as np
import pytest

from fer_tasks.config import PipelineConfig
from fer_tasks.performance import (
    cpu_flags,
    native_bfloat16_flags,
    resolve_precision,
    thread_counts,
    training_threads,
)

NATIVE = frozenset({"avx512f", "avx512_bf16"})
AMX = frozenset({"avx512f", "amx_tile", "amx_bf16"})
EMULATED = frozenset({"avx2", "avx512f"})


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}


def test_cpu_flags_empty_without_cpuinfo(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()


@pytest.mark.parametrize(
    ("requested", "flags", "name", "policy"),
    [
        ("auto", NATIVE, "bfloat16", "mixed_bfloat16"),
        ("auto", AMX, "bfloat16", "mixed_bfloat16"),
        ("auto", EMULATED, "float32", "float32"),
        ("auto", frozenset(), "float32", "float32"),
        ("float32", NATIVE, "float32", "float32"),
        ("bfloat16", NATIVE, "bfloat16", "mixed_bfloat16"),
        ("bfloat16", EMULATED, "bfloat16", "mixed_bfloat16"),
    ],
)
def test_precision_resolution(requested, flags, name, policy):
    precision = resolve_precision(requested, flags)
    assert precision.name == name
    assert precision.policy == policy


def test_auto_precision_says_why_it_falls_back():
    reason = resolve_precision("auto", EMULATED).reason
    assert "avx512_bf16" in reason
    assert "emulated" in reason


def test_forced_bfloat16_warns_when_emulated():
    assert "emulates" in resolve_precision("bfloat16", EMULATED).reason
    assert native_bfloat16_flags(AMX) == ["amx_bf16"]


def test_invalid_precision_rejected():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("float16", NATIVE)
    with pytest.raises(ValueError, match="precision must be one of"):
        PipelineConfig(precision="fp16")


@pytest.mark.parametrize(
    ("parallel", "cores", "expected"),
    [(1, 2, (2, 2)), (3, 2, (1, 1)), (2, 2, (1, 1)), (3, 8, (2, 2)), (3, 16, (5, 5)), (1, 1, (1, 1))],
)
def test_thread_counts_share_the_cores(parallel, cores, expected):
    assert thread_counts(parallel, cores) == expected


def test_training_threads_follow_pool_and_models(monkeypatch):
    monkeypatch.setattr("fer_tasks.performance.available_cores", lambda: 4)
    monkeypatch.delenv("FER_TF_INTRA_OP_THREADS", raising=False)
    monkeypatch.delenv("FER_TF_INTER_OP_THREADS", raising=False)
    monkeypatch.setenv("FER_TRAINING_POOL_SLOTS", "3")
    assert training_threads(3) == (1, 1)
    # A run that trains one model has the cores to itself.
    assert training_threads(1) == (4, 4)
    monkeypatch.setenv("FER_TRAINING_POOL_SLOTS", "2")
    assert training_threads(3) == (2, 2)
    monkeypatch.setenv("FER_TF_INTRA_OP_THREADS", "3")
    assert training_threads(3) == (3, 2)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("FER_TRAINING_POOL_SLOTS", "0", "FER_TRAINING_POOL_SLOTS must be a whole number"),
        ("FER_TRAINING_POOL_SLOTS", "three", "FER_TRAINING_POOL_SLOTS must be a whole number"),
        ("FER_TF_INTRA_OP_THREADS", "two", "FER_TF_INTRA_OP_THREADS must be a whole number"),
        ("FER_TF_INTER_OP_THREADS", "-1", "FER_TF_INTER_OP_THREADS must be 0 or more"),
    ],
)
def test_invalid_thread_settings_rejected(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        training_threads(3)


def test_fused_batch_norm_matches_keras():
    import keras

    from fer_tasks.models import FusedBatchNormalization

    inputs = np.random.default_rng(0).normal(2.0, 3.0, size=(8, 6, 6, 4)).astype(np.float32)
    plain = keras.layers.BatchNormalization(momentum=0.9)
    fused = FusedBatchNormalization(momentum=0.9)
    plain.build(inputs.shape)
    fused.build(inputs.shape)
    fused.set_weights([weight + 0.5 for weight in plain.get_weights()])
    plain.set_weights(fused.get_weights())

    expected = plain(inputs, training=True).numpy()
    actual = fused(inputs, training=True).numpy()
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)
    for plain_weight, fused_weight in zip(plain.get_weights(), fused.get_weights(), strict=True):
        np.testing.assert_allclose(fused_weight, plain_weight, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        fused(inputs, training=False).numpy(), plain(inputs, training=False).numpy(), rtol=1e-5, atol=1e-5
    )


def test_fused_batch_norm_takes_bfloat16():
    import keras

    from fer_tasks.models import FusedBatchNormalization

    inputs = np.random.default_rng(1).normal(size=(4, 6, 6, 3)).astype(np.float32)
    layer = FusedBatchNormalization(dtype="mixed_bfloat16")
    outputs = layer(inputs, training=True)
    assert keras.backend.standardize_dtype(outputs.dtype) == "bfloat16"
    assert layer.moving_mean.dtype == "float32"
    assert not np.allclose(layer.moving_mean.numpy(), 0.0)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_standard_copy_keeps_weights_and_policy(policy):
    from fer_tasks.models import FusedBatchNormalization, build_model, standard_copy
    from fer_tasks.performance import dtype_policy

    with dtype_policy(policy):
        model = build_model("cnn", fused_batch_norm=True)
    images = np.random.default_rng(2).random((3, 48, 48, 1)).astype(np.float32)
    copy = standard_copy(model)
    assert any(isinstance(layer, FusedBatchNormalization) for layer in model.layers)
    assert not any(isinstance(layer, FusedBatchNormalization) for layer in copy.layers)
    assert copy.name == "cnn"
    assert copy.get_layer("block1_conv1").compute_dtype == model.get_layer("block1_conv1").compute_dtype
    np.testing.assert_allclose(copy.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)


def test_forward_flops_of_cnn():
    from fer_tasks.benchmark import forward_flops
    from fer_tasks.models import build_model

    convolutions = [(48, 1, 32), (48, 32, 32), (24, 32, 64), (24, 64, 64), (12, 64, 128), (12, 128, 128)]
    expected = sum(2 * size * size * 9 * channels_in * channels_out for size, channels_in, channels_out in convolutions)
    expected += 2 * (6 * 6 * 128 * 213 + 213 * 7)
    assert forward_flops(build_model("cnn")) == expected


def test_naive_parser_matches_fast_parser(tmp_path):
    from fer_tasks.benchmark import parse_naive
    from fer_tasks.data import load_csv

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(5, 2304))
    rows = [f"{index % 7},{' '.join(map(str, row))}" for index, row in enumerate(pixels)]
    path = tmp_path / "train.csv.gz"
    path.write_bytes(gzip.compress(("label,feature\n" + "\n".join(rows) + "\n").encode()))

    images, labels = parse_naive(path)
    dataset = load_csv(path)
    assert np.array_equal(images, dataset.images)
    assert labels.tolist() == dataset.labels.tolist()
    assert parse_naive(path, rows=2)[0].shape == (2, 48, 48)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bfloat16", "float32"])
def test_train_model_records_precision(tracking_store, precision):
    import keras

    from fer_tasks import tracking
    from fer_tasks.explanation import saliency_maps
    from fer_tasks.tracking import RunContext
    from fer_tasks.training import train_model

    config = PipelineConfig(
        models=("cnn",), epochs=1, batch_size=32, builtin_rows=140, builtin_test_rows=14, precision=precision
    )
    context = RunContext(dag_run_id=f"manual__{precision}", task_id="train_cnn")
    parent = tracking.start_pipeline_run(config.experiment_name, context, config.to_dict())
    result = train_model(config, "cnn", parent, context)

    params = tracking.run_summary(result["run_id"])["params"]
    assert params["precision"] == precision
    assert params["precision_used"] == precision
    # Another test in this process may have fixed TensorFlow's threads already, so only presence is checked.
    assert "intra_op_threads" in params
    model = tracking.load_keras_model(result["model_uri"])
    assert [type(layer).__name__ for layer in model.layers].count("BatchNormalization") == 3
    expected_dtype = "bfloat16" if precision == "bfloat16" else "float32"
    assert model.get_layer("block1_conv1").compute_dtype == expected_dtype
    # The training policy does not leak into models built after the task.
    assert keras.config.dtype_policy().name == "float32"
    images = np.random.default_rng(4).integers(0, 256, size=(2, 48, 48), dtype=np.uint8)
    maps, _ = saliency_maps(model, images)
    assert maps.dtype == np.float32
    assert maps.shape == (2, 48, 48)


def test_naive_parser_with_object_strings(tmp_path):
    from fer_tasks.benchmark import parse_naive

    row = " ".join(str(value % 256) for value in range(2304))
    path = tmp_path / "train.csv"
    path.write_text("label,feature\n" + "\n".join(f"{label},{row}" for label in range(3)) + "\n")
    images, labels = parse_naive(path, object_strings=True)
    expected, _ = parse_naive(path)
    assert labels.tolist() == [0, 1, 2]
    assert np.array_equal(images, expected)


@pytest.mark.parametrize(
    ("requested", "model_name", "expected"),
    [("auto", "dnn", "float32"), ("bfloat16", "dnn", "bfloat16"), ("float32", "cnn", "float32"),
     ("bfloat16", "cnn_aug", "bfloat16")],
)
def test_training_precision_per_model(requested, model_name, expected):
    from fer_tasks.training import resolve_training_precision

    precision = resolve_training_precision(PipelineConfig(precision=requested), model_name)
    assert precision.name == expected


def test_auto_precision_of_cnn_follows_cpu():
    from fer_tasks.performance import resolve_precision
    from fer_tasks.training import resolve_training_precision

    precision = resolve_training_precision(PipelineConfig(precision="auto"), "cnn")
    assert precision.name == resolve_precision("auto").name
