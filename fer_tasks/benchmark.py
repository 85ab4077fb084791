"""Benchmark of loading and training speed: `make bench`, or `python -m fer_tasks.benchmark`.

The benchmark measures, in one run on this machine:

- parsing: the full training file into arrays, against only decompressing it and
  against a plain pandas `str.split` parser, and a cache hit;
- TensorFlow's float32 and bfloat16 matrix-multiply FLOP/s;
- training throughput, validation accuracy and peak memory of each model, in
  float32 and in bfloat16, each training in its own process;
- levers: batch sizes, oneDNN off, and three trainings sharing the cores at once
  against one after another, with and without the derived thread counts;
- orchestration: a DAG run on the built-in data against the same steps in one
  Python process.

It uses the real FER2013 files when `FER_DATA_DIR` (default ../shared/fer2013
beside the project) contains train.csv.gz, and the built-in data otherwise. It writes
`benchmarks/results.json` and `docs/benchmarks.md`. Each measurement that trains
runs in a child process (`python -m fer_tasks.benchmark worker ...`), so threads,
the dtype policy and peak memory are those of one fresh process, like an Airflow
task's.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fer_tasks.config import PROJECT_ROOT

logger = logging.getLogger("fer_tasks.benchmark")

DEFAULT_DATA_DIR = PROJECT_ROOT.parent / "shared" / "fer2013"
RESULTS_PATH = PROJECT_ROOT / "benchmarks" / "results.json"
DOC_PATH = PROJECT_ROOT / "docs" / "benchmarks.md"

# Bounds of the targets: (key, comparison, bound).
TARGETS = (
    ("augmentation_overhead", "<=", 1.10),
    ("parse_vs_decompress", "<=", 3.0),
    ("parse_speedup_vs_naive", ">=", 10.0),
    ("cnn_flops_fraction", ">=", 0.8),
    ("bf16_speedup", ">=", 1.4),
    ("bf16_accuracy_gap_points", "<=", 1.0),
    ("orchestration_overhead", "<=", 1.15),
)


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run. `quick` shrinks everything for development."""

    quick: bool
    train_rows: int  # training rows per epoch of the model trainings (0: all)
    epochs: int  # epochs of each model training; the first one is not timed
    batch_size: int
    naive_rows: int  # rows the pandas parser reads (0: all)
    interleaved_rows: int
    interleaved_rounds: int
    lever_rows: int
    lever_epochs: int
    lever_batch_sizes: tuple[int, ...]
    dag_epochs: int
    dag_builtin_rows: int

    @classmethod
    def create(cls, quick: bool) -> Plan:
        if quick:
            return cls(True, 1280, 2, 64, 2000, 640, 2, 640, 2, (64, 128), 2, 700)
        return cls(False, 0, 2, 64, 0, 3200, 3, 2560, 2, (64, 128, 256), 12, 3500)


# ---------------------------------------------------------------------------
# Counting FLOPs


def forward_flops(model: Any) -> int:
    """Count the forward pass's multiply-add FLOPs per image (2 per multiply-add).

    Counts Conv2D and Dense layers, which hold nearly all the arithmetic; ReLU,
    batch normalisation, pooling and softmax add well under 1% for these models.
    """
    import keras

    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            height, width = layer.output.shape[1:3]
            kernel_height, kernel_width, channels_in, channels_out = layer.kernel.shape
            total += 2 * height * width * kernel_height * kernel_width * channels_in * channels_out
        elif isinstance(layer, keras.layers.Dense):
            units_in, units_out = layer.kernel.shape
            total += 2 * units_in * units_out
    return int(total)


# ---------------------------------------------------------------------------
# Parsing


