"""Shared pytest fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "fer2013"


@pytest.fixture(scope="session")
def fer_data_dir() -> Path:
    """Folder with the real FER2013 files: `FER_DATA_DIR`, else ../shared/fer2013 beside the repo.

    Tests that use it are skipped when the folder does not exist.
    """
    folder = Path(os.environ.get("FER_DATA_DIR") or DEFAULT_DATA_DIR).expanduser()
    if not folder.is_dir():
        pytest.skip(
            f"real FER2013 data not found in {folder}; set FER_DATA_DIR to the folder "
            "with train.csv.gz, test.csv.gz, sample_train.csv and sample_test.csv"
        )
    return folder


@pytest.fixture
def tracking_store(tmp_path, monkeypatch) -> Path:
    """Point the library at a fresh SQLite MLflow store and private folders under tmp_path."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FER_ARTIFACT_ROOT", (tmp_path / "mlartifacts").as_uri())
    monkeypatch.setenv("FER_OUTPUT_DIR", str(tmp_path / "output"))
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FER_BUILTIN_DATA_DIR", str(tmp_path / "builtin"))
    monkeypatch.setenv("FER_CHECKPOINT_DIR", str(tmp_path / "checkpoints"))
    return tmp_path


def run_airflow_cli(
    arguments: list[str], environment: dict[str, str], timeout: int = 300
) -> subprocess.CompletedProcess:
    """Run the virtualenv's `airflow` command and fail the test with its output if it fails."""
    result = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result
