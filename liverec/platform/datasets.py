"""Interaction datasets: one columnar event table, fed by file readers or a synthetic stream.

Every source (a RecBole atomic ``.inter`` file, a MovieLens ``ratings.dat``, a plain sequence
file, or the seeded synthetic generator) becomes one :class:`EventTable` sorted by event time,
because ``liverec replay``, the trainer, the benchmarks and the evaluation all want the same
thing: the events in the order a live stream would have delivered them.

Readers parse in bulk with :func:`numpy.loadtxt`, a chunk of lines at a time. A chunk that bulk
parsing refuses is halved until its pieces parse in bulk or are a few hundred lines; those are
parsed line by line, the ground truth, which names the file and 1-based line number of the first
malformed line or, in lenient mode, skips and counts malformed lines. A clean 10M-line file thus
costs seconds, and a few bad lines cost a few small line passes.
"""

from __future__ import annotations

import enum
import itertools
import math
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TextIO

import numpy as np

__all__ = [
    "SYNTHETIC_EPOCH_MS",
    "Action",
    "DatasetFormatError",
    "EventTable",
    "ReadResult",
    "SyntheticConfig",
    "UserSequences",
    "load_dataset",
    "read_movielens_ratings",
    "read_recbole_inter",
    "read_sequence_file",
    "synthetic",
]

#: Origin of generated times (2023-11-14T22:13:20Z): a realistic, fixed epoch, so synthetic and
#: timestamp-less streams never carry time 0, which protobuf cannot tell from "absent".
SYNTHETIC_EPOCH_MS = 1_700_000_000_000


class Action(enum.IntEnum):
    """The proto enum ``liverec.v1.Action``, mirrored so datasets need no generated code."""

    VIEW = 1
    CLICK = 2
    LIKE = 3
    PURCHASE = 4
    RATE = 5


# --------------------------------------------------------------------------------------------
# The table


_COLUMN_DTYPES: dict[str, np.dtype] = {
    "user_id": np.dtype(np.int64),
    "item_id": np.dtype(np.int64),
    "action": np.dtype(np.int8),
    "value": np.dtype(np.float64),
    "event_time_ms": np.dtype(np.int64),
}


@dataclass(frozen=True, eq=False)
class EventTable:
    """Columnar interactions sorted by event time (stable: ties keep file order).

    The columns are read-only views, so slices share memory with the table safely. Invariants
    (equal lengths, dtypes, ids > 0, known actions, sorted times) are checked on construction,
    so every consumer can rely on them.
    """

    user_id: np.ndarray  # int64, > 0
    item_id: np.ndarray  # int64, > 0
    action: np.ndarray  # int8, values of Action
    value: np.ndarray  # float64, NaN where absent (e.g. the rating of a RATE)
    event_time_ms: np.ndarray  # int64, Unix ms

    def __post_init__(self) -> None:
        length = None
        for name, dtype in _COLUMN_DTYPES.items():
            column = _readonly_column(name, getattr(self, name), dtype)
            if length is not None and column.shape[0] != length:
                raise ValueError(f"EventTable.{name}: length {column.shape[0]}, expected {length}")
            length = column.shape[0]
            object.__setattr__(self, name, column)
        if length and (self.user_id.min() <= 0 or self.item_id.min() <= 0):
            raise ValueError("EventTable: user_id and item_id must be > 0")
        if length and (self.action.min() < Action.VIEW or self.action.max() > Action.RATE):
            raise ValueError("EventTable.action: values must be Action members (1..5)")
        if np.any(self.event_time_ms[1:] < self.event_time_ms[:-1]):
            raise ValueError("EventTable.event_time_ms: events must be sorted by time")

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    def __repr__(self) -> str:  # cheap: no unique() over millions of ids
        if not len(self):
            return "EventTable(events=0)"
        return f"EventTable(events={len(self)}, time_ms=[{self.event_time_ms[0]}, {self.event_time_ms[-1]}])"

    def slice(self, start: int, stop: int) -> EventTable:
        """Events ``[start, stop)`` in time order, e.g. a replay batch or a time split (no copy)."""
        return EventTable(*(getattr(self, name)[start:stop] for name in _COLUMN_DTYPES))

    def num_users(self) -> int:
        return int(np.unique(self.user_id).size)

    def num_items(self) -> int:
        return int(np.unique(self.item_id).size)

    def per_user_sequences(self) -> UserSequences:
        """Each user's events in time order, as CSR arrays: the shape histories and
        leave-one-out evaluation need (the last event of each user is ``indptr[1:] - 1``)."""
        order = np.argsort(self.user_id, kind="stable")  # stable: time order within a user
        users, starts = np.unique(self.user_id[order], return_index=True)
        return UserSequences(
            user_id=users,
            indptr=np.append(starts, len(self)).astype(np.int64),
            item_id=self.item_id[order],
            action=self.action[order],
            value=self.value[order],
            event_time_ms=self.event_time_ms[order],
        )


