"""Dataset layer: readers (bulk and line paths), malformed-line reporting, the synthetic stream."""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from liverec.platform import datasets
from liverec.platform.datasets import (
    SYNTHETIC_EPOCH_MS,
    Action,
    DatasetFormatError,
    EventTable,
    SyntheticConfig,
    load_dataset,
    read_movielens_ratings,
    read_recbole_inter,
    read_sequence_file,
    synthetic,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(os.environ.get("LIVEREC_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
ML100K_INTER = DATA_DIR / "ml-100k" / "ml-100k.inter"
RECBOLE_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def as_rows(table: EventTable) -> list[tuple]:
    """Rows for exact comparison (NaN made comparable)."""
    values = np.where(np.isnan(table.value), -1.0, table.value)
    return list(zip(table.user_id.tolist(), table.item_id.tolist(), table.action.tolist(), values.tolist(),
                    table.event_time_ms.tolist(), strict=True))


# --------------------------------------------------------------------------------------------
# The table


def test_action_mirrors_the_proto_enum() -> None:
    from liverec.v1 import events_pb2

    assert {a.name: a.value for a in Action} == {
        name.removeprefix("ACTION_"): value for name, value in events_pb2.Action.items() if value
    }


def small_table() -> EventTable:
    return EventTable(
        user_id=np.array([2, 1, 2, 3]), item_id=np.array([10, 11, 12, 10]),
        action=np.array([1, 5, 2, 1]), value=np.array([np.nan, 4.0, np.nan, np.nan]),
        event_time_ms=np.array([100, 200, 200, 300]),
    )


def test_table_columns_slice_and_per_user_sequences() -> None:
    table = small_table()
    assert len(table) == 4 and table.num_users() == 3 and table.num_items() == 3
    assert table.user_id.dtype == np.int64 and table.action.dtype == np.int8
    with pytest.raises(ValueError):
        table.item_id[0] = 5  # read-only, so slices can share memory
    part = table.slice(1, 3)
    assert len(part) == 2 and part.item_id.tolist() == [11, 12]
    seqs = table.per_user_sequences()
    assert seqs.user_id.tolist() == [1, 2, 3] and seqs.indptr.tolist() == [0, 1, 3, 4]
    assert seqs.item_id.tolist() == [11, 10, 12, 10] and seqs.lengths().tolist() == [1, 2, 1]
    assert seqs.event_time_ms.tolist() == [200, 100, 200, 300]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"event_time_ms": np.array([100, 300, 200, 400])}, "sorted"),
        ({"user_id": np.array([2, 0, 2, 3])}, "> 0"),
        ({"item_id": np.array([1, 2, 3])}, "length"),
        ({"action": np.array([1, 6, 1, 1])}, "Action"),
        ({"action": np.array([1, 257, 1, 1])}, "out of range"),
        ({"item_id": np.array([1.0, 2.0, 3.0, 4.0])}, "cannot become"),
    ],
)
def test_table_rejects_broken_invariants(change: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        dataclasses.replace(small_table(), **change)


# --------------------------------------------------------------------------------------------
# ml-100k


def test_ml100k_counts_sorting_and_units() -> None:
    result = read_recbole_inter(ML100K_INTER)
    table = result.table
    assert result.skipped == 0
    assert (len(table), table.num_users(), table.num_items()) == (100_000, 943, 1_682)
    assert np.all(table.action == Action.RATE)
    assert set(np.unique(table.value).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert 874_724_710_000 == table.event_time_ms[0]  # seconds became ms
    assert 874_000_000_000 < table.event_time_ms[0] and table.event_time_ms[-1] < 894_000_000_000
    # Stable sort: the reference is Python's (stable) sort of the file's rows by timestamp.
    lines = ML100K_INTER.read_text().splitlines()[1:]
    rows = sorted((tuple(int(f) for f in line.split("\t")) for line in lines), key=lambda r: r[3])
    assert table.user_id.tolist() == [r[0] for r in rows]
    assert table.item_id.tolist() == [r[1] for r in rows]


def test_ml100k_reads_fast_and_loads_from_its_directory() -> None:
    started = time.perf_counter()
    table = load_dataset(str(ML100K_INTER.parent)).table
    assert time.perf_counter() - started < 1.0
    assert len(table) == 100_000


# --------------------------------------------------------------------------------------------
# Readers on small files


def test_recbole_ratings_timestamps_and_extra_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "x.inter",
                 "user_id:token\tcomment:token_seq\titem_id:token\ttimestamp:float\trating:float\n"
                 "7\tgreat film\t3\t20.5\t4.5\n"
                 "5\tx\t9\t10\t2\n"
                 "\n"
                 "5\ty z\t3\t20.5\t1\n")
    table = read_recbole_inter(path).table
    assert as_rows(table) == [(5, 9, 5, 2.0, 10_000), (7, 3, 5, 4.5, 20_500), (5, 3, 5, 1.0, 20_500)]


def test_recbole_without_rating_is_views_and_without_timestamp_keeps_user_order(tmp_path: Path) -> None:
    no_rating = write(tmp_path / "a.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t5\n")
    assert as_rows(read_recbole_inter(no_rating).table) == [(1, 2, Action.VIEW, -1.0, 5_000)]
    no_time = write(tmp_path / "b.inter", "item_id:token\tuser_id:token\n8\t1\n9\t1\n7\t2\n")
    table = read_recbole_inter(no_time).table
    assert [(u, i) for u, i, *_ in as_rows(table)] == [(1, 8), (2, 7), (1, 9)]


def test_movielens_ratings_dat(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.dat", "1::1193::5::978300760\r\n1::661::3::978302109\n2::1193::4::978300000\n")
    result = read_movielens_ratings(path)
    assert as_rows(result.table) == [
        (2, 1193, 5, 4.0, 978_300_000_000), (1, 1193, 5, 5.0, 978_300_760_000), (1, 661, 5, 3.0, 978_302_109_000),
    ]
    assert load_dataset(str(tmp_path)).table.num_users() == 2  # a directory with ratings.dat


def test_sequence_file_with_timestamps(tmp_path: Path) -> None:
    path = write(tmp_path / "seq.txt", "1 10 100\n1 11 300\n  2\t12 200 \n")
    assert as_rows(read_sequence_file(path).table) == [
        (1, 10, 1, -1.0, 100_000), (2, 12, 1, -1.0, 200_000), (1, 11, 1, -1.0, 300_000),
    ]


def test_sequence_file_without_timestamps_interleaves_users_in_file_order(tmp_path: Path) -> None:
    # Grouped by user, as SASRec-style files are: user 1 has 4 events, user 2 has 2.
    path = write(tmp_path / "seq.txt", "1 10\n1 11\n1 12\n1 13\n2 20\n2 21\n")
    table = read_sequence_file(path).table
    assert table.event_time_ms[0] == SYNTHETIC_EPOCH_MS
    seqs = table.per_user_sequences()
    assert seqs.item_id.tolist() == [10, 11, 12, 13, 20, 21]  # per-user order kept
    assert np.all(np.diff(seqs.event_time_ms[:4]) >= 1000) and np.diff(seqs.event_time_ms[4:]).item() >= 1000
    # Both users span the same period, so the stream alternates instead of user 1 then user 2.
    assert table.user_id.tolist() == [1, 2, 1, 1, 2, 1]


# --------------------------------------------------------------------------------------------
# Malformed lines

GOOD = {
    "recbole": ["3\t4\t5\t100"] * 3,
    "movielens": ["3::4::5::100"] * 3,
    "sequence": ["3 4 100"] * 3,
}
READERS = {"recbole": read_recbole_inter, "movielens": read_movielens_ratings, "sequence": read_sequence_file}
BAD = [
    # (format, bad line, fragment of the reason)
    ("recbole", "1\t2\t3", "expected 4 tab-separated columns, found 3"),
    ("recbole", "1\t2\t3\t4\t5", "found 5"),
    ("recbole", "abc\t2\t3\t4", "user_id: not an integer"),
    ("recbole", "1\t2.5\t3\t4", "item_id: not an integer"),
    ("recbole", "0\t2\t3\t4", "user_id: must be a positive"),
    ("recbole", "1\t-2\t3\t4", "item_id: must be a positive"),
    ("recbole", "9223372036854775808\t2\t3\t4", "positive 64-bit"),
    ("recbole", "1\t2\tgood\t4", "rating: not a finite number"),
    ("recbole", "1\t2\tnan\t4", "rating: not a finite number"),
    ("recbole", "1\t2\t3\tinf", "timestamp: not a finite number"),
    ("recbole", "1\t2\t3\tyesterday", "timestamp: not a finite number"),
    ("recbole", "1\t2\t3\t-5", "timestamp: must be Unix seconds"),
    ("recbole", "1\t2\t3\t", "timestamp: not a finite number"),
    ("recbole", "1\t\t3\t4", "item_id: not an integer"),
    ("movielens", "1::2::3", "expected 4 '::'-separated columns, found 3"),
    ("movielens", "1::2\t3::4::5", "item_id: not an integer"),
    ("movielens", "1::x::3::4", "item_id: not an integer"),
    ("movielens", "1::2::NaN::4", "rating: not a finite number"),
    ("movielens", "1:2::3::4::5", "user_id: not an integer"),
    ("sequence", "1", "expected 3 whitespace-separated columns, found 1"),
    ("sequence", "1 2", "found 2"),
    ("sequence", "1 2 3 4", "found 4"),
    ("sequence", "1 0 3", "item_id: must be a positive"),
    ("sequence", "1 2 nan", "timestamp: not a finite number"),
    ("sequence", "u1 2 3", "user_id: not an integer"),
]


@pytest.mark.parametrize(("fmt", "bad", "reason"), BAD)
def test_malformed_line_is_located_or_skipped(tmp_path: Path, fmt: str, bad: str, reason: str) -> None:
    header = [RECBOLE_HEADER.rstrip("\n")] if fmt == "recbole" else []
    lines = header + GOOD[fmt][:2] + [bad] + GOOD[fmt][2:]
    path = write(tmp_path / "data", "\n".join(lines) + "\n")
    bad_line_no = len(header) + 3
    with pytest.raises(DatasetFormatError) as caught:
        READERS[fmt](path)
    error = caught.value
    assert (error.path, error.line_no) == (str(path), bad_line_no)
    assert reason in error.reason
    assert str(error) == f"{path}:{bad_line_no}: {error.reason}"
    result = READERS[fmt](path, lenient=True)
    assert result.skipped == 1 and len(result.table) == 3


@pytest.mark.parametrize(("chunk_lines", "line_path_lines"), [(4, 256), (64, 1), (64, 3), (7, 2)])
def test_strict_reports_the_first_bad_line_and_lenient_counts_all_across_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_lines: int, line_path_lines: int
) -> None:
    # Several chunks, some clean, some not, some halved before the line path takes over.
    monkeypatch.setattr(datasets, "_CHUNK_LINES", chunk_lines)
    monkeypatch.setattr(datasets, "_LINE_PATH_LINES", line_path_lines)
    body = [f"{n}\t2\t3\t{n}" for n in range(1, 41)]
    body[9], body[10], body[16], body[33] = "1\tx\t3\t4", "", "1\t2\t3", "0\t2\t3\t4"
    path = write(tmp_path / "d.inter", RECBOLE_HEADER + "\n".join(body) + "\n")
    with pytest.raises(DatasetFormatError) as caught:
        read_recbole_inter(path)
    assert caught.value.line_no == 11  # header is line 1, body[9] is line 11
    result = read_recbole_inter(path, lenient=True)
    assert result.skipped == 3  # the blank line is neither an event nor malformed
    kept = [n for n in range(1, 41) if n not in (10, 11, 17, 34)]
    assert result.table.user_id.tolist() == kept


def test_recbole_needs_its_header_even_when_lenient(tmp_path: Path) -> None:
    path = write(tmp_path / "h.inter", "196\t242\t3\t881250949\n")
    with pytest.raises(DatasetFormatError, match=r"h\.inter:1: missing RecBole header"):
        read_recbole_inter(path, lenient=True)
    no_user = write(tmp_path / "n.inter", "item_id:token\trating:float\n1\t2\n")
    with pytest.raises(DatasetFormatError, match="no user_id column"):
        read_recbole_inter(no_user)


@pytest.mark.parametrize("fmt", sorted(READERS))
def test_empty_and_all_bad_files_are_clear_errors(tmp_path: Path, fmt: str) -> None:
    empty = write(tmp_path / "empty", "")
    with pytest.raises(DatasetFormatError, match=r":1: empty file"):
        READERS[fmt](empty)
    header = RECBOLE_HEADER if fmt == "recbole" else ""
    all_bad = write(tmp_path / "bad", header + "x\ny\n")
    with pytest.raises(DatasetFormatError, match=r"no events in the file \(2 malformed lines skipped\)"):
        READERS[fmt](all_bad, lenient=True)


def test_header_only_recbole_file_has_no_events(tmp_path: Path) -> None:
    with pytest.raises(DatasetFormatError, match=r":2: no events"):
        read_recbole_inter(write(tmp_path / "h.inter", RECBOLE_HEADER))


def test_byte_order_mark_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "bom.inter"
    path.write_bytes(b"\xef\xbb\xbf" + RECBOLE_HEADER.encode() + b"1\t2\t3\t4\n")
    assert read_recbole_inter(path).table.user_id.tolist() == [1]


def test_undecodable_bytes_are_a_malformed_line(tmp_path: Path) -> None:
    path = tmp_path / "s.txt"
    path.write_bytes(b"1 2 3\n\xff\xfe 2 3\n")
    with pytest.raises(DatasetFormatError) as caught:
        read_sequence_file(path)
    assert caught.value.line_no == 2


# Number spellings both parsing paths must agree on.
ID_TEXT = st.tuples(st.integers(1, 2**63 - 1), st.sampled_from(["{}", "+{}", " {} "])).map(lambda t: t[1].format(t[0]))
RATING_TEXT = st.sampled_from(["3", "3.0", "3.5", ".5", "4e0", "+2.", " 1 ", "1E-1"])
TIME_TEXT = st.sampled_from(["881250949", "881250949.5", "8.8e8", "0", "1.0005", "0.0004"])
ROW = st.tuples(ID_TEXT, ID_TEXT, RATING_TEXT, TIME_TEXT)
LINE_FORMAT = {
    "recbole": (lambda r: "\t".join(r), RECBOLE_HEADER),
    "movielens": (lambda r: "::".join(r), ""),
    "sequence": (lambda r: f"{r[0]}  {r[1]}\t{r[3]}", ""),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(sorted(LINE_FORMAT)), rows=st.lists(ROW, min_size=1, max_size=30), where=st.data())
def test_bulk_and_line_paths_agree(tmp_path: Path, fmt: str, rows: list, where: st.DataObject) -> None:
    """A bad line sends its chunk (or, once halved, its piece) down the line path; the good rows
    must come out exactly as the bulk path reads them from the clean file."""
    line, header = LINE_FORMAT[fmt]
    lines = [line(r) for r in rows]
    clean = write(tmp_path / f"clean-{fmt}", header + "\n".join(lines) + "\n")
    at = where.draw(st.integers(0, len(lines)))
    dirty = write(tmp_path / f"dirty-{fmt}", header + "\n".join(lines[:at] + ["0 bad line here"] + lines[at:]) + "\n")
    expected = as_rows(READERS[fmt](clean).table)
    with mock.patch.object(datasets, "_LINE_PATH_LINES", where.draw(st.sampled_from([1, 2, 256]))):
        result = READERS[fmt](dirty, lenient=True)
    assert result.skipped == 1 and as_rows(result.table) == expected
    by_hand = sorted(((int(r[0]), int(r[1]), round(float(r[3]) * 1000)) for r in rows), key=lambda r: r[2])
    assert [(u, i, t) for u, i, _, _, t in expected] == by_hand


# --------------------------------------------------------------------------------------------
# load_dataset


def test_load_dataset_detects_formats(tmp_path: Path) -> None:
    write(tmp_path / "a.inter", RECBOLE_HEADER + "1\t2\t3\t4\n")
    write(tmp_path / "b.txt", "1::2::3::4\n")
    write(tmp_path / "c.txt", "user_id:token\titem_id:token\n1\t2\n")
    write(tmp_path / "d.txt", "1 2\n")
    assert load_dataset(str(tmp_path / "a.inter")).table.action.tolist() == [Action.RATE]
    assert load_dataset(str(tmp_path / "b.txt")).table.value.tolist() == [3.0]
    assert load_dataset(str(tmp_path / "c.txt")).table.item_id.tolist() == [2]
    assert load_dataset(str(tmp_path / "d.txt")).table.action.tolist() == [Action.VIEW]
    with pytest.raises(DatasetFormatError):
        load_dataset(str(tmp_path / "b.txt"), format="sequence")  # the format wins over sniffing
    assert load_dataset(str(tmp_path), format="recbole").table.item_id.tolist() == [2]


def test_load_dataset_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_dataset(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown dataset format 'csv'"):
        load_dataset("synthetic", format="csv")
    write(tmp_path / "a.inter", RECBOLE_HEADER)
    write(tmp_path / "b.inter", RECBOLE_HEADER)
    with pytest.raises(ValueError, match=r"exactly one .*found \['a.inter', 'b.inter'\]"):
        load_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="found none"):
        load_dataset(str(tmp_path), format="movielens")


def test_load_dataset_synthetic() -> None:
    result = load_dataset("synthetic", synthetic_config=SyntheticConfig(num_events=500, seed=3))
    assert result.skipped == 0
    assert as_rows(result.table) == as_rows(synthetic(SyntheticConfig(num_events=500, seed=3)))
    assert len(load_dataset("synthetic").table) == SyntheticConfig().num_events


# --------------------------------------------------------------------------------------------
# The synthetic stream


@pytest.fixture(scope="module")
def stream() -> EventTable:
    return synthetic()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_users", 0), ("num_items", 2.5), ("num_events", True), ("seed", -1), ("num_clusters", 3000),
        ("popularity_exponent", -1.0), ("mean_session_length", 0.5), ("chain_probability", 1.5),
        ("taste_drift", float("nan")), ("initial_item_fraction", 0.0), ("duration_days", 0),
        ("mean_event_gap_s", "30"), ("min_session_gap_s", -1), ("action_weights", (1.0, 1.0)),
        ("action_weights", (0, 0, 0, 0, 0)),
    ],
)
def test_synthetic_config_names_the_bad_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"SyntheticConfig\.{field}: must be"):
        SyntheticConfig(**{field: value})


