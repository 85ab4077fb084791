"""Command line for checking FER2013 CSV files and generating the built-in data set.

    python -m fer_tasks check FILE [FILE ...] [--expect KIND] [--skip-bad-rows]
    python -m fer_tasks generate DIRECTORY [--train-rows N] [--test-rows N] [--seed S]

The same commands are installed as the `fer-tasks` console script. `check` exits
with 0 when every file is valid, 1 when a file has invalid content, and 2 when a
file cannot be read (for example, when it does not exist). It applies the checks of
the DAG's validate_data task: a training file (course train.csv, or the Training
rows of fer2013.csv) must also have rows of every class.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

import numpy as np

from fer_tasks.config import DEFAULTS
from fer_tasks.data import (
    DataError,
    Dataset,
    DataValidationError,
    KINDS,
    class_counts,
    load_csv,
    split_fer2013,
    training_rows,
)

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_UNREADABLE = 2
MAX_PRINTED_ERRORS = 20


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand with `argv` (default: `sys.argv[1:]`) and return the exit code."""
    parser = _build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return arguments.handler(arguments)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fer-tasks", description="Tools for the FER2013 facial-expression pipeline."
    )
    subcommands = parser.add_subparsers(dest="command", required=True)

    check = subcommands.add_parser(
        "check",
        help="validate CSV files without training",
        description="Validate FER2013 CSV files (train, test or fer2013.csv layout, "
        "plain or gzipped) and print their row and class counts.",
    )
    check.add_argument("files", nargs="+", metavar="FILE", help="CSV file to validate")
    check.add_argument(
        "--expect",
        choices=KINDS,
        metavar="KIND",
        help="reject a file whose header is not of this layout: train (label,feature), "
        "test (id,feature) or fer2013 (emotion,pixels,Usage); default: any",
    )
    check.add_argument(
        "--skip-bad-rows",
        action="store_true",
        help="drop invalid rows and list them, instead of failing",
    )
    check.set_defaults(handler=_run_check)

    generate = subcommands.add_parser(
        "generate",
        help="write the built-in synthetic data set",
        description="Write synthetic train.csv and test.csv files in the course layout.",
    )
    generate.add_argument("directory", metavar="DIRECTORY", help="folder to write the files to")
    generate.add_argument(
        "--train-rows", type=_positive_int, default=DEFAULTS.builtin_rows,
        help="number of training rows (default: %(default)s)",
    )
    generate.add_argument(
        "--test-rows", type=_positive_int, default=DEFAULTS.builtin_test_rows,
        help="number of test rows (default: %(default)s)",
    )
    generate.add_argument(
        "--seed", type=int, default=DEFAULTS.seed,
        help="random seed, so the same seed writes the same files (default: %(default)s)",
    )
    generate.set_defaults(handler=_run_generate)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_check(arguments: argparse.Namespace) -> int:
    exit_code = EXIT_OK
    for path in arguments.files:
        try:
            dataset = load_csv(
                path, expected=arguments.expect, skip_bad_rows=arguments.skip_bad_rows
            )
            if dataset.kind != "test":
                training_rows(dataset)
        except FileNotFoundError:
            print(f"error: {path}: file not found", file=sys.stderr)
            exit_code = max(exit_code, EXIT_UNREADABLE)
        except OSError as error:
            reason = error.strerror or error
            print(f"error: {path}: cannot read the file ({reason})", file=sys.stderr)
            exit_code = max(exit_code, EXIT_UNREADABLE)
        except DataValidationError as error:
            print(f"error: {path}: {_plural(len(error.errors), 'invalid row')}", file=sys.stderr)
            print(error.describe(limit=MAX_PRINTED_ERRORS), file=sys.stderr)
            exit_code = max(exit_code, EXIT_INVALID)
        except DataError as error:
            print(f"error: {error}", file=sys.stderr)
            exit_code = max(exit_code, EXIT_INVALID)
        else:
            print(_describe_dataset(dataset))
    return exit_code


def _describe_dataset(dataset: Dataset) -> str:
    """Format kind, row count, class counts, skipped rows and parse time of one file."""
    lines = [
        f"{dataset.path}: {dataset.kind}, {_plural(len(dataset), 'row')}, "
        f"parsed in {dataset.parse_seconds:.2f} s"
    ]
    if dataset.kind == "fer2013":
        for part in split_fer2013(dataset):
            if part is not None:
                counts = _format_counts(part.labels)
                lines.append(f"  {part.usage[0]} ({_plural(len(part), 'row')}): {counts}")
    elif dataset.labels is not None:
        lines.append(f"  classes: {_format_counts(dataset.labels)}")
    else:
        lines.append(f"  ids: {dataset.ids.min()}..{dataset.ids.max()}, no labels")

    if dataset.skipped:
        lines.append(f"  skipped {_plural(len(dataset.skipped), 'invalid row')}:")
        lines.extend(f"    {error}" for error in dataset.skipped[:MAX_PRINTED_ERRORS])
        hidden = len(dataset.skipped) - MAX_PRINTED_ERRORS
        if hidden > 0:
            lines.append(f"    ... and {hidden} more invalid rows")
    return "\n".join(lines)


def _format_counts(labels: np.ndarray) -> str:
    return ", ".join(f"{name} {count}" for name, count in class_counts(labels).items())


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _run_generate(arguments: argparse.Namespace) -> int:
    # Imported here so that `check` works without the generator's dependencies.
    from fer_tasks.synthetic import write_builtin_dataset

    train_path, test_path = write_builtin_dataset(
        arguments.directory,
        train_rows=arguments.train_rows,
        test_rows=arguments.test_rows,
        seed=arguments.seed,
    )
    print(train_path)
    print(test_path)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
