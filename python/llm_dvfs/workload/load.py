"""Load schedules and the driver that plays them against an engine (no engine dependency).

Schedules:

* :class:`OpenLoop` — Poisson arrivals at ``rate_rps`` (exponential gaps, seeded: the same seed
  gives the same arrival times on every machine). The first request arrives at 0, so a run does
  not open with an idle gap.
* :class:`TraceArrivals` — arrival times read from a file (CSV or JSON lines, seconds relative
  to the start of the run), validated. The driver issues the first at once and keeps the gaps.
* :class:`ClosedLoop` — ``concurrency`` users, each issuing its next request as soon as the
  previous one finishes (no think time).

:func:`drive` issues the requests and returns the measured window and the load achieved.

Concurrency model: threads. ``submit(i)`` is called from a worker thread and blocks until
request ``i`` has finished (or returns a :class:`concurrent.futures.Future`, which the worker
waits on). That fits both engines: the HF continuous-batching manager runs its own background
thread and a worker waits for its request's result; the endpoint client streams over a blocking
HTTP connection per worker. Open loop: the calling thread sleeps until each arrival time and
hands the request to a pool of at most ``max_in_flight`` threads; when all are busy the arrival
is late, and the lateness is recorded (``LoadResult.lateness_s``). Closed loop: ``concurrency``
threads, each running its user's requests one after another. Times are ``time.monotonic()``,
which on Linux is the ``CLOCK_MONOTONIC`` timeline of the power monitor, so the measured window
can be handed straight to ``PowerMonitor.trace`` and ``attribute_served``.

Warm-up and cool-down: the measured window ``[t0, t1]`` starts ``warmup_s`` after the first
request was issued and at the issue of request ``warmup_requests`` (the later of the two), and
ends ``cooldown_s`` before the last request was issued and at the issue of request
``n - cooldown_requests`` (the earlier). After the last issue the load only decays, so the window
never extends past it; the requests issued during the cool-down keep the engine loaded while the
measured ones finish. Measured requests are those issued inside ``[t0, t1)``.
"""
from __future__ import annotations

import concurrent.futures
import csv
import io
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from llm_dvfs.errors import ConfigError

__all__ = ["OpenLoop", "TraceArrivals", "ClosedLoop", "RequestRecord", "LoadResult", "drive",
           "TRACE_TIME_COLUMNS"]

# Column (CSV) or key (JSON lines) names accepted for the arrival time, s, in a trace file.
TRACE_TIME_COLUMNS = ("arrival_s", "t_arrival_s", "arrival_time_s", "t_s", "time_s", "timestamp_s")


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return int(v)


@dataclass(frozen=True)
class OpenLoop:
    """Poisson arrivals: ``n`` requests at ``rate_rps`` requests/s on average.

    Raises:
        ConfigError: rate not finite and > 0, n < 1, seed not an integer.
    """

    rate_rps: float
    n: int
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.rate_rps, (int, float)) and math.isfinite(self.rate_rps) and self.rate_rps > 0):
            raise ConfigError(f"arrival rate must be a finite number > 0 req/s, got {self.rate_rps!r}")
        _positive_int("n", self.n)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    def arrivals_s(self) -> np.ndarray:
        """Arrival times relative to the start, s: 0, then cumulative exponential gaps of mean
        ``1 / rate_rps`` (numpy's PCG64 generator seeded with ``seed``)."""
        gaps = np.random.default_rng(int(self.seed)).exponential(1.0 / float(self.rate_rps), self.n - 1)
        return np.concatenate(([0.0], np.cumsum(gaps)))

    def describe(self) -> dict:
        return {"kind": "open", "arrival_rate_rps": float(self.rate_rps), "n": int(self.n), "seed": int(self.seed)}


