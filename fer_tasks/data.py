"""Load and validate FER2013 CSV files.

The header selects one of three layouts:

- ``train``: ``label,feature``, the course's training file.
- ``test``: ``id,feature``, the course's test file, without labels.
- ``fer2013``: ``emotion,pixels,Usage``, the original Kaggle file. ``Usage`` is
  ``Training``, ``PublicTest`` or ``PrivateTest``.

The pixel column (``feature`` or ``pixels``) contains 2,304 integers 0..255, a 48x48
grayscale image in row-major order. Labels are 0..6 in the order of
`fer_tasks.config.CLASS_NAMES`, and test ids are non-negative integers that must be
unique. Column names match without regard to case or surrounding spaces, and the
columns may come in any order.

These variants are accepted and parse to the same arrays as the plain file:

- gzip compression, detected from the magic bytes 1f 8b rather than from the file
  name (concatenated gzip members are read one after another);
- a UTF-8 byte order mark;
- Windows CRLF line endings;
- blank or whitespace-only lines anywhere, which are skipped (a trailing newline, say);
- fields enclosed in double quotes, also after spaces that follow the comma;
- runs of spaces or tabs between pixels, and spaces or tabs around any field.

Each row must fit on one line, so a quoted field cannot contain a line break.
A line longer than `MAX_LINE_BYTES` is rejected as soon as it is seen, and so is a
file larger than `MAX_TEXT_BYTES` on disk or after decompression, so a file without
line breaks or a gzip bomb cannot exhaust memory.

Every problem raises `DataError`, whose message names the file, the 1-based line,
the offending value (cut to about 40 characters) and what to do. Invalid rows are
collected and raised together as `DataValidationError`, unless ``skip_bad_rows`` is
set: then they are dropped, logged and listed in `Dataset.skipped`. Problems with the
file as a whole (empty, corrupt gzip, wrong header, no data rows) always raise.

Parsing takes one of two paths. The fast path checks cheaply that every row is in
the plain form (ASCII, no blank lines, one token per label, id or Usage field) and then
parses all rows with a single `numpy.loadtxt` call. Any anomaly sends the file to
the exact path, which works in blocks of 1,000 lines. A block that passes the fast
checks is still parsed in one call. Any other block is read row by row with the
`csv` module, so each invalid row gets its own precise error.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import logging
import os
import time
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from fer_tasks.config import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, PIXEL_COUNT
from fer_tasks.files import atomic_path

logger = logging.getLogger(__name__)

Kind = Literal["train", "test", "fer2013"]
KINDS: tuple[Kind, ...] = ("train", "test", "fer2013")

PARSER_VERSION = 2
"""Part of every cache key; raise it whenever a change alters the parsed arrays."""

USAGE_VALUES = ("Training", "PublicTest", "PrivateTest")
MAX_SHOWN_CHARS = 40
SKIP_HINT = "To skip invalid rows, set the skip_bad_rows param (--skip-bad-rows on the command line)."
ROW_HINT = "Fix or remove the row. " + SKIP_HINT

GZIP_MAGIC = b"\x1f\x8b"
# A plain row is at most about 9.2 KB (2,304 pixels of up to three digits and a
# space each). The limit allows 14 times that for padding and quoting. It equals
# the csv module's default field size limit, so csv never rejects a field first.
MAX_LINE_BYTES = 128 * 1024
# About 9 times the course train.csv, which is 240.6 MB uncompressed.
MAX_TEXT_BYTES = 2 * 1024**3
# Text is checked for long lines in pieces of this size, which must not exceed
# MAX_LINE_BYTES: a piece then cannot hold a whole line longer than the limit.
_PIECE_BYTES = MAX_LINE_BYTES
LONG_LINE_HINT = (
    "A FER2013 row is at most about 9 KB on one line. Check that this is a CSV file with a "
    "line break after every row, not another format or a damaged file."
)
UTF8_BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
MAX_ID = np.iinfo(np.int64).max

# Canonical column names per layout, lower case, in the usual order.
_COLUMNS: dict[str, tuple[str, ...]] = {
    "train": ("label", "feature"),
    "test": ("id", "feature"),
    "fer2013": ("emotion", "pixels", "usage"),
}
_DISPLAY_NAMES = {"usage": "Usage"}
_LABEL_COLUMNS = ("label", "emotion")
_PIXEL_COLUMNS = ("feature", "pixels")
_USAGE_DTYPE = "U11"
_USAGE_BYTES = frozenset(value.encode("ascii") for value in USAGE_VALUES)
_COMMA_TO_SPACE = bytes.maketrans(b",", b" ")
_COMMA_AND_QUOTE_TO_SPACE = bytes.maketrans(b',"', b"  ")
_QUOTE = ord('"')
# Lines per block on the exact path. Each block with an unusual or invalid row is read
# row by row, so this bounds the slow work that one such row causes.
_BLOCK_LINES = 1000


class DataError(ValueError):
    """One invalid value in an input file.

    Attributes:
        path: The file path as the caller gave it.
        line: 1-based line in the file, or 0 when the whole file is at fault.
        value: The offending value, cut to about 40 characters.
        reason: What is wrong, naming the value.
        hint: What to do about it.
    """

    def __init__(self, path: str, line: int, value: str, reason: str, hint: str) -> None:
        self.path = path
        self.line = line
        self.value = shorten(value)
        self.reason = reason
        self.hint = hint
        location = f"{path} line {line}" if line else path
        super().__init__(f"{location}: {reason}. {hint}")

    def __reduce__(self):
        return (type(self), (self.path, self.line, self.value, self.reason, self.hint))


class DataValidationError(ValueError):
    """Invalid rows in a file, raised when skipping was not requested or left no rows.

    Attributes:
        errors: One `DataError` per invalid row, in line order.
        summary: An optional first line that explains the failure as a whole.
    """

    def __init__(self, errors: Sequence[DataError], summary: str | None = None) -> None:
        self.errors = list(errors)
        self.summary = summary
        super().__init__(self.describe())

    def describe(self, limit: int = 5) -> str:
        """Format the summary and the first `limit` errors, one per line."""
        lines = [str(error) for error in self.errors[:limit]]
        if self.summary:
            lines.insert(0, self.summary)
        hidden = len(self.errors) - limit
        if hidden > 0:
            lines.append(f"... and {hidden} more invalid rows")
        return "\n".join(lines)

    def __reduce__(self):
        return (type(self), (self.errors, self.summary))


@dataclass(frozen=True, eq=False)
class Dataset:
    """Parsed rows of one CSV file. Arrays are aligned row by row.

    Attributes:
        path: The file path as the caller gave it.
        kind: The layout found in the header.
        images: uint8 pixels, shape (n, 48, 48).
        labels: int64 class indices 0..6, shape (n,); None for a course test file.
        ids: int64 row ids, shape (n,); only for a course test file.
        usage: str split names, shape (n,); only for fer2013.csv.
        lines: int64 1-based line number of each row in the file, shape (n,).
        skipped: Rows dropped because skip_bad_rows was set.
        parse_seconds: Wall time spent reading and parsing, or loading the cache.
        sha256: Hex digest of the file's bytes as stored (compressed if gzipped).
    """

    path: str
    kind: Kind
    images: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray | None
    usage: np.ndarray | None
    lines: np.ndarray
    skipped: tuple[DataError, ...]
    parse_seconds: float
    sha256: str

    def __len__(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class _Layout:
    """Columns of a file in the order its header lists them."""

    kind: Kind
    columns: tuple[str, ...]
    header: str

    @property
    def pixel_index(self) -> int:
        return next(i for i, name in enumerate(self.columns) if name in _PIXEL_COLUMNS)

    def display(self, column: str) -> str:
        return _DISPLAY_NAMES.get(column, column)

    def record_dtype(self) -> np.dtype:
        """Build the `numpy.loadtxt` dtype of one whole row, pixels as a subarray."""
        fields = []
        for name in self.columns:
            if name in _PIXEL_COLUMNS:
                fields.append((name, np.uint8, (PIXEL_COUNT,)))
            elif name == "usage":
                # One character longer than any valid value, so loadtxt's truncation of
                # a longer word can never turn it into a valid one.
                fields.append((name, "U12"))
            else:
                fields.append((name, np.int64))
        return np.dtype(fields)


@dataclass
class _Rows:
    """Parsed rows of one block, plus the errors of the rows it rejected."""

    images: np.ndarray
    labels: np.ndarray | None
    ids: np.ndarray | None
    usage: np.ndarray | None
    lines: np.ndarray
    errors: list[DataError]


class _InvalidField(Exception):
    """Failure to parse one field. The caller adds the path and line number."""

    def __init__(self, value: str, reason: str, hint: str = ROW_HINT) -> None:
        super().__init__(reason)
        self.value = value
        self.reason = reason
        self.hint = hint


def shorten(value: str, limit: int = MAX_SHOWN_CHARS) -> str:
    """Cut `value` to `limit` characters, marking a cut with '...'."""
    return value if len(value) <= limit else value[: limit - 3] + "..."


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Return the hex SHA-256 of the file's bytes as stored."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_csv(
    path: str | os.PathLike[str],
    *,
    expected: Kind | None = None,
    skip_bad_rows: bool = False,
) -> Dataset:
    """Read, validate and parse one FER2013 CSV file, plain or gzipped.

    Args:
        path: The file to read.
        expected: The layout the caller needs. A different header raises DataError.
        skip_bad_rows: Drop invalid rows with a warning instead of raising.

    Returns:
        The parsed rows.

    Raises:
        FileNotFoundError: The file does not exist (other OSErrors pass through too).
        DataError: The file as a whole is unusable: empty, corrupt gzip, a wrong
            header, or no data rows.
        DataValidationError: Some rows are invalid and skip_bad_rows is False, or
            every row is invalid.
    """
    _check_expected(expected)
    started = time.perf_counter()
    raw = _read_bytes(os.fspath(path))
    digest = hashlib.sha256(raw).hexdigest()
    dataset, _header, _header_line = _parse_file(
        os.fspath(path), raw, digest, expected, skip_bad_rows, started
    )
    return dataset


def load_csv_cached(
    path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str],
    expected: Kind | None = None,
    skip_bad_rows: bool = False,
) -> Dataset:
    """Load a CSV file like `load_csv`, reusing parsed arrays saved in `cache_dir`.

    The cache file name contains the SHA-256 of the file's bytes, the skip flag and
    `PARSER_VERSION`, so an edited file or a new parser never reads stale arrays.
    An unreadable cache file is logged, ignored and written again. Files with
    invalid rows that raise are not cached.
    """
    _check_expected(expected)
    started = time.perf_counter()
    path_text = os.fspath(path)
    raw = _read_bytes(path_text)
    digest = hashlib.sha256(raw).hexdigest()
    mode = "skip" if skip_bad_rows else "strict"
    cache_file = Path(cache_dir) / f"{digest}-{mode}-v{PARSER_VERSION}.npz"

    cached = _read_cache(cache_file, path_text, digest, started)
    if cached is not None:
        dataset, header, header_line = cached
        # The header stored with the arrays gives the same error as a fresh parse.
        _parse_header(path_text, header, header_line, expected)
        logger.info("Cache hit for %s: %s", path_text, cache_file)
        return dataset

    logger.info("Cache miss for %s, so parsing it and writing %s", path_text, cache_file)
    dataset, header, header_line = _parse_file(
        path_text, raw, digest, expected, skip_bad_rows, started
    )
    _write_cache(cache_file, dataset, header, header_line)
    return dataset


def class_counts(labels: np.ndarray | Sequence[int]) -> dict[str, int]:
    """Count the rows of each class, keyed by `CLASS_NAMES` in order, zeros included."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(
            f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(
            f"labels must be in 0..{NUM_CLASSES - 1}, "
            f"got values from {labels.min()} to {labels.max()}"
        )
    counts = np.bincount(labels.astype(np.int64), minlength=NUM_CLASSES)
    return {name: int(count) for name, count in zip(CLASS_NAMES, counts)}