def parse_naive(path: Path, rows: int = 0, object_strings: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Parse a label,feature file the plain pandas way: `read_csv`, then `str.split` per row.

    Reads in chunks of 4,096 rows, so the lists of pixel strings stay small.
    pandas 3 stores strings in Arrow arrays and splits them in C++. With
    `object_strings` it stores Python `str` objects, as pandas 2 did by default.
    """
    import warnings

    import pandas as pd

    images, labels = [], []
    with warnings.catch_warnings():
        # NOTE: pandas 3.1 warns that it drops the "future.infer_string" option in
        # pandas 4, which leaves only Arrow strings.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        with pd.option_context("future.infer_string", not object_strings):
            for chunk in pd.read_csv(path, chunksize=4096, nrows=rows or None):
                pixels = np.array(chunk["feature"].str.split(" ").tolist(), dtype=np.uint8)
                images.append(pixels.reshape(-1, 48, 48))
                labels.append(chunk["label"].to_numpy())
    return np.concatenate(images), np.concatenate(labels)


def best_seconds(function, repeats: int) -> float:
    """Return the shortest wall time of `repeats` calls of `function`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def bench_parse(train_path: Path, plan: Plan) -> dict[str, Any]:
    """Time decompressing, parsing, a cache hit and the pandas parser on one file."""
    from fer_tasks.data import load_csv, load_csv_cached

    raw = train_path.read_bytes()
    if train_path.suffix == ".gz":
        decompress = best_seconds(lambda: gzip.decompress(raw), 3)
    else:
        decompress = best_seconds(lambda: train_path.read_bytes(), 3)
    parse = best_seconds(lambda: load_csv(train_path), 2)
    dataset = load_csv(train_path)

    with tempfile.TemporaryDirectory() as cache:
        load_csv_cached(train_path, cache_dir=cache)
        cache_hit = best_seconds(lambda: load_csv_cached(train_path, cache_dir=cache), 3)

    naive_rows = plan.naive_rows
    started = time.perf_counter()
    naive_images, naive_labels = parse_naive(train_path, naive_rows)
    naive = time.perf_counter() - started
    count = len(naive_labels)
    if not (
        np.array_equal(naive_images, dataset.images[:count]) and np.array_equal(naive_labels, dataset.labels[:count])
    ):
        raise RuntimeError(f"the fast parser and the pandas parser disagree on {train_path}")
    # Scale the pandas time to the whole file when it read only a part.
    naive_full = naive * len(dataset.labels) / count
    object_rows = min(len(dataset.labels), plan.naive_rows or 8192)
    started = time.perf_counter()
    parse_naive(train_path, object_rows, object_strings=True)
    naive_object = (time.perf_counter() - started) * len(dataset.labels) / object_rows
    return {
        "file": str(train_path),
        "rows": int(len(dataset.labels)),
        "decompress_seconds": round(decompress, 4),
        "parse_seconds": round(parse, 4),
        "cache_hit_seconds": round(cache_hit, 4),
        "naive_seconds": round(naive_full, 3),
        "naive_rows_timed": int(count),
        "parse_vs_decompress": round(parse / decompress, 3),
        "cache_hit_vs_decompress": round(cache_hit / decompress, 3),
        "parse_speedup_vs_naive": round(naive_full / parse, 2),
        "naive_object_strings_seconds": round(naive_object, 3),
        "naive_object_strings_rows_timed": int(object_rows),
        "parse_speedup_vs_naive_object_strings": round(naive_object / parse, 2),
    }


# ---------------------------------------------------------------------------
# Worker processes (each measurement that imports TensorFlow runs in its own)


def peak_memory_mb() -> float:
    """Return this process's peak resident memory in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_matmul(size: int = 2048, repeats: int = 7) -> dict[str, Any]:
    """Measure TensorFlow's float32 and bfloat16 matrix-multiply FLOP/s on square matrices."""
    import tensorflow as tf

    results = {}
    for dtype in (tf.float32, tf.bfloat16):
        left = tf.cast(tf.random.stateless_uniform((size, size), seed=(1, 2)), dtype)
        right = tf.cast(tf.random.stateless_uniform((size, size), seed=(3, 4)), dtype)
        steps = 8

        @tf.function
        def multiply(left=left, right=right, steps=steps):
            total = tf.zeros((), tf.float32)
            for _ in tf.range(steps):
                total += tf.cast(tf.reduce_sum(tf.linalg.matmul(left, right)[0, :1]), tf.float32)
            return total

        multiply().numpy()  # trace and warm up
        seconds = best_seconds(lambda: multiply().numpy(), repeats)
        results[f"matmul_{dtype.name}_gflops"] = round(2 * size**3 * steps / seconds / 1e9, 1)
    results["matmul_size"] = size
    return results


def compiled_model(
    model_name: str,
    precision: str,
    config: Any,
    images: np.ndarray,
    labels: np.ndarray,
    fused_batch_norm: bool = True,
) -> tuple[Any, Any]:
    """Build and compile a fresh model as `fit_model` does; return it with its shuffled training dataset."""
    import keras

    from fer_tasks.models import build_model
    from fer_tasks.performance import dtype_policy
    from fer_tasks.training import make_dataset

    keras.utils.set_random_seed(config.seed)
    with dtype_policy("mixed_bfloat16" if precision == "bfloat16" else "float32"):
        model = build_model(model_name, fused_batch_norm=fused_batch_norm)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    dataset = make_dataset(
        images, labels, config.batch_size, shuffle=True, augment=model_name == "cnn_aug", seed=config.seed
    )
    return model, dataset


def worker_train(arguments: dict[str, Any]) -> dict[str, Any]:
    """Train one model as the pipeline does and return timings, accuracy and peak memory."""
    import keras

    from fer_tasks.config import PipelineConfig
    from fer_tasks.datasets import load_splits
    from fer_tasks.training import configure_threads, validation_dataset

    config = PipelineConfig.from_params(arguments["config"])
    intra, inter = configure_threads(arguments.get("parallel_tasks", 1))
    splits = load_splits(config)
    rows = arguments.get("train_rows") or len(splits.train_labels)
    images, labels = splits.train_images[:rows], splits.train_labels[:rows]
    model_name = arguments["model"]
    fused = arguments.get("fused_batch_norm", True)
    model, train = compiled_model(model_name, arguments["precision"], config, images, labels, fused)
    validation = validation_dataset(splits, config)
    epoch_seconds: list[float] = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.started)

    started = time.perf_counter()
    model.fit(train, epochs=config.epochs, callbacks=[EpochTimer()], verbose=0)
    fit_seconds = time.perf_counter() - started
    _, validation_accuracy = model.evaluate(validation, verbose=0)
    # The first epoch also traces the step function; later epochs show the steady rate.
    timed = epoch_seconds[1:] or epoch_seconds
    seconds_per_epoch = float(np.median(timed))
    images_per_second = rows / seconds_per_epoch
    flops = forward_flops(model)
    return {
        "model": model_name,
        "precision": arguments["precision"],
        "batch_size": config.batch_size,
        "train_rows": int(rows),
        "epochs": config.epochs,
        "epoch_seconds": [round(value, 3) for value in epoch_seconds],
        "seconds_per_epoch": round(seconds_per_epoch, 3),
        "fit_seconds": round(fit_seconds, 3),
        "images_per_second": round(images_per_second, 1),
        "forward_flops_per_image": flops,
        "training_gflops": round(3 * flops * images_per_second / 1e9, 1),
        "validation_accuracy": round(float(validation_accuracy), 4),
        "validation_rows": int(len(splits.validation_labels)),
        "intra_op_threads": intra,
        "inter_op_threads": inter,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "fused_batch_norm": fused,
        "peak_memory_mb": round(peak_memory_mb(), 1),
    }