@dataclass(frozen=True)
class TraceArrivals:
    """Arrival times given explicitly (s, relative to the start of the run, sorted, >= 0).

    Raises:
        ConfigError: empty, non-finite, negative or unsorted times.
    """

    times_s: tuple[float, ...]
    source: str = "<given>"

    def __post_init__(self) -> None:
        t = tuple(float(x) for x in self.times_s)
        object.__setattr__(self, "times_s", t)
        if not t:
            raise ConfigError(f"{self.source}: no arrival times")
        for k, x in enumerate(t):
            _check_arrival(x, t[k - 1] if k else None, f"{self.source}: arrival {k}")

    @property
    def n(self) -> int:
        return len(self.times_s)

    def arrivals_s(self) -> np.ndarray:
        return np.asarray(self.times_s, dtype=np.float64)

    @property
    def rate_rps(self) -> float:
        """Mean arrival rate of the trace, req/s (NaN for fewer than 2 arrivals or zero span)."""
        span = self.times_s[-1] - self.times_s[0]
        return (self.n - 1) / span if self.n > 1 and span > 0 else math.nan

    def describe(self) -> dict:
        return {"kind": "trace", "source": self.source, "n": self.n, "arrival_rate_rps": self.rate_rps}

    @classmethod
    def from_file(cls, path: Union[str, Path]) -> "TraceArrivals":
        """Read arrival times from a CSV or JSON-lines file.

        CSV (``.csv``, or any file whose first data line does not start with ``{``): a header
        naming one of :data:`TRACE_TIME_COLUMNS` (other columns ignored), or a single column,
        with or without a header. JSON lines (``.jsonl``, ``.ndjson``, ``.json``): one object
        per line with one of those keys, or a bare number per line. Blank lines and lines
        starting with ``#`` are skipped. Times are seconds relative to the start of the run,
        non-negative, finite and sorted.

        Raises:
            ConfigError: missing or unreadable file, unknown columns, or a bad value, with the
            file name and line number.
        """
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise ConfigError(f"arrival trace {p}: cannot read: {e}") from e
        lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1)
                 if ln.strip() and not ln.lstrip().startswith("#")]
        if not lines:
            raise ConfigError(f"arrival trace {p}: no arrival times")
        as_json = p.suffix.lower() in (".jsonl", ".ndjson", ".json") or lines[0][1].lstrip().startswith("{")
        values = _read_jsonl(p, lines) if as_json else _read_csv(p, lines)
        prev = None
        for lineno, x in values:
            _check_arrival(x, prev, f"arrival trace {p}, line {lineno}")
            prev = x
        if not values:
            raise ConfigError(f"arrival trace {p}: no arrival times")
        return cls(tuple(x for _, x in values), source=str(p))


def _check_arrival(x: float, prev: Optional[float], where: str) -> None:
    if not math.isfinite(x):
        raise ConfigError(f"{where}: arrival time {x} is not finite")
    if x < 0:
        raise ConfigError(f"{where}: arrival time {x} is negative (times are s from the start of the run)")
    if prev is not None and x < prev:
        raise ConfigError(f"{where}: arrival time {x} is before the previous one ({prev}): the trace must be sorted")


def _number(raw: Any, where: str) -> float:
    if isinstance(raw, bool):
        raise ConfigError(f"{where}: {raw!r} is not a number of seconds")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {raw!r} is not a number of seconds") from None


def _read_jsonl(p: Path, lines: list[tuple[int, str]]) -> list[tuple[int, float]]:
    out = []
    for n, ln in lines:
        where = f"arrival trace {p}, line {n}"
        try:
            obj = json.loads(ln)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: not JSON ({e.msg})") from None
        if isinstance(obj, dict):
            key = next((k for k in TRACE_TIME_COLUMNS if k in obj), None)
            if key is None:
                raise ConfigError(f"{where}: no arrival time key (one of {', '.join(TRACE_TIME_COLUMNS)})")
            obj = obj[key]
        out.append((n, _number(obj, where)))
    return out


def _read_csv(p: Path, lines: list[tuple[int, str]]) -> list[tuple[int, float]]:
    rows = list(csv.reader(io.StringIO("\n".join(ln for _, ln in lines))))
    first = [c.strip() for c in rows[0]]
    try:
        float(first[0])
        header = None
    except ValueError:
        header = first
    col = 0
    if header is not None:
        names = [h.lower() for h in header]
        col = next((names.index(k) for k in TRACE_TIME_COLUMNS if k in names), -1)
        if col < 0:
            if len(names) != 1:
                raise ConfigError(f"arrival trace {p}, line {lines[0][0]}: no arrival time column "
                                  f"(one of {', '.join(TRACE_TIME_COLUMNS)}) in {header}")
            col = 0
        data = list(zip(lines[1:], rows[1:]))
    else:
        data = list(zip(lines, rows))
    out = []
    for (n, _), row in data:
        where = f"arrival trace {p}, line {n}"
        if col >= len(row):
            raise ConfigError(f"{where}: {len(row)} fields, the arrival time is field {col + 1}")
        out.append((n, _number(row[col].strip(), where)))
    return out


