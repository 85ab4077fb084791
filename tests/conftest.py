"""Shared pytest fixtures."""

from __future__ import annotations

import os
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
