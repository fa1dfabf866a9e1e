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
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from llm_dvfs import errors
from llm_dvfs.errors import ConfigError
from llm_dvfs.meter.attribution import DEFAULT_LAG_S

log = logging.getLogger(__name__)

_POWER_SOURCES = ("buffer", "instant", "average")
_METHOD_ORDER = ("buffer", "instant", "counter", "average")
# How long a window end waits for the sampler to deliver samples past the end (the driver
# publishes a buffer sample ~20 ms after its timestamp; the counter read is ~3 ms).
DEFAULT_FINALIZE_TIMEOUT_S = 0.5


def now_ns() -> int:
    """Host monotonic time in ns, the timeline of every sample and mark."""
    from llm_dvfs import _core

    return _core.monotonic_ns()


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


@dataclass
class DeviceMeasurement:
    """One device's share of a window. Energies in J, powers in W, clocks in MHz."""

    device: int
    energy_j: float
    energy_method: str
    energy_j_counter: Optional[float]
    avg_power_w: float
    peak_power_w: float
    energy_j_by_source: dict[str, float] = field(default_factory=dict)
    n_samples: int = 0                 # samples of the chosen source inside the window
    max_sample_gap_s: float = 0.0      # longest interval between chosen-source samples
    lost_samples_s: float = 0.0        # buffer samples the driver dropped (sampler fell behind)
    edge_extrapolated_s: float = 0.0
    lag_s: float = 0.0                 # sensor lag the chosen source's trace was shifted by
    sm_mhz: float = float("nan")       # median SM clock in force during the window
    mem_mhz: float = float("nan")
    clock_event_reasons: int = 0       # OR of the NVML clock-event reason bits seen
    temperature_c: float = float("nan")
    errors: list[errors.NvmlError] = field(default_factory=list)


@dataclass
class Measurement:
    """Energy and power of one window, summed over its devices.

    ``energy_j`` is the best estimate (source in ``energy_method``); ``energy_j_counter`` the
    hardware counter's delta (None where a device has no counter). ``errors`` holds the NVML
    failures in force during the window, each once, also one that began before it (never
    raised): check ``ok``.
    """

    name: str
    t_start_s: float
    t_end_s: float
    energy_j: float
    energy_method: str
    energy_j_counter: Optional[float]
    avg_power_w: float
    peak_power_w: float
    devices: dict[int, DeviceMeasurement]
    idle_power_w: Optional[float] = None
    dropped_records: int = 0           # ring overflow during the window (sampler never blocks)
    errors: list[errors.NvmlError] = field(default_factory=list)
    _monitor: Any = field(default=None, repr=False, compare=False)

    @property
    def duration_s(self) -> float:
        return self.t_end_s - self.t_start_s

    @property
    def ok(self) -> bool:
        return not self.errors and self.dropped_records == 0 and np.isfinite(self.energy_j)

    @property
    def active_energy_j(self) -> Optional[float]:
        """Energy above the idle baseline (None until ``PowerMonitor.measure_idle`` ran)."""
        if self.idle_power_w is None:
            return None
        return self.energy_j - self.idle_power_w * self.duration_s

    @property
    def sm_mhz(self) -> float:
        vals = [d.sm_mhz for d in self.devices.values() if np.isfinite(d.sm_mhz)]
        return float(np.median(vals)) if vals else float("nan")

    @property
    def mem_mhz(self) -> float:
        vals = [d.mem_mhz for d in self.devices.values() if np.isfinite(d.mem_mhz)]
        return float(np.median(vals)) if vals else float("nan")

    @property
    def clock_event_reasons(self) -> int:
        r = 0
        for d in self.devices.values():
            r |= d.clock_event_reasons
        return r

    def trace(self, margin_s: float = 0.0) -> pd.DataFrame:
        """Power samples of this window: columns t_s, device, power_w, source."""
        if self._monitor is None:
            return pd.DataFrame(columns=["t_s", "device", "power_w", "source"])
        return self._monitor.trace(self.t_start_s - margin_s, self.t_end_s + margin_s)