@dataclass(frozen=True)
class ClosedLoop:
    """``concurrency`` users issuing ``n`` requests in all, each user's next request as soon as its
    previous one finishes.

    Raises:
        ConfigError: concurrency or n not an integer >= 1.
    """

    concurrency: int
    n: int

    def __post_init__(self) -> None:
        _positive_int("concurrency", self.concurrency)
        _positive_int("n", self.n)

    def describe(self) -> dict:
        return {"kind": "closed", "concurrency": int(self.concurrency), "n": int(self.n)}


Schedule = Union[OpenLoop, TraceArrivals, ClosedLoop]


# ---------------------------------------------------------------------------------------------
# The driver


@dataclass
class RequestRecord:
    """One request as the driver saw it (host monotonic s).

    Attributes:
        index: position in the schedule (the argument ``submit`` got).
        t_scheduled_s: planned arrival (open loop / trace); NaN in closed loop.
        t_issued_s: when ``submit`` was called (NaN: never issued, after a stop).
        t_done_s: when it returned (or raised).
        ok: False when ``submit`` raised; ``error`` holds the exception.
        result: what ``submit`` returned (a Future's result), None on error.
        phase: ``warmup`` | ``measured`` | ``cooldown`` | ``not_issued``.
    """

    index: int
    t_scheduled_s: float = math.nan
    t_issued_s: float = math.nan
    t_done_s: float = math.nan
    ok: bool = False
    error: Optional[BaseException] = None
    result: Any = None
    phase: str = "not_issued"


@dataclass
class LoadResult:
    """What :func:`drive` measured.

    Attributes:
        schedule: the schedule's description (kind, rate or concurrency, n, seed/source).
        records: one per request, by index.
        window_s: the measured window ``(t0, t1)``, host monotonic s (t0 == t1: empty).
        measured: indices of the requests issued inside the window.
        arrived_rps, completed_rps: requests issued / finished inside the window per second.
        mean_concurrency: time average of the requests in flight (issued, not finished) over the
            window.
        lateness_s: issue time minus planned arrival over the measured requests (open loop):
            ``{"p50", "p99", "max"}``; empty in closed loop.
        failed: indices of requests whose ``submit`` raised.
        stopped: why issuing stopped early (``stop_on_error``), else None.
        problems: human-readable notes (an empty window, a stop).
        t_first_s, t_last_issue_s, t_last_done_s: first issue, last issue, last completion.
    """

    schedule: dict
    records: list[RequestRecord]
    window_s: tuple[float, float]
    measured: list[int]
    arrived_rps: float
    completed_rps: float
    mean_concurrency: float
    lateness_s: dict[str, float]
    failed: list[int]
    stopped: Optional[str]
    problems: list[str] = field(default_factory=list)
    t_first_s: float = math.nan
    t_last_issue_s: float = math.nan
    t_last_done_s: float = math.nan

    @property
    def results(self) -> list[Any]:
        """``submit``'s return values by index (None where it raised or was never called)."""
        return [r.result for r in self.records]

    def summary(self) -> dict:
        """Scalars for logs, result rows and the run manifest."""
        t0, t1 = self.window_s
        return {**self.schedule, "window_s": self.window_s, "window_duration_s": t1 - t0,
                "measured": len(self.measured), "issued": sum(math.isfinite(r.t_issued_s) for r in self.records),
                "failed": len(self.failed), "arrived_rps": self.arrived_rps, "completed_rps": self.completed_rps,
                "mean_concurrency": self.mean_concurrency, "lateness_s": dict(self.lateness_s),
                "stopped": self.stopped, "problems": list(self.problems)}


