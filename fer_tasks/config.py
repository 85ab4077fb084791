"""Typed configuration shared by the DAG, the library and the command line.

Every knob a user can set lives in `PipelineConfig`. Its defaults are the single
source for the DAG's trigger form, so the form and the library never disagree.
This module imports only the standard library: the Airflow DAG file reads it at
parse time.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

IMAGE_SIZE = 48
PIXEL_COUNT = IMAGE_SIZE * IMAGE_SIZE
CLASS_NAMES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
NUM_CLASSES = len(CLASS_NAMES)

MODEL_NAMES = ("cnn_aug", "cnn", "dnn")
CNN_MODEL_NAMES = ("cnn_aug", "cnn")
# The CNN's convolution layers, input side first; models.py names its layers so.
CNN_CONV_LAYERS = tuple(f"block{block}_conv{index}" for block in (1, 2, 3) for index in (1, 2))
ValidationMode = Literal["head", "stratified"]
ReportLanguage = Literal["en", "zh-TW"]
REPORT_LANGUAGES = ("en", "zh-TW")
# "auto" trains in bfloat16 where the CPU computes it natively, else in float32
# (fer_tasks.performance.resolve_precision).
TrainingPrecision = Literal["auto", "bfloat16", "float32"]
PRECISIONS = ("auto", "bfloat16", "float32")

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _env_path(name: str, default: Path) -> Path:
    value = os.environ.get(name)
    return Path(value).expanduser().resolve() if value else default


def output_root() -> Path:
    """Folder with one subfolder per DAG run (`FER_OUTPUT_DIR`)."""
    return _env_path("FER_OUTPUT_DIR", PROJECT_ROOT / "output")


def builtin_data_dir() -> Path:
    """Folder for the generated default data set (`FER_BUILTIN_DATA_DIR`)."""
    return _env_path("FER_BUILTIN_DATA_DIR", PROJECT_ROOT / "data" / "builtin")


def cache_dir() -> Path:
    """Folder for parsed-array caches keyed by file content (`FER_CACHE_DIR`)."""
    return _env_path("FER_CACHE_DIR", PROJECT_ROOT / ".cache" / "fer_tasks")


def checkpoint_dir() -> Path:
    """Folder for per-epoch training checkpoints (`FER_CHECKPOINT_DIR`).

    A retried training task resumes from here, so with several workers it must be
    storage that every worker mounts.
    """
    return _env_path("FER_CHECKPOINT_DIR", PROJECT_ROOT / ".cache" / "checkpoints")


def max_active_runs() -> int:
    """How many runs of `fer_pipeline` may run at once (`FER_MAX_ACTIVE_RUNS`, default 1).

    Each run trains three models, so a second concurrent run on the same workers
    mostly competes for their cores. Raise it when the workers have room.
    """
    value = os.environ.get("FER_MAX_ACTIVE_RUNS", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FER_MAX_ACTIVE_RUNS must be a whole number of at least 1, got {value!r}")
    return int(value)


def mlflow_outage_seconds() -> float:
    """Seconds a training task keeps buffering metrics while MLflow is unreachable (`FER_MLFLOW_OUTAGE_SECONDS`)."""
    return float(os.environ.get("FER_MLFLOW_OUTAGE_SECONDS", "900"))


def retraining_schedule() -> str | None:
    """Cron expression or preset of the retraining schedule (`FER_SCHEDULE`, "none" to turn off)."""
    value = os.environ.get("FER_SCHEDULE", "@weekly").strip()
    return None if value.lower() in ("", "none") else value


def training_data_uri() -> str:
    """URI of the Airflow Asset for the training file: `FER_TRAIN_CSV`, else the built-in data."""
    path = os.environ.get("FER_TRAIN_CSV") or str(builtin_data_dir() / "train.csv")
    return Path(path).expanduser().resolve().as_uri()


def tracking_uri() -> str:
    """MLflow tracking URI: `MLFLOW_TRACKING_URI`, else a SQLite store in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def artifact_root() -> str:
    """Return the artifact root for new experiments when the tracking store is local."""
    return os.environ.get("FER_ARTIFACT_ROOT") or (PROJECT_ROOT / "mlartifacts").as_uri()


@dataclass(frozen=True)
class PipelineConfig:
    """All settings of one pipeline run. Empty data paths select the built-in data."""

    # Defaults from FER_TRAIN_CSV and FER_TEST_CSV, so scheduled runs train on
    # the configured files without a trigger form.
    train_csv: str = field(default_factory=lambda: os.environ.get("FER_TRAIN_CSV", ""))
    test_csv: str = field(default_factory=lambda: os.environ.get("FER_TEST_CSV", ""))
    skip_bad_rows: bool = False
    models: tuple[str, ...] = MODEL_NAMES
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    precision: TrainingPrecision = "auto"
    validation_mode: ValidationMode = "head"
    validation_fraction: float = 0.1
    patience: int = 5
    min_delta: float = 1e-5
    seed: int = 42
    max_train_rows: int = 0
    builtin_rows: int = 3500
    builtin_test_rows: int = 700
    saliency_images: tuple[int, ...] = (0, 1, 2, 3, 4, 5)
    filter_layers: tuple[str, ...] = ("block1_conv2", "block2_conv2", "block3_conv2")
    filters_per_layer: int = 8
    ascent_steps: int = 40
    activation_layer: str = "block1_conv2"
    activation_images: tuple[int, ...] = (0, 1)
    confusion_threshold: float = 0.15
    experiment_name: str = "fer2013"
    registered_model_name: str = "fer2013-classifier"
    force_retrain: bool = False
    report_language: ReportLanguage = "en"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.models) - set(MODEL_NAMES))
        if unknown or not self.models:
            raise ValueError(
                f"models must be a non-empty subset of {list(MODEL_NAMES)}, got {list(self.models)}"
            )
        if self.validation_mode not in ("head", "stratified"):
            raise ValueError(
                f"validation_mode must be 'head' or 'stratified', got {self.validation_mode!r}"
            )
        if not 0.0 < self.validation_fraction < 0.5:
            raise ValueError(
                f"validation_fraction must be in (0, 0.5), got {self.validation_fraction}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.report_language not in REPORT_LANGUAGES:
            raise ValueError(
                f"report_language must be one of {list(REPORT_LANGUAGES)}, "
                f"got {self.report_language!r}"
            )
        unknown_layers = sorted(
            (set(self.filter_layers) | {self.activation_layer}) - set(CNN_CONV_LAYERS)
        )
        if unknown_layers:
            raise ValueError(
                f"unknown CNN layer(s) {unknown_layers}; choose from {list(CNN_CONV_LAYERS)}"
            )
        for name in ("epochs", "batch_size", "patience", "builtin_rows", "builtin_test_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.test_csv and not self.train_csv:
            raise ValueError(
                "test_csv is set but train_csv is empty: set train_csv too, or clear "
                "both to use the built-in data"
            )

    @property
    def uses_builtin_data(self) -> bool:
        return not self.train_csv

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> PipelineConfig:
        """Build a config from Airflow params or JSON, ignoring keys it does not know.

        Lists become tuples, so the config stays hashable and comparable.
        """
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in params.items():
            if key not in known:
                continue
            values[key] = tuple(value) if isinstance(value, list) else value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-ready values (tuples become lists)."""
        return {
            key: list(value) if isinstance(value, tuple) else value
            for key, value in dataclasses.asdict(self).items()
        }


DEFAULTS = PipelineConfig()