INTERLEAVED_VARIANTS = (("cnn", "float32"), ("cnn_aug", "float32"), ("cnn", "bfloat16"), ("cnn_aug", "bfloat16"))


def worker_interleaved(arguments: dict[str, Any]) -> dict[str, Any]:
    """Time epochs of the CNN with and without augmentation, in both precisions, taking turns.

    Each round runs one epoch of every variant, in an order that rotates from
    round to round, so a change in the machine's other load hits all variants
    alike. The ratios come from the fastest epoch of each variant.
    """
    from fer_tasks.config import PipelineConfig
    from fer_tasks.datasets import load_splits
    from fer_tasks.training import configure_threads

    config = PipelineConfig.from_params(arguments["config"])
    configure_threads(1)
    splits = load_splits(config)
    rows = arguments["train_rows"] or len(splits.train_labels)
    images, labels = splits.train_images[:rows], splits.train_labels[:rows]
    variants = {}
    for model_name, precision in INTERLEAVED_VARIANTS:
        model, dataset = compiled_model(model_name, precision, config, images, labels)
        model.fit(dataset.take(2), epochs=1, verbose=0)  # trace the step function
        variants[(model_name, precision)] = (model, dataset)

    seconds: dict[str, list[float]] = {f"{name}_{precision}": [] for name, precision in variants}
    order = list(variants)
    for round_index in range(arguments["rounds"]):
        shift = round_index % len(order)
        for key in order[shift:] + order[:shift]:
            model, dataset = variants[key]
            started = time.perf_counter()
            model.fit(dataset, epochs=1, verbose=0)
            seconds[f"{key[0]}_{key[1]}"].append(round(time.perf_counter() - started, 3))
    best = {key: min(values) for key, values in seconds.items()}
    return {
        "train_rows": int(rows),
        "batch_size": config.batch_size,
        "epoch_seconds": seconds,
        "best_seconds_per_epoch": best,
        "images_per_second": {key: round(rows / value, 1) for key, value in best.items()},
    }


