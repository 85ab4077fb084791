"""The `make run` runner's handling of an `airflow dags test` that does not exit."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import run_dag  # noqa: E402

# A line as `airflow dags test` 3.3.2 logs it when the DAG run ends.
FINISHED = (
    "2026-12-05T01:17:56.832015Z [info     ] Marking run <DagRun fer_pipeline @ 2026-12-05 01:17:50.651650+00:00: "
    "manual__2026-12-05T01:17:51.140542+00:00, state:running, queued_at: None. run_type: manual> {state} "
    "[airflow.models.dagrun.DagRun] loc=dagrun.py:1219"
)


@pytest.mark.parametrize(("state", "expected"), [("successful", 0), ("failed", 1)])
def test_hung_command_is_stopped(monkeypatch, tmp_path, state, expected):
    monkeypatch.setattr(run_dag, "EXIT_GRACE_SECONDS", 1)
    pid_file = tmp_path / "child.pid"
    # The command forks a child that would outlive it, as an executor worker does.
    script = (
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        f"print({FINISHED.format(state=state)!r}, flush=True)\n"
        "time.sleep(600)\n"
    )
    started = time.monotonic()
    returncode = run_dag.run_filtered([sys.executable, "-c", script], dict(os.environ))

    assert returncode == expected
    assert time.monotonic() - started < 60
    child_pid = int(pid_file.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child_pid}").exists() or "Z" in Path(f"/proc/{child_pid}/stat").read_text().split()[2]


def test_exit_code_passes_through_without_marker():
    assert run_dag.run_filtered([sys.executable, "-c", "import sys; sys.exit(3)"], dict(os.environ)) == 3
