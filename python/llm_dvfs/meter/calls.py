"""Measuring model calls: a PowerMonitor window around each call, token marks inside it.

:class:`CallMeter` is the one place that knows how a model call is measured; the sweep's
runner (:mod:`llm_dvfs.workload.runner`) and the lm-evaluation-harness model
(:mod:`llm_dvfs.lm_eval.batches`) both measure through it.

Per call (``forward`` pass or ``generate``):

1. the model's CUDA devices are synchronised (no earlier queued work leaks into the window),
   a monitor window opens;
2. the call runs; a ``generate`` call under a :class:`~llm_dvfs.meter.timeline.TokenTimer`
   marks its start, the end of every step (the first ends the prefill) and its end;
3. the devices are synchronised again and the window closes (also when the call raises).

The result is a :class:`MeteredCall`: the window, its host-monotonic edges and the token
timing. Finalising a window waits until the sampler has delivered samples past its end (tens
of ms), so callers finalise (:meth:`MeteredCall.measurement`) once per cell, after its last
call. :meth:`CallMeter.attribute` then integrates the power trace over every step of the
cell's ``generate`` calls (one sensor-lag estimate for the whole cell,
:func:`llm_dvfs.meter.attribution.attribute`) and splits each step's energy over the sequences
still generating in it.

Without a GPU (no monitor, or one that is not ``available``) everything is timed on the host
clock: :meth:`MeteredCall.measurement` is a time-only :class:`Measurement` (energies NaN,
``energy_method = "none"``), and the attribution gives times only. Nothing here raises for a
missing GPU or CUDA driver library; torch is imported on first use.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

from llm_dvfs.meter.measurement import Measurement

log = logging.getLogger(__name__)

#: trace margin around a cell for the attribution's lag search (its default range is 0.1 s), s
TRACE_MARGIN_S = 0.25

#: the per-request values of the attribution that replace a request's window share
ATTRIBUTED_COLUMNS = ("ttft_s", "tpot_s", "latency_s", "energy_j", "prefill_energy_j", "decode_energy_j",
                      "j_per_token", "avg_power_w", "energy_method", "energy_j_counter", "idle_power_w",
                      "active_energy_j")


@dataclass
class MeteredCall:
    """One measured model call.

    Attributes:
        window: the monitor :class:`~llm_dvfs.meter.measurement.Window` (None when time only).
        t_start_s, t_end_s: the call's edges, host monotonic s.
        timing: the :class:`~llm_dvfs.meter.timeline.TokenTiming` of a ``generate`` call (None
            for forward passes or without token timing).
    """

    window: Any = None
    t_start_s: float = math.nan
    t_end_s: float = math.nan
    timing: Any = None

    @property
    def duration_s(self) -> float:
        return self.t_end_s - self.t_start_s

    def measurement(self) -> Measurement:
        """The window's :class:`Measurement` (finalised on the first call: may wait up to the
        monitor's finalise timeout), or a time-only one (NaN energies, ``energy_method``
        ``"none"``, no devices) when there is no window."""
        if self.window is None:
            return Measurement.time_only("call", self.t_start_s, self.t_end_s)
        return self.window.measurement()

    def errors(self) -> list[str]:
        """What makes the window's energy doubtful, as text: its NVML errors and the sampler
        records dropped during it (empty when time only)."""
        m = self.measurement()
        errs = [str(e) for e in m.errors]
        if m.dropped_records:
            errs.append(f"{m.dropped_records} sampler records dropped")
        return errs

    def set_tokens(self, tokens_per_sequence: Sequence[int]) -> None:
        """What each sequence of a ``generate`` call really generated: the timer counts to the
        first EOS only, so a sequence ended earlier by a stop string is padded after it, and
        those steps are not its tokens (nor its energy). No-op without token timing."""
        if self.timing is not None:
            import numpy as np
            self.timing = dataclasses.replace(self.timing,
                                              tokens_per_sequence=np.asarray(tokens_per_sequence, dtype=np.int64))


class CallMeter:
    """Windows around model calls on one device (see the module docstring).

    Args:
        monitor: a started :class:`~llm_dvfs.meter.monitor.PowerMonitor`; None or one that is
            not ``available`` = time only.
        device: the model's input device (``cuda:N``, ``cuda`` or ``cpu``), where token marks are
            taken.
        token_timing: mark every ``generate`` step (TTFT, TPOT, per-token rows and energy). When
            the timer cannot be built (no CUDA driver library) the calls are still measured,
            without marks, and :attr:`timing_error` says why.
        sync_devices: CUDA devices (ordinals or ``cuda:N``) synchronised at every window edge (a
            model split over GPUs needs all of them); None = ``device`` alone when it is a
            CUDA device.
    """

    #: the record the calls return (a subclass may carry more per call)
    record_type: type[MeteredCall] = MeteredCall

    def __init__(self, monitor: Any, device: str, token_timing: bool = True,
                 sync_devices: Optional[Sequence[Union[int, str]]] = None) -> None:
        self.monitor = monitor if (monitor is not None and getattr(monitor, "available", False)) else None
        self.device = device
        if sync_devices is None:
            sync_devices = [device] if device.startswith("cuda") else []
        self._sync_devices = list(sync_devices)
        self.timer = None
        self.timing_error: Optional[str] = None
        if token_timing:
            from llm_dvfs import errors
            from llm_dvfs.meter.timeline import Timeline, TokenTimer
            try:
                # built now, not at the first generate: a missing CUDA driver library must not
                # fail a cell halfway
                self.timer = TokenTimer(device=device, timeline=Timeline("auto", device=device))
            except (errors.LlmDvfsError, OSError) as e:
                self.timing_error = f"{type(e).__name__}: {e}"
                log.warning("token timing unavailable on %s (%s): TTFT, TPOT and per-token energy "
                            "will be empty", device, self.timing_error)

    @property
    def idle_power_w(self) -> Optional[float]:
        """The monitor's idle baseline, W (None without a monitor or before ``measure_idle``)."""
        idle = self.monitor.idle_power_w if self.monitor is not None else None
        return idle if idle is not None and math.isfinite(idle) else None

    def _sync(self) -> None:
        if self._sync_devices:
            import torch
            for d in self._sync_devices:
                torch.cuda.synchronize(d)

    @staticmethod
    def _now_s() -> float:
        from llm_dvfs.meter.timeline import host_monotonic_ns
        return host_monotonic_ns() * 1e-9

    def _open(self, name: str) -> tuple[Any, float]:
        self._sync()  # earlier queued work must not leak into the window
        # sync=False: this meter synchronises the model's devices itself; the monitor's default
        # would synchronise every monitored device a second time at each edge
        w = self.monitor.begin_window(name, sync=False) if self.monitor is not None else None
        return w, (self._now_s() if w is None else w.t_start_ns * 1e-9)

    def _close(self, w: Any) -> float:
        self._sync()
        if w is None:
            return self._now_s()
        w.end()
        return w.t_end_ns * 1e-9

    def call(self, fn: Callable[[], Any], name: str = "call") -> tuple[Any, MeteredCall]:
        """``fn()`` (e.g. a forward pass) inside a window named ``name``; returns (its result,
        the :class:`MeteredCall`). An exception of ``fn`` propagates after the window closed."""
        w, t0 = self._open(name)
        try:
            res = fn()
        finally:
            t1 = self._close(w)
        return res, self.record_type(window=w, t_start_s=t0, t_end_s=t1)

    def generate(self, model: Any, kwargs: dict[str, Any], name: str = "generate") -> tuple[Any, MeteredCall]:
        """``model.generate(**kwargs)`` inside a window, every step marked when token timing is
        on; returns (the output ids, the :class:`MeteredCall` with its ``timing``)."""
        w, t0 = self._open(name)
        try:
            out = self.timer.generate(model, **kwargs) if self.timer is not None else model.generate(**kwargs)
        finally:
            t1 = self._close(w)
        timing = self.timer.timing if self.timer is not None else None
        return out, self.record_type(window=w, t_start_s=t0, t_end_s=t1, timing=timing)

    def attribute(self, calls: Sequence[MeteredCall], request_ids: Sequence[Sequence[str]],
                  cell_id: str) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """Per-request values (by request id), ``tokens`` rows and a summary for a cell's calls.

        ``request_ids[i]`` names the sequences of ``calls[i]`` in batch order; calls without
        token timing are left out. With a monitor: :func:`llm_dvfs.meter.attribution.attribute`
        over the whole cell (one lag estimate from all call edges; the calls' windows are
        finalised). Without one: times only (``ttft_s``, ``latency_s``, ``tpot_s``, token
        intervals) and the summary ``{"energy_method": "none"}``. Empty results when no call
        has token timing. Raises what the attribution raises (callers keep their window
        shares then).
        """
        timed = [(c, ids) for c, ids in zip(calls, request_ids) if c.timing is not None]
        if not timed:
            return {}, [], {}
        from llm_dvfs.meter import attribution

        timings = [c.timing for c, _ in timed]
        ids = [list(i) for _, i in timed]
        if self.monitor is not None:
            t0 = min(t.t_start_s for t in timings)
            t1 = max(t.t_end_s for t in timings)
            trace = self.monitor.trace(t0 - TRACE_MARGIN_S, t1 + TRACE_MARGIN_S)
            att = attribution.attribute(
                trace, timings, request_ids=ids, cell_id=cell_id, window_s=(t0, t1),
                batch_counter_energy_j=[c.measurement().energy_j_counter for c, _ in timed],
                idle_power_w=self.idle_power_w)
            per = {r["request_id"]: {k: v for k, v in r.items() if k not in ("request_id", "cell_id")}
                   for r in att.requests}
            return per, att.tokens.to_dict("records"), att.summary()
        per: dict[str, dict[str, Any]] = {}
        tokens: list[dict[str, Any]] = []
        for t, rids in zip(timings, ids):
            b = t.bounds_s
            for j, rid in enumerate(rids):
                n = int(t.tokens_per_sequence[j])
                per[rid] = {"ttft_s": t.ttft_s, "latency_s": t.latency_s,
                            "tpot_s": attribution.request_tpot_s(b, n)}
                tokens.extend(attribution.request_token_rows(b, n, rid, cell_id))
        return per, tokens, {"energy_method": "none"}


__all__ = ["ATTRIBUTED_COLUMNS", "CallMeter", "MeteredCall", "TRACE_MARGIN_S"]
