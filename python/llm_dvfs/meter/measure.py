"""The simplest API: ``@ld.measure`` on a function, ``with ld.measure(...)`` around a block, and a
Zeus-compatible monitor so code written for ``zeus.monitor.ZeusMonitor`` ports with one line.

Every form measures through a :class:`~llm_dvfs.meter.monitor.PowerMonitor` window (lag,
counter-anchored scale, quality flags, CUDA sync at the edges). Without a monitor argument they
share one process-wide monitor over all visible GPUs (:func:`default_monitor`), started on first
use and stopped at exit.
"""
from __future__ import annotations

import atexit
import collections
import csv
import functools
import os
import threading
import time
from typing import Any, Callable, Optional, Sequence

from llm_dvfs.meter.measurement import Window, ZeusMeasurement
from llm_dvfs.meter.monitor import PowerMonitor

_default: Optional[PowerMonitor] = None
_default_lock = threading.Lock()


def default_monitor() -> PowerMonitor:
    """The process-wide monitor (all visible GPUs), started on first call, stopped at exit.
    Without a driver it is a time-only monitor (energies NaN, ``energy_method='none'``)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = PowerMonitor().start()
            atexit.register(_default.stop)
        elif not _default.running and _default.available:
            _default.start()
        return _default


def close_default_monitor() -> None:
    """Stop and forget the process-wide monitor (the next use starts a new one), e.g. before
    forking workers or when the visible GPUs changed."""
    global _default
    with _default_lock:
        if _default is not None:
            _default.stop()
            _default = None


class measure:
    """Measure a function's every call, or a block.

    ``@ld.measure`` / ``@ld.measure("generate")``: each call of the function runs in a window
    named after it (default: the function's qualified name); the function's return value and
    exceptions are unchanged. The wrapper keeps the last ``keep`` windows in
    ``fn.measurements`` (a deque, newest last) and the newest in ``fn.last_measurement``; each
    window's values are computed on first access. ``callback(window)`` runs after every call.

    ``with ld.measure("block") as w: ...`` then ``w.energy_j``.

    Args:
        name: window name (or, used bare as ``@ld.measure``, the function itself).
        monitor: the PowerMonitor to use; None = :func:`default_monitor`.
        sync: synchronise the monitored CUDA devices at both edges (see PowerMonitor.window).
        keep: how many windows a decorated function keeps (older ones are dropped).
        callback: called with each finished Window (exceptions from it propagate).
    """

    def __new__(cls, name: Any = None, **kwargs: Any) -> Any:
        if callable(name) and not isinstance(name, str):  # bare @ld.measure
            return cls(**kwargs)(name)
        return super().__new__(cls)

    def __init__(self, name: Optional[str] = None, *, monitor: Optional[PowerMonitor] = None,
                 sync: bool = True, keep: int = 1000,
                 callback: Optional[Callable[[Window], None]] = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.name = name
        self.monitor = monitor
        self.sync = sync
        self.keep = keep
        self.callback = callback
        self._window: Optional[Window] = None

    def _monitor(self) -> PowerMonitor:
        return self.monitor if self.monitor is not None else default_monitor()

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        name = self.name or getattr(fn, "__qualname__", getattr(fn, "__name__", "function"))
        windows: collections.deque = collections.deque(maxlen=self.keep)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            w = self._monitor().begin_window(name, sync=self.sync)
            try:
                return fn(*args, **kwargs)
            finally:
                w.end()
                windows.append(w)
                wrapper.last_measurement = w
                if self.callback is not None:
                    self.callback(w)

        wrapper.measurements = windows
        wrapper.last_measurement = None
        return wrapper

    def __enter__(self) -> Window:
        self._window = self._monitor().begin_window(self.name or "block", sync=self.sync)
        return self._window

    def __exit__(self, *exc: Any) -> None:
        assert self._window is not None
        self._window.end()
        if self.callback is not None:
            self.callback(self._window)


# -- Zeus compatibility -----------------------------------------------------------------------
class ZeusMonitor:
    """A drop-in for ``zeus.monitor.ZeusMonitor`` (GPU energy only) on llm_dvfs's meter.

    Port code written for Zeus by replacing ``from zeus.monitor import ZeusMonitor`` with
    ``from llm_dvfs import ZeusMonitor``. ``begin_window(key)`` / ``end_window(key)`` return
    :class:`ZeusMeasurement`. CPU/DRAM energy (RAPL) is not measured: ``cpu_indices`` must be
    None or empty. ``log_file`` appends one CSV row per window as Zeus does (start_time,
    window_name, elapsed_time, gpu<i>_energy...). Extra keyword arguments go to PowerMonitor.

    Raises: ValueError for a duplicate or unknown window key (as Zeus does).
    """

    def __init__(self, gpu_indices: Optional[Sequence[int]] = None,
                 cpu_indices: Optional[Sequence[int]] = None, approx_instant_energy: bool = False,
                 log_file: Optional[str | os.PathLike] = None, sync_execution_with: str = "torch",
                 **monitor_kwargs: Any) -> None:
        if cpu_indices:
            raise ValueError("llm_dvfs measures GPUs only: cpu_indices must be None or empty")
        if sync_execution_with != "torch":
            raise ValueError("only sync_execution_with='torch' is supported")
        # approx_instant_energy: windows shorter than the sensor's update period are flagged
        # (Measurement.flags) rather than approximated; the argument is accepted for porting.
        self._mon = PowerMonitor(devices=gpu_indices, **monitor_kwargs).start()
        self.gpu_indices = list(self._mon.device_indices)
        self._windows: dict[str, tuple[Window, float]] = {}
        self._log_file = None if log_file is None else os.fspath(log_file)
        if self._log_file is not None and not os.path.exists(self._log_file):
            with open(self._log_file, "w", newline="") as f:
                csv.writer(f).writerow(["start_time", "window_name", "elapsed_time"]
                                       + [f"gpu{i}_energy" for i in self.gpu_indices])

    @property
    def monitor(self) -> PowerMonitor:
        return self._mon

    def begin_window(self, key: str, sync_execution: bool = True) -> None:
        if key in self._windows:
            raise ValueError(f"Measurement window '{key}' already exists")
        self._windows[key] = (self._mon.begin_window(key, sync=sync_execution), time.time())

    def end_window(self, key: str, sync_execution: bool = True, cancel: bool = False) -> ZeusMeasurement:
        if key not in self._windows:
            raise ValueError(f"Measurement window '{key}' does not exist")
        w, wall_start = self._windows.pop(key)
        w.sync = sync_execution  # the end edge's sync, chosen here as in Zeus
        w.end()
        if cancel:
            return ZeusMeasurement(time=0.0, gpu_energy={i: 0.0 for i in self.gpu_indices})
        zm = ZeusMeasurement.from_measurement(w.measurement())
        if self._log_file is not None:
            with open(self._log_file, "a", newline="") as f:
                csv.writer(f).writerow([wall_start, key, zm.time] + [zm.gpu_energy.get(i) for i in self.gpu_indices])
        return zm

    def close(self) -> None:
        self._mon.stop()
