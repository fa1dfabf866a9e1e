"""Counter-stitched window energy: the energy counter at its change instants, the buffer between.

The energy counter has the scale (it is the reference) but changes only every ~100 ms, so a read
at a random instant is stale by U(0, 100 ms): over a 10 s window that alone moves a counter delta
by up to ±1 % under load. The driver's sample buffer has the shape (a sample every ~20 ms) but
each window's buffer integral carries sampling noise of bursty power (20 ms samples; −0.5 …
+0.4 % on ~11 s H200 windows even after the counter-anchored gain, docs/design.md), which no gain
can remove. At an instant where the counter *changes*, though, it is exact: it equals the work's
energy up to about that instant (measured on an H200: the counter leads the buffer by about the
buffer's lag, so it is close to real time).

So the sampler brackets a change at each window edge (csrc/sampler.cpp: after a window-edge
request it reads the counter back to back, ~3 ms per read on an H200, until the value changes),
and a window ``[a, b]`` of at least ``STITCH_MIN_S`` is measured as::

    E_work(e) = V2 + g · (F(e) − F(u))          at each edge e ∈ {a, b}
    energy    = E_work(b) − E_work(a)

where two consecutive counter reads ``r1 < r2`` with values ``V1 != V2`` bracket a change near
``e`` (``r2 − r1 ≤ MAX_BRACKET_S``, the change instant ``u = (r1 + r2) / 2`` within
``EDGE_SEARCH_S`` of ``e``, before or after it), ``F`` is the cumulative energy of the lag-shifted
buffer trace (zero-order hold, the monitor's rule) and ``g`` the running counter-anchored gain
(meter/calibration.py; 1 while it is not applied). The counter gives the energy between the two
change instants; the buffer gives only the two slivers between each change instant and its edge
(at most ~100 ms each).

Error budget of one window (each edge; the two edges' terms add in quadrature, partly cancel):

* change-instant uncertainty: ``u`` lies in the bracket, ``|u − true| ≤ (r2 − r1) / 2``
  (σ = that / √3); the error is that times the power at the edge. H200: reads ~3.1 ms back to
  back → ±1.6 ms, ~1.1 J at 700 W, 0.2 J idle (a read delayed by a drain or a preempted thread
  widens its bracket). On several GPUs one thread reads them in turn, so each GPU's bracket is
  that many reads wide.
* the counter's own alignment: where inside a ~3 ms call the value is taken, and how far the
  change instant is from the instant up to which the counter counts (a few ms on the H200, not
  modelled): a common offset of both edges, so its error is the offset × the difference of the
  two edges' powers.
* the counter's resolution: 1 mJ, floor (negligible).
* the slivers: at most ~100 ms (one counter period, more when a bracket was not found at the
  edge's own request) of buffer, with the buffer's error there: its scale error after ``g``
  (``gain_se``, or ~1 % when no gain is applied) and its shape error (≤ one 20 ms sample interval
  × the power step, where the sliver holds a step).

The monitor records the result as a per-window gain ``g_w = stitched / raw buffer integral``
(``DeviceMeasurement.gain``, ``calibration == "counter_edges"``), so that the window's calibrated
trace (``Measurement.trace()``) integrates to ``energy_j`` and ``attribute()`` over the window
agrees with it; ``gain_se`` is the relative standard error of the budget above (first and third
terms), ``gain_span_s`` the seconds between the two change instants. Without a bracket at an edge
(bracketing off, an old sampler's data, failed reads, a buffer gap in a sliver) the window falls
back to buffer × running gain, and ``reason`` says why.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from llm_dvfs.meter.calibration import cumulative

# Windows shorter than this keep buffer × gain: the slivers (up to ~100 ms each) would be a large
# part of them, and the buffer's ~20 ms shape matters more than its scale there.
STITCH_MIN_S = 1.0
# Widest pair of consecutive reads accepted as bracketing a change (H200: ~3 ms back to back;
# 20 ms leaves room for a drain or a poll between two reads, and for several GPUs).
MAX_BRACKET_S = 0.02
# How far from its edge a change instant may be (before or after it).
EDGE_SEARCH_S = 0.5
# How long after an edge the sampler may still be bracketing (kBracketMaxNs is 130 ms from its
# first read, which may wait for a poll): a window end waits at most this for its bracket.
BRACKET_WAIT_S = 0.2
# Relative error assumed for the buffer in a sliver when no running gain is applied (its scale
# is up to ~1 % off the counter on an H200), and the weight of a sliver's length against a
# bracket's half-width when choosing among brackets (the same ~1 %).
SLIVER_REL_ERR = 0.01
# A per-window gain further from 1 than this means a counter anomaly, not the buffer's noise.
MAX_WINDOW_GAIN_DEVIATION = 0.1


@dataclass(frozen=True)
class Bracket:
    """A counter change bracketed by two consecutive reads: instant ``u_s`` (host monotonic s),
    ``half_width_s`` (its uncertainty), the counter after it ``energy_mj``."""

    u_s: float
    half_width_s: float
    energy_mj: int


@dataclass(frozen=True)
class Stitch:
    """A window's counter-stitched energy (``applied``) or why it was not (``reason``)."""

    energy_j: float = float("nan")
    se_j: float = float("nan")
    span_s: float = 0.0
    start: Optional[Bracket] = None
    end: Optional[Bracket] = None
    applied: bool = False
    reason: str = "not tried"


