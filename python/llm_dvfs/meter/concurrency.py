"""Per-request and per-token energy when requests share the GPU (continuous batching, servers).

Plain data in, like :mod:`llm_dvfs.meter.attribution` (no torch, no monitor): a power trace,
the requests an engine served (:class:`ServedRequest`: arrival, admission, every token's emission
time, end) and, when the engine exposes them, its forward steps (:class:`EngineStep`: which
requests each step served and how many prefill / decode tokens of each).

The rule (docs/attribution.md, "Attribution under concurrency")
---------------------------------------------------------------
The window ``[t0, t1]`` is cut at every step edge, arrival, admission, token emission and end
into segments. Each segment's energy (zero-order hold, lag-compensated, summed over devices) is
given to exactly one of: the requests (split by the fractions below), ``idle_energy_j`` (no
request in flight) or ``unattributed_energy_j`` (GPU work the data names no reported request
for). A request is *in flight* from ``t_arrival_s`` to ``t_end_s``; a request with no output
token (failed) is never in flight and gets zero energy.

* **Engine steps** (``energy_method = "engine_steps"``). Inside a step, request ``r`` gets the
  fraction ``(w_p·p_r + w_d·d_r) / Σ(w_p·p + w_d·d)`` (:class:`PhaseWeights`). Shares of ids that
  are not among the requests, or of failed requests, and whole steps with no tokens, are
  unattributed. Between steps (host time: sampling, scheduling, output handling of the step
  just run) the previous step's weights apply, over those of its requests still in flight; if
  none is, the next step's, over those already in flight; if neither step has one in flight,
  the energy is split equally over the requests in flight; with none in flight it is idle.
* **Token timestamps** (``energy_method = "token_timestamps"``, no steps: an OpenAI-compatible
  server seen from outside). Token ``k`` of a request occupies ``[t_{k-1}, t_k]``; the first
  token's interval ``[t_admit or t_arrival, t_first]`` is its prefill. Each interval carries
  work ``w_p·n_prompt`` (the first) or ``w_d`` (the others), spread evenly over the interval
  (a work *rate*), and at each instant the power is split in proportion to the rates of the
  intervals covering it. With decode tokens emitted once per engine step this reproduces the
  step rule; a prefill whose position inside a long interval (queueing the client cannot see)
  is unknown is spread over it instead of being charged at full weight while it waited. In
  flight but covered by no interval (before admission, after the last token): split equally
  over the requests in flight only if no interval covers the instant.

Tokens that share one emission time (a streamed chunk carrying several) share that interval,
split by their work. Per request: energy before the first token's stamp (prefill, queueing) is
its first token's, energy after its last stamp (returning) is its last token's, so token
energies sum exactly to the request's; ``prefill_energy_j`` is the first token's energy.

Invariant: Σ requests + idle + unattributed = window energy (``ServedAttribution.summary()``
reports the residual, float rounding only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd

from llm_dvfs import schema as results
from llm_dvfs.errors import ConfigError
from llm_dvfs.meter.attribution import (LagEstimate, coerce_traces, compensate_lag, request_token_rows,
                                        trace_method)
# The input types live in served.py (kept short); they are part of this module's interface.
from llm_dvfs.meter.served import DEFAULT_WEIGHTS_SOURCE, EngineStep, PhaseWeights, ServedRequest

__all__ = [
    "ENGINE_STEPS",
    "TOKEN_TIMESTAMPS",
    "ServedRequest",
    "EngineStep",
    "PhaseWeights",
    "DEFAULT_WEIGHTS_SOURCE",
    "ServedAttribution",
    "attribute_served",
]

ENGINE_STEPS = "engine_steps"
TOKEN_TIMESTAMPS = "token_timestamps"

UNATTRIBUTED_REASONS = ("unknown_requests", "failed_requests", "empty_steps")

# Timestamps from different host threads may disagree by rounding; beyond this it is a bug.
_TOL_S = 1e-6


# ---------------------------------------------------------------------------------------------
# Result


@dataclass
class ServedAttribution:
    """Result of :func:`attribute_served`.

    Attributes:
        requests: one dict per request, ``results.REQUEST_COLUMNS`` keys: request_id, tokens_in,
            tokens_out, ttft_s, tpot_s, latency_s, energy_j, prefill_energy_j, decode_energy_j,
            j_per_token (NaN without tokens), avg_power_w (GPU power over the request's life),
            energy_method, t_arrival_s, t_start_s, t_end_s, queue_s, and cell_id /
            idle_power_w / active_energy_j (energy minus idle power over the request's share of
            time) when given.
        tokens: the ``tokens`` table (``results.to_frame("tokens", ...)``).
        window_s: (t0, t1) accounted for, host monotonic s (widened to cover every request).
        window_energy_j: trace energy over the window, J (all devices).
        attributed_energy_j: sum over requests, J. idle_energy_j: no request in flight, J.
        unattributed_energy_j: GPU work named for no reported request, J;
            ``unattributed_by_reason`` splits it (unknown_requests, failed_requests,
            empty_steps).
        energy_method: ``engine_steps`` or ``token_timestamps``. trace_source: buffer | instant
            | average (``+``-joined across devices).
        lags: per device, the lag used. weights: the PhaseWeights applied.
        step_energy_j: per step (in input order), its in-window energy, J (None without steps).
        failed: ids of requests without output tokens (zero energy).
        not_in_steps: ids of requests with tokens that no step names (they got only energy
            between steps).
        coverage: smallest fraction of the window covered by real samples over devices.
        counter_energy_j, residual_j, residual_pct: as in :class:`~llm_dvfs.meter.attribution.Attribution`.
    """

    requests: list[dict]
    tokens: pd.DataFrame
    window_s: tuple[float, float]
    window_energy_j: float
    attributed_energy_j: float
    idle_energy_j: float
    unattributed_energy_j: float
    unattributed_by_reason: dict[str, float]
    energy_method: str
    trace_source: str
    lags: dict[int, LagEstimate]
    weights: PhaseWeights
    step_energy_j: Optional[np.ndarray]
    failed: list[str]
    not_in_steps: list[str]
    coverage: float
    counter_energy_j: Optional[float] = None
    residual_j: Optional[float] = None
    residual_pct: Optional[float] = None

    def request_frame(self) -> pd.DataFrame:
        """The requests as a typed ``requests`` table (other columns NA)."""
        return results.to_frame("requests", self.requests)

    @property
    def sum_check_j(self) -> float:
        """Window energy minus (requests + idle + unattributed), J: float rounding only."""
        return self.window_energy_j - (self.attributed_energy_j + self.idle_energy_j + self.unattributed_energy_j)

    def summary(self) -> dict:
        """Scalars for logs and the run manifest, with the sum check."""
        scale = max(abs(self.window_energy_j), 1e-300)
        return {
            "window_s": self.window_s,
            "window_energy_j": self.window_energy_j,
            "attributed_energy_j": self.attributed_energy_j,
            "idle_energy_j": self.idle_energy_j,
            "unattributed_energy_j": self.unattributed_energy_j,
            "unattributed_by_reason": dict(self.unattributed_by_reason),
            "sum_check_j": self.sum_check_j,
            "sum_check_rel": abs(self.sum_check_j) / scale,
            "energy_method": self.energy_method,
            "trace_source": self.trace_source,
            "lag_s": {d: l.lag_s for d, l in self.lags.items()},
            "lag_method": {d: l.method for d, l in self.lags.items()},
            "weights": {"prefill_per_token": self.weights.prefill_per_token,
                        "decode_per_token": self.weights.decode_per_token, "source": self.weights.source},
            "coverage": self.coverage,
            "counter_energy_j": self.counter_energy_j,
            "residual_j": self.residual_j,
            "residual_pct": self.residual_pct,
            "requests": len(self.requests),
            "failed": len(self.failed),
            "not_in_steps": len(self.not_in_steps),
            "tokens": int(len(self.tokens)),
        }


# ---------------------------------------------------------------------------------------------
# Validation


@dataclass(frozen=True)
class _Req:
    """A validated request: times clamped into order, emission groups precomputed."""

    src: ServedRequest
    start: float           # t_admit or t_arrival: the first token's interval starts here
    times: np.ndarray      # token emission times (with duplicates), len n_output_tokens
    live: bool             # has tokens: in flight from arrival to end


def _check_request(r: ServedRequest, k: int) -> _Req:
    if not isinstance(r, ServedRequest):
        raise ConfigError(f"requests[{k}] is a {type(r).__name__}, not a ServedRequest")
    rid = r.request_id
    a, e = float(r.t_arrival_s), float(r.t_end_s)
    if not (math.isfinite(a) and math.isfinite(e)):
        raise ValueError(f"request {rid!r}: non-finite t_arrival_s or t_end_s")
    if e < a - _TOL_S:
        raise ValueError(f"request {rid!r}: ends {a - e:.3g} s before it arrives")
    e = max(e, a)
    if r.n_prompt_tokens < 0 or r.n_output_tokens < 0:
        raise ValueError(f"request {rid!r}: negative token count")
    start = a
    if r.t_admit_s is not None:
        start = float(r.t_admit_s)
        if not math.isfinite(start) or start < a - _TOL_S or start > e + _TOL_S:
            raise ValueError(f"request {rid!r}: t_admit_s {start} is not within [arrival, end]")
        start = min(max(start, a), e)
    t = r.token_times_s
    if t.size != r.n_output_tokens:
        raise ValueError(f"request {rid!r}: {t.size} token times for n_output_tokens={r.n_output_tokens} "
                         "(tokens of one streamed chunk repeat the chunk's time)")
    if t.size:
        if not np.all(np.isfinite(t)):
            raise ValueError(f"request {rid!r}: non-finite token times")
        if np.any(np.diff(t) < -_TOL_S):
            raise ValueError(f"request {rid!r}: token times go backwards")
        if t[0] < start - _TOL_S or t[-1] > e + _TOL_S:
            raise ValueError(f"request {rid!r}: token times [{t[0]}, {t[-1]}] outside "
                             f"[{'admission' if r.t_admit_s is not None else 'arrival'}, end] = [{start}, {e}]")
        t = np.clip(np.maximum.accumulate(t), start, e)
    return _Req(r, start, t, bool(t.size))


def _check_steps(steps: Sequence[EngineStep]) -> tuple[np.ndarray, list[EngineStep]]:
    """Steps in time order, and the input position of each. Overlaps under 1 µs (clock rounding)
    are tolerated: the later step owns the shared instant."""
    steps = list(steps)
    for k, s in enumerate(steps):
        if not isinstance(s, EngineStep):
            raise ConfigError(f"steps[{k}] is a {type(s).__name__}, not an EngineStep")
        if not (math.isfinite(s.t_start_s) and math.isfinite(s.t_end_s)) or s.t_end_s < s.t_start_s - _TOL_S:
            raise ValueError(f"step {k}: bad interval [{s.t_start_s}, {s.t_end_s}]")
        for kind, d in (("prefill_tokens", s.prefill_tokens), ("decode_tokens", s.decode_tokens)):
            if any(int(v) != v or v < 0 for v in d.values()):
                raise ValueError(f"step {k}: {kind} must be non-negative integers")
    order = np.argsort([s.t_start_s for s in steps], kind="stable")
    prev_end = -math.inf
    for k in order:
        s = steps[k]
        if s.t_start_s < prev_end - _TOL_S:
            raise ValueError(f"step {k} starts {prev_end - s.t_start_s:.3g} s before the previous step ends: "
                             "engine steps must be sequential")
        prev_end = max(prev_end, s.t_end_s)
    return order, [steps[k] for k in order]


def _merge(spans: list[tuple[float, float]]) -> list[list[float]]:
    out: list[list[float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def _busy_windows(reqs: list[_Req], steps: Optional[list[EngineStep]]) -> np.ndarray:
    """When the GPU worked, for the lag estimate (non-overlapping): busy periods (union of the
    requests' service spans and the steps), each tightened to its first step start and last step
    end where steps exist, since arrival precedes the first step's power rise."""
    spans = [(r.start, float(r.src.t_end_s)) for r in reqs if r.live]
    spans += [(s.t_start_s, s.t_end_s) for s in steps or ()]
    starts = np.array([s.t_start_s for s in steps or ()], dtype=np.float64)  # sorted, sequential
    ends = np.maximum.accumulate(np.array([s.t_end_s for s in steps or ()], dtype=np.float64))
    out = []
    for a, b in _merge(spans):
        i0 = int(np.searchsorted(starts, a, side="left"))
        i1 = int(np.searchsorted(ends, b, side="right"))  # steps i0 .. i1-1 lie inside [a, b]
        if i1 > i0:
            a, b = float(starts[i0]), float(ends[i1 - 1])
        out.append([a, b])
    return np.array(out, dtype=np.float64).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# Shares: (segment, request, fraction) triplets, and which segments are idle / unattributed

Shares = tuple[np.ndarray, np.ndarray, np.ndarray]  # segment index, request index, fraction


def _step_shares(bp: np.ndarray, reqs: list[_Req], index: Mapping[str, int], steps: list[EngineStep],
                 w: PhaseWeights) -> tuple[Shares, np.ndarray, dict[str, np.ndarray], set[int]]:
    """The engine-steps rule on the grid ``bp`` (segment j = [bp[j], bp[j+1]])."""
    S = bp.size - 1
    seg_l: list[int] = []
    req_l: list[int] = []
    frac_l: list[float] = []
    idle = np.zeros(S, dtype=bool)
    unattr = {k: np.zeros(S) for k in UNATTRIBUTED_REASONS}
    # per step: known live requests' weights, weights of ids not reported / failed, total
    known: list[list[tuple[int, float]]] = []
    lost: list[tuple[float, float]] = []
    named: set[int] = set()
    for s in steps:
        acc: dict[int, float] = {}
        unknown = failed = 0.0
        for kind, d in ((0, s.prefill_tokens), (1, s.decode_tokens)):
            for rid, n in d.items():
                x = w.work(n, 0) if kind == 0 else w.work(0, n)
                i = index.get(str(rid))
                if i is None:
                    unknown += x
                elif not reqs[i].live:
                    failed += x
                else:
                    acc[i] = acc.get(i, 0.0) + x
                    named.add(i)
        known.append(sorted(acc.items()))
        lost.append((unknown, failed))
    st = np.searchsorted(bp, np.clip([s.t_start_s for s in steps], bp[0], bp[-1]))
    en = np.searchsorted(bp, np.clip([s.t_end_s for s in steps], bp[0], bp[-1]))
    step_of = np.full(S, -1, dtype=np.int64)
    for k in range(len(steps)):
        step_of[st[k]:en[k]] = k
    live = [i for i, r in enumerate(reqs) if r.live]
    arr = np.zeros(len(reqs), dtype=np.int64)
    end = np.zeros(len(reqs), dtype=np.int64)
    arr[live] = np.searchsorted(bp, [reqs[i].src.t_arrival_s for i in live])
    end[live] = np.searchsorted(bp, [reqs[i].src.t_end_s for i in live])
    by_arr = sorted(live, key=lambda i: arr[i])
    by_end = sorted(live, key=lambda i: end[i])
    inflight: set[int] = set()
    pa = pe = 0

    def put(j: int, items: list[tuple[int, float]], tot: float) -> None:
        for i, x in items:
            seg_l.append(j)
            req_l.append(i)
            frac_l.append(x / tot)

    for j in range(S):  # in time order, keeping the set of requests in flight
        while pa < len(by_arr) and arr[by_arr[pa]] <= j:
            inflight.add(by_arr[pa])
            pa += 1
        while pe < len(by_end) and end[by_end[pe]] <= j:
            inflight.discard(by_end[pe])
            pe += 1
        k = int(step_of[j])
        if k >= 0:
            unknown, failed = lost[k]
            tot = sum(x for _, x in known[k]) + unknown + failed
            if tot <= 0:
                unattr["empty_steps"][j] = 1.0
                continue
            put(j, [(i, x) for i, x in known[k] if x > 0], tot)
            unattr["unknown_requests"][j] = unknown / tot
            unattr["failed_requests"][j] = failed / tot
            continue
        # between steps: previous step's requests still in flight, else the next step's
        prev = int(np.searchsorted(st, j, side="right")) - 1
        items: list[tuple[int, float]] = []
        for cand in (prev, prev + 1):
            if 0 <= cand < len(steps):
                items = [(i, x) for i, x in known[cand] if x > 0 and arr[i] <= j < end[i]]
                if items:
                    break
        if items:
            put(j, items, sum(x for _, x in items))
        elif inflight:
            put(j, [(i, 1.0) for i in sorted(inflight)], float(len(inflight)))
        else:
            idle[j] = True
    shares = (np.asarray(seg_l, dtype=np.int64), np.asarray(req_l, dtype=np.int64), np.asarray(frac_l))
    return shares, idle, unattr, named


def _groups(r: _Req, w: PhaseWeights) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Emission groups of a request: unique times, tokens per group, and each token's work
    (the first token carries the prefill: ``w_p · max(n_prompt, 1)``; the others ``w_d``)."""
    times, counts = np.unique(r.times, return_counts=True)
    tok_work = np.full(r.times.size, float(w.decode_per_token))
    if tok_work.size:
        tok_work[0] = float(w.prefill_per_token) * max(int(r.src.n_prompt_tokens), 1)
    return times, counts, tok_work


def _timestamp_shares(bp: np.ndarray, reqs: list[_Req], w: PhaseWeights) -> tuple[Shares, np.ndarray]:
    """The token-timestamps rule on the grid ``bp``: work rates of the emission intervals."""
    S = bp.size - 1
    seg_l, req_l, rho_l = [], [], []
    live = [i for i, r in enumerate(reqs) if r.live]
    for i in live:
        r = reqs[i]
        times, counts, tok_work = _groups(r, w)
        bounds = np.concatenate(([r.start], times))
        # work of each emission interval = the work of the tokens it delivered
        work = np.add.reduceat(tok_work, np.concatenate(([0], np.cumsum(counts)[:-1])))
        dur = np.diff(bounds)
        rate = np.where(dur > 0, work / np.where(dur > 0, dur, 1.0), 0.0)
        bidx = np.searchsorted(bp, bounds)
        lengths = np.where(rate > 0, np.diff(bidx), 0)
        n = int(lengths.sum())
        if n == 0:
            continue
        first = np.repeat(bidx[:-1], lengths)
        offs = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        seg_l.append(first + offs)
        req_l.append(np.full(n, i, dtype=np.int64))
        rho_l.append(np.repeat(rate, lengths))
    seg = np.concatenate(seg_l) if seg_l else np.zeros(0, dtype=np.int64)
    req = np.concatenate(req_l) if req_l else np.zeros(0, dtype=np.int64)
    rho = np.concatenate(rho_l) if rho_l else np.zeros(0)
    total = np.bincount(seg, weights=rho, minlength=S)
    frac = rho / total[seg] if seg.size else rho
    # requests in flight per segment; where no interval covers, split equally over them
    diff = np.zeros(S + 1)
    arr = np.searchsorted(bp, [reqs[i].src.t_arrival_s for i in live]).astype(np.int64)
    end = np.searchsorted(bp, [reqs[i].src.t_end_s for i in live]).astype(np.int64)
    np.add.at(diff, arr, 1.0)
    np.add.at(diff, end, -1.0)
    count = np.cumsum(diff)[:S]
    uncovered = (total <= 0) & (count > 0.5)
    segs, rqs, fracs = [seg], [req], [frac]
    for k, i in enumerate(live):
        js = np.arange(arr[k], end[k])
        js = js[uncovered[js]]
        if js.size:
            segs.append(js)
            rqs.append(np.full(js.size, i, dtype=np.int64))
            fracs.append(1.0 / count[js])
    return (np.concatenate(segs), np.concatenate(rqs), np.concatenate(fracs)), count < 0.5


# ---------------------------------------------------------------------------------------------
# The entry point


def attribute_served(
    trace: Any,
    requests: Sequence[ServedRequest],
    steps: Optional[Sequence[EngineStep]] = None,
    *,
    window_s: Optional[tuple[float, float]] = None,
    lag_s: Union[None, float, Mapping[int, float]] = None,
    weights: PhaseWeights = PhaseWeights(),
    idle_power_w: Optional[float] = None,
    default_lag_s: Optional[float] = None,
    source: Optional[str] = None,
    cell_id: Optional[str] = None,
    counter_energy_j: Optional[float] = None,
    lag_search_s: tuple[float, float] = (0.0, 0.1),
) -> ServedAttribution:
    """Attribute a power trace to requests that shared the GPU (rule: module docstring).

    Args:
        trace: as :func:`llm_dvfs.meter.attribution.attribute` accepts (``Window.trace()``
            DataFrame, ``(t_s, power_w)`` pair, PowerTrace(s)); devices are summed. Give it a
            margin around the window (the lag search looks past the edges).
        requests: the served requests (ids unique). Pass every request the engine served in the
            window, warm-up ones included, and filter the rows afterwards: work of requests not
            passed is unattributed inside steps and idle between them.
        steps: the engine's forward steps (``energy_method = "engine_steps"``); None = split by
            token timestamps (``"token_timestamps"``, endpoint mode).
        window_s: the window ``(t0, t1)``, widened to cover every request's [arrival, end];
            default: the span of the requests and steps. Steps are clipped to it.
        lag_s: sensor lag (float or {device: float}); None = estimated from the trace around
            the busy periods (steps where given), falling back to ``default_lag_s`` /
            ``DEFAULT_LAG_S[source]``; recorded in ``lags``.
        weights: prefill / decode token weights (:class:`PhaseWeights`).
        idle_power_w: idle baseline, W: adds ``idle_power_w`` and ``active_energy_j`` per request.
        source: force a trace source (buffer | instant | average). cell_id: copied into rows.
        counter_energy_j: hardware counter delta over the window: gives ``residual_j``.
        lag_search_s: lag range searched, s.
    Returns:
        :class:`ServedAttribution`.
    Raises:
        ConfigError: arguments of the wrong type. ValueError: duplicate ids, times out of order
        (token times backwards or outside [start, end], overlapping steps), token counts that
        disagree with the token times, nothing to attribute, an empty trace.
    """
    if not isinstance(weights, PhaseWeights):
        raise ConfigError(f"weights must be a PhaseWeights, got {type(weights).__name__}")
    reqs = [_check_request(r, k) for k, r in enumerate(requests)]
    index: dict[str, int] = {}
    for k, r in enumerate(reqs):
        if r.src.request_id in index:
            raise ValueError(f"duplicate request id {r.src.request_id!r}")
        index[r.src.request_id] = k
    order, sorted_steps = _check_steps(steps) if steps is not None else (None, None)

    spans = [(float(r.src.t_arrival_s), float(r.src.t_end_s)) for r in reqs]
    if window_s is not None:
        t0, t1 = float(window_s[0]), float(window_s[1])
        if not (math.isfinite(t0) and math.isfinite(t1)) or t1 < t0:
            raise ValueError(f"window_s must be finite with t0 <= t1, got {window_s}")
    else:
        spans += [(s.t_start_s, s.t_end_s) for s in sorted_steps or ()]
        if not spans:
            raise ValueError("attribute_served() needs requests, steps or window_s")
        t0, t1 = math.inf, -math.inf
    if reqs:
        t0, t1 = min(t0, min(a for a, _ in spans)), max(t1, max(b for _, b in spans))
    else:
        t0, t1 = min([t0] + [a for a, _ in spans]), max([t1] + [b for _, b in spans])

    traces, lags = compensate_lag(coerce_traces(trace, source), _busy_windows(reqs, sorted_steps),
                                  lag_s=lag_s, default_lag_s=default_lag_s, search_s=lag_search_s)

    def cum(x: Any) -> np.ndarray:
        return np.sum([tr.cumulative_j(x) for tr in traces], axis=0)

    # The grid: every time at which some request's share can change.
    pts = [np.array([t0, t1])]
    for r in reqs:
        pts.append(np.array([r.src.t_arrival_s, r.start, r.src.t_end_s]))
        pts.append(r.times)
    for s in sorted_steps or ():
        pts.append(np.array([s.t_start_s, s.t_end_s]))
    bp = np.unique(np.clip(np.concatenate(pts), t0, t1))
    if bp.size < 2:
        bp = np.array([t0, t0])  # an empty window: one segment of zero length
    cbp = cum(bp)
    seg_e = np.diff(cbp)
    seg_dur = np.diff(bp)

    unattr: dict[str, np.ndarray] = {}
    named: set[int] = set()
    if sorted_steps is not None:
        sh, idle, unattr, named = _step_shares(bp, reqs, index, sorted_steps, weights)
        method = ENGINE_STEPS
    else:
        sh, idle = _timestamp_shares(bp, reqs, weights)
        method = TOKEN_TIMESTAMPS
    seg, req, frac = sh
    contrib = frac * seg_e[seg]
    time_share = np.bincount(req, weights=frac * seg_dur[seg], minlength=len(reqs))
    o = np.lexsort((seg, req))
    seg, req, contrib = seg[o], req[o], contrib[o]
    lo = np.searchsorted(req, np.arange(len(reqs) + 1))

    rows: list[dict] = []
    token_rows: list[dict] = []
    attributed = 0.0
    for i, r in enumerate(reqs):
        s_i = seg[lo[i]:lo[i + 1]]
        c_cum = np.concatenate(([0.0], np.cumsum(contrib[lo[i]:lo[i + 1]])))
        total = float(c_cum[-1])
        attributed += total
        n = r.times.size
        tok_e = np.zeros(n)
        if n:
            times, counts, tok_work = _groups(r, weights)
            # energy attributed to the request before each emission time (grid index = segments before it)
            a_at = c_cum[np.searchsorted(s_i, np.searchsorted(bp, times))]
            group_e = np.diff(np.concatenate(([0.0], a_at)))
            group_e[-1] += total - a_at[-1]  # after the last stamp: the last token's
            g = np.repeat(np.arange(times.size), counts)
            g_work = np.bincount(g, weights=tok_work, minlength=times.size)
            share = np.where(g_work[g] > 0, tok_work / np.where(g_work[g] > 0, g_work[g], 1.0), 1.0 / counts[g])
            tok_e = group_e[g] * share
            token_rows.extend(request_token_rows(np.concatenate(([r.start], r.times)), n, r.src.request_id,
                                                 cell_id, tok_e))
        prefill = float(tok_e[0]) if n else 0.0
        life = float(r.src.t_end_s) - float(r.src.t_arrival_s)
        row = {
            "request_id": r.src.request_id,
            "tokens_in": int(r.src.n_prompt_tokens),
            "tokens_out": int(n),
            "ttft_s": r.src.ttft_s if n else math.nan,
            "tpot_s": r.src.tpot_s,
            "latency_s": r.src.latency_s,
            "energy_j": total,
            "prefill_energy_j": prefill,
            "decode_energy_j": total - prefill,
            "j_per_token": total / n if n else math.nan,
            "avg_power_w": float(cum(r.src.t_end_s) - cum(r.src.t_arrival_s)) / life if life > 0 else math.nan,
            "energy_method": method,
            "t_arrival_s": float(r.src.t_arrival_s),
            "t_start_s": r.start,
            "t_end_s": float(r.src.t_end_s),
            "queue_s": r.src.queue_s,
        }
        if cell_id is not None:
            row["cell_id"] = cell_id
        if idle_power_w is not None:
            row["idle_power_w"] = float(idle_power_w)
            row["active_energy_j"] = total - float(idle_power_w) * float(time_share[i])
        rows.append(row)

    window_energy = float(cum(t1) - cum(t0))
    by_reason = {k: float(np.sum(unattr[k] * seg_e)) if k in unattr else 0.0 for k in UNATTRIBUTED_REASONS}
    step_e = None
    if sorted_steps is not None:
        step_e = np.zeros(len(sorted_steps))
        edges = np.clip([[s.t_start_s, s.t_end_s] for s in sorted_steps], t0, t1).reshape(-1, 2)
        step_e[order] = cum(edges[:, 1]) - cum(edges[:, 0])
    residual = residual_pct = None
    if counter_energy_j is not None:
        residual = window_energy - float(counter_energy_j)
        residual_pct = 100.0 * residual / float(counter_energy_j) if counter_energy_j else math.nan
    return ServedAttribution(
        requests=rows,
        tokens=results.to_frame("tokens", token_rows),
        window_s=(float(t0), float(t1)),
        window_energy_j=window_energy,
        attributed_energy_j=attributed,
        idle_energy_j=float(seg_e[idle].sum()),
        unattributed_energy_j=float(sum(by_reason.values())),
        unattributed_by_reason=by_reason,
        energy_method=method,
        trace_source=trace_method(traces),
        lags=lags,
        weights=weights,
        step_energy_j=step_e,
        failed=[r.src.request_id for r in reqs if not r.live],
        not_in_steps=([r.src.request_id for i, r in enumerate(reqs) if r.live and i not in named]
                      if sorted_steps is not None else []),
        coverage=float(min(t.coverage(t0, t1) for t in traces)),
        counter_energy_j=None if counter_energy_j is None else float(counter_energy_j),
        residual_j=residual,
        residual_pct=residual_pct,
    )

