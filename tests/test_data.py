"""Tests for loading and validating FER2013 CSV files (fer_tasks.data)."""

from __future__ import annotations

import gzip
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest

import fer_tasks.data
from fer_tasks.config import CLASS_NAMES, PIXEL_COUNT
from fer_tasks.data import (
    DataError,
    DataValidationError,
    class_counts,
    file_sha256,
    load_csv,
    load_csv_cached,
    split_fer2013,
)

TRAIN_LABELS = (0, 3, 6, 2)
FULL_TRAIN_COUNTS = (3995, 436, 4097, 7215, 4830, 3171, 4965)


def make_pixels(seed: int) -> list[int]:
    """Return PIXEL_COUNT deterministic pixel values that include 0 and 255."""
    values = np.random.default_rng(seed).integers(0, 256, PIXEL_COUNT)
    values[0], values[1] = 0, 255
    return values.tolist()


def join_pixels(values: list[object], separator: str = " ") -> str:
    return separator.join(str(value) for value in values)


def train_rows(count: int = len(TRAIN_LABELS)) -> list[str]:
    return [
        f"{TRAIN_LABELS[index % len(TRAIN_LABELS)]},{join_pixels(make_pixels(index))}"
        for index in range(count)
    ]


def course_test_rows(count: int = 3) -> list[str]:
    return [f"{index},{join_pixels(make_pixels(index))}" for index in range(count)]


def fer2013_rows() -> list[str]:
    usages = ("Training", "Training", "PublicTest", "PrivateTest", "Training")
    return [
        f"{index % 7},{join_pixels(make_pixels(index))},{usage}"
        for index, usage in enumerate(usages)
    ]


HEADERS = {"train": "label,feature", "test": "id,feature", "fer2013": "emotion,pixels,Usage"}
ROWS = {"train": train_rows, "test": course_test_rows, "fer2013": fer2013_rows}


def csv_text(header: str, rows: list[str]) -> str:
    return "\n".join([header, *rows]) + "\n"


