"""What a window measures: :class:`Window` (an interval on the monitor's timeline),
:class:`Measurement` (its energy, summed over devices) and :class:`DeviceMeasurement` (one
device's share). The monitor (meter/monitor.py) computes them; this module only holds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from llm_dvfs.errors import NvmlError

# How long a window end waits for the sampler to deliver samples past the end (the driver
# publishes a buffer sample ~20 ms after its timestamp; the counter read is ~3 ms).
DEFAULT_FINALIZE_TIMEOUT_S = 0.5
# Quality thresholds (see the module docstring). The buffer's spacing is 7-45 ms on H100/H200,
# so 100 ms without a sample means samples are missing.
MAX_SAMPLE_GAP_S = 0.1
MAX_EDGE_EXTRAPOLATION_S = 0.05
# Flags that make a window's energy untrustworthy (``ok`` False); others are warnings.
BAD_FLAGS = frozenset({"samples_lost", "sample_gap", "edge_extrapolated", "dropped_records",
                       "before_history", "nvml_error"})


def now_ns() -> int:
    """Host monotonic time in ns, the timeline of every sample and mark."""
    from llm_dvfs import _core

    return _core.monotonic_ns()



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
    lag_method: str = "default"        # given | measured (sensor cache) | default
    gain: float = 1.0                  # scale applied to the chosen source's raw energy
    gain_se: float = float("nan")      # its standard error
    gain_span_s: float = 0.0           # seconds of counter the gain was fitted over (counter_edges:
                                       # between the two change instants)
    calibration: str = "none"          # counter_edges (window stitched to the counter's change
                                       # instants, meter/stitch.py) | counter (running gain) | why
                                       # no gain was applied
    edges: str = ""                    # counter_edges, or why the window was not stitched
    resolution_s: float = float("nan") # update period of the chosen source on this GPU
    flags: list[str] = field(default_factory=list)
    sm_mhz: float = float("nan")       # median SM clock in force during the window
    mem_mhz: float = float("nan")
    clock_event_reasons: int = 0       # OR of the NVML clock-event reason bits seen
    temperature_c: float = float("nan")
    errors: list[NvmlError] = field(default_factory=list)


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
    errors: list[NvmlError] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)   # union of the devices' quality flags
    resolution_s: float = float("nan") # coarsest update period of the sources used, s
    _monitor: Any = field(default=None, repr=False, compare=False)

    @classmethod
    def time_only(cls, name: str, t_start_s: float, t_end_s: float, monitor: Any = None) -> "Measurement":
        """A window measured without a power source: its edges only, NaN energies and powers,
        ``energy_method`` ``"none"``, no devices (so NaN clocks), never ``ok``."""
        nan = float("nan")
        return cls(name, t_start_s, t_end_s, energy_j=nan, energy_method="none", energy_j_counter=None,
                   avg_power_w=nan, peak_power_w=nan, devices={}, _monitor=monitor)

    @property
    def duration_s(self) -> float:
        return self.t_end_s - self.t_start_s

    @property
    def ok(self) -> bool:
        """True when the energy is trustworthy: finite, no NVML error, no record dropped, no
        lost samples, no sample gap or edge extrapolation beyond the thresholds."""
        return (not self.errors and self.dropped_records == 0 and np.isfinite(self.energy_j)
                and not BAD_FLAGS.intersection(self.flags))

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

    def zeus(self) -> "ZeusMeasurement":
        """This window in the shape of Zeus's Measurement (``time``, ``gpu_energy``,
        ``total_energy``)."""
        return ZeusMeasurement.from_measurement(self)

    def trace(self, margin_s: float = 0.0, *, calibrated: bool = True) -> pd.DataFrame:
        """Power samples of this window: columns t_s, device, power_w, source. ``calibrated``
        multiplies each device's samples by the gain this window applied, so that
        ``attribute(w.trace(), ..., lag_s=...)`` over the window gives ``energy_j``."""
        if self._monitor is None:
            return pd.DataFrame(columns=["t_s", "device", "power_w", "source"])
        gains = {d: m.gain for d, m in self.devices.items()} if calibrated else None
        return self._monitor.trace(self.t_start_s - margin_s, self.t_end_s + margin_s, gains=gains)


class Window:
    """A named interval on the monitor's timeline. Attribute access to the measured values
    (``energy_j``, ``energy_method``, ``duration_s``, ...) finalises the window's
    :class:`Measurement` (waiting briefly for the sampler to deliver samples past its end)."""

    def __init__(self, monitor: Any, name: str, t_start_ns: int, sync: bool = False) -> None:
        self.monitor = monitor
        self.name = name
        self.sync = sync  # synchronise the monitored CUDA devices at the end edge too
        self.t_start_ns = t_start_ns
        self.t_end_ns: Optional[int] = None
        self._dropped_start = monitor._dropped()
        self._bracketed_start = False  # the sampler bracketed the counter at the start edge
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


@dataclass
class ZeusMeasurement:
    """The shape of ``zeus.monitor.energy.Measurement``: ``time`` (s), ``gpu_energy`` ({GPU
    index: J}), ``cpu_energy`` / ``dram_energy`` (None: not measured) and ``total_energy`` (J).
    ``measurement`` is llm_dvfs's full :class:`Measurement` (method, flags, counter, clocks)."""

    time: float
    gpu_energy: dict[int, float]
    cpu_energy: Optional[dict[int, float]] = None
    dram_energy: Optional[dict[int, float]] = None
    measurement: Optional[Measurement] = field(default=None, repr=False)

    @property
    def total_energy(self) -> float:
        total = sum(self.gpu_energy.values())
        for extra in (self.cpu_energy, self.dram_energy):
            if extra:
                total += sum(extra.values())
        return total

    @classmethod
    def from_measurement(cls, m: Measurement) -> "ZeusMeasurement":
        return cls(time=m.duration_s, gpu_energy={i: d.energy_j for i, d in m.devices.items()},
                   measurement=m)
