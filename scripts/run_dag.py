"""Run one real DAG run of fer_pipeline on this machine and print where its outputs are.

`make run` calls this after installing. It starts an Airflow api-server on
127.0.0.1 (task processes report to its execution API), runs the DAG with
`airflow dags test --use-executor` under the LocalExecutor, so the three training
tasks run in parallel as separate task processes, and stops the api-server again.
The run is recorded in the Airflow metadata database like any other DAG run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "fer_pipeline"
API_START_TIMEOUT_SECONDS = 180
# `airflow dags test` logs this line once a second while tasks run in executor
# processes. It carries nothing a user needs, so the runner drops it from the output.
POLLING_NOISE = "No tasks to run. unrunnable tasks"
# The DAG run's final state, as the scheduler loop inside `airflow dags test` logs it.
FINISHED_LINE = re.compile(r"Marking run <DagRun fer_pipeline .*> (successful|failed)")
# NOTE: `airflow dags test --use-executor` 3.3.2 was seen to wait forever on an idle
# LocalExecutor worker after a failed run. The runner stops it this long after the
# DAG run finished and reports the run's own state.
EXIT_GRACE_SECONDS = 120

logger = logging.getLogger("run_dag")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-csv", default="", help="training file; empty selects the built-in data")
    parser.add_argument("--test-csv", default="", help="test file (id,feature)")
    parser.add_argument("--epochs", type=int, default=None, help="maximum epochs per model")
    parser.add_argument(
        "--conf", default="{}", help="extra DAG params as a JSON object, for example '{\"seed\": 1}'"
    )
    parser.add_argument(
        "--api-port", type=int, default=0, help="port of the api-server on 127.0.0.1 (0: any free port)"
    )
    return parser.parse_args(argv)


def build_conf(arguments: argparse.Namespace) -> dict:
    try:
        conf = json.loads(arguments.conf or "{}")
    except json.JSONDecodeError as error:
        raise SystemExit(f"CONF is not valid JSON ({error}): {arguments.conf!r}") from error
    if not isinstance(conf, dict):
        raise SystemExit(f"CONF must be a JSON object, got {arguments.conf!r}")
    if arguments.epochs is not None:
        conf["epochs"] = arguments.epochs
    missing = []
    for key, value in (("train_csv", arguments.train_csv), ("test_csv", arguments.test_csv)):
        if value:
            path = Path(value).expanduser().resolve()
            if not path.is_file():
                missing.append(f"{key.upper()} {value}")
            conf[key] = str(path)
    if missing:
        raise SystemExit(f"input file not found: {', '.join(missing)}")
    return conf


def validate_conf(conf: dict) -> None:
    """Check `conf` against the DAG's params, as the trigger form does, before anything starts."""
    from airflow.sdk.definitions.param import ParamsDict
    from airflow.sdk.exceptions import ParamValidationError

    sys.path.insert(0, str(PROJECT_ROOT / "dags"))
    from fer_pipeline import PARAMS

    unknown = sorted(set(conf) - set(PARAMS))
    if unknown:
        raise SystemExit(f"unknown param(s) {unknown} in CONF; known params: {sorted(PARAMS)}")
    params = ParamsDict(PARAMS)
    try:
        params.update(conf)
        params.validate()
    except ParamValidationError as error:
        first_line = str(error).splitlines()[0]
        raise SystemExit(f"invalid CONF: {first_line}") from None