def write_file(folder: Path, name: str, content: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def with_pixel(row_pixels: list[int], index: int, value: str) -> list[object]:
    changed: list[object] = list(row_pixels)
    changed[index] = value
    return changed


# --- Bad rows: each case replaces data row 2 (line 3) of a small valid file. ---------

PIXELS = make_pixels(1)
ROW_CASES = [
    pytest.param("train", f"3,{join_pixels(with_pixel(PIXELS, 5, '256'))}",
                 "256", "pixel '256' is out of range 0..255", id="pixel-256"),
    pytest.param("train", f"3,{join_pixels(with_pixel(PIXELS, 9, '99999'))}",
                 "99999", "pixel '99999' is out of range", id="pixel-huge"),
    pytest.param("train", f"3,{join_pixels(with_pixel(PIXELS, 7, '12.5'))}",
                 "12.5", "pixel '12.5' is not an integer", id="pixel-decimal"),
    pytest.param("train", f"3,{join_pixels(with_pixel(PIXELS, 7, 'x'))}",
                 "x", "pixel 'x' is not an integer", id="pixel-letter"),
    pytest.param("train", f"3,{join_pixels(with_pixel(PIXELS, 7, '-3'))}",
                 "-3", "pixel '-3' is not an integer", id="pixel-negative"),
    pytest.param("train", f"3,{join_pixels(with_pixel(PIXELS, 7, '+5'))}",
                 "+5", "pixel '+5' is not an integer", id="pixel-plus-sign"),
    pytest.param("train", f"3,{join_pixels(PIXELS[:-1])}",
                 "0 255", "has 2303 pixel values, expected 2304", id="pixels-too-few"),
    pytest.param("train", f"3,{join_pixels(PIXELS + [7])}",
                 "0 255", "has 2305 pixel values, expected 2304", id="pixels-too-many"),
    pytest.param("train", "3,", "", "has 0 pixel values", id="pixels-empty"),
    pytest.param("train", f"7,{join_pixels(PIXELS)}",
                 "7", "label '7' is out of range 0..6", id="label-7"),
    pytest.param("train", f"-1,{join_pixels(PIXELS)}",
                 "-1", "label '-1' is not an integer 0..6", id="label-negative"),
    pytest.param("train", f"happy,{join_pixels(PIXELS)}",
                 "happy", "label 'happy' is not an integer 0..6", id="label-string"),
    pytest.param("train", f"2.0,{join_pixels(PIXELS)}",
                 "2.0", "label '2.0' is not an integer", id="label-decimal"),
    pytest.param("train", f",{join_pixels(PIXELS)}", "", "label is missing", id="label-missing"),
    pytest.param("train", f",{join_pixels(PIXELS + [3])}", "", "label is missing",
                 id="label-missing-pixel-extra"),
    pytest.param("train", f"3 4,{join_pixels(PIXELS[:-1])}",
                 "3 4", "label '3 4' is not an integer", id="label-two-numbers"),
    pytest.param("train", f"3,{join_pixels(PIXELS)},4",
                 "3,0 255", "has 3 fields, expected 2", id="extra-field"),
    pytest.param("train", join_pixels(PIXELS),
                 "0 255", "has 1 field, expected 2", id="missing-field"),
    pytest.param("train", f'3,"{join_pixels(PIXELS)}',
                 '3,"0 255', "is not valid CSV", id="unterminated-quote"),
    pytest.param("train", f'"3"x,{join_pixels(PIXELS)}',
                 '"3"x,0 255', "is not valid CSV", id="text-after-quote"),
    pytest.param("train", f'"3,{join_pixels(PIXELS)}"',
                 '"3,0 255', "has 1 field, expected 2", id="comma-inside-quotes"),
    pytest.param("train", f'3,"{join_pixels(PIXELS[:9])}"{join_pixels(PIXELS[9:])}',
                 '3,"0 255', "is not valid CSV", id="quote-mid-field"),
    pytest.param("train", f"3,1 2\r3 {join_pixels(PIXELS[3:])}",
                 "3,1 2", "carriage return", id="bare-carriage-return"),
    pytest.param("test", f",{join_pixels(PIXELS)}", "", "id is missing", id="id-missing"),
    pytest.param("test", f"x1,{join_pixels(PIXELS)}",
                 "x1", "id 'x1' is not a non-negative integer", id="id-string"),
    pytest.param("test", f"1.5,{join_pixels(PIXELS)}",
                 "1.5", "id '1.5' is not a non-negative integer", id="id-decimal"),
    pytest.param("test", f"-4,{join_pixels(PIXELS)}",
                 "-4", "id '-4' is not a non-negative integer", id="id-negative"),
    pytest.param("test", f"0,{join_pixels(PIXELS)}",
                 "0", "id '0' is already used on line 2", id="id-duplicate"),
    pytest.param("fer2013", f"3,{join_pixels(PIXELS)},Validation",
                 "Validation", "Usage 'Validation' is not one of Training, PublicTest, PrivateTest",
                 id="usage-unknown"),
    pytest.param("fer2013", f"3,{join_pixels(PIXELS)},", "", "Usage is missing",
                 id="usage-missing"),
    pytest.param("fer2013", f"9,{join_pixels(PIXELS)},Training",
                 "9", "emotion '9' is out of range 0..6", id="emotion-9"),
]


@pytest.mark.parametrize(("kind", "bad_row", "value", "fragment"), ROW_CASES)
def test_bad_row_reports_line_and_value(tmp_path, kind, bad_row, value, fragment):
    rows = ROWS[kind]()
    rows[1] = bad_row
    path = write_file(tmp_path, f"{kind}_bad.csv", csv_text(HEADERS[kind], rows))

    with pytest.raises(DataValidationError) as caught:
        load_csv(path)

    errors = caught.value.errors
    assert len(errors) == 1
    error = errors[0]
    message = str(error)
    assert error.line == 3
    assert error.path == str(path)
    assert error.value.startswith(value)
    assert message.startswith(f"{path} line 3: ")
    assert fragment in message
    assert "skip_bad_rows" in message
    assert message in str(caught.value)


def test_non_utf8_byte_reports_line(tmp_path):
    rows = [row.encode("ascii") for row in train_rows()]
    rows[2] = b"3,12 \xff " + rows[2][2:]
    path = write_file(tmp_path, "latin.csv", b"\n".join([b"label,feature", *rows]) + b"\n")

    with pytest.raises(DataValidationError) as caught:
        load_csv(path)

    error = caught.value.errors[0]
    assert error.line == 4
    assert "\\xff" in error.value
    assert "0xff" in str(error)
    assert "not valid UTF-8" in str(error)
    assert "Save the file as UTF-8" in str(error)
    assert "latin.csv line 4" in str(error)


def test_bad_rows_are_all_collected(tmp_path):
    rows = train_rows(12)
    for index in range(1, 9):
        rows[index] = f"{index + 10},{join_pixels(PIXELS)}"
    path = write_file(tmp_path, "many_bad.csv", csv_text("label,feature", rows))

    with pytest.raises(DataValidationError) as caught:
        load_csv(path)

    assert [error.line for error in caught.value.errors] == list(range(3, 11))
    message = str(caught.value)
    assert message.count("\n") == 5
    assert "line 3:" in message
    assert "line 8:" not in message
    assert message.endswith("... and 3 more invalid rows")


def test_long_line_message_is_short(tmp_path):
    rows = train_rows()
    rows[0] = ",".join([join_pixels(PIXELS)] * 3)
    path = write_file(tmp_path, "long.csv", csv_text("label,feature", rows))

    with pytest.raises(DataValidationError) as caught:
        load_csv(path)

    error = caught.value.errors[0]
    assert error.line == 2
    assert len(error.value) <= 40
    assert error.value.endswith("...")
    assert len(str(error)) < 300


def test_long_pixel_value_is_shortened(tmp_path):
    rows = train_rows()
    rows[0] = f"3,{join_pixels(with_pixel(PIXELS, 0, '9' * 500))}"
    path = write_file(tmp_path, "long_pixel.csv", csv_text("label,feature", rows))

    with pytest.raises(DataValidationError) as caught:
        load_csv(path)

    assert len(str(caught.value.errors[0])) < 300
    assert "out of range 0..255" in str(caught.value.errors[0])


# --- Whole-file problems: DataError, also with skip_bad_rows. -------------------------


def gzip_bytes(text: str) -> bytes:
    return gzip.compress(text.encode("utf-8"), mtime=0)


CLEAN_TRAIN = csv_text("label,feature", train_rows())
FILE_CASES = [
    pytest.param(b"", None, 0, "file is empty (0 bytes)", id="empty"),
    pytest.param(b"  \n\n \n", None, 0, "only blank lines", id="blank-only"),
    pytest.param("label,feature\n", None, 0, "header but no data rows", id="header-only"),
    pytest.param("label,feature\n\n  \n", None, 0, "header but no data rows",
                 id="header-and-blank-lines"),
    pytest.param("label\n3\n", None, 1, "header 'label' is missing column 'feature'",
                 id="missing-column"),
    pytest.param("label,feature,extra\n", None, 1, "has unexpected column 'extra'",
                 id="extra-column"),
    pytest.param("label,feature,feature\n", None, 1, "repeats column 'feature'",
                 id="duplicated-column"),
    pytest.param("a,b\n1,2\n", None, 1, "header 'a,b' matches no known layout",
                 id="unknown-header"),
    pytest.param(CLEAN_TRAIN, "test", 1,
                 "header 'label,feature' is a train header, but a test file was expected",
                 id="test-file-with-label"),
    pytest.param(csv_text("id,feature", course_test_rows()), "train", 1,
                 "is a test header, but a train file was expected", id="train-file-with-id"),
    pytest.param("id,label,feature\n", "test", 1, "has unexpected column 'label' for a test file",
                 id="test-file-with-extra-label"),
    pytest.param(b"\xfflabel,feature\n", None, 1,
                 "header '\\\\xfflabel,feature' is not valid UTF-8", id="header-not-utf8"),
    pytest.param(b"\x1f\x8b\x08\x00garbage-bytes-here", None, 0, "gzip data is corrupt",
                 id="gzip-corrupt"),
    pytest.param(gzip_bytes(CLEAN_TRAIN)[:-5000], None, 0, "gzip data is truncated",
                 id="gzip-truncated"),
    pytest.param(gzip_bytes(CLEAN_TRAIN) + b"junk", None, 0, "unexpected bytes after the gzip data",
                 id="gzip-trailing-junk"),
    pytest.param(gzip_bytes(""), None, 0, "empty after gzip decompression", id="gzip-empty"),
]


@pytest.mark.parametrize("skip_bad_rows", [False, True], ids=["strict", "skip"])
@pytest.mark.parametrize(("content", "expected", "line", "fragment"), FILE_CASES)
def test_file_problem_raises_data_error(tmp_path, content, expected, line, fragment, skip_bad_rows):
    path = write_file(tmp_path, "input.csv", content)

    with pytest.raises(DataError) as caught:
        load_csv(path, expected=expected, skip_bad_rows=skip_bad_rows)

    error = caught.value
    assert error.line == line
    assert fragment in str(error)
    assert str(error).startswith(f"{path} line 1: " if line else f"{path}: ")
    assert error.hint
    assert str(error).endswith(error.hint)


def test_gzip_detected_by_content_not_name(tmp_path):
    plain_named_gz = write_file(tmp_path, "train.csv.gz", CLEAN_TRAIN)
    gzip_named_csv = write_file(tmp_path, "train.csv", gzip_bytes(CLEAN_TRAIN))

    from_plain = load_csv(plain_named_gz)
    from_gzip = load_csv(gzip_named_csv)

    assert len(from_plain) == len(TRAIN_LABELS)
    assert np.array_equal(from_plain.images, from_gzip.images)


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_csv(tmp_path / "absent.csv")


def test_invalid_expected_raises_value_error(tmp_path):
    path = write_file(tmp_path, "train.csv", CLEAN_TRAIN)
    with pytest.raises(ValueError, match="expected must be None or one of"):
        load_csv(path, expected="validation")


def test_errors_survive_pickling(tmp_path):
    rows = train_rows()
    rows[0] = f"9,{join_pixels(PIXELS)}"
    path = write_file(tmp_path, "bad.csv", csv_text("label,feature", rows))
    with pytest.raises(DataValidationError) as caught:
        load_csv(path)

    copy = pickle.loads(pickle.dumps(caught.value))

    assert str(copy) == str(caught.value)
    assert copy.errors[0].line == 2
    assert copy.errors[0].value == "9"


# --- Accepted variants: each parses to the clean file's arrays. -------------------------


def clean_train(tmp_path: Path):
    return load_csv(write_file(tmp_path, "clean.csv", CLEAN_TRAIN))


def quote_all(row: str) -> str:
    return ",".join(f'"{field}"' for field in row.split(","))


def spaced_row(row: str) -> str:
    label, pixels = row.split(",")
    return f" {label}\t,\t  " + join_pixels(pixels.split(), "  \t ") + " \t"


def zero_padded_row(row: str) -> str:
    label, pixels = row.split(",")
    return f"00{label}," + join_pixels([value.zfill(3) for value in pixels.split()])


ROW_LIST = train_rows()
VARIANTS = [
    pytest.param(b"\xef\xbb\xbf" + CLEAN_TRAIN.encode(), id="utf8-bom"),
    pytest.param(CLEAN_TRAIN.replace("\n", "\r\n"), id="crlf"),
    pytest.param(CLEAN_TRAIN.rstrip("\n"), id="no-final-newline"),
    pytest.param(CLEAN_TRAIN + "\n\n  \n", id="trailing-blank-lines"),
    pytest.param(csv_text('"label","feature"', [quote_all(row) for row in ROW_LIST]), id="quoted"),
    pytest.param(csv_text("label,feature", [quote_all(spaced_row(row)) for row in ROW_LIST]),
                 id="quoted-and-spaced"),
    pytest.param(csv_text("label,feature", [ROW_LIST[0], quote_all(ROW_LIST[1]), *ROW_LIST[2:]]),
                 id="one-row-quoted"),
    pytest.param(csv_text("label, feature", [row.replace(",", ', "') + '"' for row in ROW_LIST]),
                 id="space-before-quote"),
    pytest.param(csv_text("label,feature", [spaced_row(row) for row in ROW_LIST]),
                 id="tabs-and-spaces"),
    pytest.param(csv_text("label,feature", [zero_padded_row(row) for row in ROW_LIST]),
                 id="leading-zeros"),
    pytest.param(csv_text(" Label , FEATURE ", ROW_LIST), id="header-case-and-spaces"),
    pytest.param(gzip_bytes(CLEAN_TRAIN), id="gzip"),
    pytest.param(gzip_bytes(CLEAN_TRAIN[:1000]) + gzip_bytes(CLEAN_TRAIN[1000:]),
                 id="gzip-two-members"),
    pytest.param(gzip_bytes(CLEAN_TRAIN) + b"\0\0\0", id="gzip-zero-padding"),
    pytest.param(gzip_bytes("\ufeff" + CLEAN_TRAIN.replace("\n", "\r\n")), id="gzip-bom-crlf"),
]


@pytest.mark.parametrize("parser", ["fast", "exact"])
@pytest.mark.parametrize("content", VARIANTS)
def test_variant_parses_like_clean_file(tmp_path, monkeypatch, content, parser):
    clean = clean_train(tmp_path)
    if parser == "exact":
        monkeypatch.setattr(fer_tasks.data, "_parse_fast", lambda *arguments: None)

    variant = load_csv(write_file(tmp_path, "variant.csv", content))

    assert variant.kind == "train"
    assert variant.images.dtype == np.uint8
    assert variant.images.shape == (len(ROW_LIST), 48, 48)
    assert np.array_equal(variant.images, clean.images)
    assert np.array_equal(variant.labels, clean.labels)
    assert np.array_equal(variant.lines, clean.lines)
    assert variant.skipped == ()


def test_blank_lines_keep_line_numbers(tmp_path):
    clean = clean_train(tmp_path)
    content = "\n" + "\n".join(["label,feature", ROW_LIST[0], "", "   ", *ROW_LIST[1:]]) + "\n\n"

    variant = load_csv(write_file(tmp_path, "blank.csv", content))

    assert np.array_equal(variant.images, clean.images)
    assert np.array_equal(variant.labels, clean.labels)
    assert variant.lines.tolist() == [3, 6, 7, 8]


def test_columns_in_other_order(tmp_path):
    clean = clean_train(tmp_path)
    rows = [f"{pixels},{label}" for label, pixels in (row.split(",") for row in ROW_LIST)]

    variant = load_csv(write_file(tmp_path, "swapped.csv", csv_text("feature,label", rows)))

    assert np.array_equal(variant.images, clean.images)
    assert np.array_equal(variant.labels, clean.labels)


def test_clean_file_values_and_layout(tmp_path):
    dataset = clean_train(tmp_path)

    assert dataset.kind == "train"
    assert dataset.labels.dtype == np.int64
    assert dataset.labels.tolist() == list(TRAIN_LABELS)
    assert dataset.lines.tolist() == [2, 3, 4, 5]
    assert dataset.ids is None
    assert dataset.usage is None
    assert dataset.images[1].ravel().tolist() == make_pixels(1)
    assert dataset.images[1, 0, :2].tolist() == [0, 255]
    assert dataset.sha256 == file_sha256(dataset.path)
    assert dataset.parse_seconds > 0
    assert len(dataset) == 4


def test_plain_and_quoted_files_take_fast_path(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fer_tasks.data")
    clean_train(tmp_path)
    quoted = csv_text("label,feature", [quote_all(spaced_row(row)) for row in ROW_LIST])
    load_csv(write_file(tmp_path, "quoted.csv", quoted))
    assert "blocks of" not in caplog.text

    blank_line = csv_text("label,feature", [ROW_LIST[0], "", ROW_LIST[1]])
    load_csv(write_file(tmp_path, "blank_line.csv", blank_line))
    assert "blocks of" in caplog.text


def test_exact_path_block_matches_fast_path(tmp_path):
    """A blank line deep in a long file sends its block of rows to the exact path."""
    rows = train_rows(2100)
    clean = load_csv(write_file(tmp_path, "long.csv", csv_text("label,feature", rows)))
    rows[1500] = quote_all(spaced_row(rows[1500]))
    rows.insert(1600, "")

    variant = load_csv(write_file(tmp_path, "long_blank.csv", csv_text("label,feature", rows)))

    expected_lines = clean.lines + (np.arange(2100) >= 1600)
    assert np.array_equal(variant.images, clean.images)
    assert np.array_equal(variant.labels, clean.labels)
    assert np.array_equal(variant.lines, expected_lines)


def test_test_file_ids(tmp_path):
    path = write_file(tmp_path, "test.csv", csv_text("id,feature", ["7," + join_pixels(PIXELS),
                                                                     "3," + join_pixels(PIXELS)]))

    dataset = load_csv(path, expected="test")

    assert dataset.kind == "test"
    assert dataset.labels is None
    assert dataset.ids.dtype == np.int64
    assert dataset.ids.tolist() == [7, 3]


def test_large_test_id_is_kept(tmp_path):
    big = 2**40
    rows = [f"{big},{join_pixels(PIXELS)}"]
    path = write_file(tmp_path, "test.csv", csv_text("id,feature", rows))

    assert load_csv(path).ids.tolist() == [big]


# --- skip_bad_rows --------------------------------------------------------------------


def test_skip_bad_rows_drops_and_logs(tmp_path, caplog):
    rows = train_rows(6)
    rows[1] = f"3,{join_pixels(with_pixel(PIXELS, 0, '256'))}"
    rows[4] = f"8,{join_pixels(PIXELS)}"
    path = write_file(tmp_path, "some_bad.csv", csv_text("label,feature", rows))

    with caplog.at_level(logging.WARNING, logger="fer_tasks.data"):
        dataset = load_csv(path, skip_bad_rows=True)

    assert len(dataset) == 4
    assert dataset.lines.tolist() == [2, 4, 5, 7]
    assert [error.line for error in dataset.skipped] == [3, 6]
    assert [error.value for error in dataset.skipped] == ["256", "8"]
    assert "Skipped 2 invalid rows" in caplog.text
    assert "lines 3, 6" in caplog.text
    assert str(path) in caplog.text


def test_skip_bad_rows_drops_repeated_ids(tmp_path):
    rows = [f"{row_id},{join_pixels(make_pixels(row_id))}" for row_id in (5, 6, 5, 7, 6)]
    path = write_file(tmp_path, "repeated.csv", csv_text("id,feature", rows))

    dataset = load_csv(path, skip_bad_rows=True)

    assert dataset.ids.tolist() == [5, 6, 7]
    assert dataset.lines.tolist() == [2, 3, 5]
    assert [error.line for error in dataset.skipped] == [4, 6]
    assert "already used on line 2" in str(dataset.skipped[0])


def test_skip_bad_rows_in_long_file(tmp_path):
    rows = train_rows(2500)
    clean = load_csv(write_file(tmp_path, "clean_long.csv", csv_text("label,feature", rows)))
    rows[1700] = "9," + rows[1700].split(",")[1]

    path = write_file(tmp_path, "long.csv", csv_text("label,feature", rows))
    dataset = load_csv(path, skip_bad_rows=True)

    keep = np.ones(2500, dtype=bool)
    keep[1700] = False
    assert [error.line for error in dataset.skipped] == [1702]
    assert np.array_equal(dataset.images, clean.images[keep])
    assert np.array_equal(dataset.labels, clean.labels[keep])
    assert np.array_equal(dataset.lines, clean.lines[keep])


def test_skip_bad_rows_with_no_valid_rows_raises(tmp_path):
    rows = [f"9,{join_pixels(PIXELS)}", f"x,{join_pixels(PIXELS)}"]
    path = write_file(tmp_path, "all_bad.csv", csv_text("label,feature", rows))

    with pytest.raises(DataValidationError) as caught:
        load_csv(path, skip_bad_rows=True)

    assert len(caught.value.errors) == 2
    assert "no rows remain" in str(caught.value)


# --- fer2013.csv, class counts ----------------------------------------------------------


def test_fer2013_split(tmp_path):
    path = write_file(tmp_path, "fer2013.csv", csv_text(HEADERS["fer2013"], fer2013_rows()))

    dataset = load_csv(path, expected="fer2013")
    training, public_test, private_test = split_fer2013(dataset)

    assert dataset.kind == "fer2013"
    assert dataset.usage.tolist() == [
        "Training", "Training", "PublicTest", "PrivateTest", "Training"
    ]
    assert training.labels.tolist() == [0, 1, 4]
    assert training.lines.tolist() == [2, 3, 6]
    assert np.array_equal(training.images[2], dataset.images[4])
    assert public_test.labels.tolist() == [2]
    assert private_test.lines.tolist() == [5]
    assert set(private_test.usage.tolist()) == {"PrivateTest"}


def test_fer2013_split_without_private_test(tmp_path):
    rows = [row for row in fer2013_rows() if not row.endswith("PrivateTest")]
    dataset = load_csv(write_file(tmp_path, "fer2013.csv", csv_text(HEADERS["fer2013"], rows)))

    assert split_fer2013(dataset)[2] is None


def test_split_fer2013_rejects_other_kinds(tmp_path):
    with pytest.raises(ValueError, match="needs a fer2013 dataset"):
        split_fer2013(clean_train(tmp_path))


def test_class_counts_include_zero_classes():
    counts = class_counts(np.array([3, 3, 0, 6]))

    assert list(counts) == list(CLASS_NAMES)
    assert counts["Happy"] == 2
    assert counts["Angry"] == 1
    assert counts["Neutral"] == 1
    assert counts["Disgust"] == 0


@pytest.mark.parametrize("labels", [[0, 7], [-1], [0.5]], ids=["seven", "negative", "float"])
def test_class_counts_rejects_invalid_labels(labels):
    with pytest.raises(ValueError):
        class_counts(np.array(labels))


# --- Cache ------------------------------------------------------------------------------


def test_cache_hit_returns_same_arrays(tmp_path, caplog):
    path = write_file(tmp_path, "train.csv", CLEAN_TRAIN)
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="fer_tasks.data")

    first = load_csv_cached(path, cache_dir=cache)
    second = load_csv_cached(path, cache_dir=cache)

    assert "Cache miss" in caplog.text
    assert "Cache hit" in caplog.text
    assert len(list(cache.glob("*.npz"))) == 1
    assert np.array_equal(first.images, second.images)
    assert np.array_equal(first.labels, second.labels)
    assert np.array_equal(first.lines, second.lines)
    assert second.kind == "train"
    assert second.ids is None
    assert second.sha256 == first.sha256 == file_sha256(path)
    assert second.path == str(path)


def test_cache_is_invalidated_when_file_changes(tmp_path):
    path = write_file(tmp_path, "train.csv", CLEAN_TRAIN)
    cache = tmp_path / "cache"
    before = load_csv_cached(path, cache_dir=cache)

    rows = train_rows()
    rows[0] = "5," + rows[0].split(",")[1]
    write_file(tmp_path, "train.csv", csv_text("label,feature", rows))
    after = load_csv_cached(path, cache_dir=cache)

    assert before.labels[0] == 0
    assert after.labels[0] == 5
    assert after.sha256 != before.sha256
    assert len(list(cache.glob("*.npz"))) == 2


def test_cache_keeps_skipped_rows_and_fer2013_usage(tmp_path):
    rows = fer2013_rows()
    rows[3] = rows[3].replace("PrivateTest", "Holdout")
    path = write_file(tmp_path, "fer2013.csv", csv_text(HEADERS["fer2013"], rows))
    cache = tmp_path / "cache"

    first = load_csv_cached(path, cache_dir=cache, skip_bad_rows=True)
    second = load_csv_cached(path, cache_dir=cache, skip_bad_rows=True)

    assert second.usage.tolist() == first.usage.tolist()
    assert [str(error) for error in second.skipped] == [str(error) for error in first.skipped]
    assert second.skipped[0].line == 5
    assert load_csv_cached(path, cache_dir=cache, skip_bad_rows=True).skipped[0].value == "Holdout"
    with pytest.raises(DataValidationError):
        load_csv_cached(path, cache_dir=cache, skip_bad_rows=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cache_is_rewritten(tmp_path, caplog, damage):
    path = write_file(tmp_path, "train.csv", CLEAN_TRAIN)
    cache = tmp_path / "cache"
    clean = load_csv_cached(path, cache_dir=cache)
    (cache_file,) = cache.glob("*.npz")
    content = cache_file.read_bytes()
    damaged = b"not an npz file" if damage == "garbage" else content[: len(content) // 2]
    cache_file.write_bytes(damaged)

    with caplog.at_level(logging.WARNING, logger="fer_tasks.data"):
        reloaded = load_csv_cached(path, cache_dir=cache)

    assert "Ignoring unreadable cache file" in caplog.text
    assert np.array_equal(reloaded.images, clean.images)
    assert [entry.name for entry in cache.iterdir()] == [cache_file.name]
    with np.load(cache_file) as archive:
        assert np.array_equal(archive["images"], clean.images)


def test_cache_hit_still_checks_expected_kind(tmp_path):
    path = write_file(tmp_path, "train.csv", CLEAN_TRAIN)
    cache = tmp_path / "cache"
    load_csv_cached(path, cache_dir=cache)

    with pytest.raises(DataError, match="is a train header, but a test file was expected"):
        load_csv_cached(path, cache_dir=cache, expected="test")


# --- Real data (skipped when the FER2013 folder is absent) ------------------------------


def test_real_sample_files(fer_data_dir):
    train_path = fer_data_dir / "sample_train.csv"
    test_path = fer_data_dir / "sample_test.csv"
    if not (train_path.is_file() and test_path.is_file()):
        pytest.skip(f"sample_train.csv or sample_test.csv missing in {fer_data_dir}")

    train = load_csv(train_path, expected="train")
    test = load_csv(test_path, expected="test")

    assert len(train) == 300
    assert train.images.shape == (300, 48, 48)
    assert sum(class_counts(train.labels).values()) == 300
    assert min(class_counts(train.labels).values()) > 0
    assert len(test) == 100
    assert len(set(test.ids.tolist())) == 100
    assert train.skipped == ()


@pytest.mark.slow
def test_real_full_train_file(fer_data_dir):
    path = fer_data_dir / "train.csv.gz"
    if not path.is_file():
        pytest.skip(f"train.csv.gz missing in {fer_data_dir}")

    dataset = load_csv(path, expected="train")

    assert len(dataset) == 28709
    assert dataset.images.shape == (28709, 48, 48)
    assert tuple(class_counts(dataset.labels).values()) == FULL_TRAIN_COUNTS
    assert dataset.lines[-1] == 28710