def test_synthetic_is_fast_exact_and_sorted(stream: EventTable) -> None:
    started = time.perf_counter()
    synthetic()
    assert time.perf_counter() - started < 2.0
    config = SyntheticConfig()
    assert len(stream) == config.num_events
    assert stream.num_users() == config.num_users and 1_800 <= stream.num_items() <= config.num_items
    assert np.all(np.diff(stream.event_time_ms) >= 0)
    assert stream.event_time_ms[0] >= SYNTHETIC_EPOCH_MS


def test_synthetic_is_deterministic_per_seed(stream: EventTable) -> None:
    again = synthetic(SyntheticConfig())
    for name in ("user_id", "item_id", "action", "value", "event_time_ms"):
        np.testing.assert_array_equal(getattr(again, name), getattr(stream, name))
    other = synthetic(SyntheticConfig(seed=1))
    assert not np.array_equal(other.item_id, stream.item_id)
    assert not np.array_equal(other.event_time_ms, stream.event_time_ms)


def test_synthetic_popularity_is_power_law(stream: EventTable) -> None:
    counts = np.sort(np.bincount(stream.item_id))[::-1]
    counts = counts[counts > 0]
    assert counts[: len(counts) // 10].sum() > 0.4 * counts.sum()  # top 10% of items
    # log(count) against log(rank) is close to a straight line with a clearly negative slope.
    ranks = np.arange(1, len(counts) + 1)
    head = slice(0, len(counts) // 2)
    slope, _ = np.polyfit(np.log(ranks[head]), np.log(counts[head]), 1)
    assert -1.5 < slope < -0.4


def test_synthetic_items_and_users_arrive_over_time(stream: EventTable) -> None:
    t = stream.event_time_ms
    middle = (int(t[0]) + int(t[-1])) // 2

    def first_seen(ids: np.ndarray) -> np.ndarray:
        _, first = np.unique(ids, return_index=True)
        return t[first]

    items_first, users_first = first_seen(stream.item_id), first_seen(stream.user_id)
    assert np.mean(items_first > middle) > 0.15
    assert np.mean(users_first > middle) > 0.3
    # Ids follow release / arrival order.
    assert np.corrcoef(np.unique(stream.item_id), items_first)[0, 1] > 0.5
    assert np.all(np.diff(users_first) >= 0)


def test_synthetic_has_sessions_and_returning_users(stream: EventTable) -> None:
    seqs = stream.per_user_sequences()
    gaps = np.diff(seqs.event_time_ms)
    same_user = np.ones(len(gaps), dtype=bool)
    same_user[seqs.indptr[1:-1] - 1] = False
    gaps = gaps[same_user]
    assert np.all(gaps > 0)  # a user's events never tie
    assert np.mean(gaps < 5 * 60_000) > 0.7  # bursts...
    assert np.mean(gaps >= 30 * 60_000) > 0.05  # ...separated by long gaps
    new_session = np.zeros(len(seqs.item_id), dtype=bool)
    new_session[1:][same_user] = gaps >= 30 * 60_000
    sessions_per_user = 1 + np.add.reduceat(new_session.astype(np.int64), seqs.indptr[:-1])
    assert np.mean(sessions_per_user >= 2) > 0.2
    assert sessions_per_user.max() >= 10
    assert np.mean(sessions_per_user == 1) > 0.2  # and many users come only once


def test_synthetic_action_mix(stream: EventTable) -> None:
    counts = Counter(stream.action.tolist())
    assert counts[Action.VIEW] > counts[Action.CLICK] > counts[Action.LIKE] > 0
    assert counts[Action.PURCHASE] > 0 and counts[Action.RATE] > 0
    rated = stream.value[stream.action == Action.RATE]
    assert set(np.unique(rated).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.all(stream.value[stream.action == Action.PURCHASE] > 0)
    plain = np.isin(stream.action, [Action.VIEW, Action.CLICK, Action.LIKE])
    assert np.all(np.isnan(stream.value[plain]))


def next_item_hit_rates(table: EventTable, k: int = 10) -> tuple[float, float]:
    """HR@k of a first-order Markov next-item model and of popularity, both fitted on the first
    80% of the stream and scored on each later event that follows one by the same user."""
    cut_time = table.event_time_ms[int(0.8 * len(table))]
    seqs = table.per_user_sequences()
    follows = np.ones(len(seqs.item_id), dtype=bool)
    follows[seqs.indptr[:-1]] = False
    prev, nxt = seqs.item_id[np.flatnonzero(follows) - 1], seqs.item_id[follows]
    train = seqs.event_time_ms[follows] < cut_time
    popular = np.argsort(-np.bincount(table.item_id[table.event_time_ms < cut_time]), kind="stable")[:k]
    transitions: dict[int, Counter] = {}
    for p, n in zip(prev[train].tolist(), nxt[train].tolist(), strict=True):
        transitions.setdefault(p, Counter())[n] += 1
    top_next = {p: {n for n, _ in c.most_common(k)} for p, c in transitions.items()}
    test_pairs = list(zip(prev[~train].tolist(), nxt[~train].tolist(), strict=True))
    popular_set = set(popular.tolist())
    markov = np.mean([n in top_next.get(p, popular_set) for p, n in test_pairs])
    return float(markov), float(np.mean([n in popular_set for _, n in test_pairs]))


def test_synthetic_sequential_structure_is_learnable(stream: EventTable) -> None:
    markov, popularity = next_item_hit_rates(stream)
    assert markov > 2 * popularity
    # The advantage comes from the session chains: without them it mostly disappears.
    markov_plain, popularity_plain = next_item_hit_rates(synthetic(SyntheticConfig(chain_probability=0.0)))
    assert markov - popularity > 2 * (markov_plain - popularity_plain)


def test_sessions_are_pushed_apart_per_user() -> None:
    start = np.array([0, 10, 12, 5, 100])
    occupied = np.array([15, 5, 5, 50, 1])
    owner = np.array([0, 0, 0, 1, 1])
    first = np.array([0, 0, 0, 3, 3])
    pushed = datasets._push_apart(start, occupied, owner, first)
    assert pushed.tolist() == [0, 15, 20, 5, 100]


def test_synthetic_small_and_large_configs() -> None:
    tiny = synthetic(SyntheticConfig(num_users=50, num_items=3, num_events=7, num_clusters=3))
    assert len(tiny) == 7 and tiny.num_users() <= 7
    started = time.perf_counter()
    big = synthetic(SyntheticConfig(num_events=300_000, num_users=20_000, num_items=20_000))
    assert time.perf_counter() - started < 10.0
    assert len(big) == 300_000 and big.num_users() == 20_000
