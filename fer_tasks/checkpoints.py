"""Per-epoch training checkpoints, so that a retried training task resumes.

Each training task of a DAG run owns one folder,
`<FER_CHECKPOINT_DIR>/<dag id>/<dag run id>/<task id>/`. After every epoch the
folder gets a new `epoch-NNNN/` with the model weights and optimizer state, the
best weights so far, the per-epoch history and the early-stopping counters. Only
then does `LATEST` move to it (an atomic rename), so a process killed at any moment
leaves the last complete checkpoint in place.

Keras's own `BackupAndRestore` keeps weights and the epoch number only. A resumed
run here must also continue early stopping where it was and keep the history of
the epochs before the failure, which is why this module stores both.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fer_tasks import config as settings
from fer_tasks import files

logger = logging.getLogger(__name__)

LATEST_FILE = "LATEST"
STATE_FILE = "state.json"
WEIGHTS_FILE = "model.weights.h5"
BEST_WEIGHTS_FILE = "best_weights.npz"


@dataclass
class TrainingState:
    """Progress of one training after its last finished epoch."""

    epochs_done: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    stopped_early: bool = False
    # EarlyStopping's counters; `best_epoch` is zero-based, as Keras counts it.
    best: float | None = None
    best_epoch: int = 0
    wait: int = 0

    def record(self, logs: dict[str, float]) -> None:
        for name, value in logs.items():
            self.history.setdefault(name, []).append(float(value))
        self.epochs_done += 1


def _folder_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


class CheckpointStore:
    """The checkpoint folder of one training task."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def for_task(cls, dag_id: str, dag_run_id: str, task_id: str) -> CheckpointStore:
        return cls(settings.checkpoint_dir() / _folder_name(dag_id) / _folder_name(dag_run_id) / _folder_name(task_id))

    def latest(self) -> Path | None:
        """Return the folder of the last complete checkpoint, or None when there is none."""
        pointer = self.directory / LATEST_FILE
        if not pointer.exists():
            return None
        folder = self.directory / pointer.read_text(encoding="utf-8").strip()
        return folder if (folder / STATE_FILE).exists() else None

    def exists(self) -> bool:
        return self.latest() is not None

    def save(self, model: Any, state: TrainingState, best_weights: list[np.ndarray] | None) -> Path:
        """Write a checkpoint of `model` after `state.epochs_done` epochs and make it the latest."""
        name = f"epoch-{state.epochs_done:04d}"
        folder = self.directory / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        # Keras saves the optimizer's variables with the weights of a compiled model.
        model.save_weights(folder / WEIGHTS_FILE)
        if best_weights is not None:
            with files.atomic_path(folder / BEST_WEIGHTS_FILE) as temporary:
                with open(temporary, "wb") as handle:
                    np.savez(handle, *best_weights)
        files.write_text(folder / STATE_FILE, json.dumps(asdict(state)))
        files.write_text(self.directory / LATEST_FILE, name)
        for older in self.directory.glob("epoch-*"):
            if older.name != name:
                shutil.rmtree(older, ignore_errors=True)
        return folder

    def restore(self, model: Any) -> tuple[TrainingState, list[np.ndarray] | None] | None:
        """Load the latest checkpoint into `model`; return its state and best weights, or None."""
        folder = self.latest()
        if folder is None:
            return None
        state = TrainingState(**json.loads((folder / STATE_FILE).read_text(encoding="utf-8")))
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(folder / WEIGHTS_FILE)
        best_weights = None
        if (folder / BEST_WEIGHTS_FILE).exists():
            with np.load(folder / BEST_WEIGHTS_FILE) as arrays:
                best_weights = [arrays[f"arr_{index}"] for index in range(len(arrays.files))]
        return state, best_weights

    def remove(self) -> None:
        """Delete this task's checkpoints (after its results are safely in MLflow)."""
        if self.directory.exists():
            shutil.rmtree(self.directory, ignore_errors=True)
            logger.info("Removed training checkpoints in %s", self.directory)


def remove_dag_run(dag_id: str, dag_run_id: str) -> None:
    """Delete the checkpoint folders of every task of one DAG run."""
    folder = settings.checkpoint_dir() / _folder_name(dag_id) / _folder_name(dag_run_id)
    if folder.exists():
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("Removed training checkpoints of DAG run %s", dag_run_id)
