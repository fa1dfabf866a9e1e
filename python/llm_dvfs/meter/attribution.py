"""Per-token and per-request energy: the power trace integrated over each token's interval.

Inputs are plain data, so this module depends neither on the monitor nor on torch:

* a power trace: host-monotonic sample times ``t_s`` and ``power_w`` (arrays, or the
  ``Window.trace()`` DataFrame with ``t_s, device, power_w, source``);
* step boundaries from :class:`llm_dvfs.timeline.TokenTimer` (anything with ``bounds_s`` and
  ``tokens_per_sequence``, e.g. :class:`~llm_dvfs.timeline.TokenTiming`).

Method
------
1. **Zero-order hold.** Each sample's power holds from its time until the next sample (the
   method that matched the hardware counter to +0.1/-0.45 % on an H100, docs/design.md). Before the
   first sample the first value is held backwards, after the last the last value forwards;
   :attr:`Attribution.coverage` says how much of the window real samples covered.
2. **Lag compensation.** The sensor reports power late (~20-25 ms for the H100 sample buffer).
   Sample times are shifted earlier by ``lag_s`` before integrating. The lag is estimated
   from the trace itself (:func:`estimate_lag`: the shift that puts the most energy inside the
   request intervals, i.e. that aligns the power steps at request start and end with the
   marks) or taken from a per-GPU calibration value; the value used and how it was obtained are
   recorded (:class:`LagEstimate`).
3. **Steps to tokens.** Step ``k`` of a ``generate`` call (``bounds_s[k]`` to
   ``bounds_s[k+1]``) produced token ``k`` of every sequence still generating. In a batch the
   step's energy is split **equally** over the sequences still generating at that step (a
   sequence generates tokens ``0 .. n_j - 1``, ``n_j`` counted up to its first EOS). Padded
   positions cost the same compute for every row, so the prefill (step 0) is split equally too.
   A step in which no sequence is still generating (possible only if token counts disagree with
   the steps) is split over the whole batch, so nothing is lost.
4. **Reconciliation.** Token energies sum exactly to their request's energy, requests to their
   batch's, and batches plus the energy in gaps between batches (``unattributed_energy_j``) to
   the energy of the window. The window energy is compared with the hardware counter delta when
   one is given (``residual_j``, ``residual_pct``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from llm_dvfs import schema as results
from llm_dvfs.errors import ConfigError

__all__ = [
    "DEFAULT_LAG_S",
    "PowerTrace",
    "LagEstimate",
    "Attribution",
    "estimate_lag",
    "integrate_zoh",
    "step_energies",
    "split_steps",
    "request_tpot_s",
    "request_token_rows",
    "traces_from_frame",
    "coerce_traces",
    "compensate_lag",
    "trace_method",
    "attribute",
]

# Rough per-source sensor lags, s, used when the trace cannot give one (no idle edges) and no
# calibration value is passed. H100 buffer: docs/design.md (power rises 20-25 ms after work starts);
# the 100 ms instant field and the 1 s average are rough guesses. Re-measure per GPU model with
# bench/attribution_accuracy.py, which prints the lag it estimates.
DEFAULT_LAG_S: dict[str, float] = {"buffer": 0.022, "instant": 0.05, "average": 0.5}
SOURCE_PREFERENCE = ("buffer", "instant", "average")


# ---------------------------------------------------------------------------------------------
# The trace


class PowerTrace:
    """One device's power samples under zero-order hold, shifted earlier by ``lag_s``.

    Args:
        t_s: sample times, host monotonic s (any order; sorted here).
        power_w: power in W, same length, finite.
        lag_s: sensor lag to compensate, s (sample ``i`` describes the GPU at ``t_s[i] - lag_s``).
        source: buffer | instant | average (for the record only).
        device: device id (for the record only).
    Raises:
        ValueError: empty trace, mismatched lengths or non-finite values.
    """

    def __init__(self, t_s: Any, power_w: Any, *, lag_s: float = 0.0, source: str = "buffer",
                 device: int = 0) -> None:
        t = np.asarray(t_s, dtype=np.float64).ravel()
        p = np.asarray(power_w, dtype=np.float64).ravel()
        if t.shape != p.shape:
            raise ValueError(f"trace t_s and power_w differ in length ({t.size} vs {p.size})")
        if t.size == 0:
            raise ValueError("empty power trace: nothing to integrate (did the monitor run?)")
        if not (np.all(np.isfinite(t)) and np.all(np.isfinite(p))):
            raise ValueError("power trace has non-finite times or values")
        order = np.argsort(t, kind="stable")
        self.raw_t_s = t[order]
        self.power_w = p[order]
        self.lag_s = float(lag_s)
        self.source = source
        self.device = int(device)
        self.t_s = self.raw_t_s - self.lag_s
        # Energy from the first sample up to each sample time.
        self._cum = np.concatenate(([0.0], np.cumsum(self.power_w[:-1] * np.diff(self.t_s))))

    def shifted(self, lag_s: float) -> "PowerTrace":
        """The same samples with a different lag."""
        return PowerTrace(self.raw_t_s, self.power_w, lag_s=lag_s, source=self.source, device=self.device)

    def cumulative_j(self, x_s: Any) -> np.ndarray:
        """Energy from the first (shifted) sample time to each ``x_s``, J (negative before it)."""
        x = np.asarray(x_s, dtype=np.float64)
        k = np.searchsorted(self.t_s, x, side="right") - 1
        k = np.clip(k, 0, self.t_s.size - 1)  # before the first sample: hold it backwards
        return self._cum[k] + self.power_w[k] * (x - self.t_s[k])

    def energy_j(self, t0_s: float, t1_s: float) -> float:
        """Energy between two host times, J."""
        e = self.cumulative_j(np.array([t0_s, t1_s]))
        return float(e[1] - e[0])

    def energies_j(self, bounds_s: Any) -> np.ndarray:
        """Energy of each interval between consecutive ``bounds_s``, J (len(bounds_s) - 1)."""
        return np.diff(self.cumulative_j(np.asarray(bounds_s, dtype=np.float64)))

    def coverage(self, t0_s: float, t1_s: float) -> float:
        """Fraction of ``[t0_s, t1_s]`` lying between the first and last (shifted) sample, with
        the last sample credited for one median sample period."""
        if t1_s <= t0_s:
            return 1.0
        period = float(np.median(np.diff(self.t_s))) if self.t_s.size > 1 else 0.0
        lo, hi = self.t_s[0], self.t_s[-1] + period
        inside = max(0.0, min(t1_s, hi) - max(t0_s, lo))
        return inside / (t1_s - t0_s)

    def __len__(self) -> int:
        return int(self.t_s.size)


def integrate_zoh(t_s: Any, power_w: Any, t0_s: float, t1_s: float, *, lag_s: float = 0.0) -> float:
    """Energy (J) of a zero-order-hold trace between two host times, after shifting by ``lag_s``."""
    return PowerTrace(t_s, power_w, lag_s=lag_s).energy_j(t0_s, t1_s)


def traces_from_frame(df: pd.DataFrame, *, source: Optional[str] = None) -> list[PowerTrace]:
    """One :class:`PowerTrace` per device from a trace DataFrame (``t_s``, ``power_w``, and
    optionally ``device`` and ``source``), using the best source each device has (buffer >
    instant > average) unless ``source`` forces one.

    Raises:
        ValueError: missing columns, or no samples of the requested source.
    """
    for col in ("t_s", "power_w"):
        if col not in df.columns:
            raise ValueError(f"trace DataFrame lacks column {col!r} (needs t_s, power_w[, device, source])")
    devices = sorted(pd.unique(df["device"])) if "device" in df.columns else [0]
    out = []
    for dev in devices:
        d = df[df["device"] == dev] if "device" in df.columns else df
        if "source" in d.columns:
            have = set(d["source"].astype(str))
            choices = [source] if source is not None else [s for s in SOURCE_PREFERENCE if s in have]
            choices = [s for s in choices if s in have]
            if not choices:
                raise ValueError(f"device {dev}: no power samples of source {source!r} (have {sorted(have)})")
            src = choices[0]
            d = d[d["source"].astype(str) == src]
        else:
            src = source or "buffer"
        out.append(PowerTrace(d["t_s"].to_numpy(), d["power_w"].to_numpy(), source=src, device=int(dev)))
    return out


# ---------------------------------------------------------------------------------------------
# Lag


@dataclass(frozen=True)
class LagEstimate:
    """The sensor lag used for one device.

    Attributes:
        lag_s: the lag, s.
        method: ``trace`` (estimated from this trace), ``default`` (the trace had no usable
            edge; per-source default or the caller's calibration value) or ``given``.
        windows: number of activity windows the estimate used.
        contrast: depth of the objective's peak relative to its maximum (0 = flat: no edges).
    """

    lag_s: float
    method: str
    windows: int = 0
    contrast: float = 0.0


def estimate_lag(
    t_s: Any,
    power_w: Any,
    windows_s: Any,
    *,
    search_s: tuple[float, float] = (0.0, 0.1),
    resolution_s: float = 0.0005,
    default_lag_s: float = DEFAULT_LAG_S["buffer"],
    min_contrast: float = 0.01,
) -> LagEstimate:
    """Estimate the sensor lag from the trace and known activity windows.

    The lag is the shift that puts the most energy inside the windows (e.g. each request's
    ``[start, end]``): shifting the trace by the true lag aligns the power step at each
    request's start and end with the marks, and any other shift moves high-power samples out of
    the windows and idle ones in. Requests with idle gaps around them give sharp estimates;
    back-to-back windows with equal power on both sides give a flat objective, in which case
    ``default_lag_s`` is returned with ``method="default"``.

    With a coarsely sampled trace (the ~20 ms buffer) the estimate includes the hold delay of
    zero-order hold (on average half a sample period): that is the shift zero-order-hold
    integration needs, which is what this lag is used for.

    Args:
        t_s, power_w: the trace (host monotonic s, W).
        windows_s: (n, 2) array of ``[start, end]`` host times of GPU activity.
        search_s: lag range searched, s. resolution_s: grid step, s.
        default_lag_s: fallback (per-GPU calibration value, or DEFAULT_LAG_S[source]).
        min_contrast: relative peak depth below which the trace is deemed to have no edges.
    """
    w = np.asarray(windows_s, dtype=np.float64).reshape(-1, 2)
    w = w[w[:, 1] > w[:, 0]]
    if w.shape[0] == 0 or np.size(t_s) < 3:
        return LagEstimate(float(default_lag_s), "default", 0, 0.0)
    trace = PowerTrace(t_s, power_w)
    lags = np.arange(search_s[0], search_s[1] + resolution_s / 2, resolution_s)
    # Energy inside the windows for every candidate lag: E(x + L) with trace times t - L.
    ends = trace.cumulative_j(w[None, :, 1] + lags[:, None])
    starts = trace.cumulative_j(w[None, :, 0] + lags[:, None])
    j = (ends - starts).sum(axis=1)
    jmax, jmin = float(j.max()), float(j.min())
    contrast = (jmax - jmin) / abs(jmax) if jmax != 0 else 0.0
    if not math.isfinite(contrast) or contrast < min_contrast:
        return LagEstimate(float(default_lag_s), "default", int(w.shape[0]), float(contrast))
    # Centre of the plateau of maxima (J is piecewise linear; ties are common on coarse traces).
    best = lags[j >= jmax - 1e-9 * max(abs(jmax), 1.0)]
    return LagEstimate(float(0.5 * (best.min() + best.max())), "trace", int(w.shape[0]), float(contrast))


# ---------------------------------------------------------------------------------------------
# Steps and batches


def step_energies(trace: Union[PowerTrace, Sequence[PowerTrace]], bounds_s: Any) -> np.ndarray:
    """Energy of each step interval, J, summed over the given device traces."""
    traces = [trace] if isinstance(trace, PowerTrace) else list(trace)
    b = np.asarray(bounds_s, dtype=np.float64)
    return np.sum([t.energies_j(b) for t in traces], axis=0)


def split_steps(step_energy_j: Any, tokens_per_sequence: Any) -> np.ndarray:
    """Split each step's energy equally over the sequences still generating at that step.

    Args:
        step_energy_j: (S,) energy of each step, J.
        tokens_per_sequence: (B,) tokens generated by each sequence (sequence ``j`` takes part
            in steps ``0 .. n_j - 1``).
    Returns:
        (B, S) array: energy of token ``k`` of sequence ``j`` (0 where the sequence had
        finished). Columns sum to ``step_energy_j`` (a step with no active sequence is split
        over all of them).
    """
    e = np.asarray(step_energy_j, dtype=np.float64)
    n = np.asarray(tokens_per_sequence, dtype=np.int64).ravel()
    if n.size == 0:
        raise ValueError("a batch needs at least one sequence")
    active = np.arange(e.size)[None, :] < n[:, None]
    count = active.sum(axis=0)
    orphan = count == 0
    active[:, orphan] = True
    count = np.where(orphan, n.size, count)
    return active * (e / count)[None, :]


@dataclass(frozen=True)
class _Batch:
    bounds_s: np.ndarray
    tokens: np.ndarray
    request_ids: list[str]
    ttft_s: float


def _as_batch(obj: Any, ids: Optional[Sequence[str]], k: int) -> _Batch:
    if isinstance(obj, Mapping):
        bounds, tokens, ttft = obj["bounds_s"], obj["tokens_per_sequence"], obj.get("ttft_s")
    else:
        bounds, tokens = getattr(obj, "bounds_s"), getattr(obj, "tokens_per_sequence")
        ttft = getattr(obj, "ttft_s", None)
    b = np.asarray(bounds, dtype=np.float64).ravel()
    n = np.asarray(tokens, dtype=np.int64).ravel()
    if b.size < 2:
        raise ValueError(f"batch {k}: bounds_s needs at least start and end")
    d = np.diff(b)
    if np.any(d < -1e-6):
        raise ValueError(f"batch {k}: bounds_s goes backwards by {-d.min():.3g} s (marks from two streams?)")
    b = np.maximum.accumulate(b)  # sub-µs inversions from rounding
    if np.any(n < 0) or n.size == 0:
        raise ValueError(f"batch {k}: tokens_per_sequence must be >= 0 and non-empty")
    if n.max() > b.size - 1:
        raise ValueError(f"batch {k}: a sequence has {n.max()} tokens but only {b.size - 1} steps were marked")
    if ids is None:
        ids = [f"{k}:{j}" for j in range(n.size)]
    ids = [str(i) for i in ids]
    if len(ids) != n.size:
        raise ValueError(f"batch {k}: {len(ids)} request ids for {n.size} sequences")
    ttft = float(ttft) if ttft is not None and math.isfinite(float(ttft)) else float(b[1] - b[0])
    return _Batch(b, n, ids, ttft)


def request_tpot_s(bounds_s: Any, n: int) -> float:
    """Time per output token of a sequence with ``n`` tokens in a batch with step boundaries
    ``bounds_s``: ``(bounds_s[n] - bounds_s[1]) / (n - 1)`` (the decode steps, the first token's
    step excluded); NaN when ``n < 2``."""
    if n < 2:
        return float("nan")
    return (float(bounds_s[n]) - float(bounds_s[1])) / (n - 1)


def request_token_rows(bounds_s: Any, n: int, request_id: str, cell_id: Optional[str] = None,
                       energy_j: Any = None) -> list[dict]:
    """The ``tokens`` table rows of one sequence: token ``i`` spans step ``i`` of ``bounds_s``
    (token 0 is the prefill); ``energy_j[i]`` its energy (NaN for all when ``energy_j`` is None)."""
    return [{
        "cell_id": cell_id,
        "request_id": request_id,
        "token_index": i,
        "phase": "prefill" if i == 0 else "decode",
        "t_start_s": float(bounds_s[i]),
        "t_end_s": float(bounds_s[i + 1]),
        "energy_j": float(energy_j[i]) if energy_j is not None else math.nan,
    } for i in range(n)]


# ---------------------------------------------------------------------------------------------
# Attribution


@dataclass
class Attribution:
    """Result of :func:`attribute`.

    Attributes:
        requests: one dict per request with ``results.REQUEST_COLUMNS`` keys (request_id,
            batch_size, batch_index, tokens_out, ttft_s, tpot_s, latency_s, energy_j,
            prefill_energy_j, decode_energy_j, j_per_token, avg_power_w, energy_method, and
            energy_j_counter / idle_power_w / active_energy_j when given).
        tokens: the ``tokens`` table (``results.to_frame("tokens", ...)``).
        step_energy_j: per batch, the energy of each step, J.
        window_s: (t0, t1) of the window accounted for, host monotonic s.
        window_energy_j: trace energy over the window, J (all devices).
        attributed_energy_j: sum over requests, J. unattributed_energy_j: window energy outside
            every batch interval (gaps between generate calls), J. The two sum to
            ``window_energy_j``.
        counter_energy_j, residual_j, residual_pct: hardware counter delta over the window and
            ``window_energy_j`` minus it (None when no counter value was given).
        lags: per device, the lag used. energy_method: the trace source (buffer | instant | average).
        coverage: smallest fraction of the window covered by real samples over devices.
    """

    requests: list[dict]
    tokens: pd.DataFrame
    step_energy_j: list[np.ndarray]
    window_s: tuple[float, float]
    window_energy_j: float
    attributed_energy_j: float
    unattributed_energy_j: float
    counter_energy_j: Optional[float]
    residual_j: Optional[float]
    residual_pct: Optional[float]
    lags: dict[int, LagEstimate]
    energy_method: str
    coverage: float

    def request_frame(self) -> pd.DataFrame:
        """The requests as a typed ``requests`` table (other columns NA)."""
        return results.to_frame("requests", self.requests)

    def summary(self) -> dict:
        """Scalars for logs and the run manifest."""
        return {
            "window_s": self.window_s,
            "window_energy_j": self.window_energy_j,
            "attributed_energy_j": self.attributed_energy_j,
            "unattributed_energy_j": self.unattributed_energy_j,
            "counter_energy_j": self.counter_energy_j,
            "residual_j": self.residual_j,
            "residual_pct": self.residual_pct,
            "lag_s": {d: l.lag_s for d, l in self.lags.items()},
            "lag_method": {d: l.method for d, l in self.lags.items()},
            "energy_method": self.energy_method,
            "coverage": self.coverage,
            "requests": len(self.requests),
            "tokens": int(len(self.tokens)),
        }


def coerce_traces(trace: Any, source: Optional[str] = None) -> list[PowerTrace]:
    """The power trace argument of :func:`attribute` as a list of :class:`PowerTrace`, one per
    device: a ``Window.trace()`` DataFrame (``t_s``, ``power_w``[, ``device``, ``source``]; the
    best source per device unless ``source`` forces one), a ``(t_s, power_w)`` pair, or
    PowerTrace object(s).

    Raises:
        ConfigError: any other type. ValueError: as :func:`traces_from_frame` and PowerTrace.
    """
    if isinstance(trace, PowerTrace):
        return [trace]
    if isinstance(trace, pd.DataFrame):
        return traces_from_frame(trace, source=source)
    if isinstance(trace, (list, tuple)) and trace and all(isinstance(t, PowerTrace) for t in trace):
        return list(trace)
    if isinstance(trace, (list, tuple)) and len(trace) == 2:
        return [PowerTrace(trace[0], trace[1], source=source or "buffer")]
    raise ConfigError("trace must be a DataFrame (t_s, power_w[, device, source]), a (t_s, power_w) "
                      "pair or PowerTrace(s)")


def compensate_lag(
    traces: Sequence[PowerTrace],
    busy_windows_s: Any,
    *,
    lag_s: Union[None, float, Mapping[int, float]] = None,
    default_lag_s: Optional[float] = None,
    search_s: tuple[float, float] = (0.0, 0.1),
) -> tuple[list[PowerTrace], dict[int, LagEstimate]]:
    """Each device's trace shifted by its sensor lag, and the lag used per device.

    Args:
        traces: raw traces (their own ``lag_s`` is ignored; ``raw_t_s`` is shifted).
        busy_windows_s: (n, 2) ``[start, end]`` host times of GPU activity, not overlapping, for
            :func:`estimate_lag` (only used when ``lag_s`` is None).
        lag_s: None = estimate per device, falling back to ``default_lag_s``; a float for every
            device, or {device: lag} (devices not named get the fallback, method ``given``).
        default_lag_s: fallback / calibration value; None = ``DEFAULT_LAG_S[source]``.
        search_s: lag range searched, s.
    Returns:
        (shifted traces, {device: LagEstimate}); method ``trace``, ``default`` or ``given``.
    """
    out: list[PowerTrace] = []
    lags: dict[int, LagEstimate] = {}
    for tr in traces:
        fallback = default_lag_s if default_lag_s is not None else DEFAULT_LAG_S.get(tr.source, 0.0)
        if lag_s is None:
            est = estimate_lag(tr.raw_t_s, tr.power_w, busy_windows_s, search_s=search_s,
                               default_lag_s=fallback)
        else:
            val = lag_s.get(tr.device, fallback) if isinstance(lag_s, Mapping) else float(lag_s)
            est = LagEstimate(float(val), "given")
        lags[tr.device] = est
        out.append(tr.shifted(est.lag_s))
    return out, lags


def trace_method(traces: Sequence[PowerTrace]) -> str:
    """The traces' power source(s): ``buffer``, ``instant``, ``average``, or several joined by ``+``."""
    methods = sorted({t.source for t in traces})
    return methods[0] if len(methods) == 1 else "+".join(methods)


def attribute(
    trace: Any,
    batches: Any,
    *,
    request_ids: Optional[Sequence[Sequence[str]]] = None,
    cell_id: Optional[str] = None,
    window_s: Optional[tuple[float, float]] = None,
    lag_s: Union[None, float, Mapping[int, float]] = None,
    default_lag_s: Optional[float] = None,
    source: Optional[str] = None,
    counter_energy_j: Optional[float] = None,
    batch_counter_energy_j: Optional[Sequence[Optional[float]]] = None,
    idle_power_w: Optional[float] = None,
    lag_search_s: tuple[float, float] = (0.0, 0.1),
) -> Attribution:
    """Attribute the energy of a power trace to requests and tokens.

    Args:
        trace: ``Window.trace()`` DataFrame (``t_s``, ``power_w``, optional ``device``,
            ``source``), a ``(t_s, power_w)`` pair, or PowerTrace object(s). Energies are summed
            over devices (a model split over GPUs).
        batches: one ``generate`` timing or a sequence of them, in time order and not
            overlapping: objects with ``bounds_s`` (step boundaries, host s) and
            ``tokens_per_sequence`` (and optionally ``ttft_s``), e.g. ``TokenTimer.timing``.
        request_ids: per batch, one id per sequence (default ``"<batch>:<row>"``); with a single
            batch a flat list is accepted.
        cell_id: copied into every token row.
        window_s: the measurement window ``(t0, t1)``; widened to cover every batch.
            Default: first batch start to last batch end.
        lag_s: sensor lag to use (float, or {device: float}); None = estimate it from the trace
            around the batch intervals, falling back to ``default_lag_s``.
        default_lag_s: fallback/calibration lag; None = ``DEFAULT_LAG_S[source]``.
        source: force a trace source (buffer | instant | average); None = best per device.
        counter_energy_j: hardware counter delta over the window (e.g. ``Window.energy_j_counter``);
            gives ``residual_j`` / ``residual_pct``.
        batch_counter_energy_j: per batch, a counter delta over that batch; split equally over
            its requests into ``energy_j_counter``.
        idle_power_w: idle baseline; adds ``idle_power_w`` and ``active_energy_j`` (the request's
            energy minus its share of idle power over the batch latency).
    Returns:
        :class:`Attribution`.
    Raises:
        ConfigError: bad argument types. ValueError: inconsistent marks, overlapping batches or an
        empty trace.
    """
    if hasattr(batches, "bounds_s") or isinstance(batches, Mapping):
        batches = [batches]
        if request_ids is not None and len(request_ids) and isinstance(request_ids[0], str):
            request_ids = [request_ids]
    batches = list(batches)
    if not batches:
        raise ValueError("attribute() needs at least one batch timing")
    if request_ids is not None and len(request_ids) and isinstance(request_ids[0], str):
        if len(batches) != 1:
            raise ValueError("request_ids must be one list of ids per batch")
        request_ids = [request_ids]
    if request_ids is not None and len(request_ids) != len(batches):
        raise ValueError(f"{len(request_ids)} request id lists for {len(batches)} batches")
    bs = [_as_batch(b, None if request_ids is None else request_ids[k], k) for k, b in enumerate(batches)]
    for k in range(1, len(bs)):
        if bs[k].bounds_s[0] < bs[k - 1].bounds_s[-1] - 1e-6:
            raise ValueError(f"batch {k} starts before batch {k - 1} ends: batches must not overlap")
    if batch_counter_energy_j is not None and len(batch_counter_energy_j) != len(bs):
        raise ValueError("batch_counter_energy_j needs one value per batch")

    t0 = min(b.bounds_s[0] for b in bs)
    t1 = max(b.bounds_s[-1] for b in bs)
    if window_s is not None:
        t0, t1 = min(t0, float(window_s[0])), max(t1, float(window_s[1]))

    # Lag per device, then the shifted traces.
    windows = np.array([[b.bounds_s[0], b.bounds_s[-1]] for b in bs])
    traces, lags = compensate_lag(coerce_traces(trace, source), windows, lag_s=lag_s,
                                  default_lag_s=default_lag_s, search_s=lag_search_s)
    energy_method = trace_method(traces)

    requests: list[dict] = []
    token_rows: list[dict] = []
    step_e_all: list[np.ndarray] = []
    attributed = 0.0
    for k, b in enumerate(bs):
        step_e = step_energies(traces, b.bounds_s)
        step_e_all.append(step_e)
        share = split_steps(step_e, b.tokens)  # (B, S)
        latency = float(b.bounds_s[-1] - b.bounds_s[0])
        batch_energy = float(step_e.sum())
        attributed += batch_energy
        B = b.tokens.size
        counter_share = None
        if batch_counter_energy_j is not None and batch_counter_energy_j[k] is not None:
            counter_share = float(batch_counter_energy_j[k]) / B
        for j in range(B):
            n = int(b.tokens[j])
            row_e = share[j]
            energy = float(row_e.sum())
            prefill = float(row_e[0]) if row_e.size else 0.0
            row = {
                "request_id": b.request_ids[j],
                "batch_size": B,
                "batch_index": j,
                "tokens_out": n,
                "ttft_s": b.ttft_s,
                "tpot_s": request_tpot_s(b.bounds_s, n),
                "latency_s": latency,
                "energy_j": energy,
                "prefill_energy_j": prefill,
                "decode_energy_j": energy - prefill,
                "j_per_token": energy / n if n > 0 else float("nan"),
                "avg_power_w": batch_energy / latency if latency > 0 else float("nan"),
                "energy_method": energy_method,
            }
            if cell_id is not None:
                row["cell_id"] = cell_id
            if counter_share is not None:
                row["energy_j_counter"] = counter_share
            if idle_power_w is not None:
                row["idle_power_w"] = float(idle_power_w)
                row["active_energy_j"] = energy - float(idle_power_w) * latency / B
            requests.append(row)
            tok_e = row_e[:n].copy()
            if n and n < row_e.size:
                tok_e[-1] += row_e[n:].sum()  # orphan steps (see split_steps) go to the last token
            token_rows.extend(request_token_rows(b.bounds_s, n, b.request_ids[j], cell_id, tok_e))

    window_energy = float(sum(t.energy_j(t0, t1) for t in traces))
    unattributed = window_energy - attributed
    residual = residual_pct = None
    if counter_energy_j is not None:
        residual = window_energy - float(counter_energy_j)
        residual_pct = 100.0 * residual / float(counter_energy_j) if counter_energy_j else float("nan")
    coverage = min(t.coverage(t0, t1) for t in traces)
    return Attribution(
        requests=requests,
        tokens=results.to_frame("tokens", token_rows),
        step_energy_j=step_e_all,
        window_s=(float(t0), float(t1)),
        window_energy_j=window_energy,
        attributed_energy_j=attributed,
        unattributed_energy_j=unattributed,
        counter_energy_j=None if counter_energy_j is None else float(counter_energy_j),
        residual_j=residual,
        residual_pct=residual_pct,
        lags=lags,
        energy_method=energy_method,
        coverage=float(coverage),
    )