def find_bracket(counter_t: np.ndarray, counter_mj: np.ndarray, counter_dur: np.ndarray, e: float, *,
                 max_width_s: float = MAX_BRACKET_S, search_s: float = EDGE_SEARCH_S) -> Optional[Bracket]:
    """The counter change nearest in value to the edge ``e``: among consecutive reads whose values
    differ, at most ``max_width_s`` apart, with the change instant within ``search_s`` of ``e``,
    the one with the smallest expected error (half-width + ``SLIVER_REL_ERR`` × distance).

    ``counter_t``: read instants (call midpoints, host s, sorted); ``counter_mj``: values (mJ);
    ``counter_dur``: call durations (s; not used by the rule, kept for the record's shape)."""
    lo = max(int(np.searchsorted(counter_t, e - search_s - max_width_s)) - 1, 0)
    hi = int(np.searchsorted(counter_t, e + search_s + max_width_s, side="right")) + 1
    t = counter_t[lo:hi]
    if len(t) < 2:
        return None
    v = counter_mj[lo:hi].astype(np.int64)
    dt = np.diff(t)
    ch = np.flatnonzero((np.diff(v) != 0) & (dt <= max_width_s) & (dt > 0))
    if not len(ch):
        return None
    u = 0.5 * (t[ch] + t[ch + 1])
    # Each read returns the value at some instant of its call; taken to lie at the same place in
    # every call, the change lies between the two reads' instants: u ± half the pair's spacing.
    # (Where in the call that instant is, is common to both edges: the alignment term.)
    half = 0.5 * dt[ch]
    near = np.abs(u - e) <= search_s
    if not near.any():
        return None
    score = np.where(near, half + SLIVER_REL_ERR * np.abs(u - e), np.inf)
    i = int(np.argmin(score))
    return Bracket(float(u[i]), float(half[i]), int(v[ch[i] + 1]))


def edge_settled(counter_t: np.ndarray, counter_mj: np.ndarray, e: float) -> tuple[bool, float]:
    """Whether the sampler's bracket after edge ``e`` is over: (done, instant up to which the
    buffer must cover the window). Done when two consecutive reads at most ``MAX_BRACKET_S`` apart,
    the second after ``e``, show a change, or when reads went on ``BRACKET_WAIT_S`` past ``e``."""
    j = max(int(np.searchsorted(counter_t, e)) - 1, 0)
    t = counter_t[j:]
    if len(t) < 2:
        return False, e
    v = counter_mj[j:].astype(np.int64)
    ch = np.flatnonzero((np.diff(v) != 0) & (np.diff(t) <= MAX_BRACKET_S) & (t[1:] >= e))
    if len(ch):
        return True, float(t[ch[0] + 1])
    last = float(t[-1])
    return last >= e + BRACKET_WAIT_S, e