def split_fer2013(dataset: Dataset) -> tuple[Dataset | None, Dataset | None, Dataset | None]:
    """Split a fer2013.csv dataset into its Training, PublicTest and PrivateTest rows.

    Each part keeps its labels, usage and line numbers, and the file's path, sha256
    and skipped rows. A split without rows is None.
    """
    if dataset.kind != "fer2013" or dataset.usage is None:
        raise ValueError(f"split_fer2013 needs a fer2013 dataset, got kind {dataset.kind!r}")
    training, public_test, private_test = (
        _select_rows(dataset, dataset.usage == usage) for usage in USAGE_VALUES
    )
    return training, public_test, private_test


def training_rows(dataset: Dataset) -> Dataset:
    """Return the rows of `dataset` to train on, raising DataError if a class has none.

    These are all rows of a course training file, or the Training rows of
    fer2013.csv. The models always have one output per class, and a class without
    rows can never be learned, so a missing class almost always means an incomplete
    file rather than a wish.
    """
    if dataset.kind == "test":
        raise ValueError(f"{dataset.path} is a test file, which has no labels to train on")
    rows, noun = dataset, "rows"
    if dataset.kind == "fer2013":
        rows, noun = split_fer2013(dataset)[0], "Training rows"
        if rows is None:
            raise DataError(
                dataset.path, 0, "", "file has no rows with Usage 'Training'",
                "Add Training rows to train on, or use a course train.csv file.",
            )
    counts = class_counts(rows.labels)
    missing = [
        f"{index} ({name})" for index, (name, count) in enumerate(counts.items()) if count == 0
    ]
    if missing:
        subject = f"class {missing[0]} has" if len(missing) == 1 else f"classes {', '.join(missing)} have"
        all_classes = ", ".join(f"{index} {name}" for index, name in enumerate(CLASS_NAMES))
        raise DataError(
            dataset.path, 0, ", ".join(missing),
            f"{subject} no {noun}, so the model could never learn to predict "
            f"{'it' if len(missing) == 1 else 'them'}",
            f"Add {noun} of every class ({all_classes}); if rows were filtered or cut "
            "short, use the complete file.",
        )
    return rows


