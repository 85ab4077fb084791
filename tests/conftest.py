"""Shared pytest fixtures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
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


@pytest.fixture(scope="session")
def local_stack():
    """The `make up` stack on free ports in a temporary folder, stopped again when the session ends.

    Yields a `scripts/stack.py` `Stack`: its `airflow_url`, `mlflow_url`,
    `credentials()`, `airflow_token()`, `stop_service()` and `start_service()`
    reach the running services. Outputs, caches and built-in data of the DAG runs
    go to the temporary folder, and the DAG has no schedule, so it runs only when
    a test triggers it.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from stack import Stack, StackSettings, free_port

    # Not under pytest's temporary folder (mode 0700): when the tests run as root,
    # PostgreSQL runs as another user, who must pass through every folder above its data.
    root = Path(tempfile.mkdtemp(prefix="fer-stack-test-"))
    root.chmod(0o711)
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    airflow_port, mlflow_port, postgres_port = sorted(ports)
    workspace = root / "workspace"
    settings = StackSettings(
        airflow_port=airflow_port,
        mlflow_port=mlflow_port,
        postgres_port=postgres_port,
        environment={
            "FER_OUTPUT_DIR": str(workspace / "output"),
            "FER_CACHE_DIR": str(workspace / "cache"),
            "FER_BUILTIN_DATA_DIR": str(workspace / "builtin"),
            "FER_CHECKPOINT_DIR": str(workspace / "checkpoints"),
            "FER_SCHEDULE": "none",
            # Two runs at once, for the concurrency test.
            "FER_MAX_ACTIVE_RUNS": "2",
            # The three trainings share the machine's cores; one thread each avoids oversubscription.
            "FER_TF_INTRA_OP_THREADS": "1",
        },
    )
    stack = Stack(root / "state", settings)
    try:
        stack.up()
        yield stack
    finally:
        stack.down()
        shutil.rmtree(root, ignore_errors=True)