@dataclass(frozen=True, eq=False)
class UserSequences:
    """Events grouped by user: user ``user_id[u]`` owns rows ``indptr[u]:indptr[u + 1]``."""

    user_id: np.ndarray  # int64, ascending, unique
    indptr: np.ndarray  # int64, len(user_id) + 1
    item_id: np.ndarray
    action: np.ndarray
    value: np.ndarray
    event_time_ms: np.ndarray

    def __len__(self) -> int:
        return int(self.user_id.shape[0])

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)


def _readonly_column(name: str, data: object, dtype: np.dtype) -> np.ndarray:
    """A read-only 1-D view of ``data`` as ``dtype``; refuses lossy kind changes (float ids)."""
    array = np.asarray(data)
    if array.ndim != 1:
        raise ValueError(f"EventTable.{name}: must be 1-D, got shape {array.shape}")
    if array.size and not np.can_cast(array.dtype, dtype, casting="same_kind"):
        raise TypeError(f"EventTable.{name}: dtype {array.dtype} cannot become {dtype}")
    converted = array.astype(dtype, copy=False)
    if converted is not array and array.size and not np.array_equal(converted, array, equal_nan=True):
        raise ValueError(f"EventTable.{name}: values out of range for {dtype}")  # e.g. action 257
    view = converted.view()
    view.flags.writeable = False
    return view


@dataclass(frozen=True, eq=False)
class ReadResult:
    """A parsed dataset and how many malformed lines lenient mode skipped (0 when strict)."""

    table: EventTable
    skipped: int


class DatasetFormatError(ValueError):
    """A dataset file that cannot be read as its format, located to the 1-based line."""

    def __init__(self, path: str | os.PathLike[str], line_no: int, reason: str) -> None:
        super().__init__(str(path), line_no, reason)
        self.path = str(path)
        self.line_no = line_no
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.reason}"


# --------------------------------------------------------------------------------------------
# Line parsing: a bulk path per chunk, a validating line path where the bulk path refuses


_CHUNK_LINES = 65_536
_LINE_PATH_LINES = 256
_MAX_ID = int(np.iinfo(np.int64).max)
# Seconds whose millisecond value stays exact in float64 and fits int64 (year ~287,000).
_MAX_TIMESTAMP_S = 9.0e12
_INT_RE = re.compile(r"\s*[+-]?[0-9]+\s*")
_FLOAT_RE = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*")
_ROLES = ("user", "item", "rating", "timestamp")


@dataclass(frozen=True)
class _Layout:
    """The columns of a data line: a display name and a role per column (None: ignored)."""

    names: tuple[str, ...]
    roles: tuple[str | None, ...]
    delimiter: str | None  # None: any run of whitespace
    describe: str  # e.g. "tab-separated", for error messages

    def has(self, role: str) -> bool:
        return role in self.roles


class _LineError(Exception):
    """One malformed line; the reader adds the path and line number."""


def _parse_lines(
    path: str, lines: Iterable[str], first_line_no: int, layout: _Layout, lenient: bool
) -> tuple[dict[str, np.ndarray], int, int]:
    """Parse data lines numbered from ``first_line_no``.

    Returns the columns by role, the number of malformed lines skipped, and the number of the
    line after the last one read (for errors about missing data).
    """
    parts: dict[str, list[np.ndarray]] = {role: [] for role in _ROLES if layout.has(role)}
    skipped = 0
    line_no = first_line_no
    iterator = iter(lines)
    while chunk := list(itertools.islice(iterator, _CHUNK_LINES)):
        skipped += _parse_chunk(path, chunk, line_no, layout, lenient, parts)
        line_no += len(chunk)
    merged = {role: np.concatenate(chunks) if chunks else np.empty(0, _role_dtype(role)) for role, chunks in parts.items()}
    return merged, skipped, line_no


def _parse_chunk(
    path: str, chunk: list[str], first_line_no: int, layout: _Layout, lenient: bool, parts: dict[str, list[np.ndarray]]
) -> int:
    """Append the chunk's columns to ``parts``; return how many malformed lines were skipped.

    A chunk the bulk path refuses is halved until the halves parse in bulk or are small enough
    for the line path, so a few bad lines in a large file cost a few small line passes, not a
    line pass over everything. Halves go left first, so strict mode still stops at the first
    bad line.
    """
    columns = _bulk_parse(chunk, layout)
    if columns is None and len(chunk) > _LINE_PATH_LINES:
        middle = len(chunk) // 2
        left = _parse_chunk(path, chunk[:middle], first_line_no, layout, lenient, parts)
        return left + _parse_chunk(path, chunk[middle:], first_line_no + middle, layout, lenient, parts)
    bad = 0
    if columns is None:
        columns, bad = _parse_chunk_by_line(path, chunk, first_line_no, layout, lenient)
    for role, column in columns.items():
        parts[role].append(column)
    return bad


