"""Python side of the emulated GPU: a ctypes wrapper of the fake_nvml_* control functions.

Tests get a ready :class:`FakeGpu` from the ``fake_gpu`` fixture (tests/conftest.py). Scripts
(benchmarks) can set one up themselves::

    from fakes.fake_gpu import FakeGpu          # with tests/ on sys.path
    gpu = FakeGpu.setup(state_path="/tmp/my_state", devices=2)   # builds, sets env, resets
    gpu.set_trace([0.0, 0.5, 1.0], [300.0, 650.0, 90.0])

Units: watts (W), seconds of CLOCK_REALTIME (``time.time()``), MHz. Every control raises
:class:`FakeControlError` when the emulator refuses (bad device index, invalid argument, ...).
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path
from typing import Iterable, Sequence

# NVML return codes the tests use most (the full table is llm_dvfs.errors).
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_UNKNOWN = 999

NVML_FI_DEV_POWER_AVERAGE = 185
NVML_FI_DEV_POWER_INSTANT = 186
CLOCKS_EVENT_REASON_SW_POWER_CAP = 0x4

#: The emulated H100's tables (also what the NVML calls return).
GRAPHICS_CLOCKS_MHZ = {
    2619: list(range(1980, 344, -15)),  # 110 values, descending as NVML returns them
    1593: list(range(1410, 344, -15)),  # 72 values
}
MEMORY_CLOCKS_MHZ = [2619, 1593]
POWER_LIMIT_MIN_W, POWER_LIMIT_MAX_W, POWER_LIMIT_DEFAULT_W = 200.0, 700.0, 700.0
IDLE_W_DEFAULT, BASE_W_DEFAULT = 70.0, 300.0
SAMPLE_PERIOD_S, BUFFER_SAMPLES, FIELD_PERIOD_S = 0.020, 120, 0.100


def model_power_w(base_w: float, sm_mhz: float, idle_w: float = IDLE_W_DEFAULT,
                  limit_w: float = POWER_LIMIT_MAX_W) -> float:
    """The emulator's power model (W) for a base trace value at an SM clock, before/after the cap.

    P = idle' + (base - idle') * f V(f)^2 / (1980 V(1980)^2), idle' = min(idle, base),
    V rising linearly from 0.70 V at 345 MHz to 1.05 V at 1980 MHz; clamped to limit_w.
    """
    idle = min(idle_w, base_w)
    v = 0.70 + 0.35 * (sm_mhz - 345.0) / (1980.0 - 345.0)
    p = idle + (base_w - idle) * (sm_mhz * v * v) / (1980.0 * 1.05 * 1.05)
    return min(p, limit_w)


class FakeControlError(RuntimeError):
    """A fake_nvml_* control function refused; ``code`` is the NVML-style code it returned."""

    def __init__(self, function: str, code: int) -> None:
        self.function, self.code = function, int(code)
        super().__init__(f"{function} returned {code}")


_D = ctypes.c_double
_U = ctypes.c_uint
_PU = ctypes.POINTER(ctypes.c_uint)
_PD = ctypes.POINTER(ctypes.c_double)
_S = ctypes.c_char_p

# name -> (restype, argtypes)
_CONTROLS = {
    "fake_nvml_reset": (ctypes.c_int, []),
    "fake_nvml_device_count": (ctypes.c_int, []),
    "fake_nvml_set_power_w": (ctypes.c_int, [_U, _D]),
    "fake_nvml_set_trace": (ctypes.c_int, [_U, _PD, _PD, _U]),
    "fake_nvml_trace_start_s": (_D, [_U]),
    "fake_nvml_set_idle_w": (ctypes.c_int, [_U, _D]),
    "fake_nvml_fail": (ctypes.c_int, [_S, ctypes.c_int, ctypes.c_int]),
    "fake_nvml_fail_field": (ctypes.c_int, [_U, ctypes.c_int, ctypes.c_int]),
    "fake_nvml_clear_failures": (ctypes.c_int, []),
    "fake_nvml_set_latency_us": (ctypes.c_int, [_S, _U]),
    "fake_nvml_call_count": (ctypes.c_long, [_S]),
    "fake_nvml_call_count_exact": (ctypes.c_long, [_S]),
    "fake_nvml_set_permission": (ctypes.c_int, [ctypes.c_int]),
    "fake_nvml_set_lag_ms": (ctypes.c_int, [_D]),
    "fake_nvml_set_jitter_ms": (ctypes.c_int, [_D]),
    "fake_nvml_set_buffer_gain": (ctypes.c_int, [_U, _D]),
    "fake_nvml_set_counter_period_ms": (ctypes.c_int, [_U, _U]),
    "fake_nvml_set_samples_min_count": (ctypes.c_int, [_U]),
    "fake_nvml_set_realtime_offset_us": (ctypes.c_int, [ctypes.c_longlong]),
    "fake_nvml_get_locked_clocks": (ctypes.c_int, [_U, _PU, _PU]),
    "fake_nvml_get_mem_locked_clocks": (ctypes.c_int, [_U, _PU, _PU]),
    "fake_nvml_get_app_clocks": (ctypes.c_int, [_U, _PU, _PU]),
    "fake_nvml_get_power_limit_mw": (ctypes.c_int, [_U, _PU]),
    "fake_nvml_set_processes": (ctypes.c_int, [_U, _U, _PU]),
    "fake_nvml_energy_between": (_D, [_U, _D, _D]),
    "fake_nvml_power_at": (_D, [_U, _D]),
    "fake_nvml_refcount": (ctypes.c_int, []),
    "fake_nvml_state_path": (_S, []),
    "fake_nvml_debug_hold_lock": (ctypes.c_int, [_D]),
    "fake_nvml_debug_lock_holder": (ctypes.c_int, []),
}


def load_fake(lib_path: str | os.PathLike) -> ctypes.CDLL:
    """dlopen the emulator (the same handle the package gets for the same path) with prototypes."""
    lib = ctypes.CDLL(str(lib_path))
    for name, (res, args) in _CONTROLS.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


class FakeGpu:
    """Drive the emulated GPU(s) of one state file.

    The object only wraps the library; the state it controls is the file named by
    ``FAKE_NVML_STATE`` in this process's environment at call time (the fixture sets it).
    """

    def __init__(self, lib_path: str | os.PathLike, state_path: str | os.PathLike | None = None,
                 variant: str = "full") -> None:
        self.lib_path = Path(lib_path)
        self.state_path = Path(state_path) if state_path else None
        self.variant = variant
        self.lib = load_fake(self.lib_path)

    # ---- setup ----------------------------------------------------------------------------
    @classmethod
    def setup(cls, state_path: str | os.PathLike, devices: int = 1, variant: str = "full",
              build_dir: str | os.PathLike | None = None) -> "FakeGpu":
        """Build the library, point this process's environment at it, reset, return a FakeGpu.

        Sets LLM_DVFS_NVML_LIBRARY, FAKE_NVML_STATE and FAKE_NVML_DEVICES in ``os.environ``
        (child processes inherit them). For scripts; tests use the ``fake_gpu`` fixture.
        """
        lib = _build_module().build_fake(variant, build_dir)
        os.environ["LLM_DVFS_NVML_LIBRARY"] = str(lib)
        os.environ["FAKE_NVML_STATE"] = str(state_path)
        os.environ["FAKE_NVML_DEVICES"] = str(int(devices))
        gpu = cls(lib, state_path, variant)
        gpu.reset()
        return gpu

    def _check(self, name: str, rc: int) -> None:
        if rc != 0:
            raise FakeControlError(name, rc)

    def reset(self) -> None:
        """Fresh GPU state: 300 W base, no locks, default limits, no failures, counters zeroed.

        Re-reads FAKE_NVML_DEVICES, FAKE_NVML_LAG_MS, FAKE_NVML_JITTER_MS,
        FAKE_NVML_BUFFER_GAIN and FAKE_NVML_COUNTER_PERIOD_MS. Does not touch
        the per-process nvmlInit refcount.
        """
        self._check("fake_nvml_reset", self.lib.fake_nvml_reset())

    @property
    def device_count(self) -> int:
        return int(self.lib.fake_nvml_device_count())

    # ---- power ----------------------------------------------------------------------------
    def set_power_w(self, watts: float, device: int = 0) -> None:
        """Constant base power (W at 1980 MHz) from now on; scripted future segments dropped."""
        self._check("fake_nvml_set_power_w", self.lib.fake_nvml_set_power_w(device, watts))

    def set_trace(self, t_s: Sequence[float], watts: Sequence[float], device: int = 0) -> float:
        """Piecewise-constant base power starting now; segment i begins t_s[i] s from now and
        the last value holds. Starts a new 20 ms sample grid at now. Returns the start time
        (CLOCK_REALTIME s), so ``energy_between(start + a, start + b)`` is exact."""
        if len(t_s) != len(watts):
            raise ValueError("t_s and watts differ in length")
        n = len(t_s)
        ts = (ctypes.c_double * n)(*t_s)
        ws = (ctypes.c_double * n)(*watts)
        self._check("fake_nvml_set_trace", self.lib.fake_nvml_set_trace(device, ts, ws, n))
        return self.trace_start_s(device)

    def trace_start_s(self, device: int = 0) -> float:
        """CLOCK_REALTIME s of the last set_trace / set_power_w (or the reset)."""
        return float(self.lib.fake_nvml_trace_start_s(device))

    def set_idle_w(self, watts: float, device: int = 0) -> None:
        """Idle (clock-independent) part of the power model, default 70 W, from now on."""
        self._check("fake_nvml_set_idle_w", self.lib.fake_nvml_set_idle_w(device, watts))

    def energy_between(self, *args: float, device: int | None = None) -> float:
        """Exact integral (J) of the true emulated power between two CLOCK_REALTIME instants.

        Call as ``energy_between(t0_s, t1_s[, device=0])`` or, like the C function,
        ``energy_between(device, t0_s, t1_s)``. NaN for history older than the emulator keeps
        (>= 30 s normally, >= 5 s at least)."""
        if len(args) == 3:
            if device is not None:
                raise TypeError("device given twice")
            dev, t0_s, t1_s = int(args[0]), float(args[1]), float(args[2])
        elif len(args) == 2:
            dev, t0_s, t1_s = int(device or 0), float(args[0]), float(args[1])
        else:
            raise TypeError("energy_between(t0_s, t1_s, device=0) or energy_between(device, t0_s, t1_s)")
        return float(self.lib.fake_nvml_energy_between(dev, t0_s, t1_s))

    def power_at(self, t_s: float, device: int = 0) -> float:
        """True emulated power (W) at a CLOCK_REALTIME instant (no lag, after clocks and cap)."""
        return float(self.lib.fake_nvml_power_at(device, t_s))

    def set_lag_ms(self, ms: float) -> None:
        """Delay of what buffer and fields report vs the true power (0-2000 ms; counter exact)."""
        self._check("fake_nvml_set_lag_ms", self.lib.fake_nvml_set_lag_ms(ms))

    def set_jitter_ms(self, ms: float) -> None:
        """Deterministic +-jitter of buffer sample timestamps (0-9 ms)."""
        self._check("fake_nvml_set_jitter_ms", self.lib.fake_nvml_set_jitter_ms(ms))

    def set_buffer_gain(self, gain: float, device: int = 0) -> None:
        """Sample-buffer values are the true power times ``gain`` (in (0, 10]) from now on;
        fields and the energy counter stay exact. Real H200 buffers read up to ~1 % off."""
        self._check("fake_nvml_set_buffer_gain", self.lib.fake_nvml_set_buffer_gain(device, gain))

    def set_counter_period_ms(self, ms: int, device: int = 0) -> None:
        """The energy counter holds the exact integral up to the last multiple of ``ms`` (grid
        anchored at the reset, like the fields'); 0 = exact at every call, at most 10000."""
        self._check("fake_nvml_set_counter_period_ms",
                    self.lib.fake_nvml_set_counter_period_ms(device, int(ms)))

    def set_samples_min_count(self, count: int) -> None:
        """nvmlDeviceGetSamples answers an array of fewer than ``count`` samples with
        NVML_ERROR_INSUFFICIENT_SIZE and its size query with at least ``count`` (0 = off)."""
        self._check("fake_nvml_set_samples_min_count",
                    self.lib.fake_nvml_set_samples_min_count(int(count)))

    def set_realtime_offset_us(self, offset_us: int) -> None:
        """The emulated driver's CLOCK_REALTIME is ``offset_us`` off the model's from now on (a
        host clock step as the driver sees it): later buffer stamps and field timestamps carry
        it. The process under test must step its own realtime clock the same way."""
        self._check("fake_nvml_set_realtime_offset_us",
                    self.lib.fake_nvml_set_realtime_offset_us(int(offset_us)))

    # ---- failures, latency, counters ---------------------------------------------------------
    def fail(self, function: str, code: int, count: int = 1) -> None:
        """The next ``count`` calls of ``function`` return ``code`` (-1 = forever, 0 = clear).

        Any exported name or the unversioned name matches all versions of that function
        (``"nvmlDeviceGetPciInfo"`` == ``_v2`` == ``_v3``; ``...ThrottleReasons`` ==
        ``...EventReasons``)."""
        self._check("fake_nvml_fail", self.lib.fake_nvml_fail(function.encode(), code, count))

    def fail_field(self, field_id: int, code: int, count: int = 1) -> None:
        """The next ``count`` reads of one field in nvmlDeviceGetFieldValues get this per-field
        nvmlReturn (the call itself succeeds)."""
        self._check("fake_nvml_fail_field", self.lib.fake_nvml_fail_field(field_id, code, count))

    def clear_failures(self) -> None:
        self._check("fake_nvml_clear_failures", self.lib.fake_nvml_clear_failures())

    def set_latency_ms(self, function: str, ms: float) -> None:
        """Make every call of ``function`` take ``ms`` longer (slept outside the state lock);
        e.g. 3 ms for nvmlDeviceGetTotalEnergyConsumption as on an H100."""
        self._check("fake_nvml_set_latency_us",
                    self.lib.fake_nvml_set_latency_us(function.encode(), int(round(ms * 1000))))

    def call_count(self, function: str) -> int:
        """Calls of a function since the reset, all processes, all versioned names together."""
        n = int(self.lib.fake_nvml_call_count(function.encode()))
        if n < 0:
            raise FakeControlError("fake_nvml_call_count", n)
        return n

    def call_count_exact(self, symbol: str) -> int:
        """Calls through one exported name only (e.g. ``nvmlInit`` vs ``nvmlInit_v2``)."""
        n = int(self.lib.fake_nvml_call_count_exact(symbol.encode()))
        if n < 0:
            raise FakeControlError("fake_nvml_call_count_exact", n)
        return n

    def refcount(self) -> int:
        """nvmlInit refcount of this process (per loaded library)."""
        return int(self.lib.fake_nvml_refcount())

    # ---- settings -------------------------------------------------------------------------
    def set_permission(self, allowed: bool) -> None:
        """With False every setter returns NVML_ERROR_NO_PERMISSION (as without root)."""
        self._check("fake_nvml_set_permission", self.lib.fake_nvml_set_permission(int(bool(allowed))))

    def _pair(self, name: str, device: int) -> tuple[int, int]:
        a, b = ctypes.c_uint(), ctypes.c_uint()
        self._check(name, getattr(self.lib, name)(device, ctypes.byref(a), ctypes.byref(b)))
        return a.value, b.value

    def locked_clocks(self, device: int = 0) -> tuple[int, int]:
        """(min, max) locked GPU clocks in MHz; (0, 0) when not locked."""
        return self._pair("fake_nvml_get_locked_clocks", device)

    def mem_locked_clocks(self, device: int = 0) -> tuple[int, int]:
        """(min, max) locked memory clocks in MHz; (0, 0) when not locked."""
        return self._pair("fake_nvml_get_mem_locked_clocks", device)

    def app_clocks(self, device: int = 0) -> tuple[int, int]:
        """(memory, graphics) applications clocks in MHz; default (2619, 1980)."""
        return self._pair("fake_nvml_get_app_clocks", device)

    def power_limit_w(self, device: int = 0) -> float:
        mw = ctypes.c_uint()
        self._check("fake_nvml_get_power_limit_mw",
                    self.lib.fake_nvml_get_power_limit_mw(device, ctypes.byref(mw)))
        return mw.value / 1000.0

    def set_processes(self, pids: Iterable[int], device: int = 0) -> None:
        """Compute processes nvmlDeviceGetComputeRunningProcesses reports (max 64)."""
        pids = list(pids)
        arr = (ctypes.c_uint * max(1, len(pids)))(*pids)
        self._check("fake_nvml_set_processes", self.lib.fake_nvml_set_processes(device, len(pids), arr))

    def is_pristine(self, device: int = 0) -> bool:
        """No locked clocks, default applications clocks and power limit (what a restore leaves)."""
        return (self.locked_clocks(device) == (0, 0) and self.mem_locked_clocks(device) == (0, 0)
                and self.app_clocks(device) == (2619, 1980)
                and self.power_limit_w(device) == POWER_LIMIT_DEFAULT_W)

    def mapped_state_path(self) -> str:
        """The state file this process maps now (follows FAKE_NVML_STATE)."""
        return self.lib.fake_nvml_state_path().decode()


def _build_module():
    """tests/fakes/build.py, imported by path (a top-level ``build`` may be PyPA's package)."""
    import importlib.util

    name = "_llm_dvfs_fake_nvml_build"
    mod = sys.modules.get(name)
    if mod is None:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("build.py"))
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