def worker_pipeline(arguments: dict[str, Any]) -> dict[str, Any]:
    """Run the DAG's steps one after another in this process, as `fer_pipeline` orders them."""
    from fer_tasks import tracking
    from fer_tasks.config import PipelineConfig
    from fer_tasks.datasets import load_splits, summarize
    from fer_tasks.evaluation import evaluate_trained_models
    from fer_tasks.explanation import explain_filters, explain_with_saliency
    from fer_tasks.registry import (
        choose_best_run,
        find_unchanged_run,
        register_and_promote,
        report_section,
        training_fingerprint,
    )
    from fer_tasks.report import publish
    from fer_tasks.tracking import RunContext
    from fer_tasks.training import train_model

    config = PipelineConfig.from_params(arguments["config"])
    dag_run_id = f"benchmark__{int(time.time())}"

    def context(task_id: str) -> RunContext:
        return RunContext(dag_id="fer_pipeline", dag_run_id=dag_run_id, task_id=task_id, try_number=1)

    summary = summarize(load_splits(config))
    find_unchanged_run(config, summary["sha256"])
    parent = tracking.start_pipeline_run(
        config.experiment_name,
        context("start_tracking"),
        {**config.to_dict(), "data_sha256": summary["sha256"]},
        tags={tracking.TAG_FINGERPRINT: training_fingerprint(config, data_sha256=summary["sha256"])},
        metrics={"parse_seconds": summary["parse_seconds"]},
    )
    trained = [
        train_model(config, model_name, parent, context(f"train_{model_name}")) for model_name in config.models
    ]
    evaluation = evaluate_trained_models(config, trained)
    saliency = explain_with_saliency(config, trained)
    filters = explain_filters(config, trained)
    decision = register_and_promote(
        config, choose_best_run(trained, evaluation), summary["sha256"], dag_run_id
    )
    registry = {**decision, "report_section": report_section(decision)}
    publish(config, context("write_report"), summary, parent, trained, evaluation, {**saliency, **filters}, registry)
    return {"models": {run["model"]: run["seconds_per_epoch"] for run in trained}}