def _validate_exclusions(schedule: Schedule, warmup_s: float, cooldown_s: float, warmup_requests: int,
                         cooldown_requests: int) -> None:
    for name, v in (("warmup_s", warmup_s), ("cooldown_s", cooldown_s)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ConfigError(f"{name} must be a finite number >= 0, got {v!r}")
    for name, v in (("warmup_requests", warmup_requests), ("cooldown_requests", cooldown_requests)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
    if warmup_requests + cooldown_requests >= schedule.n:
        raise ConfigError(f"warm-up ({warmup_requests}) and cool-down ({cooldown_requests}) requests leave "
                          f"none of the {schedule.n} to measure")
    if not isinstance(schedule, ClosedLoop):
        arr = schedule.arrivals_s()
        span = float(arr[-1] - arr[0])
        if warmup_s + cooldown_s > 0 and warmup_s + cooldown_s >= span:
            raise ConfigError(f"warm-up {warmup_s} s + cool-down {cooldown_s} s cover the whole "
                              f"{span:.3g} s of arrivals: nothing to measure")


def drive(
    schedule: Schedule,
    submit: Callable[[int], Any],
    *,
    warmup_s: float = 0.0,
    cooldown_s: float = 0.0,
    warmup_requests: int = 0,
    cooldown_requests: int = 0,
    max_in_flight: int = 256,
    stop_on_error: bool = False,
    on_done: Optional[Callable[[RequestRecord], None]] = None,
) -> LoadResult:
    """Issue ``schedule``'s requests through ``submit`` and measure the load achieved.

    Args:
        schedule: :class:`OpenLoop`, :class:`TraceArrivals` or :class:`ClosedLoop`.
        submit: ``submit(i)`` serves request ``i`` (0-based) and blocks until it is done, or
            returns a ``concurrent.futures.Future``; called from worker threads, so it must be
            thread-safe. An exception marks the request failed (kept in ``records``); it must
            time out by itself (the driver cannot cancel a blocked call).
        warmup_s, warmup_requests, cooldown_s, cooldown_requests: excluded from the measured
            window (module docstring).
        max_in_flight: open loop only: most requests in flight at once (threads); arrivals
            beyond it are issued late and the lateness recorded.
        stop_on_error: stop issuing after the first failed request (in-flight ones finish).
        on_done: called (from the worker thread) with each finished request's record.
    Returns:
        :class:`LoadResult`.
    Raises:
        ConfigError: a bad schedule or exclusions that leave nothing to measure (before any
        request is issued). KeyboardInterrupt propagates after issuing stops.
    """
    if not isinstance(schedule, (OpenLoop, TraceArrivals, ClosedLoop)):
        raise ConfigError(f"schedule must be OpenLoop, TraceArrivals or ClosedLoop, got {type(schedule).__name__}")
    _validate_exclusions(schedule, warmup_s, cooldown_s, warmup_requests, cooldown_requests)
    max_in_flight = _positive_int("max_in_flight", max_in_flight)
    n = int(schedule.n)
    records = [RequestRecord(i) for i in range(n)]
    stop = threading.Event()
    stopped: list[str] = []

    def run_one(i: int) -> None:
        rec = records[i]
        rec.t_issued_s = time.monotonic()
        try:
            res = submit(i)
            if isinstance(res, concurrent.futures.Future):
                res = res.result()
            rec.result, rec.ok = res, True
        except Exception as e:  # a failed request is data: kept, and the load goes on
            rec.error, rec.ok = e, False
            if stop_on_error and not stop.is_set():
                stopped.append(f"request {i} failed: {e!r}")
                stop.set()
        finally:
            rec.t_done_s = time.monotonic()
        if on_done is not None:
            on_done(rec)

    closed = isinstance(schedule, ClosedLoop)
    workers = min(int(schedule.concurrency), n) if closed else min(max_in_flight, n)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm_dvfs-load")
    try:
        if closed:
            lock = threading.Lock()
            nxt = [0]

            def user() -> None:
                while not stop.is_set():
                    with lock:
                        i = nxt[0]
                        if i >= n:
                            return
                        nxt[0] += 1
                    run_one(i)

            futs = [pool.submit(user) for _ in range(workers)]
            for f in futs:  # wait in the calling thread (interruptible), then surface driver bugs
                while not f.done():
                    concurrent.futures.wait([f], timeout=0.5)
                f.result()
        else:
            slots = threading.Semaphore(workers)

            def run_slot(i: int) -> None:
                try:
                    run_one(i)
                finally:
                    slots.release()

            arrivals = schedule.arrivals_s()
            base = time.monotonic() - float(arrivals[0])
            futs = []
            for i, a in enumerate(arrivals):
                target = base + float(a)
                records[i].t_scheduled_s = target
                while not stop.is_set():
                    delay = target - time.monotonic()
                    if delay <= 0:
                        break
                    stop.wait(min(delay, 0.5))
                if stop.is_set():
                    break
                while not slots.acquire(timeout=0.5):  # all workers busy: this arrival is late
                    if stop.is_set():
                        break
                if stop.is_set():
                    break
                futs.append(pool.submit(run_slot, i))
            for f in futs:
                while not f.done():
                    concurrent.futures.wait([f], timeout=0.5)
                f.result()
    except BaseException:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return _measure(schedule, records, warmup_s, cooldown_s, warmup_requests, cooldown_requests,
                    stopped[0] if stopped else None)


def _measure(schedule: Schedule, records: Sequence[RequestRecord], warmup_s: float, cooldown_s: float,
             warmup_requests: int, cooldown_requests: int, stopped: Optional[str]) -> LoadResult:
    """The measured window and the load achieved inside it (module docstring)."""
    issued = [r for r in records if math.isfinite(r.t_issued_s)]
    problems = [f"issuing stopped early: {stopped}"] if stopped else []
    failed = [r.index for r in records if math.isfinite(r.t_issued_s) and not r.ok]
    if not issued:
        return LoadResult(schedule.describe(), list(records), (math.nan, math.nan), [], math.nan, math.nan,
                          math.nan, {}, failed, stopped, problems + ["no request was issued"])
    by_issue = sorted(issued, key=lambda r: (r.t_issued_s, r.index))
    t_first, t_last = by_issue[0].t_issued_s, by_issue[-1].t_issued_s
    t0 = t_first + warmup_s
    if warmup_requests:
        t0 = max(t0, by_issue[warmup_requests].t_issued_s if warmup_requests < len(by_issue) else math.inf)
    t1 = t_last - cooldown_s
    if cooldown_requests:
        k = len(by_issue) - cooldown_requests
        t1 = min(t1, by_issue[k].t_issued_s if k > 0 else -math.inf)
    if not t1 > t0:
        problems.append("warm-up and cool-down leave no measured window")
        t0 = t1 = min(max(t0, t_first), t_last)
    for r in issued:
        r.phase = "warmup" if r.t_issued_s < t0 else ("measured" if r.t_issued_s < t1 else "cooldown")
    measured = [r.index for r in issued if r.phase == "measured"]
    dur = t1 - t0
    if dur > 0:
        done = np.array([r.t_done_s for r in issued])
        start = np.array([r.t_issued_s for r in issued])
        arrived = len(measured) / dur
        completed = float(np.count_nonzero((done >= t0) & (done < t1))) / dur
        overlap = np.clip(np.minimum(done, t1) - np.maximum(start, t0), 0.0, None)
        conc = float(overlap.sum()) / dur
    else:
        arrived = completed = conc = math.nan
    late: dict[str, float] = {}
    lat = np.array([records[i].t_issued_s - records[i].t_scheduled_s for i in measured])
    lat = lat[np.isfinite(lat)]
    if lat.size:
        late = {"p50": float(np.median(lat)), "p99": float(np.quantile(lat, 0.99)), "max": float(lat.max())}
    return LoadResult(
        schedule=schedule.describe(), records=list(records), window_s=(float(t0), float(t1)), measured=measured,
        arrived_rps=arrived, completed_rps=completed, mean_concurrency=conc, lateness_s=late, failed=failed,
        stopped=stopped, problems=problems, t_first_s=t_first, t_last_issue_s=t_last,
        t_last_done_s=max(r.t_done_s for r in issued),
    )
