"""Write-time roll-ups of metric points: per block of a job's points, each series' count, first, last, min and max.

A chart of a run with a million points shows ~2,000 of them; reading the million rows to pick them took a minute
on a cold web process. The metric writer (worker/reporting.py) therefore also writes one ``metricrollup`` row
per ``size`` consecutive points of the job (``ROLLUP_SIZES``: 16, 64 and 256), in the same transaction as the
points that complete it. A row holds, per series key (``train.loss``), how many finite values the block has and
its *candidates*: every point when there are at most ``EXACT_POINTS``, else the first, the minimum, the maximum
and the last, in step order. That is all a min/max-per-bucket chart needs, and the series' summary (min, max,
last, count) too. A million-point run has ~3,900 rows of the coarse size; a 10,000-point run ~625 of the finest.

Blocks of one writer chain (``prev_id`` is the job's point just before the block, as that writer saw it). Points
no block covers (the unfinished block at the end, a block a dead writer never completed, a run logged before
roll-ups existed) are read raw by the reader (app/services/series.py), which finds them as gaps in the chain.
A resume that deletes points also deletes the blocks that reach them (worker/resilience.py).
"""

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

ROLLUP_SIZES = (16, 64, 256)
EXACT_POINTS = 4


@dataclass(frozen=True)
class RawPoint:
    """What a block needs of one metric point."""

    id: int
    step: int
    split: str
    values: dict[str, Any]


def finite(value: Any) -> float | None:
    """The value as a float when it is a finite number (bools and NaN/inf are not drawn), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def candidates(steps: list[float], values: list[float]) -> list[float]:
    """A series' block summary as a flat list ``[count, step, value, step, value, ...]``: every point when there
    are at most EXACT_POINTS, else the first, the (first) minimum, the (first) maximum and the last, in order."""
    count = len(values)
    if count <= EXACT_POINTS:
        picked = list(range(count))
    else:
        low = min(range(count), key=values.__getitem__)
        high = max(range(count), key=values.__getitem__)
        picked = sorted({0, low, high, count - 1})
    flat: list[float] = [float(count)]
    for index in picked:
        flat += [steps[index], values[index]]
    return flat


def summarise(points: Iterable[RawPoint]) -> dict[str, list[float]]:
    """Per series key, the block summary of ``points`` (in id order)."""
    steps: dict[str, list[float]] = {}
    values: dict[str, list[float]] = {}
    for point in points:
        for name, raw in (point.values or {}).items():
            value = finite(raw)
            if value is None:
                continue
            key = f"{point.split}.{name}"
            steps.setdefault(key, []).append(float(point.step))
            values.setdefault(key, []).append(value)
    return {key: candidates(steps[key], values[key]) for key in sorted(steps)}


@dataclass
class Block:
    """A finished block, ready to be written as a ``metricrollup`` row."""

    size: int
    prev_id: int | None
    first_id: int
    last_id: int
    points: int
    series: dict[str, list[float]]

    def row(self, job_id: int) -> dict[str, Any]:
        """The row's columns."""
        return {
            "job_id": job_id,
            "size": self.size,
            "prev_id": self.prev_id,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "points": self.points,
            "series": json.dumps(self.series, separators=(",", ":")),
        }


@dataclass
class RollupBuilder:
    """Collects a writer's points (in id order) and hands out the blocks they complete, for every size."""

    sizes: tuple[int, ...] = ROLLUP_SIZES
    last_id: int | None = None
    pending: dict[int, list[RawPoint]] = field(default_factory=dict)
    prev: dict[int, int | None] = field(default_factory=dict)

    def copy(self) -> "RollupBuilder":
        """An independent copy (the writer feeds a copy and keeps it only when its transaction commits)."""
        return RollupBuilder(
            self.sizes, self.last_id, {k: list(v) for k, v in self.pending.items()}, dict(self.prev)
        )

    def add(self, points: Iterable[RawPoint]) -> list[Block]:
        """Take points (after every point taken before) and return the blocks they complete."""
        blocks: list[Block] = []
        for point in points:
            for size in self.sizes:
                pending = self.pending.setdefault(size, [])
                if not pending:
                    self.prev[size] = self.last_id
                pending.append(point)
                if len(pending) == size:
                    blocks.append(
                        Block(size, self.prev.get(size), pending[0].id, point.id, size, summarise(pending))
                    )
                    self.pending[size] = []
            self.last_id = point.id
        return blocks
