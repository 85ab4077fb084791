"""A corpus of malformed input files, each run through both entry points a user meets.

Every case writes its files under tmp_path and goes through:

- the DAG's validate_data entry, `summarize(load_splits(config))`, which must
  either succeed or raise ValueError or FileNotFoundError (the errors that
  validate_data turns into a failure without retries);
- `python -m fer_tasks check --expect KIND FILE` as a subprocess, which must exit
  with 0 or 1 and never print a traceback.

A rejected case names the file, the line (none for a whole-file problem) and the
offending value in its message. An accepted case parses to the same arrays as the
clean file it was made from.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fer_tasks.config import PIXEL_COUNT, PipelineConfig
from fer_tasks.data import MAX_LINE_BYTES
from fer_tasks.datasets import load_splits, summarize

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRAIN_HEADER = "label,feature"
TEST_HEADER = "id,feature"
FER2013_HEADER = "emotion,pixels,Usage"
# Two rows of each class, so that every class also has a training row after the
# first row goes to validation.
TRAIN_LABELS = [index % 7 for index in range(14)]
TEST_IDS = list(range(5))
FER2013_USAGES = ["Training"] * 14 + ["PublicTest", "PrivateTest", "PrivateTest"]


def pixels(seed: int) -> list[int]:
    values = np.random.default_rng(seed).integers(0, 256, PIXEL_COUNT)
    values[0], values[1] = 0, 255
    return values.tolist()


def pixel_text(seed: int, separator: str = " ") -> str:
    return separator.join(map(str, pixels(seed)))


def train_rows() -> list[str]:
    return [f"{label},{pixel_text(index)}" for index, label in enumerate(TRAIN_LABELS)]


def course_test_rows() -> list[str]:
    return [f"{row_id},{pixel_text(100 + row_id)}" for row_id in TEST_IDS]


def fer2013_rows() -> list[str]:
    return [
        f"{index % 7},{pixel_text(index)},{usage}" for index, usage in enumerate(FER2013_USAGES)
    ]


def csv_bytes(header: str, rows: list[str], newline: str = "\n") -> bytes:
    return (newline.join([header, *rows]) + newline).encode("utf-8")


def replace_row(rows: list[str], index: int, row: str) -> list[str]:
    changed = list(rows)
    changed[index] = row
    return changed


def with_pixel(index: int, value: str, label: str = "3") -> str:
    values: list[object] = pixels(index)
    values[7] = value
    return f"{label},{' '.join(map(str, values))}"


def quote_all(row: str) -> str:
    return ",".join(f'"{field}"' for field in row.split(","))


def spaced(row: str) -> str:
    label, values = row.split(",")
    return f" {label} ,\t" + "  \t ".join(values.split()) + " "


def gzip_single_line_bomb(uncompressed_bytes: int) -> bytes:
    """Return a small gzip file whose content is one line of `uncompressed_bytes` bytes.

    A block compressed after a full flush refers to no earlier data, so repeating
    it repeats its content. The trailer's CRC is wrong, which only a reader that
    decompresses everything would notice.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"1 " * (1 << 19)
    head = compressor.compress(b"label,feature\n3,") + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(chunk) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush()
    return head + block * (uncompressed_bytes // len(chunk)) + tail


@dataclass(frozen=True)
class Case:
    """One input file and what must happen to it.

    Attributes:
        name: Test id.
        role: Which input the file is: train (train_csv), test (test_csv), or
            fer2013 (train_csv, with no test_csv).
        file_name: Name of the file written under tmp_path.
        content: Builds the file's bytes.
        line: For a rejected case, the line the message names (0: the whole file).
        value: For a rejected case, text the message must quote; None: accepted.
        fragment: For a rejected case, the reason the message must contain.
        clean: For an accepted case, builds the clean file it must parse like.
    """

    name: str
    role: str
    file_name: str
    content: Callable[[], bytes]
    line: int = 0
    value: str | None = None
    fragment: str = ""
    clean: Callable[[], bytes] | None = None

    @property
    def accepted(self) -> bool:
        return self.value is None


def clean_train() -> bytes:
    return csv_bytes(TRAIN_HEADER, train_rows())


def clean_test() -> bytes:
    return csv_bytes(TEST_HEADER, course_test_rows())


def clean_fer2013() -> bytes:
    return csv_bytes(FER2013_HEADER, fer2013_rows())


def accepted(name: str, role: str, file_name: str, content, clean) -> Case:
    return Case(name, role, file_name, content, clean=clean)


def rejected(name: str, role: str, file_name: str, content, line: int, value: str, fragment: str) -> Case:
    return Case(name, role, file_name, content, line=line, value=value, fragment=fragment)


def truncated_train() -> bytes:
    whole = clean_train()
    return whole[: len(whole) - 4000]


def no_disgust_train() -> bytes:
    rows = [row for row, label in zip(train_rows(), TRAIN_LABELS, strict=True) if label != 1]
    return csv_bytes(TRAIN_HEADER, rows)


def fer2013_disgust_only_in_tests() -> bytes:
    rows = [
        row for row in fer2013_rows() if not (row.startswith("1,") and row.endswith("Training"))
    ]
    rows.append(f"1,{pixel_text(50)},PublicTest")
    return csv_bytes(FER2013_HEADER, rows)


CASES = [
    # Accepted: variants a careful user would expect to work, normalised on load.
    accepted("train-utf8-bom", "train", "train.csv",
             lambda: b"\xef\xbb\xbf" + clean_train(), clean_train),
    accepted("train-crlf", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, train_rows(), "\r\n"), clean_train),
    accepted("train-gz-bom-crlf", "train", "train.csv.gz",
             lambda: gzip.compress(b"\xef\xbb\xbf" + csv_bytes(TRAIN_HEADER, train_rows(), "\r\n")),
             clean_train),
    accepted("train-quoted-fields", "train", "train.csv",
             lambda: csv_bytes('"label","feature"', [quote_all(row) for row in train_rows()]),
             clean_train),
    accepted("train-spaces-and-tabs", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, [spaced(row) for row in train_rows()]), clean_train),
    accepted("train-blank-lines-no-final-newline", "train", "train.csv",
             lambda: b"\n" + csv_bytes(TRAIN_HEADER, train_rows()).replace(b"\n", b"\n\n", 3).rstrip(),
             clean_train),
    accepted("train-columns-swapped-header-case", "train", "train.csv",
             lambda: csv_bytes(" Feature , LABEL ", [
                 f"{values},{label}" for label, values in (row.split(",") for row in train_rows())
             ]), clean_train),
    accepted("train-gzip-named-csv", "train", "train.csv",
             lambda: gzip.compress(clean_train()), clean_train),
    accepted("test-gz-crlf-quoted", "test", "test.csv.gz",
             lambda: gzip.compress(csv_bytes(TEST_HEADER, [quote_all(row) for row in course_test_rows()], "\r\n")),
             clean_test),
    accepted("fer2013-crlf-bom", "fer2013", "fer2013.csv",
             lambda: b"\xef\xbb\xbf" + csv_bytes(FER2013_HEADER, fer2013_rows(), "\r\n"), clean_fer2013),
    accepted("fer2013-gz", "fer2013", "fer2013.csv.gz",
             lambda: gzip.compress(clean_fer2013()), clean_fer2013),

    # Rejected: the whole file.
    rejected("train-empty", "train", "train.csv", lambda: b"", 0, "", "file is empty (0 bytes)"),
    rejected("train-header-only", "train", "train.csv", lambda: b"label,feature\n",
             0, "", "file has a header but no data rows"),
    rejected("test-gz-empty", "test", "test.csv.gz", lambda: gzip.compress(b""),
             0, "", "file is empty after gzip decompression"),
    rejected("train-gz-truncated", "train", "train.csv.gz",
             lambda: gzip.compress(clean_train())[:-3000], 0, "", "gzip data is truncated"),
    rejected("train-gz-corrupt", "train", "train.csv.gz",
             lambda: b"\x1f\x8b\x08\x00" + b"\x00" * 6 + b"not deflate data" * 20,
             0, "", "gzip data is corrupt"),
    rejected("train-class-without-rows", "train", "train.csv", no_disgust_train,
             0, "1 (Disgust)", "class 1 (Disgust) has no rows"),
    rejected("fer2013-class-only-in-test-rows", "fer2013", "fer2013.csv",
             fer2013_disgust_only_in_tests, 0, "1 (Disgust)", "class 1 (Disgust) has no Training rows"),
    rejected("fer2013-no-training-rows", "fer2013", "fer2013.csv",
             lambda: csv_bytes(FER2013_HEADER, [row for row in fer2013_rows() if "Training" not in row]),
             0, "Training", "file has no rows with Usage 'Training'"),

    # Rejected: the header.
    rejected("train-wrong-column", "train", "train.csv",
             lambda: csv_bytes("label,pixels", train_rows()), 1, "pixels", "has unexpected column 'pixels'"),
    rejected("train-duplicated-column", "train", "train.csv",
             lambda: csv_bytes("label,feature,label", train_rows()), 1, "label,feature,label",
             "repeats column 'label'"),
    rejected("fer2013-missing-usage-column", "fer2013", "fer2013.csv",
             lambda: csv_bytes("emotion,pixels", [row.rsplit(",", 1)[0] for row in fer2013_rows()]),
             1, "emotion,pixels", "is missing column 'Usage'"),
    rejected("test-with-label-column", "test", "test.csv",
             lambda: csv_bytes("id,label,feature", [f"{row_id},3,{pixel_text(row_id)}" for row_id in TEST_IDS]),
             1, "id,label,feature", "has unexpected column 'label' for a test file"),
    rejected("test-is-a-train-file", "test", "test.csv", clean_train,
             1, "label,feature", "is a train header, but a test file was expected"),
    rejected("test-without-id-column", "test", "test.csv",
             lambda: csv_bytes("feature", [pixel_text(row_id) for row_id in TEST_IDS]),
             1, "feature", "is missing column 'id'"),
    rejected("train-utf16", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, train_rows()[:2]).decode().encode("utf-16"),
             1, "ff fe", "file is UTF-16 text"),
    rejected("train-old-mac-line-endings", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, train_rows(), "\r"), 1, "label,feature",
             "bare carriage return"),
    rejected("train-gz-old-mac-line-endings", "train", "train.csv.gz",
             lambda: gzip.compress(csv_bytes(TRAIN_HEADER, train_rows() * 3, "\r")), 1, "label,feature",
             "bare carriage return"),

    # Rejected: one row. Data rows start on line 2, so rows[2] is line 4.
    rejected("train-truncated-last-row", "train", "train.csv", truncated_train,
             15, "feature '0 255", "pixel values, expected 2304"),
    rejected("train-too-few-pixels", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, f"2,{' '.join(map(str, pixels(2)[:-1]))}")),
             4, "feature '0 255", "has 2303 pixel values, expected 2304"),
    rejected("train-gz-too-many-pixels", "train", "train.csv.gz",
             lambda: gzip.compress(csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, f"2,{pixel_text(2)} 7"))),
             4, "feature '0 255", "has 2305 pixel values, expected 2304"),
    rejected("train-negative-pixel", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, with_pixel(2, "-3"))),
             4, "'-3'", "pixel '-3' is not an integer 0..255"),
    rejected("train-fractional-pixel", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, with_pixel(2, "12.5"))),
             4, "'12.5'", "pixel '12.5' is not an integer 0..255"),
    rejected("train-pixel-out-of-range", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, with_pixel(2, "256"))),
             4, "'256'", "pixel '256' is out of range 0..255"),
    rejected("train-overlong-pixel", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, with_pixel(2, "9" * 300))),
             4, "'9999999999", "is out of range 0..255"),
    rejected("train-non-numeric-pixel", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, with_pixel(2, "abc"))),
             4, "'abc'", "pixel 'abc' is not an integer 0..255"),
    rejected("train-label-out-of-range", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, f"7,{pixel_text(2)}")),
             4, "'7'", "label '7' is out of range 0..6"),
    rejected("train-label-missing", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, f",{pixel_text(2)}")),
             4, "", "label is missing"),
    rejected("train-string-label", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, f"Happy,{pixel_text(2)}")),
             4, "'Happy'", "label 'Happy' is not an integer 0..6"),
    rejected("train-extra-field", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, f"2,{pixel_text(2)},4")),
             4, "2,0 255", "has 3 fields, expected 2"),
    rejected("train-unterminated-quote", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 2, f'2,"{pixel_text(2)}')),
             4, '2,"0 255', "is not valid CSV"),
    rejected("train-non-utf8-byte", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, train_rows()).replace(b"\n2,0 255 ", b"\n2,0 \xe9255 ", 1),
             4, "\\xe9", "not valid UTF-8 (0xe9"),
    rejected("train-huge-single-line", "train", "train.csv",
             lambda: csv_bytes(TRAIN_HEADER, replace_row(train_rows(), 1, "1," + "12 " * 3_000_000)),
             3, "1,12 12", f"line is longer than {MAX_LINE_BYTES:,} bytes"),
    rejected("train-gz-huge-single-line", "train", "train.csv.gz",
             lambda: gzip_single_line_bomb(4 * 1024**3), 2, "3,1 1", f"line is longer than {MAX_LINE_BYTES:,} bytes"),
    rejected("test-duplicated-id", "test", "test.csv",
             lambda: csv_bytes(TEST_HEADER, replace_row(course_test_rows(), 3, f"1,{pixel_text(3)}")),
             5, "'1'", "id '1' is already used on line 3"),
    rejected("test-missing-id", "test", "test.csv",
             lambda: csv_bytes(TEST_HEADER, replace_row(course_test_rows(), 2, f",{pixel_text(2)}")),
             4, "", "id is missing"),
    rejected("test-non-numeric-id", "test", "test.csv.gz",
             lambda: gzip.compress(csv_bytes(TEST_HEADER, replace_row(course_test_rows(), 2, f"a7,{pixel_text(2)}"))),
             4, "'a7'", "id 'a7' is not a non-negative integer"),
    rejected("fer2013-unknown-usage", "fer2013", "fer2013.csv",
             lambda: csv_bytes(FER2013_HEADER, replace_row(fer2013_rows(), 2, f"2,{pixel_text(2)},Validation")),
             4, "'Validation'", "Usage 'Validation' is not one of Training, PublicTest, PrivateTest"),
    rejected("fer2013-string-emotion", "fer2013", "fer2013.csv.gz",
             lambda: gzip.compress(csv_bytes(FER2013_HEADER, replace_row(fer2013_rows(), 2, f"fear,{pixel_text(2)},Training"))),
             4, "'fear'", "emotion 'fear' is not an integer 0..6"),
    rejected("fer2013-too-few-pixels", "fer2013", "fer2013.csv",
             lambda: csv_bytes(FER2013_HEADER, replace_row(fer2013_rows(), 2, f"2,{pixel_text(2)[:-8]},Training")),
             4, "'0 255", "pixel values, expected 2304"),
]
assert len(CASES) >= 30


