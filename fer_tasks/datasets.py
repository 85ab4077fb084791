"""Resolve a run's input files and split them into training, validation and test sets.

Every stage calls `load_splits` with the same config and gets the same arrays. The
split is a pure function of the labels, the validation mode and the seed. The parsed
files come from a cache keyed by their content, so nothing is parsed twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fer_tasks import config as settings
from fer_tasks.config import CLASS_NAMES, PipelineConfig
from fer_tasks.data import (
    DataError,
    Dataset,
    class_counts,
    load_csv_cached,
    split_fer2013,
    training_rows,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Splits:
    """The arrays one run trains, validates and predicts on. Images are uint8 (n, 48, 48)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray
    test_images: np.ndarray
    test_ids: np.ndarray
    # Labelled test sets by name: "public" and "private" for fer2013.csv input, and
    # "test" for the built-in data, whose generator also writes the test labels.
    labelled_tests: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    train_source: str = ""
    test_source: str = ""
    parse_seconds: float = 0.0
    skipped_rows: int = 0
    sha256: str = ""


def resolve_paths(config: PipelineConfig) -> tuple[Path, Path | None]:
    """Return (train file, test file), generating the built-in data when no path is set."""
    if config.uses_builtin_data:
        from fer_tasks.synthetic import write_builtin_dataset

        directory = settings.builtin_data_dir() / (
            f"seed{config.seed}-train{config.builtin_rows}-test{config.builtin_test_rows}"
        )
        return write_builtin_dataset(
            directory,
            train_rows=config.builtin_rows,
            test_rows=config.builtin_test_rows,
            seed=config.seed,
        )
    train = Path(config.train_csv).expanduser()
    test = Path(config.test_csv).expanduser() if config.test_csv else None
    for path in (train, test):
        if path is not None and not path.is_file():
            raise FileNotFoundError(
                f"input file {path} does not exist; check the train_csv and test_csv params"
            )
    return train, test


def validation_indices(
    labels: np.ndarray, mode: str, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return (train indices, validation indices).

    "head" takes the first `fraction` of the rows, as the original study did.
    "stratified" draws a seeded sample with the class proportions of the whole set.
    """
    count = len(labels)
    validation_count = max(1, int(round(count * fraction)))
    if mode == "head":
        indices = np.arange(count)
        return indices[validation_count:], indices[:validation_count]
    if mode == "stratified":
        from sklearn.model_selection import train_test_split

        train, validation = train_test_split(
            np.arange(count),
            test_size=validation_count,
            stratify=_stratify_labels(labels),
            random_state=seed,
        )
        return np.sort(train), np.sort(validation)
    raise ValueError(f"validation_mode must be 'head' or 'stratified', got {mode!r}")


def _stratify_labels(labels: np.ndarray) -> np.ndarray | None:
    # scikit-learn cannot stratify a class with a single row; fall back to a plain
    # seeded shuffle then, which keeps tiny test inputs usable.
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    present = counts[counts > 0]
    return labels if present.min() >= 2 else None


def load_splits(config: PipelineConfig) -> Splits:
    """Load (from cache when possible) and split the run's input files."""
    started = time.perf_counter()
    train_path, test_path = resolve_paths(config)
    cache = settings.cache_dir()
    train = load_csv_cached(train_path, cache_dir=cache, skip_bad_rows=config.skip_bad_rows)

    labelled_tests: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if train.kind == "test":
        raise DataError(
            str(train_path), 0, "id,feature",
            "file has a test header (id,feature) and no labels, but train_csv needs a training file",
            "Set train_csv to a file with the header label,feature or emotion,pixels,Usage, "
            "and test_csv to this file.",
        )
    if train.kind == "fer2013":
        _, public, private = split_fer2013(train)
        for name, subset in (("public", public), ("private", private)):
            if subset is not None and len(subset.images):
                labelled_tests[name] = (subset.images, subset.labels)
    train = training_rows(train)

    test = _load_test(config, test_path, train, labelled_tests)
    skipped = len(train.skipped) + (len(test.skipped) if test is not None else 0)
    train_images, train_labels = train.images, train.labels
    if config.max_train_rows:
        train_images = train_images[: config.max_train_rows]
        train_labels = train_labels[: config.max_train_rows]
    train_index, validation_index = validation_indices(
        train_labels, config.validation_mode, config.validation_fraction, config.seed
    )
    if test is not None:
        test_images, test_ids = test.images, test.ids
    else:
        # fer2013.csv has no separate test file: the submission covers its test rows.
        test_images, test_ids = _fer2013_test_rows(labelled_tests)
    splits = Splits(
        train_images=train_images[train_index],
        train_labels=train_labels[train_index],
        validation_images=train_images[validation_index],
        validation_labels=train_labels[validation_index],
        test_images=test_images,
        test_ids=test_ids,
        labelled_tests=labelled_tests,
        train_source=str(train_path),
        test_source=str(test_path) if test_path else str(train_path),
        parse_seconds=train.parse_seconds + (test.parse_seconds if test is not None else 0.0),
        skipped_rows=skipped,
        sha256=train.sha256,
    )
    logger.info(
        "Loaded %d training, %d validation and %d test images in %.2f s (%s)",
        len(splits.train_labels),
        len(splits.validation_labels),
        len(splits.test_ids),
        time.perf_counter() - started,
        splits.train_source,
    )
    return splits


def _load_test(
    config: PipelineConfig,
    test_path: Path | None,
    train: Dataset,
    labelled_tests: dict[str, tuple[np.ndarray, np.ndarray]],
) -> Dataset | None:
    if test_path is None:
        if train.kind != "fer2013" and not labelled_tests:
            raise ValueError(
                f"test_csv is not set, and {train.path} is a course training file without "
                "test rows: set test_csv to the matching test.csv"
            )
        return None
    test = load_csv_cached(
        test_path, cache_dir=settings.cache_dir(), expected="test", skip_bad_rows=config.skip_bad_rows
    )
    answer_key = test_path.with_name("test_labels.csv")
    if config.uses_builtin_data and answer_key.is_file():
        labelled_tests["test"] = (test.images, _read_answer_key(answer_key, test.ids))
    return test


def _read_answer_key(path: Path, ids: np.ndarray) -> np.ndarray:
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
    by_id = dict(zip(table[:, 0].tolist(), table[:, 1].tolist(), strict=True))
    return np.array([by_id[int(identifier)] for identifier in ids], dtype=np.int64)


def _fer2013_test_rows(
    labelled_tests: dict[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    images = [images for images, _ in labelled_tests.values()]
    if not images:
        raise ValueError("the fer2013.csv input has no PublicTest or PrivateTest rows to predict")
    stacked = np.concatenate(images)
    return stacked, np.arange(len(stacked), dtype=np.int64)


def summarize(splits: Splits) -> dict:
    """Return the small, JSON-ready description of the data that XCom and the report carry."""
    return {
        "train_source": splits.train_source,
        "test_source": splits.test_source,
        "train_rows": int(len(splits.train_labels)),
        "validation_rows": int(len(splits.validation_labels)),
        "test_rows": int(len(splits.test_ids)),
        "labelled_tests": {name: int(len(labels)) for name, (_, labels) in splits.labelled_tests.items()},
        "class_counts": class_counts(np.concatenate([splits.train_labels, splits.validation_labels])),
        "parse_seconds": round(splits.parse_seconds, 3),
        "skipped_rows": splits.skipped_rows,
        "sha256": splits.sha256,
    }