class Window:
    """A named interval on the monitor's timeline. Attribute access to the measured values
    (``energy_j``, ``energy_method``, ``duration_s``, ...) finalises the window's
    :class:`Measurement` (waiting briefly for the sampler to deliver samples past its end)."""

    def __init__(self, monitor: "PowerMonitor", name: str, t_start_ns: int, sync: bool = False) -> None:
        self.monitor = monitor
        self.name = name
        self.sync = sync  # synchronise the monitored CUDA devices at the end edge too
        self.t_start_ns = t_start_ns
        self.t_end_ns: Optional[int] = None
        self._dropped_start = monitor._dropped()
        self._measurement: Optional[Measurement] = None

    @property
    def closed(self) -> bool:
        return self.t_end_ns is not None

    def end(self) -> "Window":
        if self.t_end_ns is None:
            if self.sync:
                self.monitor._sync_devices()
            self.t_end_ns = now_ns()
            self.monitor._on_window_end(self)
        return self

    def measurement(self, timeout_s: float = DEFAULT_FINALIZE_TIMEOUT_S) -> Measurement:
        """The window's Measurement (computed once, after the window has ended)."""
        if self.t_end_ns is None:
            raise RuntimeError(f"window {self.name!r} is still open")
        if self._measurement is None:
            self._measurement = self.monitor._measure(self, timeout_s)
        return self._measurement

    def __getattr__(self, item: str) -> Any:
        # Only reached for attributes Window itself lacks: delegate to the Measurement.
        if item.startswith("_") or item in ("monitor", "name", "sync", "t_start_ns", "t_end_ns"):
            raise AttributeError(item)
        return getattr(self.measurement(), item)

    def __repr__(self) -> str:
        state = "open" if self.t_end_ns is None else f"{(self.t_end_ns - self.t_start_ns) / 1e9:.3f} s"
        return f"<Window {self.name!r} {state}>"