def ensure_training_pool(environment: dict[str, str]) -> None:
    """Create or resize the `training` pool that the DAG's training tasks run in."""
    slots = os.environ.get("FER_TRAINING_POOL_SLOTS", "3")
    airflow = str(Path(sys.executable).with_name("airflow"))
    result = subprocess.run(
        [airflow, "pools", "set", "training", slots, "FER training tasks"],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise SystemExit(f"could not create the Airflow pool 'training': {result.stderr.strip()[-500:]}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def airflow_environment(port: int) -> dict[str, str]:
    """Return the environment shared by the api-server and the DAG run."""
    home = Path(os.environ.get("AIRFLOW_HOME", PROJECT_ROOT / ".airflow"))
    secret_file = home / "jwt_secret"
    if not secret_file.exists():
        home.mkdir(parents=True, exist_ok=True)
        secret_file.write_text(secrets.token_urlsafe(32))
        secret_file.chmod(0o600)
    return {
        # TensorFlow's C++ start-up notices would land in task logs as stderr "errors".
        "TF_CPP_MIN_LOG_LEVEL": "2",
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": os.environ.get("AIRFLOW__CORE__PARALLELISM", "4"),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": secret_file.read_text().strip(),
    }


def start_api_server(environment: dict[str, str], port: int, log_path: Path) -> subprocess.Popen:
    airflow = str(Path(sys.executable).with_name("airflow"))
    log = open(log_path, "w")  # noqa: SIM115 - the server writes to it until it stops
    server = subprocess.Popen(
        [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port)],
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + API_START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the Airflow api-server exited with {server.returncode}; see {log_path}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/version", timeout=2)
            return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    stop(server)
    raise SystemExit(f"the Airflow api-server did not respond within {API_START_TIMEOUT_SECONDS} s; see {log_path}")


def stop(server: subprocess.Popen) -> None:
    """Stop the api-server and the workers it started (its own process group)."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def run_filtered(command: list[str], environment: dict[str, str]) -> int:
    """Run `command`, copying its output to stdout without the polling noise; return its exit code.

    The command runs in its own process group, so that it can be stopped together
    with its executor workers when it does not exit after the DAG run finished.
    """
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    assert process.stdout is not None
    outcome: dict[str, int] = {}
    watchdog: threading.Timer | None = None
    try:
        for line in process.stdout:
            if POLLING_NOISE in line:
                continue
            sys.stdout.write(line)
            sys.stdout.flush()
            finished = FINISHED_LINE.search(line)
            if finished and watchdog is None:
                outcome["returncode"] = 0 if finished.group(1) == "successful" else 1
                watchdog = threading.Timer(EXIT_GRACE_SECONDS, _stop_hung_command, args=(process,))
                watchdog.daemon = True
                watchdog.start()
        returncode = process.wait()
    except KeyboardInterrupt:
        stop(process)
        raise
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if returncode in (-signal.SIGTERM, -signal.SIGKILL) and "returncode" in outcome:
        return outcome["returncode"]
    return returncode


def _stop_hung_command(process: subprocess.Popen) -> None:
    if process.poll() is None:
        print(
            f"airflow dags test did not exit {EXIT_GRACE_SECONDS} s after the DAG run finished; "
            f"stopping it and its executor workers (process group {process.pid})",
            file=sys.stderr,
            flush=True,
        )
        stop(process)


def print_summary(summary_path: Path, minutes: float) -> None:
    summary = json.loads(summary_path.read_text())
    output_dir = summary_path.parent.resolve()
    print(f"\nDAG run {summary['dag_run_id']} succeeded in {minutes:.1f} min.")
    for name, model in summary["models"].items():
        print(
            f"  {name:8s} val_accuracy {model['val_accuracy']:.4f}  epochs {model['epochs']:3d}  "
            f"{model['seconds_per_epoch']:.1f} s/epoch"
        )
    print(f"Best model: {summary['best_model']}")
    print(f"Outputs:    {output_dir}  (also output/latest)")
    print(f"Submission: {output_dir / 'submission.csv'}")
    print(f"Report:     {output_dir / 'report.html'}")
    airflow_port = os.environ.get("AIRFLOW__API__PORT", "8080")
    mlflow_port = os.environ.get("MLFLOW_PORT", "5000")
    print("Open the Airflow and MLflow UIs, on 127.0.0.1 only, with `make ui`:")
    print(f"  Airflow http://127.0.0.1:{airflow_port}   MLflow http://127.0.0.1:{mlflow_port}")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    conf = build_conf(arguments)
    validate_conf(conf)
    port = arguments.api_port or free_port()
    environment = airflow_environment(port)
    output_root = Path(os.environ.get("FER_OUTPUT_DIR", PROJECT_ROOT / "output"))
    log_path = Path(environment["AIRFLOW_HOME"]) / "api-server.log"

    ensure_training_pool(environment)
    print(f"Starting the Airflow api-server on 127.0.0.1:{port} (log: {log_path})", flush=True)
    server = start_api_server(environment, port, log_path)
    started = time.monotonic()
    started_at = time.time()
    try:
        print(f"Running DAG {DAG_ID} with conf {json.dumps(conf)}", flush=True)
        airflow = str(Path(sys.executable).with_name("airflow"))
        returncode = run_filtered(
            [airflow, "dags", "test", DAG_ID, "--use-executor", "--conf", json.dumps(conf)], environment
        )
    finally:
        stop(server)
    minutes = (time.monotonic() - started) / 60
    summary_path = output_root / "latest" / "summary.json"
    if returncode != 0:
        print(f"\nThe DAG run failed after {minutes:.1f} min; the task logs above say why.", file=sys.stderr)
        return returncode
    if not summary_path.is_file() or summary_path.stat().st_mtime < started_at:
        # The run succeeded without writing outputs: start_tracking found that the
        # data, settings and code match an earlier successful run.
        print(
            f"\nThe DAG run succeeded in {minutes:.1f} min without training: nothing changed since "
            "the last successful run, whose outputs are in output/latest. "
            "Add CONF='{\"force_retrain\": true}' to train anyway."
        )
        return 0
    print_summary(summary_path, minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
