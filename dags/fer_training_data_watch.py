"""
# FER training data watch

Marks the `fer_training_data` Asset updated when the training file changes, which
triggers `fer_pipeline` without waiting for its weekly schedule.

Every run hashes the file (`FER_TRAIN_CSV`, else the built-in data) and compares
the SHA-256 with the one stored in the Airflow Variable `fer_training_data_sha256`.
A changed file updates the Variable and emits an Asset event; an unchanged or
missing file skips the task, so no event is emitted. Trigger it by hand after
copying a new file in place, or let it poll on `FER_WATCH_SCHEDULE` (default every
15 minutes).
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from airflow.sdk import Asset, dag, task

from fer_tasks.config import training_data_uri

TRAINING_DATA = Asset(name="fer_training_data", uri=training_data_uri())
HASH_VARIABLE = "fer_training_data_sha256"


@dag(
    dag_id=Path(__file__).stem,
    doc_md=__doc__,
    schedule=os.environ.get("FER_WATCH_SCHEDULE", "*/15 * * * *"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["fer2013"],
)
def fer_training_data_watch():
    @task(outlets=[TRAINING_DATA])
    def detect_change() -> dict:
        """Emit an Asset event when the training file's content hash changed."""
        from urllib.parse import urlparse

        from airflow.sdk import Variable
        from airflow.sdk.exceptions import AirflowSkipException

        from fer_tasks.data import file_sha256

        path = Path(urlparse(TRAINING_DATA.uri).path)
        if not path.is_file():
            raise AirflowSkipException(f"{path} does not exist yet")
        digest = file_sha256(path)
        if Variable.get(HASH_VARIABLE, default=None) == digest:
            raise AirflowSkipException(f"{path} is unchanged (sha256 {digest[:12]})")
        Variable.set(HASH_VARIABLE, digest)
        return {"path": str(path), "sha256": digest}

    detect_change()


fer_training_data_watch()
