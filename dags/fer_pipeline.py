"""
# FER pipeline

Train, compare and explain three facial-expression classifiers on FER2013
(48x48 grayscale faces, seven classes).

1. **validate_data** parses and checks the input files; bad input fails the run here,
   before any training, with the file, line and value at fault.
2. **start_tracking** creates the MLflow experiment and this DAG run's parent run.
3. **train_cnn_aug**, **train_cnn**, **train_dnn** run in parallel, each in its own
   MLflow run nested under the parent: the CNN with augmentation, the same CNN
   without it, and a dense network of about the same parameter count.
4. **evaluate_models**, **compute_saliency** and **visualize_filters** load the
   trained models from MLflow: accuracy, per-class metrics, confusion matrices,
   saliency maps, gradient-ascent filter patterns and layer outputs.
5. **register_model** registers the best model by validation accuracy in the MLflow
   Model Registry and moves the `champion` alias to it only if it beats the current
   champion on the same validation images.
6. **write_report** writes the Kaggle submission (`id,label`) from that model, one
   submission per model, and an HTML and Markdown comparison report under
   `output/<dag run id>/`.

Leave `train_csv` and `test_csv` empty to use the built-in synthetic data set.
The DAG runs on the `FER_SCHEDULE` cron schedule (weekly by default) and whenever
the `fer_training_data` Asset is updated. A run whose data, settings and code match
the last successful run skips training, unless `force_retrain` is set.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from fer_tasks.config import (
    CNN_CONV_LAYERS,
    DEFAULTS,
    MODEL_NAMES,
    PRECISIONS,
    REPORT_LANGUAGES,
    max_active_runs,
    retraining_schedule,
    training_data_uri,
)

# The heavy libraries (TensorFlow, Keras, MLflow) are imported inside the task
# bodies through fer_tasks stage modules, never at parse time: the scheduler parses
# this file constantly, and TensorFlow loaded in a parent that later forks can hang.

PARAMS = {
    "train_csv": Param(
        DEFAULTS.train_csv,
        type="string",
        title="Training file",
        description=(
            "Path to train.csv (label,feature) or fer2013.csv (emotion,pixels,Usage), "
            "plain or gzipped. Empty: generate and use the built-in synthetic data."
        ),
    ),
    "test_csv": Param(
        DEFAULTS.test_csv,
        type="string",
        title="Test file",
        description="Path to test.csv (id,feature), plain or gzipped. Empty with fer2013.csv or the built-in data.",
    ),
    "skip_bad_rows": Param(
        DEFAULTS.skip_bad_rows,
        type="boolean",
        title="Skip invalid rows",
        description="Drop invalid rows (logging how many and which lines) instead of failing the run.",
    ),
    "models": Param(
        list(DEFAULTS.models),
        type="array",
        items={"type": "string", "enum": list(MODEL_NAMES)},
        minItems=1,
        uniqueItems=True,
        title="Models to train",
        description="Any of cnn_aug (CNN with augmentation), cnn (same CNN without), dnn (dense network).",
    ),
    "epochs": Param(DEFAULTS.epochs, type="integer", minimum=1, maximum=500, title="Maximum epochs",
                    description="Upper bound on epochs; early stopping on val_loss usually ends sooner."),
    "batch_size": Param(DEFAULTS.batch_size, type="integer", minimum=8, maximum=1024, title="Batch size",
                        description="Images per training step."),
    "learning_rate": Param(DEFAULTS.learning_rate, type="number", exclusiveMinimum=0, maximum=1,
                           title="Learning rate", description="Adam learning rate."),
    "precision": Param(DEFAULTS.precision, type="string", enum=list(PRECISIONS), title="Training precision",
                       description="auto: bfloat16 (Keras mixed_bfloat16) where the CPU has native bfloat16 "
                                   "(AVX-512 BF16 or AMX), else float32; the dense network always in float32. "
                                   "Saliency maps and filter patterns "
                                   "are always computed in float32."),
    "validation_mode": Param(DEFAULTS.validation_mode, type="string", enum=["head", "stratified"],
                             title="Validation split",
                             description="head: the first rows of the training file (as in the original study); "
                                         "stratified: a seeded sample with the class proportions."),
    "validation_fraction": Param(DEFAULTS.validation_fraction, type="number", exclusiveMinimum=0,
                                 exclusiveMaximum=0.5, title="Validation fraction",
                                 description="Share of the training rows held out for validation."),
    "patience": Param(DEFAULTS.patience, type="integer", minimum=1, maximum=100, title="Early-stopping patience",
                      description="Epochs without a val_loss improvement of at least min_delta before stopping."),
    "min_delta": Param(DEFAULTS.min_delta, type="number", minimum=0, maximum=1, title="Early-stopping min_delta",
                       description="Smallest val_loss decrease that counts as an improvement."),
    "seed": Param(DEFAULTS.seed, type="integer", minimum=0, maximum=2**31 - 1, title="Random seed",
                  description="Seeds the split, the weights, shuffling, augmentation and the built-in data."),
    "max_train_rows": Param(DEFAULTS.max_train_rows, type="integer", minimum=0, title="Row limit",
                            description="Use only the first N training rows (0: all). For quick trials."),
    "builtin_rows": Param(DEFAULTS.builtin_rows, type="integer", minimum=70, maximum=200_000,
                          title="Built-in training rows", description="Size of the generated training set."),
    "builtin_test_rows": Param(DEFAULTS.builtin_test_rows, type="integer", minimum=7, maximum=50_000,
                               title="Built-in test rows", description="Size of the generated test set."),
    "saliency_images": Param(list(DEFAULTS.saliency_images), type="array",
                             items={"type": "integer", "minimum": 0}, minItems=1, maxItems=32,
                             title="Saliency images",
                             description="Validation-set indices of the images to explain with saliency maps."),
    "filter_layers": Param(list(DEFAULTS.filter_layers), type="array",
                           items={"type": "string", "enum": list(CNN_CONV_LAYERS)}, minItems=1, uniqueItems=True,
                           title="Layers for gradient ascent",
                           description="CNN conv layers whose filters are visualised by gradient ascent."),
    "filters_per_layer": Param(DEFAULTS.filters_per_layer, type="integer", minimum=1, maximum=32,
                               title="Filters per layer", description="How many filters of each layer to visualise."),
    "ascent_steps": Param(DEFAULTS.ascent_steps, type="integer", minimum=1, maximum=1000,
                          title="Gradient-ascent steps", description="Optimisation steps per filter image."),
    "activation_layer": Param(DEFAULTS.activation_layer, type="string", enum=list(CNN_CONV_LAYERS),
                              title="Layer for feature maps",
                              description="CNN layer whose outputs are shown for the chosen images."),
    "activation_images": Param(list(DEFAULTS.activation_images), type="array",
                               items={"type": "integer", "minimum": 0}, minItems=1, maxItems=8,
                               title="Images for feature maps",
                               description="Validation-set indices of the images passed through that layer."),
    "confusion_threshold": Param(DEFAULTS.confusion_threshold, type="number", minimum=0, maximum=1,
                                 title="Confused-pair threshold",
                                 description="List class pairs whose row-normalised confusion rate reaches this."),
    "experiment_name": Param(DEFAULTS.experiment_name, type="string", minLength=1, maxLength=200,
                             title="MLflow experiment", description="Experiment that holds this run."),
    "registered_model_name": Param(DEFAULTS.registered_model_name, type="string", minLength=1, maxLength=200,
                                   title="Registered model",
                                   description="MLflow Model Registry name; the best model of each run becomes "
                                               "a new version, promoted to the champion alias only if better."),
    "force_retrain": Param(DEFAULTS.force_retrain, type="boolean", title="Force retraining",
                           description="Train even when the data, settings and code match the last successful run."),
    "report_language": Param(DEFAULTS.report_language, type="string", enum=list(REPORT_LANGUAGES),
                             title="Report language", description="en (English) or zh-TW (Traditional Chinese)."),
}


TRAINING_POOL = "training"

# The training file as an Airflow Asset: fer_training_data_watch marks it updated
# when the file changes, which triggers a run here between scheduled ones.
TRAINING_DATA = Asset(name="fer_training_data", uri=training_data_uri())
CRON = retraining_schedule()
SCHEDULE = (
    AssetOrTimeSchedule(timetable=CronTriggerTimetable(CRON, timezone="UTC"), assets=TRAINING_DATA)
    if CRON
    else [TRAINING_DATA]
)


def _config():
    from fer_tasks.config import PipelineConfig

    return PipelineConfig.from_params(dict(get_current_context()["params"]))


def _run_context():
    from fer_tasks.tracking import RunContext

    ti = get_current_context()["ti"]
    return RunContext(dag_id=ti.dag_id, dag_run_id=ti.run_id, task_id=ti.task_id, try_number=ti.try_number)


def _trained_runs(trained: list[dict | None]) -> list[dict]:
    """Return the results of the training tasks that ran; skip the task when none did."""
    from airflow.sdk.exceptions import AirflowSkipException

    runs = [run for run in trained if run]
    if not runs:
        raise AirflowSkipException("no model was trained in this DAG run")
    return runs


def _close_parent_run(context) -> None:
    """Mark the run's MLflow parent run and output folder as failed."""
    from fer_tasks.report import mark_run_failed

    dag_run = context["dag_run"]
    mark_run_failed(dag_run.dag_id, dag_run.run_id)