def _hold_between(t: np.ndarray, p: np.ndarray, x0: float, x1: float) -> float:
    """∫ of the forward-held trace from x0 to x1 (signed: negative when x1 < x0)."""
    lo = max(int(np.searchsorted(t, min(x0, x1), side="right")) - 2, 0)
    hi = int(np.searchsorted(t, max(x0, x1), side="right")) + 1
    f = cumulative(t[lo:hi], p[lo:hi], np.array([x0, x1]))
    return float(f[1] - f[0])


def _covered(t: np.ndarray, x0: float, x1: float, gaps: tuple[tuple[float, float], ...]) -> bool:
    """The trace holds a sample at or before x0 and one at or after x1, and no lost samples."""
    lo, hi = min(x0, x1), max(x0, x1)
    if not len(t) or t[0] > lo or t[-1] < hi:
        return False
    return not any(g0 < hi and g1 > lo for g0, g1 in gaps)


def stitch_window(trace_t: np.ndarray, trace_w: np.ndarray, counter_t: np.ndarray, counter_mj: np.ndarray,
                  counter_dur: np.ndarray, a: float, b: float, *, gain: float = 1.0,
                  gain_rel_se: Optional[float] = None, gaps: tuple[tuple[float, float], ...] = ()) -> Stitch:
    """Counter-stitched energy of ``[a, b]``, J (see the module docstring).

    Args:
        trace_t, trace_w: the buffer trace on the work's timeline (lag already removed), sorted.
        counter_t, counter_mj, counter_dur: counter reads (instant, mJ, call duration), sorted.
        gain: the running gain applied to the slivers; gain_rel_se: its relative standard error
            (None: not applied, ``SLIVER_REL_ERR`` assumed).
        gaps: ``(start, end)`` intervals of lost buffer samples on the work's timeline.
    Never raises on short or empty input (``applied`` False with ``reason``).
    """
    if b - a < STITCH_MIN_S:
        return Stitch(reason=f"window {b - a:.2f} s < {STITCH_MIN_S:g} s")
    if len(counter_t) < 2 or len(trace_t) < 2:
        return Stitch(reason="no counter reads" if len(counter_t) < 2 else "no trace")
    ends = []
    for side, e in (("start", a), ("end", b)):
        br = find_bracket(counter_t, counter_mj, counter_dur, e)
        if br is None:
            return Stitch(reason=f"no counter change bracketed near the window's {side}")
        if not _covered(trace_t, e, br.u_s, gaps):
            return Stitch(reason=f"buffer does not cover the {side} sliver")
        ends.append(br)
    s, t = ends
    if not t.u_s > s.u_s:
        return Stitch(reason="one counter change brackets both edges")
    sliver_a = gain * _hold_between(trace_t, trace_w, s.u_s, a)
    sliver_b = gain * _hold_between(trace_t, trace_w, t.u_s, b)
    energy = (t.energy_mj - s.energy_mj) * 1e-3 + sliver_b - sliver_a
    rel = SLIVER_REL_ERR if gain_rel_se is None or not math.isfinite(gain_rel_se) else gain_rel_se
    var = 2 * (1e-3 ** 2) / 12.0
    for br, sliver in ((s, sliver_a), (t, sliver_b)):
        k = int(np.clip(np.searchsorted(trace_t, br.u_s, side="right") - 1, 0, len(trace_t) - 1))
        var += (gain * float(trace_w[k]) * br.half_width_s) ** 2 / 3.0 + (rel * sliver) ** 2
    return Stitch(energy, math.sqrt(var), t.u_s - s.u_s, s, t, True, "counter_edges")