def _select_rows(dataset: Dataset, mask: np.ndarray) -> Dataset | None:
    if not mask.any():
        return None
    return dataclasses.replace(
        dataset,
        images=dataset.images[mask],
        labels=None if dataset.labels is None else dataset.labels[mask],
        ids=None if dataset.ids is None else dataset.ids[mask],
        usage=None if dataset.usage is None else dataset.usage[mask],
        lines=dataset.lines[mask],
    )


def _check_expected(expected: str | None) -> None:
    if expected is not None and expected not in KINDS:
        raise ValueError(f"expected must be None or one of {list(KINDS)}, got {expected!r}")


# --- Whole-file steps: bytes, gzip, header ---------------------------------------------


def _parse_file(
    path: str,
    raw: bytes,
    digest: str,
    expected: Kind | None,
    skip_bad_rows: bool,
    started: float,
) -> tuple[Dataset, str, int]:
    """Parse file bytes into a Dataset, and also return the header line and its number."""
    text = _decode_container(path, raw)

    header_bytes, header_line, data_start = _split_header(path, text)
    layout = _parse_header(path, header_bytes, header_line, expected)
    rows = _parse_rows(path, text, data_start, header_line + 1, layout)
    if len(rows.lines) == 0 and not rows.errors:
        raise DataError(
            path, 0, "", "file has a header but no data rows", "Add data rows below the header."
        )

    rows = _reject_duplicate_ids(path, rows)
    skipped = _handle_errors(path, rows, skip_bad_rows)
    dataset = Dataset(
        path=path,
        kind=layout.kind,
        images=rows.images,
        labels=rows.labels,
        ids=rows.ids,
        usage=rows.usage,
        lines=rows.lines,
        skipped=skipped,
        parse_seconds=time.perf_counter() - started,
        sha256=digest,
    )
    logger.info(
        "Loaded %s: %d %s rows in %.2f s", path, len(dataset), dataset.kind, dataset.parse_seconds
    )
    return dataset, layout.header, header_line


