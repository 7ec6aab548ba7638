"""Metric series for charts: a job's points read once into arrays, then downsampled per request.

A job logs one ``metricpoint`` row per logged step; a long run has a million of them. A chart cannot show more
points than it has pixels, so the server sends at most ``max_points`` per series, chosen by min/max per bucket:
the first and last points, and in each bucket of the interior its lowest and highest value, in step order.
Every extreme survives (a loss spike is never averaged away) and the count is bounded.

Reading a million JSON rows takes about a second, so each web process keeps the parsed series of recently
viewed jobs in memory (:class:`SeriesCache`) and on later requests reads only the rows logged since
(``id > cursor``, on the ``(job_id, id)`` index). numpy does the bucketing (a few ms for a million points).
No library fits: LTTB packages work on one series at a time in pure Python or need compiled extras, and
``min/max per bucket`` is ten lines of numpy.
"""

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlmodel import Session, col, select

from app.core.models import MetricPoint, MetricRollup
from app.core.rollups import RawPoint, finite

DEFAULT_MAX_POINTS = 2000
MIN_MAX_POINTS = 10
MAX_MAX_POINTS = 100_000
CACHED_JOBS = 16
READ_CHUNK = 100_000
BLOCK = 64
# The block path is used once a series has this many blocks per bucket, so buckets stay even (at most 1/8 wasted).
MIN_BLOCKS_PER_BUCKET = 8


