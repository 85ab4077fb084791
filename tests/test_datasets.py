"""Input resolution and splits: built-in data, fer2013.csv and missing files."""

from __future__ import annotations

import numpy as np
import pytest

from fer_tasks.config import PipelineConfig
from fer_tasks.datasets import load_splits, summarize
from fer_tasks.synthetic import generate_faces


@pytest.fixture(autouse=True)
def private_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FER_BUILTIN_DATA_DIR", str(tmp_path / "builtin"))


def write_fer2013(path, usage_counts: dict[str, int]) -> tuple[np.ndarray, list[str]]:
    total = sum(usage_counts.values())
    images, labels = generate_faces(total, seed=7)
    usages = [usage for usage, count in usage_counts.items() for _ in range(count)]
    lines = ["emotion,pixels,Usage"]
    for image, label, usage in zip(images, labels, usages, strict=True):
        lines.append(f"{label},{' '.join(map(str, image.ravel()))},{usage}")
    path.write_text("\n".join(lines) + "\n")
    return labels, usages


def test_builtin_data_is_generated_and_split(tmp_path):
    config = PipelineConfig(builtin_rows=140, builtin_test_rows=21)
    splits = load_splits(config)
    assert len(splits.train_labels) == 126
    assert len(splits.validation_labels) == 14
    assert splits.test_ids.tolist() == list(range(21))
    assert set(splits.labelled_tests) == {"test"}
    assert (tmp_path / "builtin").is_dir()


def test_fer2013_rows_split_by_usage(tmp_path):
    path = tmp_path / "fer2013.csv"
    labels, _ = write_fer2013(path, {"Training": 70, "PublicTest": 14, "PrivateTest": 21})
    splits = load_splits(PipelineConfig(train_csv=str(path)))

    assert len(splits.train_labels) + len(splits.validation_labels) == 70
    assert splits.validation_labels.tolist() == labels[:7].tolist()
    assert set(splits.labelled_tests) == {"public", "private"}
    assert splits.labelled_tests["public"][1].tolist() == labels[70:84].tolist()
    assert splits.labelled_tests["private"][1].tolist() == labels[84:].tolist()
    assert splits.test_ids.tolist() == list(range(35))
    summary = summarize(splits)
    assert summary["labelled_tests"] == {"public": 14, "private": 21}


def test_course_train_file_without_test_file_is_rejected(tmp_path):
    images, labels = generate_faces(14, seed=3)
    path = tmp_path / "train.csv"
    rows = [f"{label},{' '.join(map(str, image.ravel()))}" for image, label in zip(images, labels, strict=True)]
    path.write_text("label,feature\n" + "\n".join(rows) + "\n")
    with pytest.raises(ValueError, match="set test_csv"):
        load_splits(PipelineConfig(train_csv=str(path)))


def test_missing_input_file_names_the_path(tmp_path):
    missing = tmp_path / "absent.csv"
    with pytest.raises(FileNotFoundError, match="absent.csv does not exist"):
        load_splits(PipelineConfig(train_csv=str(missing), test_csv=str(missing)))


def test_row_limit_applies_before_the_split():
    splits = load_splits(PipelineConfig(builtin_rows=140, builtin_test_rows=14, max_train_rows=70))
    assert len(splits.train_labels) + len(splits.validation_labels) == 70