def _role_dtype(role: str | None) -> str:
    return {"user": "i8", "item": "i8", "rating": "f8", "timestamp": "f8"}.get(role or "", "U1")


def _bulk_parse(chunk: list[str], layout: _Layout) -> dict[str, np.ndarray] | None:
    """The chunk's columns if every line is valid, else None (the line path then decides).

    It may refuse lines the line path accepts, never the other way round: loadtxt checks the
    column count and number syntax, the checks below the value ranges.
    """
    delimiter = layout.delimiter
    if delimiter == "::":  # loadtxt wants one character; a tab would then fake a separator
        if any("\t" in line for line in chunk):
            return None
        chunk, delimiter = [line.replace("::", "\t") for line in chunk], "\t"
    dtype = [(f"c{j}", _role_dtype(role)) for j, role in enumerate(layout.roles)]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "input contained no data" must not pass silently
            parsed = np.loadtxt(chunk, dtype=dtype, delimiter=delimiter, comments=None, quotechar=None, ndmin=1)
    except (ValueError, UserWarning):
        return None
    columns = {role: np.ascontiguousarray(parsed[f"c{j}"]) for j, role in enumerate(layout.roles) if role}
    return columns if _columns_valid(columns) else None


def _columns_valid(columns: dict[str, np.ndarray]) -> bool:
    """The range checks of :func:`_parse_fields`, vectorised."""
    ok = bool(np.all(columns["user"] > 0) and np.all(columns["item"] > 0))
    if "rating" in columns:
        ok = ok and bool(np.all(np.isfinite(columns["rating"])))
    if "timestamp" in columns:
        stamps = columns["timestamp"]
        ok = ok and bool(np.all((stamps >= 0) & (stamps <= _MAX_TIMESTAMP_S)))  # False for NaN
    return ok


def _parse_chunk_by_line(
    path: str, chunk: list[str], first_line_no: int, layout: _Layout, lenient: bool
) -> tuple[dict[str, np.ndarray], int]:
    """Validate each line: raise at the first malformed one, or skip and count it if lenient."""
    rows: list[tuple[float, ...]] = []
    bad = 0
    for line_no, line in enumerate(chunk, start=first_line_no):
        if not line.strip():
            continue
        try:
            rows.append(_parse_fields(_split(line, layout), layout))
        except _LineError as error:
            if not lenient:
                raise DatasetFormatError(path, line_no, str(error)) from None
            bad += 1
    used = [role for role in layout.roles if role]
    columns = {role: np.array([row[k] for row in rows], dtype=_role_dtype(role)) for k, role in enumerate(used)}
    return columns, bad


def _split(line: str, layout: _Layout) -> list[str]:
    if layout.delimiter is None:
        return line.split()
    return line.rstrip("\r\n").split(layout.delimiter)


def _parse_fields(values: list[str], layout: _Layout) -> tuple[float, ...]:
    """The used fields of one line, in column order, or _LineError saying what is wrong."""
    if len(values) != len(layout.roles):
        raise _LineError(f"expected {len(layout.roles)} {layout.describe} columns, found {len(values)}")
    parsed: list[float] = []
    for text, name, role in zip(values, layout.names, layout.roles, strict=True):
        if role in ("user", "item"):
            parsed.append(_parse_id(text, name))
        elif role == "rating":
            parsed.append(_parse_number(text, name))
        elif role == "timestamp":
            parsed.append(_parse_timestamp(text, name))
    return tuple(parsed)


def _parse_id(text: str, name: str) -> int:
    if not _INT_RE.fullmatch(text):
        raise _LineError(f"{name}: not an integer: {text!r}")
    value = int(text)
    if not 0 < value <= _MAX_ID:
        raise _LineError(f"{name}: must be a positive 64-bit integer, got {text.strip()!r}")
    return value


def _parse_number(text: str, name: str) -> float:
    if not _FLOAT_RE.fullmatch(text):  # also refuses nan and inf
        raise _LineError(f"{name}: not a finite number: {text!r}")
    return float(text)


