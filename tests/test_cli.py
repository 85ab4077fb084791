"""Tests for the command line: python -m fer_tasks check / generate."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fer_tasks.__main__ import main
from fer_tasks.config import PIXEL_COUNT

REPO_ROOT = Path(__file__).resolve().parent.parent


def pixel_field(seed: int) -> str:
    values = np.random.default_rng(seed).integers(0, 256, PIXEL_COUNT)
    return " ".join(str(value) for value in values)


def write_csv(folder: Path, name: str, header: str, rows: list[str]) -> Path:
    path = folder / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fer_tasks", *arguments],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def train_file(tmp_path) -> Path:
    rows = [f"{label},{pixel_field(index)}" for index, label in enumerate([3, 3, 0, 6, 1, 2, 4, 5])]
    return write_csv(tmp_path, "train.csv", "label,feature", rows)


@pytest.fixture
def bad_train_file(tmp_path) -> Path:
    rows = [f"3,{pixel_field(0)}", f"9,{pixel_field(1)}"]
    rows += [f"{label},{pixel_field(label + 2)}" for label in range(7)]
    return write_csv(tmp_path, "bad_train.csv", "label,feature", rows)


def test_check_valid_train_file(train_file):
    result = run_cli("check", str(train_file))

    assert result.returncode == 0, result.stderr
    assert f"{train_file}: train, 8 rows, parsed in" in result.stdout
    assert "Angry 1, Disgust 1, Fear 1, Happy 2, Sad 1, Surprise 1, Neutral 1" in result.stdout
    assert result.stderr == ""


def test_check_test_file_shows_ids(tmp_path):
    path = write_csv(tmp_path, "test.csv", "id,feature", [f"{i},{pixel_field(i)}" for i in (4, 9)])

    result = run_cli("check", str(path))

    assert result.returncode == 0, result.stderr
    assert "test, 2 rows" in result.stdout
    assert "ids: 4..9" in result.stdout


def test_check_fer2013_counts_per_usage(tmp_path):
    rows = [f"{label},{pixel_field(label)},Training" for label in (0, 3, 1, 2, 4, 5, 6)]
    rows.append(f"5,{pixel_field(9)},PrivateTest")
    path = write_csv(tmp_path, "fer2013.csv", "emotion,pixels,Usage", rows)

    result = run_cli("check", str(path))

    assert result.returncode == 0, result.stderr
    assert "fer2013, 8 rows" in result.stdout
    assert "Training (7 rows): Angry 1, Disgust 1, Fear 1, Happy 1" in result.stdout
    assert "PrivateTest (1 row): Angry 0" in result.stdout
    assert "PublicTest" not in result.stdout


def test_check_invalid_row_exits_1(bad_train_file):
    result = run_cli("check", str(bad_train_file))

    assert result.returncode == 1
    assert f"{bad_train_file} line 3: label '9' is out of range 0..6" in result.stderr
    assert "1 invalid row\n" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_check_bad_header_exits_1(tmp_path):
    path = write_csv(tmp_path, "odd.csv", "label,pixels", [f"3,{pixel_field(0)}"])

    result = run_cli("check", str(path))

    assert result.returncode == 1
    assert f"{path} line 1: header 'label,pixels'" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_empty_file_exits_1(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")

    result = run_cli("check", str(path))

    assert result.returncode == 1
    assert f"{path}: file is empty" in result.stderr


def test_check_missing_file_exits_2(tmp_path, train_file):
    missing = tmp_path / "absent.csv"

    result = run_cli("check", str(missing), str(train_file))

    assert result.returncode == 2
    assert f"{missing}: file not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert "train, 8 rows" in result.stdout


def test_check_skip_bad_rows_lists_them(bad_train_file):
    result = run_cli("check", str(bad_train_file), "--skip-bad-rows")

    assert result.returncode == 0, result.stderr
    assert "train, 8 rows" in result.stdout
    assert "skipped 1 invalid row:" in result.stdout
    assert "line 3: label '9' is out of range" in result.stdout


def test_check_reports_every_file(train_file, bad_train_file):
    result = run_cli("check", str(bad_train_file), str(train_file))

    assert result.returncode == 1
    assert "train, 8 rows" in result.stdout
    assert "bad_train.csv line 3" in result.stderr


def test_main_accepts_argv(train_file, capsys):
    exit_code = main(["check", str(train_file)])

    assert exit_code == 0
    assert "train, 8 rows" in capsys.readouterr().out


def test_main_without_subcommand_exits_2(capsys):
    with pytest.raises(SystemExit) as caught:
        main([])

    assert caught.value.code == 2
    assert "check" in capsys.readouterr().err


def test_generate_rejects_zero_rows(tmp_path, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["generate", str(tmp_path), "--train-rows", "0"])

    assert caught.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_generate_writes_checkable_files(tmp_path):
    pytest.importorskip("fer_tasks.synthetic", reason="fer_tasks.synthetic is not written yet")
    folder = tmp_path / "builtin"

    result = run_cli(
        "generate", str(folder), "--train-rows", "30", "--test-rows", "10", "--seed", "3"
    )

    assert result.returncode == 0, result.stderr
    printed = result.stdout.split()
    assert len(printed) == 2
    train_path, test_path = (Path(text) for text in printed)
    assert train_path.is_file()
    assert test_path.is_file()
    checked = run_cli("check", str(train_path), str(test_path))
    assert checked.returncode == 0, checked.stderr
    assert "train, 30 rows" in checked.stdout
    assert "test, 10 rows" in checked.stdout


def test_check_real_sample_files(fer_data_dir):
    paths = [fer_data_dir / "sample_train.csv", fer_data_dir / "sample_test.csv"]
    if not all(path.is_file() for path in paths):
        pytest.skip(f"sample_train.csv or sample_test.csv missing in {fer_data_dir}")

    result = run_cli("check", *map(str, paths))

    assert result.returncode == 0, result.stderr
    assert "train, 300 rows" in result.stdout
    assert "test, 100 rows" in result.stdout