@dag(
    dag_id=Path(__file__).stem,
    doc_md=__doc__,
    schedule=SCHEDULE,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=max_active_runs(),
    params=PARAMS,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
    on_failure_callback=_close_parent_run,
    tags=["fer2013", "keras", "mlflow"],
)
def fer_pipeline():
    @task
    def validate_data() -> dict:
        """Parse and validate the input files; fail before training on bad input."""
        from airflow.sdk.exceptions import AirflowFailException

        from fer_tasks.datasets import load_splits, summarize

        try:
            return summarize(load_splits(_config()))
        except (ValueError, FileNotFoundError) as error:
            # Invalid files and settings (fer_tasks.data.DataError is a ValueError)
            # stay invalid on a retry, so the run fails at once.
            raise AirflowFailException(f"invalid input, nothing was trained: {error}") from None

    @task
    def start_tracking(data_summary: dict) -> dict:
        """Create the MLflow parent run, or decide to skip training when nothing changed."""
        import logging

        from fer_tasks.registry import find_unchanged_run, training_fingerprint
        from fer_tasks.tracking import TAG_FINGERPRINT, start_pipeline_run

        config = _config()
        unchanged = find_unchanged_run(config, data_summary["sha256"])
        if unchanged and not config.force_retrain:
            logging.getLogger(__name__).info(
                "Skipping training: data, settings and code match the successful DAG run %s "
                "(MLflow run %s). Set force_retrain to train anyway.",
                unchanged["dag_run_id"],
                unchanged["parent_run_id"],
            )
            return {"skip_training": True, **unchanged}
        return start_pipeline_run(
            config.experiment_name,
            _run_context(),
            {**config.to_dict(), "data_sha256": data_summary["sha256"]},
            tags={TAG_FINGERPRINT: training_fingerprint(config, data_sha256=data_summary["sha256"])},
            metrics={
                "parse_seconds": data_summary["parse_seconds"],
                "train_rows": data_summary["train_rows"],
                "validation_rows": data_summary["validation_rows"],
                "test_rows": data_summary["test_rows"],
            },
        )

    def train(model_name: str):
        # The training pool caps how many trainings share the workers' cores.
        @task(task_id=f"train_{model_name}", pool=TRAINING_POOL)
        def train_one(parent: dict) -> dict:
            """Train one model in its own MLflow run; return its run id, model URI and metrics."""
            from airflow.sdk.exceptions import AirflowSkipException

            from fer_tasks.training import train_model

            config = _config()
            if parent.get("skip_training"):
                raise AirflowSkipException(f"unchanged since DAG run {parent['dag_run_id']}; not retraining")
            if model_name not in config.models:
                raise AirflowSkipException(f"{model_name} is not in the models param")
            return train_model(config, model_name, parent, _run_context())

        return train_one

    @task(trigger_rule="none_failed_min_one_success")
    def evaluate_models(trained: list[dict | None]) -> dict:
        """Validation and test accuracy, per-class metrics and confusion matrices per model."""
        from fer_tasks.evaluation import evaluate_trained_models

        return evaluate_trained_models(_config(), _trained_runs(trained))

    @task(trigger_rule="none_failed_min_one_success")
    def compute_saliency(trained: list[dict | None]) -> dict:
        """Saliency maps of the chosen validation images for each CNN."""
        from fer_tasks.explanation import explain_with_saliency

        return explain_with_saliency(_config(), _trained_runs(trained))

    @task(trigger_rule="none_failed_min_one_success")
    def visualize_filters(trained: list[dict | None]) -> dict:
        """Gradient-ascent filter patterns and layer outputs for each CNN."""
        from fer_tasks.explanation import explain_filters

        return explain_filters(_config(), _trained_runs(trained))

    # One register_model at a time across DAG runs, so that two concurrent runs
    # cannot both compare against the same champion and both move the alias.
    @task(trigger_rule="none_failed_min_one_success", max_active_tis_per_dag=1)
    def register_model(data_summary: dict, trained: list[dict | None], evaluation: dict) -> dict:
        """Register the best model; move the champion alias to it only if it beats the champion."""
        from fer_tasks.registry import choose_best_run, register_and_promote, report_section

        best = choose_best_run(_trained_runs(trained), evaluation)
        decision = register_and_promote(_config(), best, data_summary["sha256"], _run_context().dag_run_id)
        return {**decision, "report_section": report_section(decision)}

    @task(trigger_rule="none_failed_min_one_success")
    def write_report(
        data_summary: dict,
        parent: dict,
        trained: list[dict | None],
        evaluation: dict,
        saliency: dict,
        filters: dict,
        registry: dict,
    ) -> dict:
        """Write the Kaggle submissions and the comparison report; close the parent run."""
        from fer_tasks.report import publish

        return publish(
            _config(), _run_context(), data_summary, parent, _trained_runs(trained),
            evaluation, {**saliency, **filters}, registry,
        )

    data_summary = validate_data()
    parent = start_tracking(data_summary)
    trained_runs = [train(model_name)(parent) for model_name in MODEL_NAMES]
    evaluation = evaluate_models(trained_runs)
    saliency = compute_saliency(trained_runs)
    filters = visualize_filters(trained_runs)
    registry = register_model(data_summary, trained_runs, evaluation)
    write_report(data_summary, parent, trained_runs, evaluation, saliency, filters, registry)


fer_pipeline()

