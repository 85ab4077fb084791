"""Run one real DAG run of fer_pipeline from the command line and say where its outputs are.

`make run` calls this after installing. It triggers `airflow dags test` with the
LocalExecutor, so the three training tasks run in parallel as task processes, and
the run is recorded in the Airflow metadata database like any other DAG run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DAG_ID = "fer_pipeline"


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-csv", default="", help="training file; empty selects the built-in data")
    parser.add_argument("--test-csv", default="", help="test file (id,feature)")
    parser.add_argument("--epochs", type=int, default=12, help="maximum epochs per model")
    parser.add_argument(
        "--conf", default="{}", help="extra DAG params as a JSON object, for example '{\"seed\": 1}'"
    )
    return parser.parse_args(argv)


def build_conf(arguments: argparse.Namespace) -> dict:
    conf = json.loads(arguments.conf)
    if not isinstance(conf, dict):
        raise SystemExit(f"--conf must be a JSON object, got {arguments.conf!r}")
    conf.setdefault("epochs", arguments.epochs)
    for key, value in (("train_csv", arguments.train_csv), ("test_csv", arguments.test_csv)):
        if value:
            conf.setdefault(key, str(Path(value).expanduser().resolve()))
    return conf


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    conf = build_conf(arguments)
    airflow = Path(sys.executable).with_name("airflow")
    command = [str(airflow), "dags", "test", DAG_ID, "--conf", json.dumps(conf)]
    print(f"Running DAG {DAG_ID} with conf {json.dumps(conf)}", flush=True)
    started = time.monotonic()
    result = subprocess.run(command, cwd=PROJECT_ROOT, env=os.environ.copy(), check=False)
    minutes = (time.monotonic() - started) / 60
    summary_path = Path(os.environ.get("FER_OUTPUT_DIR", PROJECT_ROOT / "output")) / "latest" / "summary.json"
    if result.returncode != 0 or not summary_path.is_file():
        print(f"\nThe DAG run failed after {minutes:.1f} min; the task logs above say why.", file=sys.stderr)
        return result.returncode or 1
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
    print("Open the Airflow and MLflow UIs on 127.0.0.1 with `make ui`:")
    print("  Airflow http://127.0.0.1:8080   MLflow http://127.0.0.1:5000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