def _loaded_real_nvml() -> list[str]:
    """Paths of a real libnvidia-ml mapped into this process (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return sorted({line.split()[-1] for line in f
                           if "/libnvidia-ml.so" in line and line.split()[-1].startswith("/")})
    except OSError:
        return []


def assert_emulated_nvml() -> Path:
    """Skip the calling test unless this process's NVML calls go to the emulated GPU.

    Fail-closed guard for tests that change clocks or power limits: it passes only when
    LLM_DVFS_NVML_LIBRARY names an existing library exporting ``fake_nvml_reset``, no real
    libnvidia-ml is mapped into the process, and — if the package already loaded an NVML
    library (``llm_dvfs._core.nvml_library_path()``) — that library is this same file.
    Returns the emulator's path. Outside pytest the skip is raised as ``pytest.skip.Exception``.
    """
    import pytest

    path = os.environ.get("LLM_DVFS_NVML_LIBRARY", "")
    if not path:
        pytest.skip("LLM_DVFS_NVML_LIBRARY is not set: refusing to change clocks of a possibly "
                    "real GPU (use the fake_gpu fixture)")
    p = Path(path)
    if not p.is_file():
        pytest.skip(f"LLM_DVFS_NVML_LIBRARY={path} does not exist")
    try:
        lib = ctypes.CDLL(str(p))
    except OSError as e:
        pytest.skip(f"cannot load LLM_DVFS_NVML_LIBRARY={path}: {e}")
    if not hasattr(lib, "fake_nvml_reset"):
        pytest.skip(f"LLM_DVFS_NVML_LIBRARY={path} is not the emulated GPU (no fake_nvml_reset)")
    real = _loaded_real_nvml()
    if real:
        pytest.skip(f"a real NVML library is loaded in this process ({', '.join(real)}): "
                    "refusing to run a clock-changing test")
    core = sys.modules.get("llm_dvfs._core")
    get_loaded = getattr(core, "nvml_library_path", None) if core is not None else None
    if get_loaded is not None:
        loaded = get_loaded()
        if loaded and Path(loaded).resolve() != p.resolve():
            pytest.skip(f"the package has {loaded} loaded, not the emulated GPU at {p}")
    return p