def run_worker(kind: str, arguments: dict[str, Any], environment: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one worker in a child process and return its JSON result with the process's wall time."""
    command = [sys.executable, "-m", "fer_tasks.benchmark", "worker", kind, json.dumps(arguments)]
    started = time.perf_counter()
    result = subprocess.run(
        command, env={**os.environ, **(environment or {})}, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"benchmark worker {kind} {arguments} failed:\n{result.stderr[-3000:]}")
    output = json.loads(result.stdout.strip().splitlines()[-1])
    output["process_seconds"] = round(wall, 3)
    return output


def start_worker(kind: str, arguments: dict[str, Any], environment: dict[str, str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "fer_tasks.benchmark", "worker", kind, json.dumps(arguments)]
    return subprocess.Popen(
        command, env={**os.environ, **environment}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


# ---------------------------------------------------------------------------
# Sections of the benchmark


def data_config(data_dir: Path | None, plan: Plan, **overrides: Any) -> dict[str, Any]:
    """Return PipelineConfig params for the benchmark's trainings on the real or the built-in data."""
    params: dict[str, Any] = {"epochs": plan.epochs, "batch_size": plan.batch_size, "seed": 42}
    if data_dir is not None:
        params["train_csv"] = str(data_dir / "train.csv.gz")
        params["test_csv"] = str(data_dir / "test.csv.gz")
    return {**params, **overrides}


def bench_training(data_dir: Path | None, plan: Plan) -> list[dict[str, Any]]:
    """Train each model in its own process, one after another, as a training task does.

    Every model trains in bfloat16, the default on CPUs with native support, and
    the CNN also in float32 for the accuracy comparison.
    """
    runs = []
    for model_name, precision in (
        ("cnn", "float32"),
        ("cnn", "bfloat16"),
        ("cnn_aug", "bfloat16"),
        ("dnn", "bfloat16"),
    ):
        logger.info("Training %s in %s", model_name, precision)
        run = run_worker(
            "train",
            {
                "config": data_config(data_dir, plan),
                "model": model_name,
                "precision": precision,
                "train_rows": plan.train_rows,
            },
        )
        logger.info(
            "%s %s: %.1f images/s, %.1f s per epoch, val_accuracy %.4f, peak %.0f MB",
            model_name,
            precision,
            run["images_per_second"],
            run["seconds_per_epoch"],
            run["validation_accuracy"],
            run["peak_memory_mb"],
        )
        runs.append(run)
    return runs


def bench_levers(data_dir: Path | None, plan: Plan) -> dict[str, Any]:
    """Try the levers on short float32 CNN trainings: batch size, oneDNN, threads of parallel tasks."""
    levers: dict[str, Any] = {}
    base = {"model": "cnn", "precision": "float32", "train_rows": plan.lever_rows}
    config = data_config(data_dir, plan, epochs=plan.lever_epochs)

    for batch_size in plan.lever_batch_sizes:
        run = run_worker("train", {**base, "config": {**config, "batch_size": batch_size}})
        levers[f"batch_{batch_size}_images_per_second"] = run["images_per_second"]
    for precision in ("float32", "bfloat16"):
        run = run_worker("train", {**base, "precision": precision, "config": config})
        levers[f"{precision}_images_per_second"] = run["images_per_second"]
        run = run_worker("train", {**base, "precision": precision, "config": config, "fused_batch_norm": False})
        levers[f"keras_batch_norm_{precision}_images_per_second"] = run["images_per_second"]

    # Without oneDNN, TensorFlow's own kernels are several times slower, so this run is shorter.
    run = run_worker(
        "train",
        {**base, "train_rows": max(plan.batch_size, plan.lever_rows // 5), "config": config},
        {"TF_ENABLE_ONEDNN_OPTS": "0"},
    )
    levers["onednn_off_float32_images_per_second"] = run["images_per_second"]

    # Three trainings (the DAG's three models) at once, against one after another.
    tasks = [{**base, "model": name, "config": config} for name in ("cnn_aug", "cnn", "dnn")]
    derived = {"FER_TRAINING_POOL_SLOTS": "3", "FER_TF_INTRA_OP_THREADS": "", "FER_TF_INTER_OP_THREADS": ""}
    one_per_core = {**derived, "FER_TF_INTRA_OP_THREADS": "0", "FER_TF_INTER_OP_THREADS": "0", "FER_TRAINING_POOL_SLOTS": "1"}
    started = time.perf_counter()
    for task in tasks:
        run_worker("train", {**task, "parallel_tasks": 1}, one_per_core)
    levers["three_tasks_sequential_seconds"] = round(time.perf_counter() - started, 2)
    for name, environment in (("derived_threads", derived), ("one_thread_per_core", one_per_core)):
        started = time.perf_counter()
        processes = [start_worker("train", {**task, "parallel_tasks": 3}, environment) for task in tasks]
        for process in processes:
            _, errors = process.communicate()
            if process.returncode != 0:
                raise RuntimeError(f"parallel benchmark training failed:\n{errors[-3000:]}")
        levers[f"three_tasks_parallel_{name}_seconds"] = round(time.perf_counter() - started, 2)
    return levers


def bench_orchestration(plan: Plan, workspace: Path) -> dict[str, Any]:
    """Time a DAG run on the built-in data against the same steps in one Python process."""
    params = {
        "epochs": plan.dag_epochs,
        # Early stopping would let the two runs stop after different epochs.
        "patience": plan.dag_epochs,
        "builtin_rows": plan.dag_builtin_rows,
        "force_retrain": True,
    }
    shared = {
        "FER_BUILTIN_DATA_DIR": str(workspace / "builtin"),
        "FER_CACHE_DIR": str(workspace / "cache"),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }

    def private(name: str) -> dict[str, str]:
        folder = workspace / name
        return {
            **shared,
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
            "FER_ARTIFACT_ROOT": (folder / "mlartifacts").as_uri(),
            "FER_OUTPUT_DIR": str(folder / "output"),
        }

    # Generate and parse the built-in data once, outside the timed runs.
    run_worker("prepare", {"config": params}, shared)

    # One process trains the models one after another, each with every core.
    in_process = run_worker(
        "pipeline", {"config": params}, {**private("in_process"), "FER_TRAINING_POOL_SLOTS": "1"}
    )

    airflow_home = workspace / "airflow"
    environment = {
        **os.environ,
        **private("dag"),
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(PROJECT_ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    }
    airflow = str(Path(sys.executable).with_name("airflow"))
    subprocess.run([airflow, "db", "migrate"], env=environment, capture_output=True, check=True)
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts" / "run_dag.py"), "--conf", json.dumps(params)],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    dag_seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"the benchmark DAG run failed:\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}")
    summary = json.loads((workspace / "dag" / "output" / "latest" / "summary.json").read_text())
    return {
        "params": params,
        "in_process_seconds": in_process["process_seconds"],
        "in_process_seconds_per_epoch": in_process["models"],
        "dag_seconds": round(dag_seconds, 3),
        "dag_seconds_per_epoch": {name: model["seconds_per_epoch"] for name, model in summary["models"].items()},
        "orchestration_overhead": round(dag_seconds / in_process["process_seconds"], 3),
    }


def worker_prepare(arguments: dict[str, Any]) -> dict[str, Any]:
    from fer_tasks.config import PipelineConfig
    from fer_tasks.datasets import load_splits

    splits = load_splits(PipelineConfig.from_params(arguments["config"]))
    return {"train_rows": int(len(splits.train_labels))}


# ---------------------------------------------------------------------------
# Results


def machine_info() -> dict[str, Any]:
    """Describe the CPU, the core count and the library versions."""
    from importlib.metadata import version

    from fer_tasks.performance import available_cores, cpu_flags, native_bfloat16_flags

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    flags = cpu_flags()
    return {
        "cpu": model or platform.processor(),
        "cores": available_cores(),
        "native_bfloat16": native_bfloat16_flags(flags),
        "avx512f": "avx512f" in flags,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {
            package: version(package) for package in ("tensorflow-cpu", "keras", "numpy", "pandas", "apache-airflow", "mlflow")
        },
    }


def summarize_targets(results: dict[str, Any]) -> dict[str, Any]:
    """Compute the target ratios from the raw measurements and compare each with its bound."""
    runs = {(run["model"], run["precision"]): run for run in results["training"]}
    best = results["interleaved"]["best_seconds_per_epoch"]
    speed = results["interleaved"]["images_per_second"]
    values: dict[str, Any] = {}
    values["parse_vs_decompress"] = results["parse"]["parse_vs_decompress"]
    values["parse_speedup_vs_naive"] = results["parse"]["parse_speedup_vs_naive"]
    for precision in ("float32", "bfloat16"):
        values[f"augmentation_overhead_{precision}"] = round(best[f"cnn_aug_{precision}"] / best[f"cnn_{precision}"], 3)
    # The overhead that counts is the one in this CPU's default precision.
    default = "bfloat16" if results["machine"]["native_bfloat16"] else "float32"
    values["augmentation_overhead"] = values[f"augmentation_overhead_{default}"]
    flops = runs[("cnn", "float32")]["forward_flops_per_image"]
    values["cnn_training_gflops_float32"] = round(3 * flops * speed["cnn_float32"] / 1e9, 1)
    values["cnn_training_gflops_bfloat16"] = round(3 * flops * speed["cnn_bfloat16"] / 1e9, 1)
    values["cnn_flops_fraction"] = round(
        values["cnn_training_gflops_float32"] / results["matmul"]["matmul_float32_gflops"], 3
    )
    values["cnn_bf16_flops_fraction_of_bf16_matmul"] = round(
        values["cnn_training_gflops_bfloat16"] / results["matmul"]["matmul_bfloat16_gflops"], 3
    )
    values["bf16_speedup"] = round(speed["cnn_bfloat16"] / speed["cnn_float32"], 3)
    values["bf16_speedup_cnn_aug"] = round(speed["cnn_aug_bfloat16"] / speed["cnn_aug_float32"], 3)
    values["bf16_accuracy_gap_points"] = round(
        100 * abs(runs[("cnn", "bfloat16")]["validation_accuracy"] - runs[("cnn", "float32")]["validation_accuracy"]), 2
    )
    values["full_data_bf16_speedup"] = round(
        runs[("cnn", "bfloat16")]["images_per_second"] / runs[("cnn", "float32")]["images_per_second"], 3
    )
    if "orchestration" in results:
        values["orchestration_overhead"] = results["orchestration"]["orchestration_overhead"]
    values["peak_memory_mb"] = {f"{model}_{precision}": run["peak_memory_mb"] for (model, precision), run in runs.items()}

    checks = {}
    for key, comparison, bound in TARGETS:
        if key not in values:
            continue
        value = values[key]
        met = value <= bound if comparison == "<=" else value >= bound
        checks[key] = {"value": value, "bound": f"{comparison} {bound}", "met": bool(met)}
    return {"values": values, "checks": checks}


DEFINITIONS = [
    "## Definitions",
    "",
    "- `augmentation_overhead`: seconds per epoch of `cnn_aug` over `cnn`, same rows and batch size, in the",
    "  default precision of this CPU (`augmentation_overhead_float32` and `_bfloat16` give both).",
    "- `parse_vs_decompress`: `fer_tasks.data.load_csv` on the training file over `gzip.decompress` of it;",
    "  `parse_speedup_vs_naive`: pandas `read_csv` plus `str.split` over `load_csv`, both on this",
    "  machine's pandas (pandas 3 splits Arrow strings in C++).",
    "- `cnn_flops_fraction`: 3 x the CNN's forward FLOPs per image (Conv2D and Dense multiply-adds, 2 FLOPs",
    "  each) x float32 training images/s, over TensorFlow's float32 2048x2048 matmul FLOP/s.",
    "- `bf16_speedup`: `cnn` training images/s in `mixed_bfloat16` over float32;",
    "  `bf16_accuracy_gap_points`: their validation accuracies after the same epochs, in points.",
    "- `orchestration_overhead`: wall time of `scripts/run_dag.py` (api-server start, DAG run, stop) over",
    "  one Python process that runs the same task functions one after another.",
    "- Levers: `batch_N` trains at batch size N; `keras_batch_norm` uses Keras' own BatchNormalization",
    "  instead of the fused kernel; `onednn_off` sets `TF_ENABLE_ONEDNN_OPTS=0`; `three_tasks_*` trains",
    "  `cnn_aug`, `cnn` and `dnn` one after another with one thread per core, or at once with the derived",
    "  threads (1 each on 2 cores) or with one thread per core each.",
    "",
    "## Reproduce",
    "",
    "```bash",
    "make bench                 # full run",
    "make bench BENCH_QUICK=1   # shrunk sizes, for development",
    "FER_DATA_DIR=path/to/fer2013 make bench",
    ".venv/bin/python -m fer_tasks.benchmark --render-only   # rewrite this page from results.json",
    "```",
    "",
    "Timings vary with other load on the machine; the load average at the start is recorded above.",
    "",
]


def write_markdown(results: dict[str, Any], path: Path) -> None:
    """Write the human-readable benchmark page."""
    lines = _summary_lines(results) + _training_lines(results) + _other_lines(results) + DEFINITIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _summary_lines(results: dict[str, Any]) -> list[str]:
    machine = results["machine"]
    lines = [
        "# Benchmarks",
        "",
        "Loading and training speed of the pipeline on one machine, written by `make bench`",
        f"(`python -m fer_tasks.benchmark`) at {results['finished_at']} in {results['total_seconds'] / 60:.1f} min.",
        "",
        f"- Data: {results['data']}",
        f"- Mode: {'quick (BENCH_QUICK=1), sizes shrunk for development' if results['plan']['quick'] else 'full'}",
        f"- CPU: {machine['cpu']}, {machine['cores']} cores, native bfloat16: "
        f"{', '.join(machine['native_bfloat16']) or 'no'}; load average at start {machine['load_average_at_start']}",
        f"- Versions: Python {machine['python']}, "
        + ", ".join(f"{name} {value}" for name, value in machine["versions"].items()),
        "",
        "## Targets",
        "",
        "| target | value | bound | met |",
        "|---|---|---|---|",
    ]
    for key, check in results["targets"]["checks"].items():
        lines.append(f"| `{key}` | {check['value']} | {check['bound']} | {'yes' if check['met'] else 'no'} |")
    return lines


def _training_lines(results: dict[str, Any]) -> list[str]:
    interleaved = results["interleaved"]
    lines = [
        "",
        "## CNN epochs taking turns",
        "",
        f"One process, {interleaved['train_rows']} rows per epoch, batch {interleaved['batch_size']}; the four "
        "variants take turns epoch by epoch. The ratios of the targets come from the fastest epoch of each.",
        "",
        "| variant | epoch seconds | images/s (fastest epoch) |",
        "|---|---|---|",
    ]
    for key, seconds in interleaved["epoch_seconds"].items():
        lines.append(f"| {key} | {seconds} | {interleaved['images_per_second'][key]} |")
    lines += [
        "",
        "## Training runs",
        "",
        "Each run trains in its own process on the full training split, as a training task does;",
        "images/s comes from the epochs after the first, and peak MB is the process's maximum resident memory.",
        "",
        "| model | precision | rows | s/epoch | images/s | GFLOP/s | val accuracy | peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in results["training"]:
        lines.append(
            f"| {run['model']} | {run['precision']} | {run['train_rows']} | {run['seconds_per_epoch']} | "
            f"{run['images_per_second']} | {run['training_gflops']} | {run['validation_accuracy']} | "
            f"{run['peak_memory_mb']} |"
        )
    return lines


def _other_lines(results: dict[str, Any]) -> list[str]:
    parse = results["parse"]
    matmul = results["matmul"]
    lines = [
        "",
        "## Parsing",
        "",
        f"{parse['rows']} rows of `{Path(parse['file']).name}`: decompress {parse['decompress_seconds']} s, "
        f"parse {parse['parse_seconds']} s, cache hit {parse['cache_hit_seconds']} s, pandas `str.split` "
        f"{parse['naive_seconds']} s (timed on {parse['naive_rows_timed']} rows, scaled to the file).",
        *(
            [
                f"The same pandas code with Python `str` objects, the pandas 2 default, takes "
                f"{parse['naive_object_strings_seconds']} s (timed on {parse['naive_object_strings_rows_timed']} "
                f"rows, scaled), {parse['parse_speedup_vs_naive_object_strings']} times the parse time."
            ]
            if "naive_object_strings_seconds" in parse
            else []
        ),
        "",
        "## Matrix multiply",
        "",
        f"TensorFlow {matmul['matmul_size']}x{matmul['matmul_size']}: float32 "
        f"{matmul['matmul_float32_gflops']} GFLOP/s, bfloat16 {matmul['matmul_bfloat16_gflops']} GFLOP/s.",
    ]
    if "levers" in results:
        lines += ["", "## Levers", "", "| lever | value |", "|---|---|"]
        lines += [f"| `{key}` | {value} |" for key, value in results["levers"].items()]
    if "orchestration" in results:
        orchestration = results["orchestration"]
        lines += [
            "",
            "## Orchestration",
            "",
            f"Built-in data, params {json.dumps(orchestration['params'])}: DAG run "
            f"{orchestration['dag_seconds']} s, the same steps in one process {orchestration['in_process_seconds']} s.",
        ]
    return lines + [""]


def run_benchmark(plan: Plan, data_dir: Path | None, sections: set[str]) -> dict[str, Any]:
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine_info(), "plan": asdict(plan)}
    if data_dir is not None:
        train_path = data_dir / "train.csv.gz"
        results["data"] = f"real FER2013 from {data_dir}"
    else:
        from fer_tasks.config import PipelineConfig
        from fer_tasks.datasets import resolve_paths

        train_path, _ = resolve_paths(PipelineConfig())
        results["data"] = "built-in synthetic data (no real FER2013 files found)"
    logger.info("Benchmark on %s", results["data"])

    results["parse"] = bench_parse(train_path, plan)
    logger.info("Parsing: %s", results["parse"])
    results["matmul"] = run_worker("matmul", {})
    logger.info("Matrix multiply: %s", results["matmul"])
    results["interleaved"] = run_worker(
        "interleaved",
        {
            "config": data_config(data_dir, plan),
            "train_rows": plan.interleaved_rows,
            "rounds": plan.interleaved_rounds,
        },
    )
    logger.info("Interleaved CNN epochs: %s", results["interleaved"])
    results["training"] = bench_training(data_dir, plan)
    if "levers" in sections:
        results["levers"] = bench_levers(data_dir, plan)
        logger.info("Levers: %s", results["levers"])
    if "orchestration" in sections:
        with tempfile.TemporaryDirectory(prefix="fer-bench-") as workspace:
            results["orchestration"] = bench_orchestration(plan, Path(workspace))
        logger.info("Orchestration: %s", results["orchestration"])
    results["targets"] = summarize_targets(results)
    results["total_seconds"] = round(time.perf_counter() - started, 1)
    results["finished_at"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return results


WORKERS = {
    "matmul": lambda arguments: worker_matmul(),
    "train": worker_train,
    "interleaved": worker_interleaved,
    "pipeline": worker_pipeline,
    "prepare": worker_prepare,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command")
    worker = subparsers.add_parser("worker", help="run one measurement in this process (used internally)")
    worker.add_argument("kind", choices=sorted(WORKERS))
    worker.add_argument("arguments", help="JSON object")
    parser.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "") not in ("", "0"),
                        help="shrink every size for a run of a few minutes (also BENCH_QUICK=1)")
    parser.add_argument("--data-dir", default=os.environ.get("FER_DATA_DIR") or str(DEFAULT_DATA_DIR),
                        help="folder with train.csv.gz and test.csv.gz; the built-in data is used when it has none")
    parser.add_argument("--skip", action="append", default=[], choices=["levers", "orchestration"],
                        help="leave out a section (repeatable)")
    parser.add_argument("--output", default=str(RESULTS_PATH), help="results JSON file")
    parser.add_argument("--doc", default=str(DOC_PATH), help="Markdown page written from the results")
    parser.add_argument("--render-only", action="store_true",
                        help="only rewrite the Markdown page from an existing results file")
    arguments = parser.parse_args(argv)

    if arguments.command == "worker":
        logging.basicConfig(level=logging.WARNING)
        result = WORKERS[arguments.kind](json.loads(arguments.arguments))
        print(json.dumps(result))
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if arguments.render_only:
        write_markdown(json.loads(Path(arguments.output).read_text()), Path(arguments.doc))
        print(f"Wrote {arguments.doc} from {arguments.output}")
        return 0
    data_dir = Path(arguments.data_dir).expanduser()
    if not (data_dir / "train.csv.gz").is_file() or not (data_dir / "test.csv.gz").is_file():
        logger.info("No train.csv.gz and test.csv.gz in %s; using the built-in data", data_dir)
        data_dir = None
    plan = Plan.create(arguments.quick)
    sections = {"levers", "orchestration"} - set(arguments.skip)
    results = run_benchmark(plan, data_dir, sections)
    output = Path(arguments.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, Path(arguments.doc))
    for key, check in results["targets"]["checks"].items():
        print(f"{key:28s} {check['value']!s:>10s}  bound {check['bound']:8s}  {'met' if check['met'] else 'NOT met'}")
    print(f"Wrote {output} and {arguments.doc} in {results['total_seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