@dataclass
class Inputs:
    config: PipelineConfig
    path: Path
    expect: str


def write_inputs(folder: Path, case: Case, content: bytes) -> Inputs:
    """Write the case's file, plus a clean companion file where its role needs one."""
    path = folder / case.file_name
    path.write_bytes(content)
    if case.role == "train":
        test_path = folder / "companion_test.csv"
        test_path.write_bytes(clean_test())
        config = PipelineConfig(train_csv=str(path), test_csv=str(test_path))
    elif case.role == "test":
        train_path = folder / "companion_train.csv"
        train_path.write_bytes(clean_train())
        config = PipelineConfig(train_csv=str(train_path), test_csv=str(path))
    else:
        config = PipelineConfig(train_csv=str(path))
    return Inputs(config, path, case.role)


def run_check(inputs: Inputs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fer_tasks", "check", "--expect", inputs.expect, str(inputs.path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def assert_names_file_line_value(message: str, case: Case, path: Path) -> None:
    location = f"{path} line {case.line}: " if case.line else f"{path}: "
    assert location in message
    assert case.value in message
    assert case.fragment in message


@pytest.fixture(autouse=True)
def private_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("FER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FER_BUILTIN_DATA_DIR", str(tmp_path / "builtin"))


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_dag_entry(tmp_path, case):
    folder = tmp_path / "input"
    folder.mkdir()
    inputs = write_inputs(folder, case, case.content())

    if case.accepted:
        splits = load_splits(inputs.config)
        summary = summarize(splits)
        clean_folder = tmp_path / "clean"
        clean_folder.mkdir()
        clean_splits = load_splits(write_inputs(clean_folder, case, case.clean()).config)
        assert summary["train_rows"] == len(clean_splits.train_labels)
        assert np.array_equal(splits.train_images, clean_splits.train_images)
        assert np.array_equal(splits.train_labels, clean_splits.train_labels)
        assert np.array_equal(splits.validation_labels, clean_splits.validation_labels)
        assert np.array_equal(splits.test_images, clean_splits.test_images)
        assert np.array_equal(splits.test_ids, clean_splits.test_ids)
        return

    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        summarize(load_splits(inputs.config))
    assert_names_file_line_value(str(caught.value), case, inputs.path)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_check_command(tmp_path, case):
    inputs = write_inputs(tmp_path, case, case.content())

    result = run_check(inputs)

    assert "Traceback" not in result.stderr
    if case.accepted:
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"{inputs.path}: {case.role}, ")
        assert result.stderr == ""
        return
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert_names_file_line_value(result.stderr, case, inputs.path)
