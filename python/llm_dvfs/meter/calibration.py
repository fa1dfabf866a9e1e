"""Counter-anchored gain: the power trace's scale, fitted to the hardware energy counter.

The driver's sample buffer has the shape a short window needs (a sample every ~20 ms) but its
scale drifts from the energy counter by up to ~1 % on an H200 (docs/design.md). The counter
has the scale but changes only every ~100 ms and costs ~3 ms per read. So the monitor keeps
the buffer's shape and takes the scale from the counter: over a horizon of slow-lane counter
reads (default 120 s around the window), ``gain = Δcounter / ∫trace``, and a window's energy is
``gain × ∫trace`` over the window.

Counter model (measured on the H200, bench/nvml_probe.py): the counter's value changes every
100 ms and, at a change, equals the work's energy up to that instant; a read at a random
instant therefore returns the energy up to ``read - U(0, period)``, on average ``read -
period / 2``. Reads every second are at random phase, so each read's error is at most
``period × P``; over a horizon of ``H`` seconds the gain's error is ~``period / H`` at worst
and its standard error is estimated from independent blocks of the horizon.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Defaults: a 120 s horizon makes the counter's ±100 ms edge uncertainty ~0.05 % (1σ) of the
# gain; below 10 s of span the gain is not applied (edge error could reach ~1 %).
DEFAULT_HORIZON_S = 120.0
MIN_SPAN_S = 10.0
BLOCK_S = 5.0
MAX_GAIN_DEVIATION = 0.05  # a gain further from 1 means a broken lane, not a sensor scale error


@dataclass(frozen=True)
class Gain:
    """Scale of a power trace relative to the energy counter.

    ``gain`` multiplies the trace's energy; ``se`` is its standard error from the counter's
    staleness at the horizon's ends; ``span_s`` the seconds of counter reads it was fitted over; ``applied`` whether
    the monitor used it (False with ``reason`` when the span was too short or the fit
    implausible).
    """

    gain: float = 1.0
    se: float = float("nan")
    span_s: float = 0.0
    n_blocks: int = 0
    applied: bool = False
    reason: str = "no counter"


def cumulative(t: np.ndarray, p: np.ndarray, x: np.ndarray) -> np.ndarray:
    """∫ of the forward-held trace (t, p) from t[0] to each x (first sample held backwards)."""
    cum = np.concatenate(([0.0], np.cumsum(p[:-1] * np.diff(t))))
    k = np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 1)
    return cum[k] + p[k] * (x - t[k])


def _power_at(t: np.ndarray, p: np.ndarray, x: np.ndarray) -> np.ndarray:
    return p[np.clip(np.searchsorted(t, x, side="right") - 1, 0, len(t) - 1)]


def counter_gain(trace_t: np.ndarray, trace_w: np.ndarray, counter_t: np.ndarray,
                 counter_j: np.ndarray, t_lo: float, t_hi: float, *,
                 counter_period_s: float = 0.1, gaps: tuple[tuple[float, float], ...] = (),
                 min_span_s: float = MIN_SPAN_S, block_s: float = BLOCK_S) -> Gain:
    """Fit the trace's gain to the counter over the reads in ``[t_lo, t_hi]``.

    Args:
        trace_t, trace_w: the power trace on the work's timeline (lag already removed), sorted.
        counter_t, counter_j: counter reads (host time of the read, cumulative J), sorted.
        t_lo, t_hi: horizon, host s.
        counter_period_s: the counter's update period (a read shows the energy up to
            ``read - period / 2`` on average).
        gaps: ``(start, end)`` intervals where the trace lost samples: blocks touching them are
            left out.
    Returns a :class:`Gain`; never raises on short or empty input (``applied`` False).
    """
    if len(trace_t) < 2 or len(counter_t) < 2:
        return Gain(reason="no counter" if len(counter_t) < 2 else "no trace")
    sel = (counter_t >= t_lo) & (counter_t <= t_hi)
    ct = counter_t[sel] - counter_period_s / 2
    cj = counter_j[sel]
    # only reads inside the trace's coverage
    inside = (ct >= trace_t[0]) & (ct <= trace_t[-1])
    ct, cj = ct[inside], cj[inside]
    if len(ct) < 2:
        return Gain(reason="too few counter reads in the horizon")
    # blocks: consecutive reads at least block_s apart
    edges = [0]
    for i in range(1, len(ct)):
        if ct[i] - ct[edges[-1]] >= block_s:
            edges.append(i)
    if len(edges) < 2:
        edges = [0, len(ct) - 1]
    e_idx = np.asarray(edges)
    f = cumulative(trace_t, trace_w, ct[e_idx])
    d_trace = np.diff(f)
    d_ctr = np.diff(cj[e_idx])
    t0, t1 = ct[e_idx[:-1]], ct[e_idx[1:]]
    ok = d_trace > 0
    for g0, g1 in gaps:
        ok &= ~((t0 < g1) & (t1 > g0))
    if not ok.any():
        return Gain(reason="no gap-free block in the horizon")
    span = float(np.sum((t1 - t0)[ok]))
    g = float(np.sum(d_ctr[ok]) / np.sum(d_trace[ok]))
    n = int(ok.sum())
    # Standard error from the counter's staleness: each run of contiguous blocks contributes its
    # two end reads, each off by U(-period/2, period/2) × the power then (σ = period/√12).
    starts = np.flatnonzero(ok & ~np.concatenate(([False], ok[:-1])))
    ends = np.flatnonzero(ok & ~np.concatenate((ok[1:], [False])))
    p_edges = np.concatenate((_power_at(trace_t, trace_w, t0[starts]), _power_at(trace_t, trace_w, t1[ends])))
    se = float(g * counter_period_s / math.sqrt(12.0) * math.sqrt(float(np.sum(p_edges ** 2)))
               / float(np.sum(d_trace[ok])))
    if not math.isfinite(g):
        return Gain(reason="non-finite fit")
    if span < min_span_s:
        return Gain(g, se, span, n, False, f"span {span:.1f} s < {min_span_s:g} s")
    if abs(g - 1.0) > MAX_GAIN_DEVIATION:
        return Gain(g, se, span, n, False, f"implausible gain {g:.4f}")
    return Gain(g, se, span, n, True, "counter")