def downsample(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` of (x, y), keeping the first, the last, and the min and max of each bucket.

    Buckets split the interior points into equal runs; each contributes its minimum and maximum in their
    original order (one point when they coincide). The global minimum and maximum are therefore always kept.
    """
    n = len(y)
    if n <= max_points:
        return x, y
    if max_points < 4:
        keep = np.unique(np.array([0, int(np.argmin(y)), int(np.argmax(y)), n - 1]))[:max_points]
        return x[keep], y[keep]
    interior = y[1:-1]
    buckets = (max_points - 2) // 2
    size = math.ceil(len(interior) / buckets)
    padded = math.ceil(len(interior) / size) * size
    low = np.full(padded, np.inf)
    high = np.full(padded, -np.inf)
    low[: len(interior)] = interior
    high[: len(interior)] = interior
    offsets = np.arange(0, padded, size)
    mins = low.reshape(-1, size).argmin(axis=1) + offsets
    maxs = high.reshape(-1, size).argmax(axis=1) + offsets
    keep = np.unique(np.concatenate(([0], mins + 1, maxs + 1, [n - 1])))
    return x[keep], y[keep]


def _as_floats(items: list[Any]) -> np.ndarray:
    """Values as float64, None (not logged at that point) as NaN; anything not a number is NaN too."""
    try:
        return np.array(items, dtype=np.float64)
    except (TypeError, ValueError):
        return np.array(
            [v if isinstance(v, int | float) and not isinstance(v, bool) else None for v in items],
            dtype=np.float64,
        )


class _Column:
    """One metric of one split in growable arrays, plus the positions of the min and max of every full block of
    ``BLOCK`` points, kept current as points arrive. A chart of a long series is then picked from its ~n/64
    blocks instead of all n points, so a live run of a million points costs the new points, not a million."""

    def __init__(self) -> None:
        self.size = 0
        self._steps = np.empty(1024)
        self._values = np.empty(1024)
        self._blocks = 0
        self._block_min = np.empty(0, dtype=np.int64)
        self._block_max = np.empty(0, dtype=np.int64)

    def append(self, steps: np.ndarray, values: np.ndarray) -> None:
        """Add points at the end (amortised O(new points): the arrays double when full)."""
        end = self.size + len(values)
        if end > len(self._values):
            capacity = max(end, 2 * len(self._values))
            for name in ("_steps", "_values"):
                grown = np.empty(capacity)
                grown[: self.size] = getattr(self, name)[: self.size]
                setattr(self, name, grown)
        self._steps[self.size : end] = steps
        self._values[self.size : end] = values
        self.size = end

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values), views of the stored points."""
        return self._steps[: self.size], self._values[: self.size]

    def _block_extremes(self) -> tuple[np.ndarray, np.ndarray]:
        full = self.size // BLOCK
        if full > self._blocks:
            chunk = self._values[self._blocks * BLOCK : full * BLOCK].reshape(-1, BLOCK)
            offsets = np.arange(self._blocks, full, dtype=np.int64) * BLOCK
            self._block_min = np.concatenate((self._block_min, chunk.argmin(axis=1) + offsets))
            self._block_max = np.concatenate((self._block_max, chunk.argmax(axis=1) + offsets))
            self._blocks = full
        mins, maxs = self._block_min, self._block_max
        start = self._blocks * BLOCK
        if start < self.size:  # the last, partial block
            tail = self._values[start : self.size]
            mins = np.append(mins, start + int(tail.argmin()))
            maxs = np.append(maxs, start + int(tail.argmax()))
        return mins, maxs

    def chart(self, max_points: int) -> tuple[np.ndarray, np.ndarray]:
        """At most ``max_points`` points: the first, the last, and the min and max of each bucket of blocks."""
        x, y = self.arrays()
        buckets = (max_points - 2) // 2
        if max_points < 4 or self.size < BLOCK * buckets * MIN_BLOCKS_PER_BUCKET:
            return downsample(x, y, max_points)  # short enough to scan whole
        mins, maxs = self._block_extremes()
        per_bucket = math.ceil(len(mins) / buckets)
        padded = math.ceil(len(mins) / per_bucket) * per_bucket
        low = np.full(padded, np.inf)
        high = np.full(padded, -np.inf)
        low[: len(mins)] = y[mins]
        high[: len(maxs)] = y[maxs]
        min_at = np.zeros(padded, dtype=np.int64)
        max_at = np.zeros(padded, dtype=np.int64)
        min_at[: len(mins)] = mins
        max_at[: len(maxs)] = maxs
        rows = np.arange(padded // per_bucket)
        picked_min = min_at.reshape(-1, per_bucket)[rows, low.reshape(-1, per_bucket).argmin(axis=1)]
        picked_max = max_at.reshape(-1, per_bucket)[rows, high.reshape(-1, per_bucket).argmax(axis=1)]
        keep = np.unique(np.concatenate(([0], picked_min, picked_max, [self.size - 1])))
        return x[keep], y[keep]


@dataclass
class JobSeries:
    """Every finite metric value a job logged, by series key ("train.loss", "eval.accuracy")."""

    job_id: int
    cursor: int = 0
    cursor_created: Any = None
    point_count: int = 0
    columns: dict[str, _Column] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # (series key, max points) -> (cursor it was computed at, xs, ys): repeated views of a finished run are free.
    downsampled: dict[tuple[str, int], tuple[int, np.ndarray, np.ndarray]] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget everything read so far."""
        self.cursor, self.cursor_created, self.point_count, self.columns = 0, None, 0, {}
        self.downsampled = {}

    def chart(self, key: str, max_points: int) -> tuple[np.ndarray, np.ndarray, int]:
        """One series downsampled to ``max_points`` (memoised until new points arrive), and its full length."""
        column = self.columns.get(key)
        if column is None:
            return np.empty(0), np.empty(0), 0
        memo = self.downsampled.get((key, max_points))
        if memo is None or memo[0] != self.cursor:
            memo = (self.cursor, *column.chart(max_points))
            self.downsampled[(key, max_points)] = memo
        return memo[1], memo[2], column.size

    def add_rows(self, steps: np.ndarray, splits: list[str], values: list[Any]) -> None:
        """Append a chunk of points (in id order): their steps, splits and decoded value dicts."""
        for split in sorted(set(splits)):
            rows = [i for i, name in enumerate(splits) if name == split]
            dicts = [values[i] if isinstance(values[i], dict) else {} for i in rows]
            split_steps = steps[rows]
            for name in sorted(set().union(*map(dict.keys, dicts))):
                column_values = _as_floats([d.get(name) for d in dicts])
                finite = np.isfinite(column_values)  # NaN/inf (a diverged grad norm) cannot be drawn or sent
                if not finite.any():
                    continue
                column = self.columns.get(f"{split}.{name}")
                if column is None:
                    column = self.columns[f"{split}.{name}"] = _Column()
                column.append(split_steps[finite], column_values[finite])

    def keys(self) -> list[str]:
        """Series keys, train first, then eval, alphabetical within each."""
        return sorted(self.columns, key=lambda key: (not key.startswith("train."), key))

    def arrays(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """All (steps, values) of one series; empty arrays when the job never logged it."""
        column = self.columns.get(key)
        return column.arrays() if column is not None else (np.empty(0), np.empty(0))


class SeriesCache:
    """Parsed series of recently viewed jobs, brought up to date by reading only newer rows.

    Entries are keyed by database URL and job id. Before reading on, the newest point already read is looked
    up by its primary key: if it is gone or was replaced (a resumed job deletes the points after its
    checkpoint, and SQLite may hand the ids out again), the job is read again from the start.
    """

    def __init__(self, capacity: int = CACHED_JOBS) -> None:
        self.capacity = capacity
        self._jobs: OrderedDict[tuple[str, int], JobSeries] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every cached job."""
        with self._lock:
            self._jobs.clear()

    def _entry(self, key: tuple[str, int]) -> JobSeries:
        with self._lock:
            entry = self._jobs.get(key)
            if entry is None:
                entry = self._jobs[key] = JobSeries(key[1])
            self._jobs.move_to_end(key)
            while len(self._jobs) > self.capacity:
                self._jobs.popitem(last=False)
            return entry

    def get(self, session: Session, job_id: int) -> JobSeries:
        """The job's series, current as of now."""
        entry = self._entry((str(session.get_bind().engine.url), job_id))
        with entry.lock:
            if entry.cursor:
                created = session.exec(
                    select(MetricPoint.created_at).where(
                        MetricPoint.id == entry.cursor, MetricPoint.job_id == job_id
                    )
                ).first()
                if created is None or created != entry.cursor_created:
                    entry.reset()
            _read_new_points(session, entry)
            return entry


def _read_new_points(session: Session, entry: JobSeries) -> None:
    """Append the rows after the entry's cursor, in id order, a chunk at a time.

    The values come as raw JSON text and are decoded with one ``json.loads`` per chunk (one C call instead of
    one per row), then split into columns with numpy: about 10x faster than row-by-row decoding.
    """
    connection = session.connection()
    while True:
        statement = (
            sa.select(
                col(MetricPoint.id),
                col(MetricPoint.step),
                col(MetricPoint.split),
                sa.cast(col(MetricPoint.values), sa.Text),
            )
            .where(col(MetricPoint.job_id) == entry.job_id, col(MetricPoint.id) > entry.cursor)
            .order_by(col(MetricPoint.id))
            .limit(READ_CHUNK)
        )
        rows = connection.execute(statement).all()
        if rows:
            values = json.loads("[" + ",".join(row[3] or "{}" for row in rows) + "]")
            steps = np.fromiter((row[1] for row in rows), dtype=np.float64, count=len(rows))
            entry.add_rows(steps, [row[2] for row in rows], values)
            entry.cursor = int(rows[-1][0] or 0)
            entry.point_count += len(rows)
        if len(rows) < READ_CHUNK:
            break
    if entry.cursor:
        # Remembered to notice when this row is deleted or its id reused (see SeriesCache).
        entry.cursor_created = session.exec(
            select(MetricPoint.created_at).where(MetricPoint.id == entry.cursor)
        ).first()


_cache = SeriesCache()


def get_cache() -> SeriesCache:
    """The process-wide series cache."""
    return _cache


def clamp_max_points(max_points: int | None) -> int:
    """A chart's point budget within sane bounds."""
    return min(max(max_points or DEFAULT_MAX_POINTS, MIN_MAX_POINTS), MAX_MAX_POINTS)


def job_series(
    session: Session, job_id: int, max_points: int | None = None, keys: list[str] | None = None
) -> dict[str, Any]:
    """The job's series, each downsampled to at most ``max_points`` points, as plain lists for JSON.

    ``cursor`` is the id of the newest point included: a live viewer continues the SSE stream after it.
    """
    _, make = series_answer(session, job_id, max_points, keys)
    return make()


def series_answer(
    session: Session, job_id: int, max_points: int | None = None, keys: list[str] | None = None
) -> tuple[str, Callable[[], dict[str, Any]]]:
    """Bring the job's data up to date and return (a version string that changes whenever the answer would, a
    function that computes the answer): an unchanged version needs no computing at all (ETag, app/http/etag.py).

    A long run is charted from its roll-up blocks (thousands of rows, not millions); a short one, or one logged
    before roll-ups existed, from its raw points, cached per process."""
    budget = clamp_max_points(max_points)
    where = f"{session.get_bind().engine.url}:{job_id}:{budget}:{','.join(keys) if keys is not None else '*'}"
    entry = rollups_for_chart(session, job_id, budget)
    if entry is not None:
        return (
            f"series:rollup{entry.size}:{where}:{entry.cursor}:{entry.point_count}",
            lambda: rollup_series(entry, budget, keys),
        )
    data = get_cache().get(session, job_id)

    def make() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in keys if keys is not None else data.keys():
            xs, ys, total = data.chart(key, budget)
            out[key] = {"x": xs.tolist(), "y": ys.tolist(), "total": total}
        return {
            "job_id": job_id,
            "cursor": data.cursor,
            "points": data.point_count,
            "max_points": budget,
            "series": out,
        }

    return f"series:raw:{where}:{data.cursor}:{data.point_count}", make


def series_stats(session: Session, job_id: int) -> dict[str, dict[str, float]]:
    """Per series key: min, max, last value and count (for summary tables); from roll-up blocks when the job has
    them (a cold compare of long runs reads thousands of rows, not every point)."""
    counts = rollup_counts(session, job_id)
    if counts:
        entry = get_rollup_cache().get(session, job_id, max(counts))
        with entry.lock:
            return _unit_stats(entry.units())
    data = get_cache().get(session, job_id)
    stats: dict[str, dict[str, float]] = {}
    for key in data.keys():
        _, values = data.arrays(key)
        if len(values):
            stats[key] = {
                "min": float(values.min()),
                "max": float(values.max()),
                "last": float(values[-1]),
                "count": float(len(values)),
            }
    return stats


def _unit_stats(units: dict[str, "Unit"]) -> dict[str, dict[str, float]]:
    stats: dict[str, dict[str, float]] = {}
    for key in sorted(units, key=lambda key: (not key.startswith("train."), key)):
        counts, _, values = units[key]
        if not values.size:
            continue
        last_row = values[-1][~np.isnan(values[-1])]
        stats[key] = {
            "min": float(np.nanmin(values)),
            "max": float(np.nanmax(values)),
            "last": float(last_row[-1]),
            "count": float(counts.sum()),
        }
    return stats


# ---- charts from write-time roll-ups (app/core/rollups.py) ----------------------------------------------------

CANDIDATES = 4


Unit = tuple[
    np.ndarray, np.ndarray, np.ndarray
]  # counts (n,), candidate steps (n, 4), candidate values (n, 4)
_PAD = [math.nan] * (2 * CANDIDATES)


class _Units:
    """One series as units in id order: a roll-up block (its count and up to four candidate points) or one raw
    point (count 1, itself). Kept as flat lists that grow; converted to arrays once per new unit only."""

    def __init__(self) -> None:
        self.counts: list[int] = []
        self.flat: list[float] = []  # 8 floats per unit: step, value pairs, NaN-padded
        self._arrays: Unit = (
            np.empty(0, dtype=np.int64),
            np.empty((0, CANDIDATES)),
            np.empty((0, CANDIDATES)),
        )

    def add(self, flat: list[float]) -> None:
        """Append a unit from its ``[count, step, value, ...]`` summary."""
        self.counts.append(int(flat[0]))
        self.flat += flat[1:]
        self.flat += _PAD[: 2 * CANDIDATES + 1 - len(flat)]

    def extend(self, other: "_Units") -> None:
        """Append ``other``'s units."""
        self.counts += other.counts
        self.flat += other.flat

    def arrays(self) -> Unit:
        """(counts, steps, values) as arrays; only units added since the last call are converted."""
        done = len(self._arrays[0])
        if done < len(self.counts):
            new = np.array(self.flat[done * 2 * CANDIDATES :], dtype=np.float64).reshape(-1, 2 * CANDIDATES)
            counts = np.array(self.counts[done:], dtype=np.int64)
            self._arrays = (
                np.concatenate((self._arrays[0], counts)),
                np.concatenate((self._arrays[1], new[:, 0::2])),
                np.concatenate((self._arrays[2], new[:, 1::2])),
            )
        return self._arrays


def _joined(first: Unit, second: Unit) -> Unit:
    if not len(second[0]):
        return first
    return (
        np.concatenate((first[0], second[0])),
        np.concatenate((first[1], second[1])),
        np.concatenate((first[2], second[2])),
    )


def chart_units(units: Unit, max_points: int) -> tuple[np.ndarray, np.ndarray, int]:
    """At most ``max_points`` points of a series given as units, and its full length.

    When every unit is exact (holds all its points) and they fit, every point is returned, as the raw path does.
    Otherwise the units are split into ``(max_points - 2) // 2`` even runs and each run contributes its lowest and
    highest candidate; the very first and last points are kept. Blocks carry their true first, min, max and last,
    so every extreme of the series survives, exactly as the per-bucket min/max of the raw points would keep it.
    """
    counts, steps, values = units
    total = int(counts.sum()) if len(counts) else 0
    if not total:
        return np.empty(0), np.empty(0), 0
    present = ~np.isnan(steps)
    exact = bool(np.all(present.sum(axis=1) == counts))
    flat_steps, flat_values = steps[present], values[present]  # row-major: unit order, then step order
    if (exact and total <= max_points) or max_points < 4:
        if exact and total <= max_points:
            return flat_steps, flat_values, total
        xs, ys = downsample(flat_steps, flat_values, max_points)
        return xs, ys, total
    buckets = (max_points - 2) // 2
    n = len(counts)
    per_bucket = math.ceil(n / buckets)
    padded = math.ceil(n / per_bucket) * per_bucket
    low = np.full((padded, CANDIDATES), np.inf)
    high = np.full((padded, CANDIDATES), -np.inf)
    low[:n] = np.where(present, values, np.inf)
    high[:n] = np.where(present, values, -np.inf)
    width = per_bucket * CANDIDATES
    offsets = np.arange(0, padded * CANDIDATES, width)
    picked_min = low.reshape(-1, width).argmin(axis=1) + offsets
    picked_max = high.reshape(-1, width).argmax(axis=1) + offsets
    first = int(np.flatnonzero(present.reshape(-1))[0])
    last = int(np.flatnonzero(present.reshape(-1))[-1])
    keep = np.unique(np.concatenate(([first], picked_min, picked_max, [last])))
    all_steps = np.full(padded * CANDIDATES, np.nan)
    all_values = np.full(padded * CANDIDATES, np.nan)
    all_steps[: n * CANDIDATES] = steps.reshape(-1)
    all_values[: n * CANDIDATES] = values.reshape(-1)
    keep = keep[~np.isnan(all_steps[keep])]
    return all_steps[keep], all_values[keep], total


def raw_units(rows: list[RawPoint]) -> dict[str, _Units]:
    """Raw points (in id order) as one unit each, per series key."""
    out: dict[str, _Units] = {}
    for row in rows:
        for name, raw in (row.values or {}).items():
            value = finite(raw)
            if value is not None:
                key = f"{row.split}.{name}"
                if key not in out:
                    out[key] = _Units()
                out[key].add([1.0, float(row.step), value])
    return out


@dataclass
class _Block:
    id: int
    prev_id: int | None
    first_id: int
    last_id: int
    points: int
    series: dict[str, list[float]]


@dataclass
class RollupSeries:
    """A job's roll-up blocks of one size, read once and then only the newer ones, plus the raw points no block
    covers (gaps between writers; the unfinished tail, read again on every request)."""

    job_id: int
    size: int
    blocks: list[_Block] = field(default_factory=list)
    gaps: dict[int, list[RawPoint]] = field(default_factory=dict)  # block index -> raw points before it
    tail: list[RawPoint] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    static: dict[str, _Units] = field(
        default_factory=dict
    )  # per key: the units of the blocks and gaps so far

    def reset(self) -> None:
        """Forget everything read so far."""
        self.blocks, self.gaps, self.tail, self.static = [], {}, [], {}

    @property
    def cursor(self) -> int:
        """The newest point id covered."""
        newest = self.blocks[-1].last_id if self.blocks else 0
        return max(newest, self.tail[-1].id if self.tail else 0)

    @property
    def point_count(self) -> int:
        """Points covered: the blocks', the gaps' and the tail's."""
        return sum(b.points for b in self.blocks) + sum(map(len, self.gaps.values())) + len(self.tail)

    def refresh(self, session: Session) -> None:
        """Bring the blocks up to date (starting over when the newest known block is gone: a resume deleted it),
        read the raw points of new gaps, and the tail again."""
        connection = session.connection()
        if self.blocks:
            last = self.blocks[-1]
            still = connection.execute(
                sa.select(col(MetricRollup.id)).where(
                    col(MetricRollup.id) == last.id, col(MetricRollup.last_id) == last.last_id
                )
            ).first()
            if still is None:
                self.reset()
        known = self.blocks[-1].last_id if self.blocks else 0
        rows = connection.execute(
            sa.select(
                col(MetricRollup.id),
                col(MetricRollup.prev_id),
                col(MetricRollup.first_id),
                col(MetricRollup.last_id),
                col(MetricRollup.points),
                col(MetricRollup.series),
            )
            .where(
                col(MetricRollup.job_id) == self.job_id,
                col(MetricRollup.size) == self.size,
                col(MetricRollup.last_id) > known,
            )
            .order_by(col(MetricRollup.last_id))
        ).all()
        if rows:
            decoded = json.loads("[" + ",".join(row[5] for row in rows) + "]")
            for row, series in zip(rows, decoded, strict=True):
                previous = self.blocks[-1].last_id if self.blocks else 0
                block = _Block(int(row[0] or 0), row[1], int(row[2]), int(row[3]), int(row[4]), series)
                if (
                    block.prev_id is None or block.prev_id != previous
                ):  # another writer began: points between?
                    between = _raw_points(session, self.job_id, previous, block.first_id)
                    if between:
                        self.gaps[len(self.blocks)] = between
                        for key, units in raw_units(between).items():
                            self._static_of(key).extend(units)
                for key, flat in block.series.items():
                    self._static_of(key).add(flat)
                self.blocks.append(block)
        self.tail = _raw_points(session, self.job_id, self.blocks[-1].last_id if self.blocks else 0, None)

    def _static_of(self, key: str) -> _Units:
        units = self.static.get(key)
        if units is None:
            units = self.static[key] = _Units()
        return units

    def units(self) -> dict[str, Unit]:
        """Every series as units in id order: blocks (with the raw points of gaps among them), then the tail."""
        tail = raw_units(self.tail)
        empty = _Units().arrays()
        return {
            key: _joined(
                self.static[key].arrays() if key in self.static else empty,
                tail[key].arrays() if key in tail else empty,
            )
            for key in set(self.static) | set(tail)
        }


def _raw_points(session: Session, job_id: int, after: int, before: int | None) -> list[RawPoint]:
    """The job's points with ``after < id < before`` (no upper bound when None), in id order."""
    where = [col(MetricPoint.job_id) == job_id, col(MetricPoint.id) > after]
    if before is not None:
        where.append(col(MetricPoint.id) < before)
    rows = (
        session.connection()
        .execute(
            sa.select(
                col(MetricPoint.id),
                col(MetricPoint.step),
                col(MetricPoint.split),
                sa.cast(col(MetricPoint.values), sa.Text),
            )
            .where(*where)
            .order_by(col(MetricPoint.id))
        )
        .all()
    )
    if not rows:
        return []
    values = json.loads("[" + ",".join(row[3] or "{}" for row in rows) + "]")
    return [
        RawPoint(int(row[0] or 0), int(row[1]), str(row[2]), value)
        for row, value in zip(rows, values, strict=True)
    ]


class RollupCache:
    """Roll-up state of recently viewed jobs, by database, job and block size."""

    def __init__(self, capacity: int = CACHED_JOBS * 2) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, int, int], RollupSeries] = OrderedDict()
        self._lock = threading.Lock()

    def clear(self) -> None:
        """Forget every job."""
        with self._lock:
            self._entries.clear()

    def get(self, session: Session, job_id: int, size: int) -> RollupSeries:
        """The job's blocks of ``size``, current as of now."""
        key = (str(session.get_bind().engine.url), job_id, size)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = RollupSeries(job_id, size)
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        with entry.lock:
            entry.refresh(session)
        return entry


_rollups = RollupCache()


def get_rollup_cache() -> RollupCache:
    """The process-wide roll-up cache."""
    return _rollups


def rollup_counts(session: Session, job_id: int) -> dict[int, int]:
    """How many roll-up blocks the job has, by size (one index-only query)."""
    rows = session.connection().execute(
        sa.select(col(MetricRollup.size), sa.func.count())
        .where(col(MetricRollup.job_id) == job_id)
        .group_by(col(MetricRollup.size))
    )
    return {int(size): int(count) for size, count in rows}


_chosen: dict[tuple[str, int, int], int] = {}


def rollups_for_chart(session: Session, job_id: int, max_points: int) -> RollupSeries | None:
    """The coarsest roll-up with at least one block per chart bucket (so every bucket has something to pick
    from), or None when the job is too short for roll-ups to help (or has none: logged before they existed).
    The choice is remembered per job and budget, so a warm request reads only that size's new blocks."""
    buckets = max((max_points - 2) // 2, 1)
    key = (str(session.get_bind().engine.url), job_id, buckets)
    size = _chosen.get(key)
    if size is None:
        counts = rollup_counts(session, job_id)
        size = max((size for size, count in counts.items() if count >= buckets), default=None)
        if size is None:
            return None
        if len(_chosen) > 1000:
            _chosen.clear()
        _chosen[key] = size
    entry = get_rollup_cache().get(session, job_id, size)
    if not entry.blocks:  # gone (a resume dropped them): choose again next time
        _chosen.pop(key, None)
        return None
    return entry


def rollup_series(entry: RollupSeries, budget: int, keys: list[str] | None) -> dict[str, Any]:
    """``job_series``'s answer computed from roll-up blocks."""
    with entry.lock:
        units, cursor, points = entry.units(), entry.cursor, entry.point_count
    ordered = sorted(units, key=lambda key: (not key.startswith("train."), key))
    out: dict[str, Any] = {}
    for key in keys if keys is not None else ordered:
        xs, ys, total = chart_units(units[key] if key in units else _Units().arrays(), budget)
        out[key] = {"x": xs.tolist(), "y": ys.tolist(), "total": total}
    return {
        "job_id": entry.job_id,
        "cursor": cursor,
        "points": points,
        "max_points": budget,
        "series": out,
    }