def _parse_timestamp(text: str, name: str) -> float:
    value = _parse_number(text, name)
    if not 0 <= value <= _MAX_TIMESTAMP_S:
        raise _LineError(f"{name}: must be Unix seconds in [0, {_MAX_TIMESTAMP_S:.0e}], got {text.strip()!r}")
    return value


# --------------------------------------------------------------------------------------------
# From parsed columns to a table


def _build_table(columns: dict[str, np.ndarray], action: Action) -> EventTable:
    """Sort the parsed rows by time into a table; ratings become values, seconds become ms."""
    users = columns["user"]
    value = columns.get("rating", np.full(users.shape[0], np.nan))
    if "timestamp" in columns:
        times = np.rint(columns["timestamp"] * 1000.0).astype(np.int64)
    else:
        times = _spread_times(users)
    order = np.argsort(times, kind="stable")
    return EventTable(
        user_id=users[order],
        item_id=columns["item"][order],
        action=np.full(users.shape[0], action, dtype=np.int8),
        value=value[order],
        event_time_ms=times[order],
    )


def _spread_times(users: np.ndarray) -> np.ndarray:
    """Times for files without timestamps, keeping each user's file order.

    Each user's events are spread evenly, in file order, over one common span that starts at
    SYNTHETIC_EPOCH_MS and gives the longest history one event per second: event ``k`` of a user
    with ``n`` events gets ``epoch + floor(k * span / n)``. A user's times therefore strictly
    increase (steps of at least 1 s), and users interleave over the same period as they would in
    a live stream, instead of arriving one after another as in a file grouped by user. Ties
    between users keep file order under the stable time sort.
    """
    n = users.shape[0]
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]]) if n else np.empty(0, np.int64)
    counts = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, counts)
    span_ms = 1000 * int(counts.max(initial=1))
    times = np.empty(n, dtype=np.int64)
    times[order] = SYNTHETIC_EPOCH_MS + (rank * span_ms) // np.repeat(counts, counts)
    return times


def _finish(path: str, columns: dict[str, np.ndarray], skipped: int, end_line: int, action: Action) -> ReadResult:
    if columns["user"].size == 0:
        detail = f" ({skipped} malformed lines skipped)" if skipped else ""
        raise DatasetFormatError(path, end_line, f"no events in the file{detail}")
    return ReadResult(table=_build_table(columns, action), skipped=skipped)


def _open_text(path: str | os.PathLike[str]) -> TextIO:
    """Undecodable bytes become U+FFFD, so they surface as a malformed line with its number;
    a leading byte-order mark is dropped."""
    return open(path, encoding="utf-8-sig", errors="replace", newline=None)


# --------------------------------------------------------------------------------------------
# The readers


_RECBOLE_TYPES = ("token", "token_seq", "float", "float_seq")
_RECBOLE_ROLES = {"user_id": "user", "item_id": "item", "rating": "rating", "timestamp": "timestamp"}


def read_recbole_inter(path: str | os.PathLike[str], *, lenient: bool = False) -> ReadResult:
    """A RecBole atomic ``.inter`` file: tab-separated, header of ``name:type`` columns.

    ``user_id`` and ``item_id`` are required (positive integers); ``rating`` makes every event a
    RATE with the rating as value, otherwise events are VIEWs; ``timestamp`` is Unix seconds
    (float), otherwise times are synthesised as in :func:`read_sequence_file`. Other columns are
    ignored. A malformed header is an error even when lenient: nothing after it can be read.
    """
    path = os.fspath(path)
    with _open_text(path) as handle:
        header = handle.readline()
        if not header:
            raise DatasetFormatError(path, 1, "empty file: expected a RecBole header such as 'user_id:token'")
        layout = _recbole_layout(path, header)
        columns, skipped, end_line = _parse_lines(path, handle, 2, layout, lenient)
    action = Action.RATE if layout.has("rating") else Action.VIEW
    return _finish(path, columns, skipped, end_line, action)


