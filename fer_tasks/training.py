"""Training stage: fit one model, logging everything to its own MLflow run.

The input pipeline is `tf.data`: uint8 images are batched first and then (for
`cnn_aug`) augmented and scaled one batch at a time, so augmentation runs
vectorised beside the training step instead of image by image.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from fer_tasks import tracking
from fer_tasks.checkpoints import CheckpointStore, TrainingState
from fer_tasks.config import CNN_MODEL_NAMES, PipelineConfig
from fer_tasks.datasets import Splits, load_splits
from fer_tasks.models import standard_copy, to_model_input
from fer_tasks.performance import Precision, dtype_policy, resolve_precision
from fer_tasks.tracking import RunContext

logger = logging.getLogger(__name__)

def configure_threads(models: int = 1) -> tuple[int, int]:
    """Set TensorFlow's intra- and inter-op threads for one of the run's training tasks.

    `fer_tasks.performance.training_threads` derives the counts from the cores, the
    training pool's slots and the number of `models` the run trains, so parallel
    tasks share the cores instead of each starting one thread per core.
    `FER_TF_INTRA_OP_THREADS` and `FER_TF_INTER_OP_THREADS` override them. Returns
    the counts in effect.
    """
    import tensorflow as tf

    from fer_tasks.performance import training_threads

    intra, inter = training_threads(models)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        # TensorFlow fixes its thread pools when it first runs an op. In a process
        # that already trained (a test session, a notebook) the first setting stays.
        logger.warning("TensorFlow threads are already initialised; keeping the current setting")
    intra = tf.config.threading.get_intra_op_parallelism_threads()
    inter = tf.config.threading.get_inter_op_parallelism_threads()
    logger.info("TensorFlow threads: intra-op %s, inter-op %s (0 means one per core)", intra, inter)
    return intra, inter


def resolve_training_precision(config: PipelineConfig, model_name: str) -> Precision:
    """Resolve and log the `precision` setting (auto, bfloat16 or float32) for one model.

    With `auto`, the dense network trains in float32 whatever the CPU: bfloat16
    cost it 19 points of validation accuracy on the built-in data (0.457 against
    0.646 after 12 epochs), and it takes about a second per epoch either way.
    """
    precision = resolve_precision(config.precision)
    if config.precision == "auto" and model_name not in CNN_MODEL_NAMES and precision.name != "float32":
        precision = Precision(
            "float32",
            "float32",
            f"auto: {model_name} trains in float32, because bfloat16 lowered its validation accuracy "
            "and its epochs are short anyway",
        )
    logger.info(
        "Training precision of %s: %s (Keras policy %s). Reason: %s",
        model_name,
        precision.name,
        precision.policy,
        precision.reason,
    )
    return precision


def build_augmenter(seed: int) -> Any:
    """Return the augmentation layer: flips, rotations of up to 10 degrees, 10% shifts, in one resampling pass."""
    from fer_tasks.augmentation import ROTATION_DEGREES, SHIFT_FRACTION, RandomFlipRotateShift

    return RandomFlipRotateShift(
        rotation_degrees=ROTATION_DEGREES,
        shift_fraction=SHIFT_FRACTION,
        interpolation="nearest",
        seed=seed,
        name="augmentation",
    )


def make_dataset(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    *,
    shuffle: bool,
    augment: bool,
    seed: int,
) -> Any:
    """Return a `tf.data.Dataset` of (float32 (batch, 48, 48, 1) in [0, 1], int labels)."""
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))
    if shuffle:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)

    augmenter = build_augmenter(seed) if augment else None

    def prepare(batch_images, batch_labels):
        # (batch, 48, 48) uint8 -> (batch, 48, 48, 1) float32 in [0, 1]. Augmenting
        # the uint8 images before scaling moves a quarter of the bytes, and nearest
        # interpolation copies pixels, so the result equals augmenting after scaling.
        images = batch_images[..., tf.newaxis]
        if augmenter is not None:
            images = augmenter(images, training=True)
        return tf.cast(images, tf.float32) / 255.0, batch_labels

    # NOTE: the seeds fix the split, the weights and the shuffle order, but the
    # random augmentation inside a parallel map is not bitwise reproducible:
    # two cnn_aug runs with one seed on the built-in data ended at 0.9457 and
    # 0.9229 validation accuracy. Fixing it needs stateless seeded ops per batch.
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def validation_dataset(splits: Splits, config: PipelineConfig) -> Any:
    """Return the validation split as an unshuffled, unaugmented dataset."""
    return make_dataset(
        splits.validation_images,
        splits.validation_labels,
        config.batch_size,
        shuffle=False,
        augment=False,
        seed=config.seed,
    )


class EpochRecorder:
    """Build a Keras callback that records each finished epoch.

    In this order: the history, a checkpoint (when a store is given), the MLflow
    metrics and a task-log line. Metrics leave only after the checkpoint holding
    them exists, so a task killed in between logs nothing twice after resuming.
    Place it after `EarlyStopping` in the callback list, so that it saves the early
    stopping counters of the epoch that just ended.
    """

    def __new__(
        cls,
        model_name: str,
        max_epochs: int,
        state: TrainingState,
        stopping: Any,
        store: CheckpointStore | None,
        sender: tracking.MetricSender | None,
        best_weights: list | None = None,
    ) -> Any:
        import keras

        class _Callback(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                # EarlyStopping resets its counters in its own on_train_begin, which
                # runs first; a resumed training puts the saved ones back here.
                if state.epochs_done:
                    stopping.best = state.best
                    stopping.best_epoch = state.best_epoch
                    stopping.wait = state.wait
                    stopping.best_weights = best_weights

            def on_epoch_begin(self, epoch, logs=None):
                self.started = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                metrics = {name: float(value) for name, value in (logs or {}).items()}
                metrics["epoch_seconds"] = time.perf_counter() - self.started
                state.record(metrics)
                state.stopped_early = bool(self.model.stop_training)
                state.best = None if stopping.best is None else float(stopping.best)
                state.best_epoch = int(stopping.best_epoch)
                state.wait = int(stopping.wait)
                if store is not None:
                    store.save(self.model, state, stopping.best_weights)
                if sender is not None:
                    sender.send(metrics, step=epoch + 1)
                logger.info(
                    "%s epoch %d/%d: loss %.4f accuracy %.4f val_loss %.4f val_accuracy %.4f (%.1f s)",
                    model_name,
                    epoch + 1,
                    max_epochs,
                    metrics.get("loss", float("nan")),
                    metrics.get("accuracy", float("nan")),
                    metrics.get("val_loss", float("nan")),
                    metrics.get("val_accuracy", float("nan")),
                    metrics["epoch_seconds"],
                )

        return _Callback()


def _send_missing_epochs(state: TrainingState, run_id: str, sender: tracking.MetricSender) -> None:
    """Log the checkpointed epochs that the MLflow run lacks (an earlier try died before logging them)."""
    logged = tracking.logged_steps(run_id, "loss")
    missing = [step for step in range(1, state.epochs_done + 1) if step not in logged]
    for step in missing:
        sender.send({name: values[step - 1] for name, values in state.history.items()}, step=step)
    if missing:
        logger.info("Logged the metrics of epochs %s from the checkpoint to MLflow run %s", missing, run_id)


def fit_model(
    model_name: str,
    splits: Splits,
    config: PipelineConfig,
    store: CheckpointStore | None = None,
    run_id: str | None = None,
) -> tuple[Any, dict]:
    """Compile and fit a model, resuming from the checkpoint in `store` if there is one.

    Metrics go to MLflow run `run_id` when it is given. Returns the model, with the
    best epoch's weights, and its history and timing over all tries.
    """
    import keras

    from fer_tasks.models import build_model

    keras.utils.set_random_seed(config.seed)
    model = build_model(model_name, fused_batch_norm=True)
    model.compile(
        optimizer=keras.optimizers.Adam(config.learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    stopping = keras.callbacks.EarlyStopping(
        monitor="val_loss",
        min_delta=config.min_delta,
        patience=config.patience,
        restore_best_weights=True,
    )
    state, best_weights = TrainingState(), None
    restored = store.restore(model) if store is not None else None
    if restored:
        state, best_weights = restored
        logger.info(
            "Resuming %s from the checkpoint after epoch %d of %d in %s",
            model_name,
            state.epochs_done,
            config.epochs,
            store.directory,
        )
    resumed_after = state.epochs_done
    sender = tracking.MetricSender(run_id) if run_id else None
    try:
        if sender is not None and state.epochs_done:
            _send_missing_epochs(state, run_id, sender)
        if state.stopped_early or state.epochs_done >= config.epochs:
            # The earlier try finished fitting but died before its results were stored.
            if best_weights is not None:
                model.set_weights(best_weights)
        else:
            _fit(model, model_name, splits, config, state, stopping, store, sender, best_weights)
    finally:
        if sender is not None:
            sender.close()

    history = state.history
    seconds = float(sum(history.get("epoch_seconds", [])))
    epochs_run = state.epochs_done
    best_epoch = int(np.argmin(history["val_loss"])) + 1
    return model, {
        "history": history,
        "epochs": epochs_run,
        "best_epoch": best_epoch,
        "train_seconds": seconds,
        "seconds_per_epoch": seconds / epochs_run,
        "resumed_after_epoch": resumed_after,
    }


def _fit(
    model: Any,
    model_name: str,
    splits: Splits,
    config: PipelineConfig,
    state: TrainingState,
    stopping: Any,
    store: CheckpointStore | None,
    sender: tracking.MetricSender | None,
    best_weights: list | None,
) -> None:
    train = make_dataset(
        splits.train_images,
        splits.train_labels,
        config.batch_size,
        shuffle=True,
        augment=model_name == "cnn_aug",
        seed=config.seed,
    )
    validation = validation_dataset(splits, config)
    recorder = EpochRecorder(model_name, config.epochs, state, stopping, store, sender, best_weights)
    # NOTE: a resumed training reseeds its shuffling and augmentation from the start,
    # so its later epochs see other batches than an uninterrupted run would.
    model.fit(
        train,
        validation_data=validation,
        epochs=config.epochs,
        initial_epoch=state.epochs_done,
        callbacks=[stopping, recorder],
        shuffle=False,  # the dataset shuffles itself each epoch
        verbose=0,
    )


def describe_architecture(model: Any) -> tuple[str, list[list[Any]]]:
    """Return the Keras summary text and a (name, type, output shape, params) table."""
    lines: list[str] = []
    model.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    table = [
        [layer.name, type(layer).__name__, str(layer.output.shape), int(layer.count_params())]
        for layer in model.layers
    ]
    return "\n".join(lines), table


def parameter_counts(model: Any) -> dict[str, int]:
    import keras

    trainable = sum(keras.ops.size(weight) for weight in model.trainable_weights)
    non_trainable = sum(keras.ops.size(weight) for weight in model.non_trainable_weights)
    return {
        "parameters_total": int(model.count_params()),
        "parameters_trainable": int(trainable),
        "parameters_non_trainable": int(non_trainable),
    }


def train_model(
    config: PipelineConfig, model_name: str, parent: dict, context: RunContext
) -> dict[str, Any]:
    """Train `model_name` in its own MLflow run under `parent`; return a small summary.

    The summary (run id, model URI, headline metrics) is what travels by XCom. A
    retry of the task resumes from the last epoch checkpoint of the earlier try and
    reopens its MLflow run. The checkpoints are deleted once the run is complete.
    """
    intra_threads, inter_threads = configure_threads(len(config.models))
    precision = resolve_training_precision(config, model_name)
    store = CheckpointStore.for_task(context.dag_id, context.dag_run_id, context.task_id)
    splits = load_splits(config)
    logger.info(
        "Training %s on %d images, validating on %d (max %d epochs, batch %d)",
        model_name,
        len(splits.train_labels),
        len(splits.validation_labels),
        config.epochs,
        config.batch_size,
    )
    with tracking.child_run(parent, context, model_name, resume=store.exists()) as run_id:
        from fer_tasks.models import build_model

        counts = parameter_counts(build_model(model_name))
        tracking.log_params(
            {
                "model": model_name,
                "augmentation": model_name == "cnn_aug",
                **{key: value for key, value in config.to_dict().items()},
                **counts,
                "train_rows": len(splits.train_labels),
                "validation_rows": len(splits.validation_labels),
                "data_sha256": splits.sha256,
                "precision_used": precision.name,
                "precision_reason": precision.reason,
                "intra_op_threads": intra_threads,
                "inter_op_threads": inter_threads,
            }
        )
        with dtype_policy(precision.policy):
            model, fit = fit_model(model_name, splits, config, store=store, run_id=run_id)
        validation_loss, validation_accuracy = model.evaluate(
            validation_dataset(splits, config),
            verbose=0,
        )
        tracking.log_metrics(
            {
                "best_val_loss": validation_loss,
                "best_val_accuracy": validation_accuracy,
                "epochs_run": fit["epochs"],
                "best_epoch": fit["best_epoch"],
                "seconds_per_epoch": fit["seconds_per_epoch"],
            }
        )
        # The saved model has plain Keras layers, so loading it needs no fer_tasks import.
        model = standard_copy(model)
        summary_text, architecture = describe_architecture(model)
        tracking.log_text(summary_text, tracking.SUMMARY_ARTIFACT)
        tracking.log_json(architecture, tracking.ARCHITECTURE_ARTIFACT)
        tracking.log_json(fit, tracking.HISTORY_ARTIFACT)
        model_uri = tracking.log_keras_model(model, to_model_input(splits.validation_images[:4]))
    store.remove()
    logger.info(
        "Trained %s: val_accuracy %.4f after %d epochs (best epoch %d, %.1f s per epoch)",
        model_name,
        validation_accuracy,
        fit["epochs"],
        fit["best_epoch"],
        fit["seconds_per_epoch"],
    )
    return {
        "model": model_name,
        "run_id": run_id,
        "model_uri": model_uri,
        "val_accuracy": float(validation_accuracy),
        "val_loss": float(validation_loss),
        "epochs": fit["epochs"],
        "best_epoch": fit["best_epoch"],
        "seconds_per_epoch": round(fit["seconds_per_epoch"], 3),
        "parameters": counts["parameters_total"],
    }
