"""Model registry stage: register each run's best model and promote it only when it is better.

Every DAG run that trains registers its best model (by validation accuracy) as a
new version of one registered model. The alias `champion` marks the version in
service. A new version takes the alias only if it beats the champion on the same
validation images: the champion is evaluated again on this run's data, because
numbers measured on different data cannot be compared. The first version becomes
champion.

This stage reuses the pure metric functions of `fer_tasks.evaluation`, so both
models are scored by exactly the same code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
from typing import Any

import numpy as np

from fer_tasks import config as settings
from fer_tasks import tracking
from fer_tasks.config import CLASS_NAMES, MODEL_NAMES, PipelineConfig
from fer_tasks.datasets import Splits, load_splits
from fer_tasks.evaluation import (
    classification_metrics,
    confusion_matrix_normalised,
    predict_probabilities,
)

logger = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
# Settings that change only what is explained or reported, not what is trained.
NON_TRAINING_SETTINGS = frozenset(
    {
        "saliency_images",
        "filter_layers",
        "filters_per_layer",
        "ascent_steps",
        "activation_layer",
        "activation_images",
        "confusion_threshold",
        "report_language",
        "force_retrain",
        "registered_model_name",
    }
)


def code_version() -> str:
    """Return the git commit of the project, `FER_CODE_VERSION`, or the package version."""
    if os.environ.get("FER_CODE_VERSION"):
        return os.environ["FER_CODE_VERSION"]
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=settings.PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return result.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"fer-pipeline=={version('fer-pipeline')}"
        except PackageNotFoundError:
            return "unknown"


def training_fingerprint(config: PipelineConfig, data_sha256: str) -> str:
    """Return a hash of everything that decides what a run trains: data, settings and code."""
    training_settings = {
        key: value for key, value in config.to_dict().items() if key not in NON_TRAINING_SETTINGS
    }
    payload = json.dumps(
        {"data": data_sha256, "settings": training_settings, "code": code_version()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def find_unchanged_run(config: PipelineConfig, data_sha256: str) -> dict | None:
    """Return the last successful parent run trained on the same data, settings and code, if any."""
    fingerprint = training_fingerprint(config, data_sha256)
    experiment_id = tracking.ensure_experiment(config.experiment_name)
    runs = tracking.find_runs(
        experiment_id, {tracking.TAG_ROLE: "parent", tracking.TAG_FINGERPRINT: fingerprint}
    )
    finished = [run for run in runs if run.info.status == "FINISHED"]
    if not finished:
        return None
    latest = max(finished, key=lambda run: run.info.end_time or 0)
    return {
        "parent_run_id": latest.info.run_id,
        "dag_run_id": latest.data.tags.get(tracking.TAG_DAG_RUN_ID, ""),
        "fingerprint": fingerprint,
    }


def choose_best_run(trained: list[dict], evaluation: dict[str, dict]) -> dict:
    """Return the training result with the best validation accuracy.

    Ties go to the model listed first in `MODEL_NAMES`, as in the report.
    """
    if not trained:
        raise ValueError("no trained model to register: every training task was skipped")
    return max(
        trained,
        key=lambda run: (
            evaluation[run["model"]]["val_accuracy"],
            -MODEL_NAMES.index(run["model"]),
        ),
    )


def _score(model: Any, splits: Splits) -> dict[str, Any]:
    predicted = predict_probabilities(model, splits.validation_images).argmax(axis=1)
    metrics = classification_metrics(splits.validation_labels, predicted)
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "recall": {name: values["recall"] for name, values in metrics["per_class"].items()},
        "confusion": confusion_matrix_normalised(splits.validation_labels, predicted),
    }


def _confusion_changes(new: np.ndarray, old: np.ndarray, limit: int = 5) -> list[dict]:
    """List the off-diagonal confusion rates that changed most between two models."""
    difference = new - old
    np.fill_diagonal(difference, 0.0)
    order = np.argsort(-np.abs(difference), axis=None)[:limit]
    changes = []
    for flat in order:
        true, predicted = np.unravel_index(flat, difference.shape)
        if abs(difference[true, predicted]) < 0.005:
            break
        changes.append(
            {
                "true": CLASS_NAMES[true],
                "predicted": CLASS_NAMES[predicted],
                "new": float(new[true, predicted]),
                "champion": float(old[true, predicted]),
            }
        )
    return changes


def register_and_promote(
    config: PipelineConfig, best: dict, data_sha256: str, dag_run_id: str
) -> dict[str, Any]:
    """Register `best` (a training result) and move the champion alias if it is better.

    Returns the decision with its reason and the per-class comparison that the
    report shows.
    """
    name = config.registered_model_name
    splits = load_splits(config)
    new_model = tracking.load_keras_model(best["model_uri"])
    new_score = _score(new_model, splits)
    tags = {
        "data_sha256": data_sha256,
        "code_version": code_version(),
        tracking.TAG_DAG_RUN_ID: dag_run_id,
        "model": best["model"],
        "val_accuracy": f"{new_score['accuracy']:.6f}",
        "val_macro_f1": f"{new_score['macro_f1']:.6f}",
        "mlflow_run_id": best["run_id"],
    }
    version = tracking.register_model(best["model_uri"], name, tags)
    champion = tracking.get_alias_version(name, CHAMPION_ALIAS)

    decision: dict[str, Any] = {
        "registered_model": name,
        "version": version,
        "model": best["model"],
        "new_accuracy": new_score["accuracy"],
        "champion_version": champion,
        "champion_accuracy": None,
        "recall": {"new": new_score["recall"], "champion": None},
        "confusion_changes": [],
    }
    if champion is None:
        promoted, reason = True, "first registered version, so it becomes the champion"
    else:
        champion_model = tracking.load_keras_model(f"models:/{name}@{CHAMPION_ALIAS}")
        champion_score = _score(champion_model, splits)
        decision["champion_accuracy"] = champion_score["accuracy"]
        decision["recall"]["champion"] = champion_score["recall"]
        decision["confusion_changes"] = _confusion_changes(
            new_score["confusion"], champion_score["confusion"]
        )
        promoted = new_score["accuracy"] > champion_score["accuracy"]
        comparison = (
            f"{new_score['accuracy']:.4f} against {champion_score['accuracy']:.4f} for "
            f"version {champion} on the same {len(splits.validation_labels)} validation images"
        )
        reason = (
            f"validation accuracy {comparison}, so it replaces the champion"
            if promoted
            else f"validation accuracy {comparison}, which is not better, so version "
            f"{champion} stays champion"
        )
    if promoted:
        tracking.set_alias(name, CHAMPION_ALIAS, version)
    decision["promoted"] = promoted
    decision["reason"] = reason
    decision["champion_after"] = version if promoted else champion
    logger.info("Registered %s version %s (%s): %s", name, version, best["model"], reason)
    return decision


def report_section(decision: dict[str, Any]) -> tuple[str, str]:
    """Return the report's (heading, text) section that states the promotion decision."""
    # NOTE: this section is English in every report language; translating it means
    # moving these sentences into the report's text table.
    name, version = decision["registered_model"], decision["version"]
    verdict = "promoted to champion" if decision["promoted"] else "registered, not promoted"
    lines = [
        f"`{decision['model']}` was registered as `{name}` version {version}: **{verdict}**. "
        f"Reason: {decision['reason']}. The Kaggle submission `submission.csv` comes from "
        f"this version; the champion is now version {decision['champion_after']}.",
        "",
    ]
    champion_recall = decision["recall"]["champion"]
    if champion_recall is not None:
        lines.append(
            f"Recall per class, new version {version} against champion version "
            f"{decision['champion_version']}:"
        )
        lines.append("")
        for class_name, recall in decision["recall"]["new"].items():
            lines.append(f"- {class_name}: {recall:.3f} against {champion_recall[class_name]:.3f}")
        if decision["confusion_changes"]:
            lines += ["", "Largest changes in the confusion rates (true -> predicted):", ""]
            for change in decision["confusion_changes"]:
                lines.append(
                    f"- {change['true']} -> {change['predicted']}: {change['new']:.3f} "
                    f"against {change['champion']:.3f}"
                )
    return "Model registry", "\n".join(lines)