def _recbole_layout(path: str, header: str) -> _Layout:
    names: list[str] = []
    for column in header.rstrip("\r\n").split("\t"):
        name, _, kind = column.strip().partition(":")
        if kind not in _RECBOLE_TYPES or not name:
            raise DatasetFormatError(
                path, 1, f"missing RecBole header: column {column!r} is not 'name:type' with type in {_RECBOLE_TYPES}"
            )
        names.append(name)
    for required in ("user_id", "item_id"):
        if required not in names:
            raise DatasetFormatError(path, 1, f"RecBole header has no {required} column: {names}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetFormatError(path, 1, f"RecBole header repeats columns {duplicates}")
    roles = tuple(_RECBOLE_ROLES.get(name) for name in names)
    return _Layout(names=tuple(names), roles=roles, delimiter="\t", describe="tab-separated")


_MOVIELENS_LAYOUT = _Layout(
    names=("user_id", "item_id", "rating", "timestamp"),
    roles=("user", "item", "rating", "timestamp"),
    delimiter="::",
    describe="'::'-separated",
)


def read_movielens_ratings(path: str | os.PathLike[str], *, lenient: bool = False) -> ReadResult:
    """A MovieLens ``ratings.dat`` (ml-1m, ml-10m): ``user::item::rating::timestamp`` per line,
    timestamps in Unix seconds. Every event is a RATE with the rating as value."""
    path = os.fspath(path)
    with _open_text(path) as handle:
        columns, skipped, end_line = _parse_lines(path, handle, 1, _MOVIELENS_LAYOUT, lenient)
    if end_line == 1:
        raise DatasetFormatError(path, 1, "empty file: expected 'user::item::rating::timestamp' lines")
    return _finish(path, columns, skipped, end_line, Action.RATE)


def read_sequence_file(path: str | os.PathLike[str], *, lenient: bool = False) -> ReadResult:
    """A plain sequence file: ``user item [timestamp]`` per line, whitespace-separated, each
    user's lines in the order the user acted. Every event is a VIEW.

    Whether the file has timestamps (Unix seconds) is decided by the first non-blank line with
    two or three columns; lines with the other count are malformed. Without timestamps, times
    are synthesised so that each user's events keep file order and users interleave over one
    common span (see :func:`_spread_times`).
    """
    path = os.fspath(path)
    with _open_text(path) as handle:
        head = list(itertools.islice(handle, _CHUNK_LINES))
        if not any(line.strip() for line in head):
            raise DatasetFormatError(path, 1, "empty file: expected 'user item [timestamp]' lines")
        layout = _sequence_layout(head)
        columns, skipped, end_line = _parse_lines(path, itertools.chain(head, handle), 1, layout, lenient)
    return _finish(path, columns, skipped, end_line, Action.VIEW)


def _sequence_layout(head: list[str]) -> _Layout:
    counts = (len(line.split()) for line in head)
    with_time = next((count for count in counts if count in (2, 3)), 2) == 3
    names = ("user_id", "item_id", "timestamp") if with_time else ("user_id", "item_id")
    roles = ("user", "item", "timestamp") if with_time else ("user", "item")
    return _Layout(names=names, roles=roles, delimiter=None, describe="whitespace-separated")


# --------------------------------------------------------------------------------------------
# Choosing a reader


_READERS = {
    "recbole": read_recbole_inter,
    "movielens": read_movielens_ratings,
    "sequence": read_sequence_file,
}
_RECBOLE_HEADER_RE = re.compile(r"\s*\w+:(?:token|token_seq|float|float_seq)\s*")


def load_dataset(
    spec: str,
    *,
    format: str | None = None,  # noqa: A002 - the CLI's --format, by name
    lenient: bool = False,
    synthetic_config: SyntheticConfig | None = None,
) -> ReadResult:
    """What ``liverec replay --dataset SPEC [--format F] [--lenient]`` replays.

    ``"synthetic"`` runs the generator (``synthetic_config`` or the default); a directory holds
    exactly one ``*.inter`` or ``ratings.dat`` (narrowed by ``format`` if given); a file is read
    as ``format`` ("recbole", "movielens" or "sequence"), else as its extension says (``.inter``,
    ``.dat``), else as its first non-blank line looks.
    """
    if format is not None and format not in _READERS:
        raise ValueError(f"unknown dataset format {format!r}; expected one of {sorted(_READERS)}")
    if spec == "synthetic":
        if format is not None:
            raise ValueError("format applies to dataset files, not to 'synthetic'")
        return ReadResult(table=synthetic(synthetic_config or SyntheticConfig()), skipped=0)
    path = Path(spec)
    if path.is_dir():
        path, format = _dataset_in_directory(path, format)
    elif not path.is_file():
        raise FileNotFoundError(f"dataset {spec!r}: no such file or directory (or use 'synthetic')")
    return _READERS[format or _detect_format(path)](path, lenient=lenient)


def _dataset_in_directory(directory: Path, wanted: str | None) -> tuple[Path, str]:
    candidates = [(p, "recbole") for p in sorted(directory.glob("*.inter"))]
    if (directory / "ratings.dat").is_file():
        candidates.append((directory / "ratings.dat", "movielens"))
    if wanted is not None:
        candidates = [(p, f) for p, f in candidates if f == wanted]
    if len(candidates) != 1:
        found = [p.name for p, _ in candidates] or "none"
        raise ValueError(f"dataset directory {directory}: expected exactly one *.inter or ratings.dat, found {found}")
    return candidates[0]


def _detect_format(path: Path) -> str:
    if path.suffix == ".inter":
        return "recbole"
    if path.suffix == ".dat":
        return "movielens"
    with _open_text(path) as handle:
        first = next((line for line in handle if line.strip()), "")
    if "::" in first:
        return "movielens"
    if _RECBOLE_HEADER_RE.fullmatch(first.split("\t")[0]):
        return "recbole"
    return "sequence"


# --------------------------------------------------------------------------------------------
# The synthetic stream


_DAY_MS = 86_400_000
_RATING_LEVELS = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
_RATING_PROBABILITIES = np.array([0.05, 0.10, 0.25, 0.35, 0.25])


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape of the synthetic stream; the defaults are the demo's and the tests' stream.

    The number of users is a ceiling: with fewer sessions than users, only as many users as
    sessions appear.
    """

    num_users: int = 3_000
    num_items: int = 2_000
    num_events: int = 50_000
    seed: int = 0
    #: Taste clusters; items belong to one, users prefer a few.
    num_clusters: int = 25
    #: Zipf exponent of item popularity (weight = rank ** -exponent).
    popularity_exponent: float = 1.0
    mean_session_length: float = 8.0
    #: Chance that the next event of a session steps to the next item of the current item's
    #: cluster chain instead of a fresh popularity x taste draw: the sequential signal.
    chain_probability: float = 0.5
    #: Spread of users' initial cluster preferences (std of the logits): higher, more focused.
    taste_concentration: float = 2.0
    #: Std of the random-walk step of a user's cluster logits between sessions.
    taste_drift: float = 0.3
    #: Fraction of items available from the start; the rest are released over the period.
    initial_item_fraction: float = 0.5
    duration_days: float = 30.0
    mean_event_gap_s: float = 30.0
    min_session_gap_s: float = 1_800.0
    #: Relative frequency of VIEW, CLICK, LIKE, PURCHASE, RATE.
    action_weights: tuple[float, float, float, float, float] = (0.60, 0.25, 0.08, 0.03, 0.04)

    def __post_init__(self) -> None:
        minimum = {"num_users": 1, "num_items": 1, "num_events": 1, "seed": 0, "num_clusters": 1}
        for name, low in minimum.items():
            _check_int(name, getattr(self, name), low)
        if self.num_clusters > self.num_items:
            _invalid("num_clusters", self.num_clusters, f"at most num_items ({self.num_items})")
        _check_float("popularity_exponent", self.popularity_exponent, 0.0, math.inf)
        _check_float("mean_session_length", self.mean_session_length, 1.0, math.inf)
        _check_float("chain_probability", self.chain_probability, 0.0, 1.0)
        _check_float("taste_concentration", self.taste_concentration, 0.0, math.inf)
        _check_float("taste_drift", self.taste_drift, 0.0, math.inf)
        _check_float("initial_item_fraction", self.initial_item_fraction, 0.0, 1.0)
        if self.initial_item_fraction == 0.0:
            _invalid("initial_item_fraction", 0.0, "> 0 (the stream needs items at its start)")
        _check_float("duration_days", self.duration_days, 0.0, 36_500.0)
        if self.duration_days == 0.0:
            _invalid("duration_days", 0.0, "> 0")
        _check_float("mean_event_gap_s", self.mean_event_gap_s, 0.0, 86_400.0)
        _check_float("min_session_gap_s", self.min_session_gap_s, 0.0, 86_400.0 * 365)
        weights = self.action_weights
        if (
            not isinstance(weights, tuple)
            or len(weights) != len(Action)
            or not all(_is_number(w) and math.isfinite(w) and w >= 0 for w in weights)
            or sum(weights) <= 0
        ):
            _invalid("action_weights", weights, "a tuple of 5 finite weights >= 0 with a positive sum")


def _invalid(name: str, value: object, expected: str) -> NoReturn:
    raise ValueError(f"SyntheticConfig.{name}: must be {expected}, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        _invalid(name, value, f"an integer >= {low}")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if not _is_number(value) or not low <= value <= high:  # type: ignore[operator]
        _invalid(name, value, f"a number in [{low}, {high}]")


def synthetic(config: SyntheticConfig = SyntheticConfig()) -> EventTable:  # frozen: a safe default
    """A seeded, fully deterministic interaction stream with the structure real ones have.

    - Items: Zipf popularity (of a random rank, so some late releases become hits); each in one
      taste cluster; ids in release order, part of the catalog released over the period.
    - Users: ids in arrival order, arrivals spread over the period; a heavy-tailed number of
      sessions each, so many users come once and some keep returning. Each user has cluster
      logits that random-walk between sessions (slowly drifting tastes).
    - Sessions: bursts of events seconds apart, separated from the user's other sessions by at
      least ``min_session_gap_s``. An event is a fresh draw (cluster from the user's current
      taste, item by popularity among the cluster's released items) or, with
      ``chain_probability``, the next item of the cluster's chain (its items in release order,
      like episodes) after the previous event: the sequential signal a sequence model can learn
      and popularity cannot.
    - Actions mostly VIEW/CLICK; RATE carries a 1..5 rating, PURCHASE the item's price.

    Everything is vectorised: a session's chain steps are positions ``anchor + k`` in the chain,
    so no loop runs per event.
    """
    rng = np.random.default_rng(config.seed)
    span_ms = int(config.duration_days * _DAY_MS)
    catalog = _Catalog.generate(config, span_ms, rng)
    sessions = _Sessions.generate(config, span_ms, rng)
    item_index = _choose_items(config, catalog, sessions, rng)
    action = rng.choice(np.arange(Action.VIEW, Action.RATE + 1, dtype=np.int8), config.num_events, p=_action_p(config))
    value = np.full(config.num_events, np.nan)
    is_rate, is_purchase = action == Action.RATE, action == Action.PURCHASE
    value[is_rate] = rng.choice(_RATING_LEVELS, int(is_rate.sum()), p=_RATING_PROBABILITIES)
    value[is_purchase] = catalog.price[item_index[is_purchase]]
    order = np.argsort(sessions.event_time, kind="stable")  # generated per user in order
    return EventTable(
        user_id=sessions.owner[sessions.event_session][order] + 1,
        item_id=item_index[order] + 1,
        action=action[order],
        value=value[order],
        event_time_ms=sessions.event_time[order] + SYNTHETIC_EPOCH_MS,
    )


def _action_p(config: SyntheticConfig) -> np.ndarray:
    weights = np.asarray(config.action_weights, dtype=np.float64)
    return weights / weights.sum()


@dataclass(frozen=True)
class _Catalog:
    """Items in release order (item index = id - 1) laid out as per-cluster chains.

    ``chain[start[c]:start[c + 1]]`` are cluster ``c``'s items, oldest first; since releases are
    sorted, the items of ``c`` released by time ``t`` are a prefix of that range, found by a
    search in ``chain_key`` (``cluster * key_stride + release``). ``cumulative_popularity``
    runs along ``chain``, so a popularity draw within a released prefix is one search.
    """

    chain: np.ndarray
    start: np.ndarray
    chain_key: np.ndarray
    key_stride: int
    cumulative_popularity: np.ndarray
    price: np.ndarray

    @staticmethod
    def generate(config: SyntheticConfig, span_ms: int, rng: np.random.Generator) -> _Catalog:
        count, clusters = config.num_items, config.num_clusters
        cluster = rng.permutation(np.arange(count) % clusters)
        release = rng.integers(0, span_ms + 1, count)
        release[rng.permutation(count)[: math.ceil(config.initial_item_fraction * count)]] = 0
        release[np.unique(cluster, return_index=True)[1]] = 0  # every cluster has items at t=0
        by_release = np.argsort(release, kind="stable")
        cluster, release = cluster[by_release], release[by_release]
        popularity = (rng.permutation(count) + 1.0) ** -config.popularity_exponent
        chain = np.argsort(cluster, kind="stable")  # within a cluster: release order
        key_stride = span_ms + 1
        return _Catalog(
            chain=chain,
            start=np.searchsorted(cluster[chain], np.arange(clusters + 1)),
            chain_key=cluster[chain] * key_stride + release[chain],
            key_stride=key_stride,
            cumulative_popularity=np.r_[0.0, np.cumsum(popularity[chain])],
            price=np.round(rng.lognormal(3.0, 0.8, count), 2),
        )

    def released(self, cluster: np.ndarray, time_ms: np.ndarray) -> np.ndarray:
        """How many of ``cluster``'s items are out at ``time_ms`` (at least one: see generate)."""
        query = cluster * self.key_stride + np.minimum(time_ms, self.key_stride - 1)
        return np.searchsorted(self.chain_key, query, side="right") - self.start[cluster]


@dataclass(frozen=True)
class _Sessions:
    """Sessions sorted by (user, start) and their events, in generation order (per user, in
    time order). ``logits`` are each session's cluster preferences."""

    owner: np.ndarray  # per session: user index
    logits: np.ndarray  # per session: (num_clusters,) taste logits
    event_session: np.ndarray  # per event: its session
    event_position: np.ndarray  # per event: index within its session
    event_time: np.ndarray  # per event: ms since the start of the period

    @staticmethod
    def generate(config: SyntheticConfig, span_ms: int, rng: np.random.Generator) -> _Sessions:
        events = config.num_events
        num_sessions = min(max(round(events / config.mean_session_length), 1), events)
        users = min(config.num_users, num_sessions)
        arrival = np.sort(rng.integers(0, span_ms, users))  # user index = arrival order
        activity = rng.lognormal(0.0, 1.2, users)
        per_user = 1 + rng.multinomial(num_sessions - users, activity / activity.sum())
        owner = np.repeat(np.arange(users), per_user)
        first_session = np.repeat(np.cumsum(per_user) - per_user, per_user)
        is_first = np.arange(num_sessions) == first_session
        after = arrival[owner] + (rng.random(num_sessions) * (span_ms - arrival[owner])).astype(np.int64)
        start = np.where(is_first, arrival[owner], after)
        start = start[np.lexsort((start, owner))]  # owner is sorted already

        weights = rng.exponential(1.0, num_sessions)
        lengths = 1 + rng.multinomial(events - num_sessions, weights / weights.sum())
        event_session = np.repeat(np.arange(num_sessions), lengths)
        session_first_event = np.cumsum(lengths) - lengths
        position = np.arange(events) - session_first_event[event_session]
        gaps = 1_000 + rng.exponential(config.mean_event_gap_s * 1_000.0, events).astype(np.int64)
        offset = _segment_cumsum(np.where(position == 0, 0, gaps), session_first_event[event_session])
        duration = offset[session_first_event + lengths - 1]
        start = _push_apart(start, duration + int(config.min_session_gap_s * 1_000), owner, first_session)

        step = config.taste_drift * rng.standard_normal((num_sessions, config.num_clusters))
        walk = np.cumsum(step, axis=0)
        walk -= walk[first_session]  # a user's first session starts from the initial taste
        initial = config.taste_concentration * rng.standard_normal((users, config.num_clusters))
        return _Sessions(
            owner=owner,
            logits=initial[owner] + walk,
            event_session=event_session,
            event_position=position,
            event_time=start[event_session] + offset,
        )


def _segment_cumsum(values: np.ndarray, segment_first: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarting at each segment (``segment_first``: per element, the
    index of its segment's first element), without a Python loop."""
    total = np.cumsum(values)
    return total - total[segment_first] + values[segment_first]


def _push_apart(start: np.ndarray, occupied: np.ndarray, owner: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Delay sessions so each starts after the user's previous one ends (plus the gap).

    ``start'[j] = max(start[j], start'[j-1] + occupied[j-1])`` per user unrolls to
    ``C[j] + cummax(start - C)[j]`` with ``C`` the user's exclusive cumulative ``occupied``; the
    per-user cummax is one global cummax after lifting each user's values above the previous
    user's.
    """
    before = _segment_cumsum(occupied, first) - occupied
    relative = start - before
    lift = owner * (int(relative.max() - relative.min()) + 1)
    return before + np.maximum.accumulate(relative + lift) - lift


def _choose_items(config: SyntheticConfig, catalog: _Catalog, sessions: _Sessions, rng: np.random.Generator) -> np.ndarray:
    """The item index of every event: fresh popularity x taste draws, and chain steps after them."""
    events = config.num_events
    session = sessions.event_session
    clusters = config.num_clusters
    # Inverse-CDF draw of a cluster from each event's session taste: row s of the CDF, shifted by
    # s, makes the flattened CDF ascending, so one searchsorted serves every row.
    probability = np.exp(sessions.logits - sessions.logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(probability, axis=1)
    cdf /= cdf[:, -1:]
    cdf[:, -1] = 1.0
    flat = (cdf + np.arange(cdf.shape[0])[:, None]).ravel()
    drawn_cluster = np.searchsorted(flat, session + rng.random(events), side="right") - session * clusters
    drawn_cluster = np.minimum(drawn_cluster, clusters - 1)  # u -> 1 may round onto the row's end

    fresh = (sessions.event_position == 0) | (rng.random(events) >= config.chain_probability)
    index = np.arange(events)
    anchor = np.maximum.accumulate(np.where(fresh, index, 0))  # the session's latest fresh draw
    cluster = drawn_cluster[anchor]
    out = catalog.released(cluster, sessions.event_time)
    first = catalog.start[cluster]
    low = catalog.cumulative_popularity[first]
    high = catalog.cumulative_popularity[first + out]
    target = low + rng.random(events) * (high - low)
    drawn = np.searchsorted(catalog.cumulative_popularity, target, side="right") - 1 - first
    drawn = np.clip(drawn, 0, out - 1)
    position = (drawn[anchor] + (index - anchor)) % out  # k chain steps after the anchor
    return catalog.chain[first + position]
