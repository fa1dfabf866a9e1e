"""PowerMonitor: the meter. This module alone turns power samples into joules.

The native sampler (``_core.PowerSampler``) drains the driver's ~20 ms power-sample buffer,
polls the instant/average power fields and clocks, and reads the energy counter, stamping every
record on the host ``CLOCK_MONOTONIC`` timeline. This module stores the records and integrates
them over named windows.

Integration rule (every power source): each sample is held until the next one (zero-order hold,
forward). A window ``[a, b]`` gets, from the sample at or before ``a``, the partial interval
``[a, next sample)``, every whole interval inside, and from the last sample at or before ``b``
the partial interval ``[that sample, b]``. If no sample precedes ``a`` (the window opened
before the first sample arrived), the first sample is held backwards to ``a`` and the window's
``edge_extrapolated_s`` says for how long.

Source order for ``energy_j`` (named in ``energy_method``): ``buffer`` (driver samples, ±0.5 %
vs the counter on H100) → ``instant`` (field 186, −1…−2 %) → ``counter`` (energy counter,
interpolated at the edges; ~100 ms granularity) → ``average`` (1 s moving average, ≈ −4 %) →
``none``.

Scale: the chosen power source's energy is multiplied by a gain fitted to the energy counter
over the last ``calibration_horizon_s`` (meter/calibration.py), once at least 10 s of counter
reads exist; ``energy_j_by_source`` keeps the raw (uncalibrated) energy of every source, and
``DeviceMeasurement.gain`` / ``gain_se`` / ``calibration`` say what was applied.

Counter edges: a buffer window of at least ``stitch.STITCH_MIN_S`` (1 s) takes its energy from
the counter at the change instants the sampler bracketed at its edges, and the buffer (× gain)
only for the slivers between each change instant and its edge (meter/stitch.py); it is recorded
as the per-window gain that turns the raw buffer integral into that energy (``calibration ==
"counter_edges"``), so the window's calibrated trace still integrates to ``energy_j``. Without a
bracket at an edge the window keeps buffer × gain.

Quality: a window whose buffer lost samples, had a gap longer than ``MAX_SAMPLE_GAP_S`` or was
extrapolated at an edge for longer than ``MAX_EDGE_EXTRAPOLATION_S`` is flagged, falls back to
the counter where one brackets it, and has ``ok`` False. A window shorter than its source's
resolution (``resolution_s``: the update period in the GPU's sensor model) is flagged
``below_resolution`` (a warning, ``ok`` unaffected).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import warnings
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from llm_dvfs import errors
from llm_dvfs.errors import ConfigError
from llm_dvfs.meter import calibration, sensors, stitch
from llm_dvfs.meter.attribution import DEFAULT_LAG_S
from llm_dvfs.meter.measurement import (BAD_FLAGS, DEFAULT_FINALIZE_TIMEOUT_S, MAX_EDGE_EXTRAPOLATION_S,
                                        MAX_SAMPLE_GAP_S, DeviceMeasurement, Measurement, Window, now_ns)
from llm_dvfs.meter.store import SampleStore

log = logging.getLogger(__name__)

__all__ = ["PowerMonitor", "Window", "Measurement", "DeviceMeasurement", "BAD_FLAGS",
           "DEFAULT_FINALIZE_TIMEOUT_S", "MAX_SAMPLE_GAP_S", "MAX_EDGE_EXTRAPOLATION_S", "now_ns"]

_POWER_SOURCES = ("buffer", "instant", "average")
_METHOD_ORDER = ("buffer", "instant", "counter", "average")
def _hold_integral(t: np.ndarray, p: np.ndarray, a: float, b: float) -> tuple[float, float]:
    """∫ of the forward-held step function (t, p) over [a, b].

    Returns (joules, seconds extrapolated backwards before the first sample).
    ``t`` must be sorted. Empty input → (nan, 0).
    """
    if len(t) == 0 or b <= a:
        return (float("nan") if len(t) == 0 else 0.0), 0.0
    # index of the sample holding at a: last t_i <= a (or the first sample, held backwards)
    i0 = int(np.searchsorted(t, a, side="right")) - 1
    extrap = 0.0
    if i0 < 0:
        extrap = float(min(t[0], b) - a)
        i0 = 0
    i1 = int(np.searchsorted(t, b, side="right"))  # samples with t <= b are [.., i1)
    i1 = max(i1, i0 + 1)
    edges = np.clip(t[i0:i1], a, b)
    edges = np.append(edges, b)
    edges[0] = a
    energy = float(np.sum(p[i0:i1] * np.diff(edges)))
    return energy, extrap


def _held_values(t: np.ndarray, v: np.ndarray, a: float, b: float) -> np.ndarray:
    """Values of the held step function that are in force at some point of [a, b]."""
    if len(t) == 0:
        return v[:0]
    i0 = max(int(np.searchsorted(t, a, side="right")) - 1, 0)
    i1 = int(np.searchsorted(t, b, side="right"))
    return v[i0:max(i1, i0 + 1)]


# the one NVML error that does not persist: the sampler falls back and stops calling that lane
_NVML_ERROR_NOT_SUPPORTED = 3


class PowerMonitor:
    """Samples GPU power in a native thread and measures energy over named windows.

    Args:
        devices: CUDA ordinals to monitor; ``None`` = all visible GPUs. On a machine without an
            NVIDIA driver, ``None`` gives a time-only monitor (``available`` False, every
            measurement ``energy_method='none'``); an explicit list raises instead.
        buffer_period_s: how often the driver's power-sample buffer is drained (it holds ~2.4 s
            on an H100; the default drains ~10× inside that).
        poll_period_s: period of the instant/average power, clock and temperature poll. Those
            fields change only every ~100 ms on an H100; 50 ms catches every change within half
            an update while costing ~20 NVML calls/s per field.
        counter_period_s: period of the energy-counter lane (also read at every window edge).
        capacity: records the ring holds between drains by Python (overflow is counted).
        lag_s: sensor lag, s, the power trace is shifted by before a window is integrated: None =
            the lag measured for that GPU (``python -m llm_dvfs.info --sensors`` caches it per
            UUID), else the per-source defaults (``DEFAULT_LAG_S``); a number for every source,
            or a mapping per source; 0 disables the shift. Outside 0-2 s: ConfigError.
        calibration_horizon_s: seconds of counter reads before a window's end that the
            counter-anchored gain is fitted over; 0 disables the calibration.
        history_s: keep only this many seconds of samples (None: all). Windows that begin
            before the retained history are flagged ``before_history``.
        bracket_edges: at each window edge the sampler reads the energy counter back to back
            (~3 ms per read on an H200) until its value changes (every ~100 ms), so that windows
            of at least 1 s take their energy from the counter's change instants (meter/stitch.py);
            False: one read per edge, and those windows keep buffer × gain.
        bracket_min_interval_s: a start edge is bracketed only if the last bracketed start edge
            is at least this old, and an end edge only when its window is ≥ 1 s and its start
            was bracketed. A bracket costs ~16 counter reads, and NVML spins for each (~65 ms
            of CPU per bracket measured on an H200), so the default (10 s) keeps brackets under
            ~1 % of a core however many short windows are measured; a window whose start was
            not bracketed keeps buffer × gain (``edges`` says so). 0: bracket every edge.
        counter_grid_s: the counter's update period where it changes on a fixed grid (100.0 ms
            on H100 and H200): after the first bracket a bracket reads once, sleeps to 12 ms
            before the predicted change and reads back to back from there (~5 reads instead of
            ~16 on an H200). A wrong period is detected (``stats()["bracket_misses"]``) and
            prediction turned off for that GPU; a miss never widens a bracket. 0: no prediction.

    Raises (from ``start``): LibraryNotFound, NvmlError, ConfigError for invalid devices.
    """

    def __init__(
        self,
        devices: Optional[Sequence[int]] = None,
        *,
        buffer_period_s: float = 0.25,
        poll_period_s: float = 0.05,
        counter_period_s: float = 1.0,
        capacity: int = 1 << 19,
        poll_clocks: bool = True,
        lag_s: Optional[float | Mapping[str, float]] = None,
        calibration_horizon_s: float = calibration.DEFAULT_HORIZON_S,
        history_s: Optional[float] = None,
        bracket_edges: bool = True,
        bracket_min_interval_s: float = 10.0,
        counter_grid_s: float = 0.1,
    ) -> None:
        self._requested = None if devices is None else list(devices)
        self._cfg = dict(
            buffer_period_s=buffer_period_s,
            poll_period_s=poll_period_s,
            counter_period_s=counter_period_s,
            capacity=capacity,
            poll_clocks=poll_clocks,
            bracket_edges=bool(bracket_edges),
            counter_grid_s=float(counter_grid_s),
        )
        # Sensor lag per power source, s: a sample at host time t shows the work done at t - lag,
        # so a window [a, b] integrates the samples of [a + lag, b + lag].
        self._lag_given = lag_s is not None
        if lag_s is None:
            lag_s = DEFAULT_LAG_S
        self._lag_s = ({src: float(lag_s) for src in _POWER_SOURCES} if isinstance(lag_s, (int, float))
                       else {src: float(lag_s.get(src, DEFAULT_LAG_S.get(src, 0.0))) for src in _POWER_SOURCES})
        if any(not np.isfinite(v) or v < 0 or v > 2.0 for v in self._lag_s.values()):
            raise ConfigError(f"lag_s must be between 0 and 2 s per source, got {self._lag_s}")
        if not (np.isfinite(calibration_horizon_s) and calibration_horizon_s >= 0):
            raise ConfigError(f"calibration_horizon_s must be >= 0, got {calibration_horizon_s}")
        if history_s is not None and not history_s > 0:
            raise ConfigError(f"history_s must be > 0 or None, got {history_s}")
        if not (np.isfinite(counter_grid_s) and 0 <= counter_grid_s <= 10):
            raise ConfigError(f"counter_grid_s must be between 0 and 10 s, got {counter_grid_s}")
        if not (np.isfinite(bracket_min_interval_s) and bracket_min_interval_s >= 0):
            raise ConfigError(f"bracket_min_interval_s must be >= 0, got {bracket_min_interval_s}")
        self._bracket_min_interval_s = float(bracket_min_interval_s)
        self._last_bracket_s = float("-inf")
        self._horizon_s = float(calibration_horizon_s)
        self._history_s = history_s
        self._sampler = None
        self._store: Optional[SampleStore] = None
        # per device position: lag per source and how it was chosen; the GPU's sensor model
        self._dev_lag: list[dict[str, float]] = []
        self._dev_lag_method: list[str] = []
        self.sensor_models: list[sensors.SensorModel] = []
        self._warned_resolution = False
        self._lock = threading.RLock()
        self.device_indices: list[int] = []
        self.nvml_indices: list[int] = []
        self.device_info: list[Any] = []
        self.unavailable_reason: Optional[str] = None
        self.idle_power_w: Optional[float] = None
        self.idle_power_w_by_device: dict[int, float] = {}
        self._open: list[Window] = []

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """True when energy is being measured (a driver and at least one device)."""
        return self._sampler is not None

    @property
    def running(self) -> bool:
        return self._sampler is not None and self._sampler.running

    def start(self) -> "PowerMonitor":
        """Start sampling (idempotent)."""
        with self._lock:
            if self.running:
                return self
            from llm_dvfs import _core
            from llm_dvfs.devices import devices as list_devices, last_error

            infos = list_devices()
            if self._requested is None:
                if not infos:
                    self.unavailable_reason = last_error() or "no NVIDIA GPU visible"
                    warnings.warn(f"PowerMonitor: energy unavailable: {self.unavailable_reason}",
                                  RuntimeWarning, stacklevel=2)
                    return self
                chosen = infos
            else:
                by_idx = {d.index: d for d in infos}
                missing = [i for i in self._requested if i not in by_idx]
                if missing:
                    reason = last_error()
                    if not infos and reason:
                        raise errors.LibraryNotFound(reason)
                    raise errors.ConfigError(
                        f"GPU(s) {missing} not visible; visible: {sorted(by_idx)}")
                chosen = [by_idx[i] for i in self._requested]
            uuids = [d.uuid for d in chosen]
            if self._store is None or uuids != [d.uuid for d in self.device_info]:
                # a restart keeps the samples (windows measured before stay right); the new
                # sampler's re-read of the driver buffer is dropped by the store as duplicates
                self._store = SampleStore(dict(_core.RECORD_KINDS), self._history_s)
            self.device_info = chosen
            self.device_indices = [d.index for d in chosen]
            self.nvml_indices = [d.nvml_index for d in chosen]
            if not chosen:
                return self
            self._load_sensor_models()
            sampler = _core.PowerSampler(self.nvml_indices, **self._cfg)
            sampler.start()
            self._sampler = sampler
            return self

    def _load_sensor_models(self) -> None:
        """Each GPU's cached sensor model (else one of defaults) and the lag it implies."""
        self.sensor_models, self._dev_lag, self._dev_lag_method = [], [], []
        for info in self.device_info:
            model = sensors.load(info.uuid) or sensors.SensorModel(uuid=info.uuid, name=info.name)
            lag = dict(self._lag_s)
            method = "given" if self._lag_given else "default"
            if not self._lag_given and model.lag_method == "measured" and model.lag_s is not None:
                lag["buffer"], method = float(model.lag_s), "measured"
            self.sensor_models.append(model)
            self._dev_lag.append(lag)
            self._dev_lag_method.append(method)

    def sensor_model(self, device: int) -> sensors.SensorModel:
        """The sensor model of CUDA device ``device`` as observed so far by this monitor (buffer
        spacing and change interval, field update period), with the cached lag."""
        k = self.device_indices.index(device)
        self._pull()
        lanes = {kind: self._store.get(kind, k) for kind in ("buffer", "instant", "counter")}
        m = sensors.model_from_lanes(self.device_info[k].uuid, self.device_info[k].name, lanes)
        cached = self.sensor_models[k]
        m.lag_s = self._dev_lag[k]["buffer"]
        m.lag_method = self._dev_lag_method[k]
        m.counter_update_s = m.counter_update_s if m.counter_update_s and m.counter_update_s < 0.5 \
            else cached.counter_update_s  # 1 s slow-lane reads cannot resolve a 100 ms update
        return m

    def stop(self) -> None:
        """Stop sampling (idempotent). Measurements stay available."""
        with self._lock:
            if self._sampler is not None and self._sampler.running:
                self._sampler.flush(1.0)
                self._sampler.stop()
                self._pull()

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> "PowerMonitor":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """Sampler counters (loops, drains, polls, samples, dropped, thread_cpu_s)."""
        return dict(self._sampler.stats()) if self._sampler is not None else {}

    # -- windows ---------------------------------------------------------------------------
    def begin_window(self, name: str = "window", *, sync: bool = True) -> Window:
        """Open a window now. Windows may nest and overlap freely.

        ``sync=True`` (default) waits for the work already queued on the monitored CUDA devices
        before the start edge and again before the end edge, so that the window holds the GPU
        work issued inside it rather than only its kernel launches (CUDA is asynchronous). It
        costs one ``torch.cuda.synchronize`` per device and edge, and is a no-op where torch is
        not imported or CUDA is not initialised. Pass ``sync=False`` when the caller
        synchronises itself (or measures work on other streams/processes).
        """
        if self._sampler is None and self.unavailable_reason is None:
            self.start()
        if sync:
            self._sync_devices()
        w = Window(self, name, now_ns(), sync=sync)
        if self._sampler is not None:
            t = w.t_start_ns * 1e-9
            w._bracketed_start = (self._cfg["bracket_edges"]
                                  and t - self._last_bracket_s >= self._bracket_min_interval_s)
            if w._bracketed_start:
                self._last_bracket_s = t
            self._sampler.request_counter(bracket=w._bracketed_start)
        return w

    def end_window(self, window: Window) -> Window:
        """Close ``window`` now; its measurement is computed on first access."""
        return window.end()

    @contextlib.contextmanager
    def window(self, name: str = "window", *, sync: bool = True) -> Iterator[Window]:
        """``with mon.window("generate") as w: ...`` then ``w.energy_j``. ``sync`` as in
        :meth:`begin_window` (on by default)."""
        w = self.begin_window(name, sync=sync)
        try:
            yield w
        finally:
            w.end()

    def _sync_devices(self) -> None:
        """``torch.cuda.synchronize`` on every monitored device (all visible ones when the monitor
        measures nothing). Never imports torch: a process that has not imported it has queued no
        CUDA work through it."""
        torch = sys.modules.get("torch")
        if torch is None:
            return
        cuda = getattr(torch, "cuda", None)
        if cuda is None or not cuda.is_available() or not cuda.is_initialized():
            return
        for idx in (self.device_indices or range(cuda.device_count())):
            cuda.synchronize(idx)

    def _on_window_end(self, w: Window) -> None:
        if self._sampler is not None:
            # only a window stitched to the counter needs its end bracketed (the start edge is
            # bracketed for every window: its length is not known then)
            long = (w.t_end_ns - w.t_start_ns) * 1e-9 >= stitch.STITCH_MIN_S
            self._sampler.request_counter(bracket=long and getattr(w, "_bracketed_start", False))

    def measure_idle(self, duration_s: float = 2.0) -> float:
        """Measure idle power for ``duration_s`` (nothing else should run on the GPUs).

        Sets ``idle_power_w`` (sum over devices, W), which later windows use for
        ``active_energy_j``. Returns it (NaN without a driver).
        """
        w = self.begin_window("idle")
        time.sleep(duration_s)
        w.end()
        m = w.measurement()
        self.idle_power_w = m.avg_power_w if np.isfinite(m.avg_power_w) else None
        self.idle_power_w_by_device = {k: d.avg_power_w for k, d in m.devices.items()}
        return m.avg_power_w

    # -- data ------------------------------------------------------------------------------
    def _dropped(self) -> int:
        return int(self._sampler.stats()["dropped"]) if self._sampler is not None else 0

    def _pull(self) -> None:
        if self._sampler is None or self._store is None:
            return
        with self._lock:
            self._store.add(self._sampler.drain())

    def _latest(self, kind: str, dev: int) -> float:
        t, _, _ = self._store.get(kind, dev)
        return float(t[-1]) if len(t) else float("-inf")

    def _wait_covered(self, t_end_s: float, timeout_s: float, bracket: bool = False) -> None:
        """Flush until every device's buffer lane has a record past ``t_end_s`` plus its lag
        and its counter one past ``t_end_s``; with ``bracket``, until the counter's bracket after
        ``t_end_s`` is over and the buffer covers it too."""
        if self._sampler is None:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            running = self._sampler.running
            if running:
                self._sampler.flush(0.2)
            self._pull()
            done = True
            for k, info in enumerate(self.device_info):
                lag = self._dev_lag[k]["buffer"] if self._dev_lag else self._lag_s["buffer"]
                cover = t_end_s
                if info.has_energy_counter:
                    ct, _, cmj = self._store.get("counter", k)
                    if not len(ct) or ct[-1] < t_end_s:
                        done = False
                    elif bracket and info.has_power_samples:
                        settled, cover = stitch.edge_settled(ct, cmj, t_end_s)
                        done = done and settled
                if info.has_power_samples and self._latest("buffer", k) < cover + lag:
                    done = False
            if done or not running or time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def _measure(self, w: Window, timeout_s: float) -> Measurement:
        a = w.t_start_ns * 1e-9
        b = (w.t_end_ns or now_ns()) * 1e-9
        if self._sampler is None:
            return Measurement.time_only(w.name, a, b, monitor=self)
        self._wait_covered(b, timeout_s, bracket=self._cfg["bracket_edges"] and b - a >= stitch.STITCH_MIN_S)
        from llm_dvfs import _core

        dropped = max(self._dropped() - w._dropped_start, 0)
        per_dev: dict[int, DeviceMeasurement] = {}
        with self._lock:
            for k, cuda_idx in enumerate(self.device_indices):
                per_dev[cuda_idx] = self._measure_device(k, cuda_idx, a, b, _core, dropped)
        energies = [d.energy_j for d in per_dev.values()]
        energy = float(np.sum(energies)) if all(np.isfinite(energies)) else float("nan")
        methods = sorted({d.energy_method for d in per_dev.values()})
        method = methods[0] if len(methods) == 1 else "+".join(methods)
        counters = [d.energy_j_counter for d in per_dev.values()]
        counter = None if any(c is None for c in counters) else float(np.sum(counters))
        peaks = [d.peak_power_w for d in per_dev.values() if np.isfinite(d.peak_power_w)]
        dur = b - a
        errs = [e for d in per_dev.values() for e in d.errors]
        flags = sorted({f for d in per_dev.values() for f in d.flags})
        res = [d.resolution_s for d in per_dev.values() if np.isfinite(d.resolution_s)]
        if "below_resolution" in flags and not self._warned_resolution:
            self._warned_resolution = True
            log.warning("window %r (%.3f s) is shorter than the power source's resolution (%.3f s): "
                        "its energy is flagged 'below_resolution'", w.name, dur, max(res))
        return Measurement(
            name=w.name, t_start_s=a, t_end_s=b, energy_j=energy, energy_method=method,
            energy_j_counter=counter,
            avg_power_w=energy / dur if dur > 0 and np.isfinite(energy) else float("nan"),
            peak_power_w=float(np.sum(peaks)) if peaks else float("nan"),
            devices=per_dev, idle_power_w=self.idle_power_w, dropped_records=dropped,
            errors=errs, flags=flags, resolution_s=max(res) if res else float("nan"), _monitor=self,
        )

    def _source_quality(self, k: int, src: str, a: float, b: float, lag: float) -> dict[str, Any]:
        """Sample statistics of one power source over [a, b] on the work's timeline."""
        t, p, _ = self._store.get(src, k)
        lo = max(int(np.searchsorted(t, a + lag, side="right")) - 1, 0)
        hi = int(np.searchsorted(t, b + lag, side="right"))
        ts = t[lo:max(hi, lo + 1)] - lag
        ps = p[lo:max(hi, lo + 1)]
        inside = (ts >= a) & (ts <= b)
        edges = np.concatenate([[a], ts[inside], [b]])
        return dict(n=int(inside.sum()), peak=float(ps.max()) if len(ps) else float("nan"),
                    gap=float(np.max(np.diff(edges))) if len(edges) > 1 else 0.0)

    def _gain(self, k: int, src: str, b: float, lag: float) -> calibration.Gain:
        """Counter-anchored gain of ``src`` over the horizon ending at ``b``."""
        if self._horizon_s <= 0:
            return calibration.Gain(reason="disabled")
        lo_t = b - self._horizon_s
        t, p, _ = self._store.get(src, k)
        ct, _, mj = self._store.get("counter", k)
        if len(t) < 2 or len(ct) < 2:
            return calibration.Gain(reason="no counter" if len(ct) < 2 else "no trace")
        i0 = max(int(np.searchsorted(t, lo_t + lag - 1.0)) - 1, 0)
        i1 = int(np.searchsorted(t, b + lag + 1.0, side="right"))
        c0 = int(np.searchsorted(ct, lo_t))
        c1 = int(np.searchsorted(ct, b + 0.5, side="right"))
        gt, gv, _ = self._store.get("gap", k)
        g_sel = gt >= lo_t
        gaps = tuple((float(x) - float(v) - lag, float(x) - lag) for x, v in zip(gt[g_sel], gv[g_sel]))
        period = self.sensor_models[k].counter_update_s or sensors.DEFAULT_RESOLUTION_S["counter"]
        return calibration.counter_gain(t[i0:i1] - lag, p[i0:i1], ct[c0:c1], mj[c0:c1].astype(np.float64) * 1e-3,
                                        lo_t, b + 0.5, counter_period_s=period, gaps=gaps)

    def _measure_device(self, k: int, cuda_idx: int, a: float, b: float, core: Any,
                        dropped: int) -> DeviceMeasurement:
        st = self._store
        lags = self._dev_lag[k]
        by_source: dict[str, float] = {}
        extrap: dict[str, float] = {}
        for src in _POWER_SOURCES:
            t, p, _ = st.get(src, k)
            if len(t):
                lo = max(int(np.searchsorted(t, a + lags[src], side="right")) - 1, 0)
                hi = int(np.searchsorted(t, b + lags[src], side="right")) + 1
                e, x = _hold_integral(t[lo:hi], p[lo:hi], a + lags[src], b + lags[src])
                if lo > 0:
                    x = 0.0  # a sample precedes the slice: nothing was extrapolated
                by_source[src] = e
                extrap[src] = x
        counter_j = self._counter_delta(k, a, b)
        if counter_j is not None:
            by_source["counter"] = counter_j
        method = next((m for m in _METHOD_ORDER if m in by_source and np.isfinite(by_source[m])), "none")
        model = self.sensor_models[k]

        # quality of the chosen source
        flags: list[str] = []
        n, gap, peak, lag = 0, 0.0, float("nan"), 0.0
        gt, gv, _ = st.get("gap", k)
        g_lo, g_hi = np.searchsorted(gt, [a + lags["buffer"], b + lags["buffer"] + 1.0])
        lost = float(gv[g_lo:g_hi][gt[g_lo:g_hi] - gv[g_lo:g_hi] < b + lags["buffer"]].sum())
        if method in _POWER_SOURCES:
            lag = lags[method]
            q = self._source_quality(k, method, a, b, lag)
            n, gap, peak = q["n"], q["gap"], q["peak"]
            if method == "buffer":  # the only lane that stores every sample
                if lost > 0:
                    flags.append("samples_lost")
                if gap > MAX_SAMPLE_GAP_S:
                    flags.append("sample_gap")
            if extrap.get(method, 0.0) > MAX_EDGE_EXTRAPOLATION_S:
                flags.append("edge_extrapolated")
        if dropped:
            flags.append("dropped_records")
        if a < st.start_s:
            flags.append("before_history")

        # scale: the counter-anchored gain of the chosen source
        gain = calibration.Gain(reason="not a power trace")
        energy = by_source.get(method, float("nan"))
        if method in _POWER_SOURCES:
            gain = self._gain(k, method, b, lag)
            if gain.applied:
                energy = energy * gain.gain
        # an untrustworthy trace falls back to the counter where one brackets the window
        if method in _POWER_SOURCES and counter_j is not None and \
                {"samples_lost", "sample_gap", "edge_extrapolated"}.intersection(flags):
            method, energy, lag = "counter", counter_j, 0.0
            gain = calibration.Gain(reason="counter used")
        # the scale recorded: the running gain, or for a window of >= 1 s stitched to the counter
        # at the change instants bracketed at its edges, the per-window gain that gives it
        calib = "counter" if gain.applied else gain.reason
        g_applied, g_se, g_span = (gain.gain if gain.applied else 1.0), gain.se, gain.span_s
        raw = by_source.get("buffer", float("nan"))
        sw, edges = self._counter_edges(k, a, b, method, lag, gain, raw)
        if sw is not None:
            energy, calib = sw.energy_j, "counter_edges"
            g_applied, g_se, g_span = sw.energy_j / raw, sw.se_j / raw, sw.span_s
        resolution = model.resolution_s(method)
        if b - a < resolution:
            flags.append("below_resolution")

        sm_t, sm_v, _ = st.get("sm_clock", k)
        mem_t, mem_v, _ = st.get("mem_clock", k)
        tmp_t, tmp_v, _ = st.get("temperature", k)
        ev_t, _, ev_x = st.get("clock_events", k)
        reasons = 0
        for bits in _held_values(ev_t, ev_x, a, b):
            reasons |= int(bits)
        sm = _held_values(sm_t, sm_v, a, b)
        mem = _held_values(mem_t, mem_v, a, b)
        tmp = _held_values(tmp_t, tmp_v, a, b)
        # errors of the sampler's lanes in force during the window (and a poll period around it)
        margin = 2 * self._cfg["poll_period_s"] + self._cfg["buffer_period_s"]
        errs = [errors.from_nvml(c, core.nvml_symbol_name(x),
                                 "reported by the sampler thread" + (f" for field {f}" if f else ""))
                for c, x, f in st.error_episodes(k, a - margin, b + margin,
                                                 transient_codes=(_NVML_ERROR_NOT_SUPPORTED,))]
        if errs:
            flags.append("nvml_error")
        dur = b - a
        return DeviceMeasurement(
            device=cuda_idx, energy_j=energy, energy_method=method, energy_j_counter=counter_j,
            avg_power_w=energy / dur if dur > 0 and np.isfinite(energy) else float("nan"),
            peak_power_w=peak, energy_j_by_source=by_source, n_samples=n, max_sample_gap_s=gap,
            lost_samples_s=lost, edge_extrapolated_s=extrap.get(method, 0.0), lag_s=lag,
            lag_method=self._dev_lag_method[k] if method == "buffer" else ("given" if self._lag_given else "default"),
            gain=g_applied, gain_se=g_se, gain_span_s=g_span, calibration=calib, edges=edges,
            resolution_s=resolution,
            flags=flags,
            sm_mhz=float(np.median(sm)) if len(sm) else float("nan"),
            mem_mhz=float(np.median(mem)) if len(mem) else float("nan"),
            clock_event_reasons=reasons,
            temperature_c=float(np.max(tmp)) if len(tmp) else float("nan"),
            errors=errs,
        )

    def _counter_edges(self, k: int, a: float, b: float, method: str, lag: float, gain: calibration.Gain,
                       raw: float) -> tuple[Optional[stitch.Stitch], str]:
        """(the window's counter-stitched energy, "counter_edges") or (None, why not); ``raw``:
        the window's raw buffer energy."""
        if b - a < stitch.STITCH_MIN_S:
            return None, f"window {b - a:.2f} s < {stitch.STITCH_MIN_S:g} s"
        if method != "buffer":
            return None, f"energy_method {method}"
        if not self._cfg["bracket_edges"]:
            return None, "bracket_edges off"
        sw = self._stitch(k, a, b, lag, gain)
        if not sw.applied:
            return None, sw.reason
        if not (raw > 0 and abs(sw.energy_j / raw - 1) <= stitch.MAX_WINDOW_GAIN_DEVIATION):
            return None, f"implausible window gain {sw.energy_j / raw if raw else float('nan'):.4f}"
        return sw, sw.reason

    def _stitch(self, k: int, a: float, b: float, lag: float, gain: calibration.Gain) -> stitch.Stitch:
        """Counter-stitched energy of [a, b] on device position ``k`` (meter/stitch.py)."""
        t, p, _ = self._store.get("buffer", k)
        ct, cdur, cmj = self._store.get("counter", k)
        m = stitch.EDGE_SEARCH_S + 1.0
        i0 = max(int(np.searchsorted(t, a + lag - m)) - 1, 0)
        i1 = int(np.searchsorted(t, b + lag + m, side="right"))
        c0 = int(np.searchsorted(ct, a - m))
        c1 = int(np.searchsorted(ct, b + m, side="right"))
        gt, gv, _ = self._store.get("gap", k)
        g_sel = (gt >= a + lag - m) & (gt - gv <= b + lag + m)
        gaps = tuple((float(x) - float(v) - lag, float(x) - lag) for x, v in zip(gt[g_sel], gv[g_sel]))
        g, g_se = (gain.gain, gain.se) if gain.applied else (1.0, None)
        return stitch.stitch_window(t[i0:i1] - lag, p[i0:i1], ct[c0:c1], cmj[c0:c1], cdur[c0:c1], a, b,
                                    gain=g, gain_rel_se=g_se, gaps=gaps)

    def _counter_delta(self, k: int, a: float, b: float) -> Optional[float]:
        """Counter energy over [a, b] in J by linear interpolation between reads, or None when
        the reads don't bracket both edges."""
        t, _, mj = self._store.get("counter", k)
        if len(t) < 2 or t[0] > a or t[-1] < b:
            return None
        lo = max(int(np.searchsorted(t, a, side="right")) - 1, 0)
        hi = int(np.searchsorted(t, b, side="left")) + 1
        ts, e = t[lo:hi], mj[lo:hi].astype(np.float64) * 1e-3
        return float(np.interp(b, ts, e) - np.interp(a, ts, e))

    def trace(self, t0_s: Optional[float] = None, t1_s: Optional[float] = None,
              sources: Sequence[str] = _POWER_SOURCES, *,
              gains: Optional[Mapping[int, float]] = None) -> pd.DataFrame:
        """Raw power samples: columns t_s (host monotonic s), device (CUDA index), power_w,
        source. With bounds, the sample in force at ``t0_s`` is included. ``gains`` ({device:
        gain}) scales each device's power (a window's calibrated trace)."""
        self._pull()
        frames = []
        if self._store is not None:
            with self._lock:
                for k, cuda_idx in enumerate(self.device_indices):
                    g = 1.0 if gains is None else float(gains.get(cuda_idx, 1.0))
                    for src in sources:
                        t, p, _ = self._store.get(src, k)
                        if not len(t):
                            continue
                        lo = 0 if t0_s is None else max(int(np.searchsorted(t, t0_s, side="right")) - 1, 0)
                        hi = len(t) if t1_s is None else int(np.searchsorted(t, t1_s, side="right"))
                        if hi <= lo:
                            continue
                        frames.append(pd.DataFrame({
                            "t_s": t[lo:hi], "device": cuda_idx, "power_w": p[lo:hi] * g, "source": src}))
        if not frames:
            return pd.DataFrame({"t_s": pd.Series(dtype="float64"), "device": pd.Series(dtype="int64"),
                                 "power_w": pd.Series(dtype="float64"), "source": pd.Series(dtype="string")})
        df = pd.concat(frames, ignore_index=True).sort_values(["t_s", "device"], kind="stable")
        return df.reset_index(drop=True)