def _read_bytes(path: str) -> bytes:
    """Read the whole file, raising DataError first if it is larger than MAX_TEXT_BYTES."""
    size = os.stat(path).st_size
    if size > MAX_TEXT_BYTES:
        raise DataError(
            path, 0, f"{size:,} bytes",
            f"file is {size:,} bytes, more than the limit of {MAX_TEXT_BYTES:,} bytes",
            "Check that this is the right file; FER2013 files are a few hundred MB at most.",
        )
    return Path(path).read_bytes()


def _decode_container(path: str, raw: bytes) -> bytes:
    """Gunzip if needed, then drop a UTF-8 BOM and turn CRLF line endings into LF.

    Raises DataError for a line longer than MAX_LINE_BYTES, naming its number.
    """
    if not raw:
        raise DataError(
            path, 0, "", "file is empty (0 bytes)",
            "Write a CSV header such as 'label,feature' followed by data rows.",
        )
    guard = _LineLengthGuard(path)
    if raw.startswith(GZIP_MAGIC):
        text = _gunzip(path, raw, guard)
    else:
        text = raw
        for start in range(0, len(text), _PIECE_BYTES):
            guard.feed(text, start, min(start + _PIECE_BYTES, len(text)))
    if not text:
        raise DataError(
            path, 0, "", "file is empty after gzip decompression",
            "Compress the CSV file again, with its header and data rows.",
        )
    if text.startswith(UTF8_BOM):
        text = text[len(UTF8_BOM):]
    elif text.startswith(UTF16_BOMS):
        mark = text[:2].hex(" ")
        raise DataError(
            path, 1, mark,
            f"file is UTF-16 text (it starts with the byte order mark {mark}), not UTF-8",
            "Save the file as UTF-8 CSV (in Excel: 'CSV UTF-8').",
        )
    # Most files have no "\r", and a one-byte search is about 20 times faster than
    # a two-byte one here (0.01 s against 0.18 s on 240 MB with CPython 3.11).
    if b"\r" in text:
        text = text.replace(b"\r\n", b"\n")
    return text


