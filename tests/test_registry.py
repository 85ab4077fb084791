"""Model registry: registration, promotion on the same validation data, and skipped reruns.

Runs the stages as the DAG chains them, against a real SQLite MLflow store, with
a small CNN on the built-in data.
"""

from __future__ import annotations

import dataclasses

import pytest

from fer_tasks.config import PipelineConfig

pytestmark = pytest.mark.slow

BASE = PipelineConfig(
    models=("cnn",),
    builtin_rows=700,
    builtin_test_rows=14,
    batch_size=16,
    registered_model_name="fer-test-classifier",
)


@pytest.fixture(autouse=True)
def fixed_code_version(monkeypatch):
    monkeypatch.setenv("FER_CODE_VERSION", "test-code")


def run_stages(config: PipelineConfig, dag_run_id: str) -> dict:
    """Run data, tracking, training, evaluation and registration as one DAG run does."""
    from fer_tasks import tracking
    from fer_tasks.datasets import load_splits, summarize
    from fer_tasks.evaluation import evaluate_trained_models
    from fer_tasks.registry import (
        choose_best_run,
        find_unchanged_run,
        register_and_promote,
        training_fingerprint,
    )
    from fer_tasks.tracking import RunContext
    from fer_tasks.training import train_model

    data = summarize(load_splits(config))
    unchanged = find_unchanged_run(config, data["sha256"])
    if unchanged and not config.force_retrain:
        return {"skipped": True, **unchanged}
    parent = tracking.start_pipeline_run(
        config.experiment_name,
        RunContext(dag_run_id=dag_run_id, task_id="start_tracking"),
        config.to_dict(),
        tags={tracking.TAG_FINGERPRINT: training_fingerprint(config, data["sha256"])},
    )
    trained = [
        train_model(config, model, parent, RunContext(dag_run_id=dag_run_id, task_id=f"train_{model}"))
        for model in config.models
    ]
    evaluation = evaluate_trained_models(config, trained)
    decision = register_and_promote(config, choose_best_run(trained, evaluation), data["sha256"], dag_run_id)
    tracking.finish_pipeline_run(parent["parent_run_id"])
    return {"skipped": False, **decision}


def test_champion_moves_only_to_a_better_model(tracking_store):
    from fer_tasks import tracking

    first = run_stages(dataclasses.replace(BASE, epochs=4), "run_1")
    assert first["version"] == "1"
    assert first["promoted"] is True
    assert "first registered version" in first["reason"]

    worse = run_stages(dataclasses.replace(BASE, epochs=1, learning_rate=1e-7), "run_2")
    assert worse["version"] == "2"
    assert worse["champion_version"] == "1"
    assert worse["new_accuracy"] < worse["champion_accuracy"]
    assert worse["promoted"] is False
    assert tracking.get_alias_version(BASE.registered_model_name, "champion") == "1"

    better = run_stages(dataclasses.replace(BASE, epochs=10), "run_3")
    assert better["version"] == "3"
    assert better["champion_version"] == "1"
    assert better["new_accuracy"] > better["champion_accuracy"]
    assert better["promoted"] is True
    assert tracking.get_alias_version(BASE.registered_model_name, "champion") == "3"
    assert set(better["recall"]["champion"]) == set(better["recall"]["new"])

    version = tracking.client().get_model_version(BASE.registered_model_name, "3")
    assert version.tags["data_sha256"]
    assert version.tags["code_version"] == "test-code"
    assert version.tags[tracking.TAG_DAG_RUN_ID] == "run_3"
    assert float(version.tags["val_accuracy"]) == pytest.approx(better["new_accuracy"], abs=1e-6)

    rerun = run_stages(dataclasses.replace(BASE, epochs=10), "run_4")
    assert rerun["skipped"] is True
    assert rerun["dag_run_id"] == "run_3"
    versions = tracking.client().search_model_versions(f"name = '{BASE.registered_model_name}'")
    assert len(versions) == 3


def test_changed_settings_or_forced_run_retrain(tracking_store):
    from fer_tasks.datasets import load_splits, summarize
    from fer_tasks.registry import find_unchanged_run

    config = dataclasses.replace(BASE, epochs=1)
    run_stages(config, "run_a")
    sha256 = summarize(load_splits(config))["sha256"]

    assert find_unchanged_run(config, sha256) is not None
    assert find_unchanged_run(dataclasses.replace(config, epochs=2), sha256) is None
    assert find_unchanged_run(config, "0" * 64) is None
    # Settings that only change the explanations or the report do not force a retrain.
    assert find_unchanged_run(dataclasses.replace(config, report_language="zh-TW"), sha256) is not None
    forced = run_stages(dataclasses.replace(config, force_retrain=True), "run_b")
    assert forced["skipped"] is False
    assert forced["version"] == "2"


def test_report_section_states_decision(tracking_store):
    from fer_tasks.registry import report_section

    decision = {
        "registered_model": "fer",
        "version": "2",
        "model": "cnn",
        "promoted": False,
        "reason": "validation accuracy 0.5 against 0.6, which is not better",
        "champion_version": "1",
        "champion_after": "1",
        "recall": {"new": {"Angry": 0.4}, "champion": {"Angry": 0.5}},
        "confusion_changes": [{"true": "Angry", "predicted": "Sad", "new": 0.3, "champion": 0.2}],
    }
    heading, text = report_section(decision)
    assert heading == "Model registry"
    assert "version 2" in text
    assert "registered, not promoted" in text
    assert "- Angry: 0.400 against 0.500" in text
    assert "Angry -> Sad" in text
    assert "champion is now version 1" in text
