"""Request traces: the vendored Azure 2023 conversation trace, or any CSV like it.

A trace CSV has a header with the three columns ``TIMESTAMP``,
``ContextTokens`` and ``GeneratedTokens`` (any order, any extra columns
ignored). ``TIMESTAMP`` is an ISO date-time (``2023-11-16 18:15:46.6805900``;
more than six fractional digits are truncated) or a number of seconds.
Rows need not be sorted. A malformed file raises :class:`TraceError` naming
the file and the line.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
#: longest trace accepted, seconds (366 days: per-minute arrays of ~0.5 M entries)
MAX_SPAN_S = 366 * 86400
VENDORED_NAME = "azure_conv_2023.csv"
ATTRIBUTION = (
    'Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting", '
    "ISCA 2024; data from the Azure Public Dataset (CC-BY 4.0)"
)


class TraceError(ValueError):
    """A trace file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Trace:
    """Arrival times (s from the first request) and token counts, sorted by arrival."""

    name: str
    arrival_s: FloatArray
    input_tokens: IntArray
    output_tokens: IntArray

    def __post_init__(self) -> None:
        n = self.arrival_s.size
        if n == 0:
            raise TraceError(f"{self.name}: the trace has no requests")
        if self.input_tokens.size != n or self.output_tokens.size != n:
            raise TraceError(f"{self.name}: columns have different lengths")
        span = float(self.arrival_s[-1] - self.arrival_s[0]) if n else 0.0
        if not math.isfinite(span) or span > MAX_SPAN_S:
            raise TraceError(
                f"{self.name}: the trace spans {span / 86400:.0f} days; at most "
                f"{MAX_SPAN_S // 86400} days are supported (the simulator keeps per-minute "
                "arrays of the whole span): check the TIMESTAMP column")

    @property
    def requests(self) -> int:
        return int(self.arrival_s.size)

    @property
    def span_s(self) -> float:
        """Length of the trace: to the end of the minute in which its last request falls."""
        last = float(self.arrival_s[-1])
        return max(60.0 * math.floor(last / 60.0) + 60.0, 60.0) if last > 0 else 60.0

    @property
    def mean_rate_rps(self) -> float:
        return self.requests / self.minute_lengths_s().sum()

    def minute_lengths_s(self) -> FloatArray:
        """Seconds covered by each trace minute; the last one ends at the last request."""
        m = self.minute_counts().size
        lengths = np.full(m, 60.0)
        tail = float(self.arrival_s[-1]) - 60.0 * (m - 1)
        # a partial last minute counts for the time it covers (at least 1 s)
        lengths[-1] = min(60.0, max(tail, 1.0))
        return lengths

    def minute_counts(self) -> IntArray:
        minutes = np.floor(self.arrival_s / 60.0).astype(np.int64)
        return np.bincount(minutes).astype(np.int64)

    def minute_rates_rps(self) -> FloatArray:
        """Request rate in each trace minute (req/s): the shape NHPP scaling keeps."""
        return np.asarray(self.minute_counts() / self.minute_lengths_s(), dtype=np.float64)


def vendored_trace_path() -> Path:
    return Path(str(resources.files("joulepool") / "data" / VENDORED_NAME))


def _parse_time(text: str) -> float:
    """Seconds since the epoch of an ISO date-time, or a plain number of seconds."""
    s = text.strip()
    try:
        v = float(s)
    except ValueError:
        pass
    else:
        if not math.isfinite(v):
            raise ValueError(f"timestamp {s!r} is not finite")
        return v
    if "." in s:  # datetime accepts at most 6 fractional digits
        head, frac = s.rsplit(".", 1)
        digits = "".join(ch for ch in frac if ch.isdigit())
        rest = frac[len(digits):]
        if digits:
            s = f"{head}.{digits[:6]}{rest}"
    try:
        stamp = datetime.fromisoformat(s)
    except ValueError:
        raise ValueError(f"timestamp {text.strip()!r} is neither an ISO date-time nor seconds")\
            from None
    if stamp.tzinfo is None:  # naive times are read as UTC: no DST jumps inside a trace
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _parse_count(text: str, column: str, minimum: int) -> int:
    s = text.strip()
    try:
        v = int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            raise ValueError(f"{column} {s!r} is not an integer") from None
        if not f.is_integer():
            raise ValueError(f"{column} {s!r} is not an integer") from None
        v = int(f)
    if v < minimum:
        raise ValueError(f"{column} must be >= {minimum}, got {v}")
    return v


def load_trace(path: str | Path | None = None) -> Trace:
    """Read a trace CSV (default: the vendored Azure 2023 conversation trace)."""
    p = Path(path) if path is not None else vendored_trace_path()
    try:
        handle = p.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{p}: cannot read: {exc.strerror or exc}") from None
    times: list[float] = []
    inputs: list[int] = []
    outputs: list[int] = []
    with handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise TraceError(f"{p}:1: empty file; expected a header {','.join(COLUMNS)}") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(f"{p}:1: unreadable header: {exc}") from None
        names = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise TraceError(
                f"{p}:1: header {header!r} lacks column(s) {missing}; expected {','.join(COLUMNS)}"
            )
        ti, ci, gi = (names.index(c) for c in COLUMNS)
        width = max(ti, ci, gi) + 1
        line = 1
        try:
            for row in reader:
                line = reader.line_num
                if not row or all(not f.strip() for f in row):
                    continue
                if len(row) < width:
                    raise TraceError(
                        f"{p}:{line}: expected {len(names)} fields, got {len(row)}: {row!r}"
                    )
                try:
                    times.append(_parse_time(row[ti]))
                    inputs.append(_parse_count(row[ci], "ContextTokens", 0))
                    outputs.append(_parse_count(row[gi], "GeneratedTokens", 1))
                except ValueError as exc:
                    raise TraceError(f"{p}:{line}: {exc}") from None
        except (csv.Error, UnicodeDecodeError) as exc:
            raise TraceError(f"{p}:{line + 1}: unreadable row: {exc}") from None
    if not times:
        raise TraceError(f"{p}: the trace has a header but no requests")
    t = np.asarray(times, dtype=np.float64)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order[0]]
    return Trace(
        name=p.name,
        arrival_s=np.asarray(t, dtype=np.float64),
        input_tokens=np.asarray(inputs, dtype=np.int64)[order],
        output_tokens=np.asarray(outputs, dtype=np.int64)[order],
    )