class _LineLengthGuard:
    """Track the length of the current line over consecutive pieces of text.

    Each piece must be at most MAX_LINE_BYTES long, so every line that starts and
    ends inside one piece is shorter than the limit and only the lines that cross
    piece boundaries need counting.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.line = 1
        self.length = 0
        self.head = b""

    def feed(self, piece: bytes, start: int, stop: int) -> None:
        """Account for piece[start:stop], raising DataError once a line exceeds the limit."""
        first = piece.find(b"\n", start, stop)
        if first < 0:
            self._extend(piece, start, stop)
            return
        self._extend(piece, start, first)
        last = piece.rfind(b"\n", first, stop)
        self.line += piece.count(b"\n", first, stop)
        self.length = 0
        self.head = b""
        self._extend(piece, last + 1, stop)

    def _extend(self, piece: bytes, start: int, stop: int) -> None:
        if len(self.head) < MAX_SHOWN_CHARS:
            self.head += piece[start : min(stop, start + MAX_SHOWN_CHARS - len(self.head))]
        self.length += stop - start
        if self.length > MAX_LINE_BYTES:
            excerpt = self.head.decode("utf-8", "backslashreplace")
            if "\r" in excerpt:
                raise _bare_carriage_return_error(self.path, self.line, excerpt)
            raise DataError(
                self.path, self.line, excerpt,
                f"line is longer than {MAX_LINE_BYTES:,} bytes (it starts with "
                f"{shorten(excerpt)!r})",
                LONG_LINE_HINT,
            )


def _bare_carriage_return_error(path: str, line: int, excerpt: str) -> DataError:
    return DataError(
        path, line, excerpt,
        f"line {shorten(excerpt)!r} ends rows with a bare carriage return (\\r), the line "
        "ending of classic Mac OS",
        "Save the file with LF or CRLF (Windows) line endings.",
    )


def _gunzip(path: str, raw: bytes, guard: _LineLengthGuard) -> bytes:
    """Decompress every gzip member in `raw` piece by piece, feeding each piece to `guard`.

    Raises DataError if a member is corrupt or truncated, or if the text grows past
    MAX_TEXT_BYTES.
    """
    hint = "Download or compress the file again, and test it with 'gzip -t'."
    # Input also goes in in pieces: zlib copies the unconsumed input after every
    # call with an output limit, which would be quadratic on the whole file.
    data = memoryview(raw)
    pieces = []
    total = 0
    offset = 0
    while raw.startswith(GZIP_MAGIC, offset):
        decompressor = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        pending = b""
        while not decompressor.eof:
            if not pending:
                pending = data[offset : offset + _PIECE_BYTES]
                offset += len(pending)
            try:
                piece = decompressor.decompress(pending, _PIECE_BYTES)
            except zlib.error as error:
                raise DataError(path, 0, str(error), f"gzip data is corrupt ({error})", hint) from error
            pending = decompressor.unconsumed_tail
            if not piece and not pending and not decompressor.eof and offset >= len(data):
                raise DataError(path, 0, "", "gzip data is truncated (the stream ends early)", hint)
            total += len(piece)
            if total > MAX_TEXT_BYTES:
                raise DataError(
                    path, 0, f"{total:,} bytes",
                    f"file is more than {MAX_TEXT_BYTES:,} bytes after gzip decompression",
                    "Check that this is the right file; FER2013 files are a few hundred MB "
                    "at most when uncompressed.",
                )
            guard.feed(piece, 0, len(piece))
            pieces.append(piece)
        # The next member starts where this one's unused input begins.
        offset -= len(decompressor.unused_data)

    remaining = raw[offset:]
    # Like the gzip module, tolerate zero padding after the last member.
    if remaining.strip(b"\0"):
        excerpt = remaining[:MAX_SHOWN_CHARS].hex(" ")
        raise DataError(
            path, 0, excerpt,
            f"file has unexpected bytes after the gzip data: {shorten(excerpt)}", hint,
        )
    return b"".join(pieces)


def _split_header(path: str, text: bytes) -> tuple[bytes, int, int]:
    """Find the first non-blank line and return it, its line number and where data starts."""
    position = 0
    line_number = 1
    while position < len(text):
        line_end = text.find(b"\n", position)
        if line_end < 0:
            line_end = len(text)
        if text[position:line_end].strip():
            return text[position:line_end], line_number, line_end + 1
        position = line_end + 1
        line_number += 1
    raise DataError(
        path, 0, "", "file contains only blank lines",
        "Write a CSV header such as 'label,feature' followed by data rows.",
    )


def _parse_header(path: str, header: bytes | str, line: int, expected: Kind | None) -> _Layout:
    """Match the header to a layout, raising DataError when it fits none or not `expected`."""
    if isinstance(header, bytes):
        try:
            header = header.decode("utf-8")
        except UnicodeDecodeError:
            excerpt = header[:MAX_SHOWN_CHARS].decode("utf-8", "backslashreplace")
            raise DataError(
                path, line, excerpt, f"header {shorten(excerpt)!r} is not valid UTF-8 text",
                "Save the file as UTF-8 CSV with a header such as 'label,feature'.",
            ) from None
    if "\r" in header:
        raise _bare_carriage_return_error(path, line, header)
    try:
        names = next(csv.reader([header], strict=True, skipinitialspace=True))
    except csv.Error as error:
        raise DataError(
            path, line, header, f"header {shorten(header)!r} is not valid CSV ({error})",
            "Write the header as comma-separated column names, such as 'label,feature'.",
        ) from None
    columns = tuple(name.strip().lower() for name in names)

    duplicated = sorted({name for name in columns if columns.count(name) > 1})
    if duplicated:
        raise DataError(
            path, line, header,
            f"header {shorten(header)!r} repeats column {_quote_names(duplicated)}",
            f"Keep one column of each name, as in {_format_headers()}.",
        )
    kind = _match_kind(path, line, header, columns, expected)
    return _Layout(kind=kind, columns=columns, header=header)


def _match_kind(
    path: str, line: int, header: str, columns: tuple[str, ...], expected: Kind | None
) -> Kind:
    found = next((kind for kind in KINDS if set(_COLUMNS[kind]) == set(columns)), None)
    if found is not None and (expected is None or found == expected):
        return found
    excerpt = shorten(header)
    if found is not None:
        raise DataError(
            path, line, header,
            f"header {excerpt!r} is a {found} header, but a {expected} file was expected",
            f"Use a {expected} file here, with the header {_format_header(expected)!r}.",
        )

    # No exact match: describe the difference from the closest (or expected) layout.
    target = expected or max(KINDS, key=lambda kind: len(set(_COLUMNS[kind]) & set(columns)))
    if not set(_COLUMNS[target]) & set(columns):
        raise DataError(
            path, line, header, f"header {excerpt!r} matches no known layout",
            f"Use one of the headers {_format_headers()}.",
        )
    problems = []
    missing = [name for name in _COLUMNS[target] if name not in columns]
    extra = [name for name in columns if name not in _COLUMNS[target]]
    if missing:
        problems.append(f"is missing column {_quote_names(missing)}")
    if extra:
        problems.append(f"has unexpected column {_quote_names(extra)}")
    raise DataError(
        path, line, header,
        f"header {excerpt!r} " + " and ".join(problems) + f" for a {target} file",
        f"Use the header {_format_header(target)!r}, or one of {_format_headers()}.",
    )


def _format_header(kind: str) -> str:
    return ",".join(_DISPLAY_NAMES.get(name, name) for name in _COLUMNS[kind])


def _format_headers() -> str:
    return ", ".join(f"'{_format_header(kind)}' ({kind})" for kind in KINDS)


def _quote_names(names: Sequence[str]) -> str:
    return ", ".join(repr(_DISPLAY_NAMES.get(name, name)) for name in names)


# --- Rows: fast path, exact path, assembly ----------------------------------------------


def _parse_rows(path: str, text: bytes, data_start: int, first_line: int, layout: _Layout) -> _Rows:
    """Parse the data lines, trying the whole file at once before going block by block."""
    rows = _parse_fast(text, data_start, first_line, layout)
    if rows is not None:
        return rows

    logger.info(
        "%s is not in the plain layout throughout; parsing it in blocks of %d lines",
        path, _BLOCK_LINES,
    )
    lines = text.split(b"\n")[first_line - 1 :]
    blocks = []
    for offset in range(0, len(lines), _BLOCK_LINES):
        block = lines[offset : offset + _BLOCK_LINES]
        block_first_line = first_line + offset
        rows = _parse_fast(b"\n".join(block), 0, block_first_line, layout)
        if rows is None:
            rows = _parse_exact(path, block, block_first_line, layout)
        blocks.append(rows)
    return _concatenate(blocks)


def _parse_fast(text: bytes, start: int, first_line: int, layout: _Layout) -> _Rows | None:
    """Parse text[start:] in one `numpy.loadtxt` call, or return None if anything is unusual.

    None means only that the exact path must decide. The exact path accepts every
    file that this function accepts, and returns the same arrays for it.
    """
    # '+' is excluded because loadtxt accepts '+5' but the exact path does not.
    if not text.isascii() or text.find(b"+", start) >= 0 or text.find(b"\r", start) >= 0:
        return None
    quoted = text.find(b'"', start) >= 0
    stop = len(text)
    while stop > start and text[stop - 1] in b" \t\n":
        stop -= 1
    count = _count_plain_rows(text, start, stop, layout, quoted)
    if count is None:
        return None
    if count == 0:
        return _empty_rows(layout)

    # With commas (and the quotes around whole fields) turned into spaces, loadtxt
    # checks that every row has one value per other column plus exactly 2304 pixels,
    # and that each pixel fits in uint8.
    table = _COMMA_AND_QUOTE_TO_SPACE if quoted else _COMMA_TO_SPACE
    try:
        records = np.loadtxt(
            io.BytesIO(text.translate(table)),
            dtype=layout.record_dtype(),
            comments=None,
            skiprows=text.count(b"\n", 0, start),
            max_rows=count,
            ndmin=1,
        )
    except ValueError:
        return None
    if len(records) != count:
        return None
    return _rows_from_records(records, first_line, layout)


def _count_plain_rows(
    text: bytes, start: int, stop: int, layout: _Layout, quoted: bool
) -> int | None:
    """Count the lines in text[start:stop] if each one is a plain row, else return None.

    A plain row has exactly one comma between fields and no blank line before it.
    Every field other than the pixels is one token, with optional whitespace around
    it: digits for a label or id, or one of the Usage values. When `quoted` is set,
    any field may also be enclosed in one pair of double quotes, which must be its
    first and last characters.
    """
    last = len(layout.columns) - 1
    count = 0
    position = start
    while position < stop:
        line_end = text.find(b"\n", position, stop)
        if line_end < 0:
            line_end = stop
        if line_end == position:
            return None
        field_start = position
        for index, column in enumerate(layout.columns):
            field_end = text.find(b",", field_start, line_end) if index < last else line_end
            if field_end < 0 or (index == last and text.find(b",", field_start, line_end) >= 0):
                return None
            if not _is_plain_field(text, field_start, field_end, column, quoted):
                return None
            field_start = field_end + 1
        count += 1
        position = line_end + 1
    return count


def _is_plain_field(text: bytes, start: int, end: int, column: str, quoted: bool) -> bool:
    if quoted:
        quotes = text.count(b'"', start, end)
        if quotes:
            if quotes != 2 or text[start] != _QUOTE or text[end - 1] != _QUOTE:
                return False
            start, end = start + 1, end - 1
    if column in _PIXEL_COLUMNS:
        return True
    field = text[start:end].strip()
    return field in _USAGE_BYTES if column == "usage" else field.isdigit()


def _rows_from_records(records: np.ndarray, first_line: int, layout: _Layout) -> _Rows | None:
    """Turn loadtxt records into rows, or return None if a label, id or Usage is invalid."""
    label_column = next((name for name in layout.columns if name in _LABEL_COLUMNS), None)
    labels = ids = usage = None
    if label_column is not None:
        labels = np.ascontiguousarray(records[label_column])
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            return None
    if "id" in layout.columns:
        ids = np.ascontiguousarray(records["id"])
        if ids.size and ids.min() < 0:
            return None
    if "usage" in layout.columns:
        usage = records["usage"].astype(_USAGE_DTYPE)
        if not np.isin(usage, USAGE_VALUES).all():
            return None

    pixel_column = layout.columns[layout.pixel_index]
    images = np.ascontiguousarray(records[pixel_column]).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    lines = np.arange(first_line, first_line + len(records), dtype=np.int64)
    return _Rows(images, labels, ids, usage, lines, errors=[])


def _parse_exact(path: str, lines: list[bytes], first_line: int, layout: _Layout) -> _Rows:
    """Parse lines one by one, collecting a DataError for each invalid row."""
    images, labels, ids, usage, line_numbers, errors = [], [], [], [], [], []
    for offset, raw_line in enumerate(lines):
        if not raw_line.strip():
            continue
        line_number = first_line + offset
        try:
            values = _parse_line(raw_line, layout)
        except _InvalidField as invalid:
            errors.append(
                DataError(path, line_number, invalid.value, invalid.reason, invalid.hint)
            )
            continue
        images.append(values["pixels"])
        labels.append(values.get("label"))
        ids.append(values.get("id"))
        usage.append(values.get("usage"))
        line_numbers.append(line_number)

    rows = _empty_rows(layout)
    rows.errors = errors
    if not line_numbers:
        return rows
    rows.images = np.stack(images).reshape(-1, IMAGE_SIZE, IMAGE_SIZE)
    rows.lines = np.asarray(line_numbers, dtype=np.int64)
    if rows.labels is not None:
        rows.labels = np.asarray(labels, dtype=np.int64)
    if rows.ids is not None:
        rows.ids = np.asarray(ids, dtype=np.int64)
    if rows.usage is not None:
        rows.usage = np.asarray(usage, dtype=_USAGE_DTYPE)
    return rows


def _parse_line(raw_line: bytes, layout: _Layout) -> dict[str, object]:
    """Parse one CSV line into values keyed by role: pixels, label, id, usage."""
    try:
        line = raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        context = raw_line[max(0, error.start - 10) : error.end + 10]
        excerpt = context.decode("utf-8", "backslashreplace")
        raise _InvalidField(
            excerpt,
            f"row has a byte that is not valid UTF-8 (0x{raw_line[error.start]:02x} at "
            f"byte {error.start + 1}) in {shorten(excerpt)!r}",
            "Save the file as UTF-8. " + ROW_HINT,
        ) from None
    if "\r" in line:
        raise _InvalidField(
            line,
            f"row {shorten(line)!r} contains a carriage return (\\r) outside a CRLF line ending",
        )
    try:
        fields = next(csv.reader([line], strict=True, skipinitialspace=True))
    except csv.Error as error:
        raise _InvalidField(line, f"row {shorten(line)!r} is not valid CSV ({error})") from None
    if len(fields) != len(layout.columns):
        noun = "field" if len(fields) == 1 else "fields"
        raise _InvalidField(
            line,
            f"row {shorten(line)!r} has {len(fields)} {noun}, expected {len(layout.columns)} "
            f"({shorten(layout.header.strip())})",
        )

    values: dict[str, object] = {}
    for column, field in zip(layout.columns, fields):
        name = layout.display(column)
        if column in _PIXEL_COLUMNS:
            values["pixels"] = _parse_pixels(field, name)
        elif column in _LABEL_COLUMNS:
            values["label"] = _parse_label(field, name)
        elif column == "id":
            values["id"] = _parse_id(field)
        else:
            values["usage"] = _parse_usage(field, name)
    return values


def _parse_label(field: str, name: str) -> int:
    text = field.strip()
    if not text:
        raise _InvalidField(field, f"{name} is missing")
    excerpt = shorten(text)
    if not (text.isascii() and text.isdigit()):
        numbers = ", ".join(f"{index} {class_name}" for index, class_name in enumerate(CLASS_NAMES))
        raise _InvalidField(
            text,
            f"{name} {excerpt!r} is not an integer 0..{NUM_CLASSES - 1}",
            f"Write the class as its number ({numbers}). " + ROW_HINT,
        )
    value = int(text)
    if value >= NUM_CLASSES:
        raise _InvalidField(text, f"{name} {excerpt!r} is out of range 0..{NUM_CLASSES - 1}")
    return value


def _parse_id(field: str) -> int:
    text = field.strip()
    if not text:
        raise _InvalidField(field, "id is missing")
    excerpt = shorten(text)
    if not (text.isascii() and text.isdigit()):
        raise _InvalidField(text, f"id {excerpt!r} is not a non-negative integer")
    value = int(text)
    if value > MAX_ID:
        raise _InvalidField(text, f"id {excerpt!r} is larger than the maximum {MAX_ID}")
    return value


def _parse_usage(field: str, name: str) -> str:
    text = field.strip()
    if not text:
        raise _InvalidField(field, f"{name} is missing")
    if text not in USAGE_VALUES:
        raise _InvalidField(
            text, f"{name} {shorten(text)!r} is not one of {', '.join(USAGE_VALUES)}"
        )
    return text


def _parse_pixels(field: str, name: str) -> np.ndarray:
    """Parse whitespace-separated pixels into a uint8 array of PIXEL_COUNT values."""
    tokens = field.split()
    if len(tokens) != PIXEL_COUNT:
        raise _InvalidField(
            field.strip(),
            f"{name} {shorten(field.strip())!r} has {len(tokens)} pixel values, expected "
            f"{PIXEL_COUNT} ({IMAGE_SIZE}x{IMAGE_SIZE})",
        )
    digits = "".join(tokens)
    if not (digits.isascii() and digits.isdigit()):
        bad = next(token for token in tokens if not (token.isascii() and token.isdigit()))
        raise _InvalidField(bad, f"pixel {shorten(bad)!r} is not an integer 0..255")

    # Numbers too large for uint16 go through Python integers, capped at 256 so that
    # they stay in range for the check below.
    try:
        values = np.array(tokens, dtype=np.uint16)
    except OverflowError:
        values = np.array([min(int(token), 256) for token in tokens], dtype=np.uint16)
    if values.max() > 255:
        bad = tokens[int(np.argmax(values > 255))]
        raise _InvalidField(bad, f"pixel {shorten(bad)!r} is out of range 0..255")
    return values.astype(np.uint8)


def _empty_rows(layout: _Layout) -> _Rows:
    columns = layout.columns
    has_label = any(name in _LABEL_COLUMNS for name in columns)
    return _Rows(
        images=np.empty((0, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8),
        labels=np.empty(0, dtype=np.int64) if has_label else None,
        ids=np.empty(0, dtype=np.int64) if "id" in columns else None,
        usage=np.empty(0, dtype=_USAGE_DTYPE) if "usage" in columns else None,
        lines=np.empty(0, dtype=np.int64),
        errors=[],
    )


def _concatenate(blocks: list[_Rows]) -> _Rows:
    def join(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        return None if arrays[0] is None else np.concatenate(arrays)

    return _Rows(
        images=np.concatenate([block.images for block in blocks]),
        labels=join([block.labels for block in blocks]),
        ids=join([block.ids for block in blocks]),
        usage=join([block.usage for block in blocks]),
        lines=np.concatenate([block.lines for block in blocks]),
        errors=[error for block in blocks for error in block.errors],
    )


def _reject_duplicate_ids(path: str, rows: _Rows) -> _Rows:
    """Move every repeat of an earlier id from the rows to the errors."""
    if rows.ids is None or len(rows.ids) == 0:
        return rows
    unique_ids, first_index = np.unique(rows.ids, return_index=True)
    if len(unique_ids) == len(rows.ids):
        return rows

    keep = np.zeros(len(rows.ids), dtype=bool)
    keep[first_index] = True
    for index in np.flatnonzero(~keep):
        value = rows.ids[index]
        first_line = rows.lines[first_index[np.searchsorted(unique_ids, value)]]
        rows.errors.append(DataError(
            path, int(rows.lines[index]), str(value),
            f"id '{value}' is already used on line {first_line}",
            "Give every test row a unique id or remove the repeated row. " + SKIP_HINT,
        ))
    rows.errors.sort(key=lambda error: error.line)
    return _Rows(
        images=rows.images[keep],
        labels=None if rows.labels is None else rows.labels[keep],
        ids=rows.ids[keep],
        usage=None if rows.usage is None else rows.usage[keep],
        lines=rows.lines[keep],
        errors=rows.errors,
    )


def _handle_errors(path: str, rows: _Rows, skip_bad_rows: bool) -> tuple[DataError, ...]:
    """Raise for invalid rows, or log them and return them as skipped."""
    if not rows.errors:
        return ()
    if not skip_bad_rows:
        raise DataValidationError(rows.errors)
    if len(rows.lines) == 0:
        raise DataValidationError(
            rows.errors,
            summary=f"{path}: all {len(rows.errors)} data rows are invalid, so no rows remain",
        )
    logger.warning(
        "Skipped %d invalid rows in %s (lines %s). First error: %s",
        len(rows.errors), path, _describe_lines(rows.errors), rows.errors[0],
    )
    return tuple(rows.errors)


def _describe_lines(errors: Sequence[DataError], limit: int = 20) -> str:
    listed = ", ".join(str(error.line) for error in errors[:limit])
    hidden = len(errors) - limit
    return f"{listed}, and {hidden} more" if hidden > 0 else listed


# --- Cache ------------------------------------------------------------------------------


def _write_cache(cache_file: Path, dataset: Dataset, header: str, header_line: int) -> None:
    arrays: dict[str, np.ndarray] = {
        "kind": np.array(dataset.kind),
        "header": np.array(header),
        "header_line": np.array(header_line, dtype=np.int64),
        "images": dataset.images,
        "lines": dataset.lines,
        "skipped_lines": np.array([error.line for error in dataset.skipped], dtype=np.int64),
        "skipped_values": np.array([error.value for error in dataset.skipped], dtype=str),
        "skipped_reasons": np.array([error.reason for error in dataset.skipped], dtype=str),
        "skipped_hints": np.array([error.hint for error in dataset.skipped], dtype=str),
    }
    for name in ("labels", "ids", "usage"):
        value = getattr(dataset, name)
        if value is not None:
            arrays[name] = value
    try:
        with atomic_path(cache_file) as temporary:
            np.savez(temporary, **arrays)
    except OSError as error:
        logger.warning("Could not write cache file %s: %s", cache_file, error)


def _read_cache(
    cache_file: Path, path: str, digest: str, started: float
) -> tuple[Dataset, str, int] | None:
    """Load a cached Dataset, header and header line, or return None if missing or unreadable."""
    if not cache_file.is_file():
        return None
    try:
        with np.load(cache_file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        skipped = tuple(
            DataError(path, int(line), str(value), str(reason), str(hint))
            for line, value, reason, hint in zip(
                arrays["skipped_lines"], arrays["skipped_values"],
                arrays["skipped_reasons"], arrays["skipped_hints"], strict=True,
            )
        )
        dataset = Dataset(
            path=path,
            kind=str(arrays["kind"]),
            images=arrays["images"],
            labels=arrays.get("labels"),
            ids=arrays.get("ids"),
            usage=arrays.get("usage"),
            lines=arrays["lines"],
            skipped=skipped,
            parse_seconds=time.perf_counter() - started,
            sha256=digest,
        )
        _check_cached(dataset)
        return dataset, str(arrays["header"]), int(arrays["header_line"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
        logger.warning(
            "Ignoring unreadable cache file %s (%s) and parsing %s again", cache_file, error, path
        )
        return None


def _check_cached(dataset: Dataset) -> None:
    """Raise ValueError unless the cached arrays have the shapes and types of a parse."""
    count = len(dataset.images)
    if (
        dataset.kind not in KINDS
        or dataset.images.dtype != np.uint8
        or dataset.images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE)
        or dataset.lines.shape != (count,)
    ):
        raise ValueError("cached arrays do not match the parsed layout")
    for name in ("labels", "ids", "usage"):
        value = getattr(dataset, name)
        if value is not None and value.shape != (count,):
            raise ValueError(f"cached {name} has shape {value.shape}, expected ({count},)")