class _Store:
    """Records drained from the sampler, by kind and device, as growing numpy arrays."""

    def __init__(self, n_devices: int, kinds: dict[str, int]) -> None:
        self.kinds = kinds
        self.kind_names = {v: k for k, v in kinds.items()}
        self._chunks: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        self.n_devices = n_devices

    def add(self, rec: dict[str, np.ndarray]) -> None:
        if len(rec["t_ns"]) == 0:
            return
        for kind_id in np.unique(rec["kind"]):
            name = self.kind_names.get(int(kind_id), f"kind{int(kind_id)}")
            m_kind = rec["kind"] == kind_id
            for dev in np.unique(rec["device"][m_kind]):
                m = m_kind & (rec["device"] == dev)
                self._chunks.setdefault((name, int(dev)), []).append(
                    (rec["t_ns"][m].astype(np.float64) * 1e-9, rec["value"][m], rec["extra"][m].copy())
                )
                if name == "error":
                    self._chunks.setdefault(("error_aux", int(dev)), []).append(
                        (rec["t_ns"][m].astype(np.float64) * 1e-9, rec["aux"][m].astype(np.float64), rec["extra"][m].copy())
                    )

    def get(self, kind: str, dev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        chunks = self._chunks.get((kind, dev))
        if not chunks:
            e = np.empty(0)
            return e, e, np.empty(0, dtype=np.uint64)
        if len(chunks) > 1:
            t = np.concatenate([c[0] for c in chunks])
            v = np.concatenate([c[1] for c in chunks])
            x = np.concatenate([c[2] for c in chunks])
            order = np.argsort(t, kind="stable")  # drains are in order; sort is a cheap guard
            chunks[:] = [(t[order], v[order], x[order])]
        return chunks[0]


_NVML_ERROR_NOT_SUPPORTED = 3


def _lane_errors(st: _Store, k: int, lo: float, hi: float) -> list[tuple[int, int, int]]:
    """(nvmlReturn, NvmlSym index, field id) of each error episode of a lane that was in force
    at some time in [lo, hi]. The sampler records a lane's error once when it starts and once
    (code 0) when the lane works again, so an error that began before lo still counts. Only
    NOT_SUPPORTED does not persist: the sampler then stops calling that lane (a fallback)."""
    et, efield, ecode = st.get("error", k)
    _, eaux, _ = st.get("error_aux", k)
    in_force: dict[tuple[int, int], tuple[int, int, int]] = {}
    during: list[tuple[int, int, int]] = []
    for t, f, c, x in zip(et, efield, ecode, eaux):
        if t > hi:
            break
        lane, code = (int(x), int(f)), int(c)
        if t >= lo:
            if code:
                during.append((code, lane[0], lane[1]))
        elif code and code != _NVML_ERROR_NOT_SUPPORTED:
            in_force[lane] = (code, lane[0], lane[1])
        else:
            in_force.pop(lane, None)
    return list(in_force.values()) + during


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
            the per-source defaults (``DEFAULT_LAG_S``), a number for every source, or a mapping
            per source; 0 disables the shift. Outside 0-2 s: ConfigError.

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
    ) -> None:
        self._requested = None if devices is None else list(devices)
        self._cfg = dict(
            buffer_period_s=buffer_period_s,
            poll_period_s=poll_period_s,
            counter_period_s=counter_period_s,
            capacity=capacity,
            poll_clocks=poll_clocks,
        )
        # Sensor lag per power source, s: a sample at host time t shows the work done at t - lag,
        # so a window [a, b] integrates the samples of [a + lag, b + lag].
        if lag_s is None:
            lag_s = DEFAULT_LAG_S
        self._lag_s = ({src: float(lag_s) for src in _POWER_SOURCES} if isinstance(lag_s, (int, float))
                       else {src: float(lag_s.get(src, DEFAULT_LAG_S.get(src, 0.0))) for src in _POWER_SOURCES})
        if any(not np.isfinite(v) or v < 0 or v > 2.0 for v in self._lag_s.values()):
            raise ConfigError(f"lag_s must be between 0 and 2 s per source, got {self._lag_s}")
        self._sampler = None
        self._store: Optional[_Store] = None
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
            self.device_info = chosen
            self.device_indices = [d.index for d in chosen]
            self.nvml_indices = [d.nvml_index for d in chosen]
            if not chosen:
                return self
            self._store = _Store(len(chosen), dict(_core.RECORD_KINDS))
            sampler = _core.PowerSampler(self.nvml_indices, **self._cfg)
            sampler.start()
            self._sampler = sampler
            return self

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
            self._sampler.request_counter()
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
            self._sampler.request_counter()

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

    def _wait_covered(self, t_end_s: float, timeout_s: float) -> None:
        """Flush until every device's buffer lane and counter have a record past t_end_s."""
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
                if info.has_power_samples and self._latest("buffer", k) < t_end_s:
                    done = False
                if info.has_energy_counter and self._latest("counter", k) < t_end_s:
                    done = False
            if done or not running or time.monotonic() >= deadline:
                return
            time.sleep(0.01)

    def _measure(self, w: Window, timeout_s: float) -> Measurement:
        a = w.t_start_ns * 1e-9
        b = (w.t_end_ns or now_ns()) * 1e-9
        if self._sampler is None:
            return Measurement(w.name, a, b, float("nan"), "none", None, float("nan"),
                               float("nan"), {}, None, 0,
                               [], self)
        self._wait_covered(b + self._lag_s["buffer"], timeout_s)  # the buffer is the lane it waits on
        from llm_dvfs import _core

        dropped = self._dropped() - w._dropped_start
        per_dev: dict[int, DeviceMeasurement] = {}
        with self._lock:
            for k, cuda_idx in enumerate(self.device_indices):
                per_dev[cuda_idx] = self._measure_device(k, cuda_idx, a, b, _core)
        energies = [d.energy_j for d in per_dev.values()]
        energy = float(np.sum(energies)) if all(np.isfinite(energies)) else float("nan")
        methods = sorted({d.energy_method for d in per_dev.values()})
        method = methods[0] if len(methods) == 1 else "+".join(methods)
        counters = [d.energy_j_counter for d in per_dev.values()]
        counter = None if any(c is None for c in counters) else float(np.sum(counters))
        peaks = [d.peak_power_w for d in per_dev.values() if np.isfinite(d.peak_power_w)]
        dur = b - a
        errs = [e for d in per_dev.values() for e in d.errors]
        return Measurement(
            name=w.name, t_start_s=a, t_end_s=b, energy_j=energy, energy_method=method,
            energy_j_counter=counter,
            avg_power_w=energy / dur if dur > 0 and np.isfinite(energy) else float("nan"),
            peak_power_w=float(np.sum(peaks)) if peaks else float("nan"),
            devices=per_dev, idle_power_w=self.idle_power_w, dropped_records=max(dropped, 0),
            errors=errs, _monitor=self,
        )

    def _measure_device(self, k: int, cuda_idx: int, a: float, b: float, core: Any) -> DeviceMeasurement:
        st = self._store
        by_source: dict[str, float] = {}
        extrap: dict[str, float] = {}
        for src in _POWER_SOURCES:
            t, p, _ = st.get(src, k)
            if len(t):
                lag = self._lag_s[src]
                e, x = _hold_integral(t, p, a + lag, b + lag)
                by_source[src] = e
                extrap[src] = x
        counter_j = self._counter_delta(k, a, b)
        if counter_j is not None:
            by_source["counter"] = counter_j
        method = next((m for m in _METHOD_ORDER if m in by_source and np.isfinite(by_source[m])), "none")
        energy = by_source.get(method, float("nan"))
        # sample statistics of the chosen power source
        n, gap, peak, lag = 0, 0.0, float("nan"), 0.0
        if method in _POWER_SOURCES:
            t, p, _ = st.get(method, k)
            lag = self._lag_s[method]
            t = t - lag  # on the work's timeline
            inside = (t >= a) & (t <= b)
            n = int(inside.sum())
            held = _held_values(t, p, a, b)
            peak = float(held.max()) if len(held) else float("nan")
            edges = np.concatenate([[a], t[inside], [b]])
            gap = float(np.max(np.diff(edges))) if len(edges) > 1 else 0.0
        gt, gv, _ = st.get("gap", k)
        lost = float(gv[(gt >= a) & (gt <= b)].sum()) if len(gt) else 0.0
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
                for c, x, f in _lane_errors(st, k, a - margin, b + margin)]
        dur = b - a
        return DeviceMeasurement(
            device=cuda_idx, energy_j=energy, energy_method=method, energy_j_counter=counter_j,
            avg_power_w=energy / dur if dur > 0 and np.isfinite(energy) else float("nan"),
            peak_power_w=peak, energy_j_by_source=by_source, n_samples=n, max_sample_gap_s=gap,
            lost_samples_s=lost, edge_extrapolated_s=extrap.get(method, 0.0), lag_s=lag,
            sm_mhz=float(np.median(sm)) if len(sm) else float("nan"),
            mem_mhz=float(np.median(mem)) if len(mem) else float("nan"),
            clock_event_reasons=reasons,
            temperature_c=float(np.max(tmp)) if len(tmp) else float("nan"),
            errors=errs,
        )

    def _counter_delta(self, k: int, a: float, b: float) -> Optional[float]:
        """Counter energy over [a, b] in J by linear interpolation between reads, or None when
        the reads don't bracket both edges."""
        t, _, mj = self._store.get("counter", k)
        if len(t) < 2 or t[0] > a or t[-1] < b:
            return None
        e = mj.astype(np.float64) * 1e-3
        return float(np.interp(b, t, e) - np.interp(a, t, e))

    def trace(self, t0_s: Optional[float] = None, t1_s: Optional[float] = None,
              sources: Sequence[str] = _POWER_SOURCES) -> pd.DataFrame:
        """Raw power samples: columns t_s (host monotonic s), device (CUDA index), power_w,
        source. With bounds, the sample in force at ``t0_s`` is included."""
        self._pull()
        frames = []
        if self._store is not None:
            with self._lock:
                for k, cuda_idx in enumerate(self.device_indices):
                    for src in sources:
                        t, p, _ = self._store.get(src, k)
                        if not len(t):
                            continue
                        lo = 0 if t0_s is None else max(int(np.searchsorted(t, t0_s, side="right")) - 1, 0)
                        hi = len(t) if t1_s is None else int(np.searchsorted(t, t1_s, side="right"))
                        if hi <= lo:
                            continue
                        frames.append(pd.DataFrame({
                            "t_s": t[lo:hi], "device": cuda_idx, "power_w": p[lo:hi], "source": src}))
        if not frames:
            return pd.DataFrame({"t_s": pd.Series(dtype="float64"), "device": pd.Series(dtype="int64"),
                                 "power_w": pd.Series(dtype="float64"), "source": pd.Series(dtype="string")})
        df = pd.concat(frames, ignore_index=True).sort_values(["t_s", "device"], kind="stable")
        return df.reset_index(drop=True)
