"""The emulated GPU itself (tests/fakes/fake_nvml.c), driven directly through ctypes.

These tests pin what the package's tests rely on: the exported ABI of every build variant, the
H100 tables and size protocols, the 20 ms / 120-entry sample buffer, the 100 ms fields, an energy
counter equal to the exact integral of the scripted trace (or held on a 100 ms grid), a buffer
gain, realtime-clock steps, power that follows the locked clock and the power cap, failure
injection, and state shared between processes and threads.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from fakes.fake_gpu import (
    CLOCKS_EVENT_REASON_SW_POWER_CAP,
    GRAPHICS_CLOCKS_MHZ,
    NVML_ERROR_GPU_IS_LOST,
    NVML_ERROR_INSUFFICIENT_SIZE,
    NVML_ERROR_INVALID_ARGUMENT,
    NVML_ERROR_NO_PERMISSION,
    NVML_ERROR_NOT_FOUND,
    NVML_ERROR_NOT_SUPPORTED,
    NVML_ERROR_UNINITIALIZED,
    NVML_FI_DEV_POWER_AVERAGE,
    NVML_FI_DEV_POWER_INSTANT,
    NVML_SUCCESS,
    FakeControlError,
    FakeGpu,
    _build_module,
    assert_emulated_nvml,
    model_power_w,
)

ROOT = Path(__file__).resolve().parents[1]
NVML_API_H = ROOT / "csrc" / "nvml_api.h"
CONTROL_FUNCTIONS = ["fake_nvml_set_power_w", "fake_nvml_set_trace", "fake_nvml_fail",
                     "fake_nvml_get_locked_clocks", "fake_nvml_reset", "fake_nvml_set_permission",
                     "fake_nvml_get_power_limit_mw", "fake_nvml_get_mem_locked_clocks",
                     "fake_nvml_get_app_clocks", "fake_nvml_energy_between",
                     "fake_nvml_set_processes", "fake_nvml_call_count"]
OPTIONAL_ABSENT_IN_MINIMAL = {"nvmlDeviceGetSamples", "nvmlDeviceGetTotalEnergyConsumption",
                              "nvmlDeviceGetFieldValues"}


# -- a thin ctypes view of the fake's NVML side ---------------------------------------------------
class Value(ctypes.Union):
    _fields_ = [("dVal", ctypes.c_double), ("siVal", ctypes.c_int), ("uiVal", ctypes.c_uint),
                ("ulVal", ctypes.c_ulong), ("ullVal", ctypes.c_ulonglong),
                ("sllVal", ctypes.c_longlong), ("usVal", ctypes.c_ushort)]


class Sample(ctypes.Structure):
    _fields_ = [("timeStamp", ctypes.c_ulonglong), ("sampleValue", Value)]


class FieldValue(ctypes.Structure):
    _fields_ = [("fieldId", ctypes.c_uint), ("scopeId", ctypes.c_uint),
                ("timestamp", ctypes.c_longlong), ("latencyUsec", ctypes.c_longlong),
                ("valueType", ctypes.c_int), ("nvmlReturn", ctypes.c_int), ("value", Value)]


class PciInfo(ctypes.Structure):
    _fields_ = [("busIdLegacy", ctypes.c_char * 16), ("domain", ctypes.c_uint),
                ("bus", ctypes.c_uint), ("device", ctypes.c_uint), ("pciDeviceId", ctypes.c_uint),
                ("pciSubSystemId", ctypes.c_uint), ("busId", ctypes.c_char * 32)]


class ProcessInfo(ctypes.Structure):
    _fields_ = [("pid", ctypes.c_uint), ("usedGpuMemory", ctypes.c_ulonglong),
                ("gpuInstanceId", ctypes.c_uint), ("computeInstanceId", ctypes.c_uint)]


class Memory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong),
                ("used", ctypes.c_ulonglong)]


def test_ctypes_mirrors_have_nvml_sizes():
    assert (ctypes.sizeof(Sample), ctypes.sizeof(FieldValue), ctypes.sizeof(PciInfo),
            ctypes.sizeof(ProcessInfo), ctypes.sizeof(Memory)) == (16, 40, 68, 24, 24)


class Nvml:
    """Calls into a loaded emulator; each method returns the NVML return code first."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        lib.nvmlErrorString.restype = ctypes.c_char_p

    def __getattr__(self, name):
        return getattr(self.lib, name)

    def init(self) -> int:
        fn = getattr(self.lib, "nvmlInit_v2", None) or self.lib.nvmlInit
        return fn()

    def handle(self, index: int = 0) -> ctypes.c_void_p:
        h = ctypes.c_void_p()
        fn = getattr(self.lib, "nvmlDeviceGetHandleByIndex_v2", None) or self.lib.nvmlDeviceGetHandleByIndex
        assert fn(ctypes.c_uint(index), ctypes.byref(h)) == NVML_SUCCESS
        return h

    def samples(self, h, last_seen: int = 0, cap: int = 200):
        buf = (Sample * max(cap, 1))()
        vt, n = ctypes.c_int(-1), ctypes.c_uint(cap)
        r = self.lib.nvmlDeviceGetSamples(h, 0, ctypes.c_ulonglong(last_seen), ctypes.byref(vt),
                                          ctypes.byref(n), buf)
        got = n.value if r == NVML_SUCCESS else 0
        return r, vt.value, [(buf[i].timeStamp, buf[i].sampleValue.uiVal) for i in range(got)]

    def fields(self, h, *ids: int):
        arr = (FieldValue * len(ids))()
        for i, f in enumerate(ids):
            arr[i].fieldId = f
        r = self.lib.nvmlDeviceGetFieldValues(h, len(ids), arr)
        return r, list(arr)

    def uint(self, fn: str, h, *args) -> tuple[int, int]:
        v = ctypes.c_uint()
        return getattr(self.lib, fn)(h, *args, ctypes.byref(v)), v.value

    def energy_mj(self, h) -> int:
        v = ctypes.c_ulonglong()
        assert self.lib.nvmlDeviceGetTotalEnergyConsumption(h, ctypes.byref(v)) == NVML_SUCCESS
        return v.value

    def sm_mhz(self, h) -> int:
        r, v = self.uint("nvmlDeviceGetClockInfo", h, ctypes.c_int(1))
        assert r == NVML_SUCCESS
        return v

    def reasons(self, h) -> int:
        v = ctypes.c_ulonglong()
        assert self.lib.nvmlDeviceGetCurrentClocksEventReasons(h, ctypes.byref(v)) == NVML_SUCCESS
        return v.value

    def lock(self, h, lo: int, hi: int) -> int:
        return self.lib.nvmlDeviceSetGpuLockedClocks(h, ctypes.c_uint(lo), ctypes.c_uint(hi))

    def string(self, fn: str, *args, size: int = 96) -> tuple[int, str]:
        buf = ctypes.create_string_buffer(size)
        r = getattr(self.lib, fn)(*args, buf, ctypes.c_uint(size))
        return r, buf.value.decode()


@pytest.fixture
def nvml(fake_gpu: FakeGpu):
    """NVML initialised on the fake (shut down after the test)."""
    n = Nvml(fake_gpu.lib)
    assert n.init() == NVML_SUCCESS
    yield n
    assert n.nvmlShutdown() == NVML_SUCCESS


# -- exported ABI -------------------------------------------------------------------------------
def _symbol_list() -> list[tuple[str, bool, str, str | None]]:
    """(member, required, primary, fallback) of every entry of csrc/nvml_api.h's X-macro."""
    text = NVML_API_H.read_text()
    sep = r"[\s\\]*"  # whitespace and the macro's line continuations
    rows = re.findall(rf'X\((\w+),{sep}(true|false),{sep}"(\w+)",{sep}(?:"(\w+)"|nullptr)', text)
    assert len(rows) == text.count("X(") - 1 >= 32, "could not parse csrc/nvml_api.h's symbol list"
    return [(m, req == "true", p, fb or None) for m, req, p, fb in rows]


def test_full_variant_exports_every_primary_and_fallback_name(fake_nvml_lib):
    lib = ctypes.CDLL(str(fake_nvml_lib))
    missing = [n for _, _, p, fb in _symbol_list() for n in (p, fb) if n and not hasattr(lib, n)]
    assert missing == []
    assert [c for c in CONTROL_FUNCTIONS if not hasattr(lib, c)] == []


def test_minimal_variant_exports_only_fallbacks_and_no_optional_sources(fake_nvml_minimal_lib):
    lib = ctypes.CDLL(str(fake_nvml_minimal_lib))
    for _, _, primary, fallback in _symbol_list():
        if fallback:
            assert not hasattr(lib, primary), primary
            assert hasattr(lib, fallback), fallback
        elif primary in OPTIONAL_ABSENT_IN_MINIMAL:
            assert not hasattr(lib, primary), primary
        else:
            assert hasattr(lib, primary), primary


def test_no_required_variant_lacks_only_get_name(fake_nvml_no_required_lib):
    lib = ctypes.CDLL(str(fake_nvml_no_required_lib))
    absent = [n for _, _, p, fb in _symbol_list() for n in (p, fb) if n and not hasattr(lib, n)]
    assert absent == ["nvmlDeviceGetName"]
    required = {p for _, req, p, _ in _symbol_list() if req}
    assert "nvmlDeviceGetName" in required


def test_signatures_and_layouts_match_the_packages_header():
    build = _build_module()
    try:
        r = build.abi_check()
    except build.FakeBuildError as e:
        pytest.skip(str(e))
    assert r.returncode == 0, r.stderr[-3000:]


def test_build_is_cached_by_mtime(fake_nvml_lib):
    mtime = fake_nvml_lib.stat().st_mtime_ns
    assert _build_module().build_fake("full", fake_nvml_lib.parent) == fake_nvml_lib
    assert fake_nvml_lib.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="unknown fake NVML variant"):
        _build_module().build_fake("bogus")


# -- init, identity, tables -----------------------------------------------------------------------
def test_init_is_refcounted_and_calls_before_init_fail(fake_gpu):
    n = Nvml(fake_gpu.lib)
    count = ctypes.c_uint()
    base = fake_gpu.refcount()
    if base == 0:
        assert n.nvmlDeviceGetCount_v2(ctypes.byref(count)) == NVML_ERROR_UNINITIALIZED
        assert n.nvmlShutdown() == NVML_ERROR_UNINITIALIZED
    assert n.nvmlInit_v2() == NVML_SUCCESS and n.nvmlInit() == NVML_SUCCESS
    assert fake_gpu.refcount() == base + 2
    assert n.nvmlShutdown() == NVML_SUCCESS
    assert n.nvmlDeviceGetCount_v2(ctypes.byref(count)) == NVML_SUCCESS and count.value == 1
    assert n.nvmlShutdown() == NVML_SUCCESS
    assert fake_gpu.refcount() == base
    if base == 0:
        assert n.nvmlDeviceGetCount(ctypes.byref(count)) == NVML_ERROR_UNINITIALIZED
    assert fake_gpu.call_count("nvmlInit") == 2
    assert fake_gpu.call_count_exact("nvmlInit_v2") == 1 and fake_gpu.call_count_exact("nvmlInit") == 1
    assert n.nvmlErrorString(NVML_ERROR_NO_PERMISSION) == b"Insufficient Permissions"


@pytest.mark.fake_gpu(devices=2)
def test_identity_of_two_emulated_h100s(fake_gpu, nvml):
    count = ctypes.c_uint()
    assert nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == NVML_SUCCESS and count.value == 2
    h0, h1 = nvml.handle(0), nvml.handle(1)
    bad = ctypes.c_void_p()
    assert nvml.nvmlDeviceGetHandleByIndex_v2(2, ctypes.byref(bad)) == NVML_ERROR_INVALID_ARGUMENT
    assert nvml.string("nvmlDeviceGetName", h0) == (NVML_SUCCESS, "NVIDIA H100 80GB HBM3")
    assert nvml.string("nvmlDeviceGetName", h0, size=8)[0] == NVML_ERROR_INSUFFICIENT_SIZE
    u0, u1 = nvml.string("nvmlDeviceGetUUID", h0)[1], nvml.string("nvmlDeviceGetUUID", h1)[1]
    assert u0 == "GPU-fa4e0000-0000-0000-0000-000000000000"  # valid hex, like a real UUID
    assert u1 == "GPU-fa4e0000-0000-0000-0000-000000000001"
    assert nvml.string("nvmlSystemGetDriverVersion") == (NVML_SUCCESS, "580.159.04")
    assert nvml.string("nvmlSystemGetNVMLVersion") == (NVML_SUCCESS, "12.580.159.04")
    pcis = []
    for h, fn in ((h0, "nvmlDeviceGetPciInfo_v3"), (h1, "nvmlDeviceGetPciInfo_v2")):
        p = PciInfo()
        assert getattr(nvml, fn)(h, ctypes.byref(p)) == NVML_SUCCESS
        assert re.fullmatch(r"00000000:[0-9A-F]{2}:00\.0", p.busId.decode())
        assert p.busIdLegacy.decode() == p.busId.decode()[4:] and p.bus == int(p.busId[9:11], 16)
        pcis.append(p.busId)
    assert pcis[0] != pcis[1]
    mem = Memory()
    assert nvml.nvmlDeviceGetMemoryInfo(h0, ctypes.byref(mem)) == NVML_SUCCESS
    assert mem.total == 85520809984 and mem.used + mem.free == mem.total
    # the devices are independent
    fake_gpu.set_power_w(500.0, device=1)
    now = time.time()
    assert fake_gpu.power_at(now + 0.01, device=1) == 500.0 and fake_gpu.power_at(now + 0.01) == 300.0


def test_supported_clocks_follow_nvmls_size_protocol(nvml):
    h = nvml.handle()
    n = ctypes.c_uint(0)
    assert nvml.nvmlDeviceGetSupportedMemoryClocks(h, ctypes.byref(n), None) == NVML_ERROR_INSUFFICIENT_SIZE
    assert n.value == 2
    mems = (ctypes.c_uint * 2)()
    assert nvml.nvmlDeviceGetSupportedMemoryClocks(h, ctypes.byref(n), mems) == NVML_SUCCESS
    assert list(mems) == [2619, 1593]
    for mem, expected in GRAPHICS_CLOCKS_MHZ.items():
        n = ctypes.c_uint(10)
        small = (ctypes.c_uint * 10)()
        r = nvml.nvmlDeviceGetSupportedGraphicsClocks(h, mem, ctypes.byref(n), small)
        assert r == NVML_ERROR_INSUFFICIENT_SIZE and n.value == len(expected)
        buf = (ctypes.c_uint * n.value)()
        assert nvml.nvmlDeviceGetSupportedGraphicsClocks(h, mem, ctypes.byref(n), buf) == NVML_SUCCESS
        assert list(buf) == expected
    assert len(GRAPHICS_CLOCKS_MHZ[2619]) == 110 and GRAPHICS_CLOCKS_MHZ[2619][-1] == 345
    n = ctypes.c_uint(200)
    buf = (ctypes.c_uint * 200)()
    assert nvml.nvmlDeviceGetSupportedGraphicsClocks(h, 1000, ctypes.byref(n), buf) == NVML_ERROR_NOT_FOUND


def test_running_processes_size_protocol(fake_gpu, nvml):
    h = nvml.handle()
    n = ctypes.c_uint(0)
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(h, ctypes.byref(n), None) == NVML_SUCCESS
    assert n.value == 0
    fake_gpu.set_processes([4242, 777])
    n = ctypes.c_uint(1)
    buf = (ProcessInfo * 4)()
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v3(h, ctypes.byref(n), buf) == NVML_ERROR_INSUFFICIENT_SIZE
    assert n.value == 2
    n = ctypes.c_uint(4)
    assert nvml.nvmlDeviceGetComputeRunningProcesses_v2(h, ctypes.byref(n), buf) == NVML_SUCCESS
    assert [buf[i].pid for i in range(n.value)] == [4242, 777]
    assert buf[0].usedGpuMemory > 0 and buf[0].gpuInstanceId == 0xFFFFFFFF


def test_power_limits_and_permission_switch(fake_gpu, nvml):
    h = nvml.handle()
    lo, hi = ctypes.c_uint(), ctypes.c_uint()
    assert nvml.nvmlDeviceGetPowerManagementLimitConstraints(h, ctypes.byref(lo), ctypes.byref(hi)) == 0
    assert (lo.value, hi.value) == (200000, 700000)
    assert nvml.uint("nvmlDeviceGetPowerManagementDefaultLimit", h) == (NVML_SUCCESS, 700000)
    assert nvml.nvmlDeviceSetPowerManagementLimit(h, 450000) == NVML_SUCCESS
    assert nvml.uint("nvmlDeviceGetPowerManagementLimit", h) == (NVML_SUCCESS, 450000)
    assert fake_gpu.power_limit_w() == 450.0
    assert nvml.nvmlDeviceSetPowerManagementLimit(h, 150000) == NVML_ERROR_INVALID_ARGUMENT
    fake_gpu.set_permission(False)
    assert nvml.nvmlDeviceSetPowerManagementLimit(h, 300000) == NVML_ERROR_NO_PERMISSION
    assert nvml.lock(h, 1005, 1005) == NVML_ERROR_NO_PERMISSION
    assert nvml.nvmlDeviceResetGpuLockedClocks(h) == NVML_ERROR_NO_PERMISSION
    assert nvml.nvmlDeviceSetApplicationsClocks(h, 2619, 1500) == NVML_ERROR_NO_PERMISSION
    assert fake_gpu.power_limit_w() == 450.0 and fake_gpu.locked_clocks() == (0, 0)
    fake_gpu.set_permission(True)
    assert nvml.nvmlDeviceSetPowerManagementLimit(h, 300000) == NVML_SUCCESS


def test_clock_setters_validate_and_record(fake_gpu, nvml):
    h = nvml.handle()
    assert nvml.lock(h, 1000, 1005) == NVML_ERROR_INVALID_ARGUMENT  # 1000 is off the 15 MHz grid
    assert nvml.lock(h, 1200, 1005) == NVML_ERROR_INVALID_ARGUMENT  # min > max
    assert nvml.lock(h, 345, 1995) == NVML_ERROR_INVALID_ARGUMENT   # above the table
    assert fake_gpu.locked_clocks() == (0, 0)
    assert nvml.lock(h, 345, 1005) == NVML_SUCCESS
    assert fake_gpu.locked_clocks() == (345, 1005) and nvml.sm_mhz(h) == 1005
    assert nvml.nvmlDeviceSetMemoryLockedClocks(h, 1593, 1593) == NVML_SUCCESS
    assert nvml.nvmlDeviceSetMemoryLockedClocks(h, 1600, 1600) == NVML_ERROR_INVALID_ARGUMENT
    assert fake_gpu.mem_locked_clocks() == (1593, 1593)
    assert nvml.uint("nvmlDeviceGetClockInfo", h, ctypes.c_int(2)) == (NVML_SUCCESS, 1593)
    assert nvml.nvmlDeviceResetGpuLockedClocks(h) == NVML_SUCCESS
    assert nvml.nvmlDeviceResetMemoryLockedClocks(h) == NVML_SUCCESS
    assert fake_gpu.locked_clocks() == (0, 0) and fake_gpu.mem_locked_clocks() == (0, 0)
    # applications clocks are honoured when nothing is locked, and checked per memory clock
    assert nvml.nvmlDeviceSetApplicationsClocks(h, 1593, 1500) == NVML_ERROR_INVALID_ARGUMENT
    assert nvml.nvmlDeviceSetApplicationsClocks(h, 1593, 1200) == NVML_SUCCESS
    assert fake_gpu.app_clocks() == (1593, 1200)
    assert nvml.uint("nvmlDeviceGetApplicationsClock", h, ctypes.c_int(0)) == (NVML_SUCCESS, 1200)
    assert nvml.sm_mhz(h) == 1200
    assert nvml.uint("nvmlDeviceGetClockInfo", h, ctypes.c_int(2)) == (NVML_SUCCESS, 1593)
    assert nvml.nvmlDeviceResetApplicationsClocks(h) == NVML_SUCCESS
    assert fake_gpu.is_pristine() and nvml.sm_mhz(h) == 1980


# -- power model ----------------------------------------------------------------------------------
def test_power_follows_locked_clock_as_f_v_squared(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.set_power_w(400.0)
    powers = []
    for f in (345, 1005, 1500, 1980):
        assert nvml.lock(h, f, f) == NVML_SUCCESS
        t = time.time()
        # the future under the current settings: exact, no sleeping needed
        powers.append(fake_gpu.energy_between(t + 0.01, t + 1.01))
        assert powers[-1] == pytest.approx(model_power_w(400.0, f), rel=1e-9)
    assert powers == sorted(powers) and powers[-1] == pytest.approx(400.0)
    assert powers[0] == pytest.approx(70 + 330 * 345 * 0.70**2 / (1980 * 1.05**2))
    # the idle part does not scale
    fake_gpu.set_idle_w(100.0)
    t = time.time()
    assert fake_gpu.power_at(t + 0.01) == pytest.approx(model_power_w(400.0, 1980, idle_w=100.0))
    assert nvml.lock(h, 345, 345) == NVML_SUCCESS
    t = time.time()
    assert fake_gpu.power_at(t + 0.01) == pytest.approx(model_power_w(400.0, 345, idle_w=100.0))


def test_power_cap_clamps_power_throttles_clock_and_sets_reason(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.set_power_w(650.0)
    assert nvml.reasons(h) == 0 and nvml.sm_mhz(h) == 1980
    assert nvml.nvmlDeviceSetPowerManagementLimit(h, 300000) == NVML_SUCCESS
    t = time.time()
    assert fake_gpu.power_at(t + 0.01) == 300.0
    assert nvml.reasons(h) == CLOCKS_EVENT_REASON_SW_POWER_CAP
    f = nvml.sm_mhz(h)
    assert model_power_w(650.0, f) <= 300.0 < model_power_w(650.0, f + 15)
    # a low locked clock gets under the cap: no throttling any more
    assert nvml.lock(h, 345, 600) == NVML_SUCCESS
    assert nvml.reasons(h) == 0 and nvml.sm_mhz(h) == 600
    t = time.time()
    assert fake_gpu.power_at(t + 0.01) == pytest.approx(model_power_w(650.0, 600))


# -- sample buffer --------------------------------------------------------------------------------
def test_buffer_holds_the_last_120_samples_on_a_20ms_grid(fake_gpu, nvml):
    h = nvml.handle()
    vt, n = ctypes.c_int(), ctypes.c_uint(0)
    assert nvml.nvmlDeviceGetSamples(h, 0, 0, ctypes.byref(vt), ctypes.byref(n), None) == NVML_SUCCESS
    assert n.value == 120 and vt.value == 1  # size query, unsigned int values
    t_before = time.time()
    r, vt, s = nvml.samples(h)
    assert r == NVML_SUCCESS and vt == 1 and len(s) == 120
    ts = [t for t, _ in s]
    assert all(b - a == 20000 for a, b in zip(ts, ts[1:]))  # oldest first, 20 ms apart
    assert ts[-1] <= time.time() * 1e6 and ts[-1] >= t_before * 1e6 - 20000
    assert {v for _, v in s} == {300000}  # mW
    # only newer than lastSeen; none in the future; NOT_FOUND when nothing is new
    r, _, newer = nvml.samples(h, last_seen=ts[100])
    assert r == NVML_SUCCESS and [t for t, _ in newer][:19] == ts[101:]
    r, _, none = nvml.samples(h, last_seen=ts[-1] + 10**7)
    assert r == NVML_ERROR_NOT_FOUND and none == []
    # a small buffer gets the oldest new samples, so draining by timestamp loses none
    r, _, first5 = nvml.samples(h, last_seen=ts[0], cap=5)
    assert r == NVML_SUCCESS and [t for t, _ in first5] == ts[1:6]
    r, _, _ = nvml.samples(h, last_seen=ts[0], cap=0)
    assert r == NVML_ERROR_INSUFFICIENT_SIZE
    assert nvml.nvmlDeviceGetSamples(h, 1, 0, ctypes.byref(ctypes.c_int()), ctypes.byref(ctypes.c_uint(5)),
                                     (Sample * 5)()) == NVML_ERROR_NOT_SUPPORTED


def _new_grid(samples, start_s):
    """Samples of the grid a set_trace started at start_s: (ms since start, W)."""
    start_us = round(start_s * 1e6)
    return [((t - start_us) / 1000, v / 1000) for t, v in samples if t >= start_us - 1]


def test_buffer_samples_a_scripted_trace_and_counter_is_its_integral(fake_gpu, nvml):
    h = nvml.handle()
    e_start = nvml.energy_mj(h)
    start = fake_gpu.set_trace([0.0, 0.1, 0.2], [200.0, 500.0, 100.0])
    time.sleep(0.35)
    r, _, s = nvml.samples(h)
    assert r == NVML_SUCCESS
    grid = _new_grid(s, start)
    assert [round(ms) for ms, _ in grid[:16]] == list(range(0, 320, 20))
    assert [w for _, w in grid[:16]] == [200.0] * 5 + [500.0] * 5 + [100.0] * 6
    # the exact integral, and the buffer's zero-order hold over the same span agree
    exact = fake_gpu.energy_between(start, start + 0.3)
    # (times as float seconds resolve ~0.25 µs: 1 mJ of slack)
    assert exact == pytest.approx(200 * 0.1 + 500 * 0.1 + 100 * 0.1, abs=1e-3)
    assert sum(w * 0.02 for _, w in grid[:15]) == pytest.approx(exact, abs=1e-3)
    # the counter (mJ) moves exactly with the integral
    t_a0 = time.time(); e_a = nvml.energy_mj(h); t_a1 = time.time()
    time.sleep(0.1)
    t_b0 = time.time(); e_b = nvml.energy_mj(h); t_b1 = time.time()
    lo = fake_gpu.energy_between(t_a1, t_b0) * 1000 - 1
    hi = fake_gpu.energy_between(t_a0, t_b1) * 1000 + 1
    assert lo <= e_b - e_a <= hi
    assert e_a - e_start >= exact * 1000 - 1


def test_lag_delays_buffer_and_fields_but_not_the_counter(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.set_lag_ms(40)
    start = fake_gpu.set_trace([0.0, 0.1], [200.0, 500.0])
    time.sleep(0.25)
    grid = _new_grid(nvml.samples(h)[2], start)
    first_500 = next(ms for ms, w in grid if w == 500.0)
    assert round(first_500) == 140  # power changed at +100 ms, reported 40 ms late
    assert fake_gpu.energy_between(start, start + 0.2) == pytest.approx(200 * 0.1 + 500 * 0.1, abs=1e-3)


def test_jitter_is_deterministic_and_keeps_order(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.set_jitter_ms(3)
    _, _, s1 = nvml.samples(h)
    _, _, s2 = nvml.samples(h, last_seen=s1[0][0] - 1)
    assert s2[: len(s1)] == s1  # same timestamps on every read
    gaps = [b - a for (a, _), (b, _) in zip(s1, s1[1:])]
    assert all(14000 <= g <= 26000 for g in gaps) and len(set(gaps)) > 5


def test_buffer_gain_scales_the_buffer_only(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.set_buffer_gain(1.01)
    start = fake_gpu.set_trace([0.0], [500.0])  # a fresh grid: every new sample is at the new gain
    time.sleep(0.25)
    grid = _new_grid(nvml.samples(h)[2], start)
    assert len(grid) >= 10 and {w for _, w in grid} == {505.0}  # 500 W true, read 1 % high
    r, (inst,) = nvml.fields(h, NVML_FI_DEV_POWER_INSTANT)
    assert inst.value.uiVal == 500000  # fields stay exact
    t_a0 = time.time(); e_a = nvml.energy_mj(h); t_a1 = time.time()
    time.sleep(0.1)
    t_b0 = time.time(); e_b = nvml.energy_mj(h); t_b1 = time.time()
    # the counter integrates the true 500 W, not the buffer's 505 W
    assert fake_gpu.energy_between(t_a1, t_b0) * 1000 - 1 <= e_b - e_a <= \
        fake_gpu.energy_between(t_a0, t_b1) * 1000 + 1
    assert (e_b - e_a) / 1000 / (t_b1 - t_a0) <= 500.0 + 1e-6
    # history is not rewritten: samples taken before a change keep their gain
    t_change = time.time()
    fake_gpu.set_buffer_gain(0.99)
    time.sleep(0.1)
    s = nvml.samples(h, last_seen=round((t_change - 0.1) * 1e6))[2]
    before = {v / 1000 for t, v in s if t < t_change * 1e6}
    after = {v / 1000 for t, v in s if t > t_change * 1e6 + 1}
    assert before == {505.0} and after == {495.0}
    for bad in (0.0, -1.0, float("nan"), 11.0):
        with pytest.raises(FakeControlError):
            fake_gpu.set_buffer_gain(bad)


@pytest.mark.fake_gpu(buffer_gain=0.98)
def test_buffer_gain_from_the_environment(fake_gpu, nvml):
    start = fake_gpu.set_trace([0.0], [400.0])
    time.sleep(0.1)
    assert {w for _, w in _new_grid(nvml.samples(nvml.handle())[2], start)} == {392.0}


def _counter_series(nvml, h, seconds: float) -> list[tuple[float, float, int]]:
    """(time before, time after, mJ) of back-to-back counter reads for `seconds`."""
    out, end = [], time.time() + seconds
    while time.time() < end:
        t0 = time.time(); e = nvml.energy_mj(h); t1 = time.time()
        out.append((t0, t1, e))
        time.sleep(0.001)
    return out


def test_counter_period_holds_the_integral_to_the_last_boundary(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.set_power_w(400.0)
    exact = _counter_series(nvml, h, 0.05)  # period 0: it moves with every read (~0.4 J/ms)
    assert len({e for *_, e in exact}) >= 0.5 * len(exact)
    fake_gpu.set_counter_period_ms(100)
    time.sleep(0.15)  # every boundary from here on closes a whole 100 ms period at 400 W
    series = _counter_series(nvml, h, 0.45)
    values = [e for *_, e in series]
    steps = [(i, b - a) for i, (a, b) in enumerate(zip(values, values[1:]), 1) if b != a]
    assert 4 <= len(steps) <= 5  # one change per 100 ms
    for _, de in steps:
        assert de == pytest.approx(400 * 0.1 * 1000, abs=2)  # 40 J per period, mJ floor
    # changes are 100 ms apart (the grid), and the value lags the exact integral by < 100 ms
    change_t = [series[i][1] for i, _ in steps]
    for a, b in zip(change_t, change_t[1:]):
        assert b - a == pytest.approx(0.1, abs=0.01)
    # each read is the exact integral at a boundary b within the last 100 ms: relative to the
    # first change (boundary b0 after the previous read started and before this one ended),
    # E(b) - E(b0) lies between E(t0 - 0.1) - E(b0_max) and E(t1) - E(b0_min)
    i0 = steps[0][0]
    b0_min, b0_max, e_ref = series[i0 - 1][0], series[i0][1], series[i0][2]
    for t0, t1, e in series[i0:]:
        lo = fake_gpu.energy_between(b0_max, t0 - 0.1) * 1000 - 2
        hi = fake_gpu.energy_between(b0_min, t1) * 1000 + 2
        assert lo <= e - e_ref <= hi
    fake_gpu.set_counter_period_ms(0)
    values = [e for *_, e in _counter_series(nvml, h, 0.03)]
    assert len(set(values)) >= 0.5 * len(values)
    with pytest.raises(FakeControlError):
        fake_gpu.set_counter_period_ms(10001)


@pytest.mark.fake_gpu(counter_period_ms=100)
def test_counter_period_from_the_environment(fake_gpu, nvml):
    values = [e for *_, e in _counter_series(nvml, nvml.handle(), 0.25)]
    assert 2 <= len(set(values)) <= 4


def test_samples_min_count_follows_nvmls_size_protocol(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.set_samples_min_count(256)
    vt, n = ctypes.c_int(), ctypes.c_uint(0)
    assert nvml.nvmlDeviceGetSamples(h, 0, 0, ctypes.byref(vt), ctypes.byref(n), None) == NVML_SUCCESS
    assert n.value == 256  # the size query names what to allocate
    buf, n = (Sample * 200)(), ctypes.c_uint(200)
    assert nvml.nvmlDeviceGetSamples(h, 0, 0, ctypes.byref(vt), ctypes.byref(n), buf) == \
        NVML_ERROR_INSUFFICIENT_SIZE
    assert n.value == 256
    r, _, s = nvml.samples(h, cap=256)
    assert r == NVML_SUCCESS and len(s) == 120
    fake_gpu.set_samples_min_count(0)
    assert nvml.samples(h, cap=5)[0] == NVML_SUCCESS
    with pytest.raises(FakeControlError):
        fake_gpu.set_samples_min_count(65537)


def test_realtime_offset_stamps_later_samples_and_fields(fake_gpu, nvml):
    h = nvml.handle()
    _, _, before = nvml.samples(h)
    t_step = time.time()
    fake_gpu.set_realtime_offset_us(-5_000_000)  # the driver's realtime clock stepped back 5 s
    time.sleep(0.2)
    _, _, s = nvml.samples(h)  # the whole buffer, in the order the samples were taken
    old = [t for t, _ in s if t > t_step * 1e6 - 3e6]  # stamped before the step: unchanged
    new = [t for t, _ in s if t < t_step * 1e6 - 3e6]  # taken after it: 5 s earlier stamps
    assert len(s) == 120 and [t for t, _ in s] == old + new
    assert old == [t for t, _ in before][-len(old):]
    assert len(new) >= 8 and all(b - a == 20000 for a, b in zip(new, new[1:]))
    assert abs(new[-1] - (time.time() - 5.0) * 1e6) < 40000
    # lastSeen of the old frame hides every new sample: what the sampler must cope with
    r, _, hidden = nvml.samples(h, last_seen=before[-1][0])
    assert r == NVML_ERROR_NOT_FOUND and hidden == []
    got = [t for t, _ in nvml.samples(h, last_seen=new[2])[2]]  # old stamps all exceed new[2]
    assert all(t > new[2] for t in got) and got[0] > t_step * 1e6 - 3e6
    assert [t for t in got if t < t_step * 1e6 - 3e6][:3] == new[3:6]
    r, (inst,) = nvml.fields(h, NVML_FI_DEV_POWER_INSTANT)
    assert abs(inst.timestamp - (time.time() - 5.0) * 1e6) < 50000
    assert fake_gpu.energy_between(t_step, t_step + 0.1) == pytest.approx(30.0, abs=1e-3)


# -- fields ---------------------------------------------------------------------------------------
def test_instant_and_average_fields(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.set_power_w(450.0)
    time.sleep(0.25)
    t0 = time.time()
    r, (inst, avg, other) = nvml.fields(h, NVML_FI_DEV_POWER_INSTANT, NVML_FI_DEV_POWER_AVERAGE, 1)
    assert r == NVML_SUCCESS
    assert inst.nvmlReturn == NVML_SUCCESS and inst.valueType == 1 and inst.value.uiVal == 450000
    assert avg.nvmlReturn == NVML_SUCCESS and 300000 < avg.value.uiVal < 450000  # 1 s mean
    assert other.nvmlReturn == NVML_ERROR_NOT_SUPPORTED
    assert abs(inst.timestamp - t0 * 1e6) < 1e6  # query time, µs of CLOCK_REALTIME
    r, usage = nvml.uint("nvmlDeviceGetPowerUsage", h)
    assert r == NVML_SUCCESS and 300000 < usage <= 450000
    r, temp = nvml.uint("nvmlDeviceGetTemperature", h, ctypes.c_int(0))
    assert r == NVML_SUCCESS and 40 <= temp <= 70


# -- failure injection ----------------------------------------------------------------------------
def test_failure_injection_counts_and_matches_all_versions(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.fail("nvmlDeviceGetSamples", NVML_ERROR_GPU_IS_LOST, 2)
    assert [nvml.samples(h)[0] for _ in range(3)] == [NVML_ERROR_GPU_IS_LOST] * 2 + [NVML_SUCCESS]

    pci = PciInfo()
    fake_gpu.fail("nvmlDeviceGetPciInfo", 999, -1)  # forever, both versions
    for _ in range(3):
        assert nvml.nvmlDeviceGetPciInfo_v3(h, ctypes.byref(pci)) == 999
        assert nvml.nvmlDeviceGetPciInfo_v2(h, ctypes.byref(pci)) == 999
    fake_gpu.fail("nvmlDeviceGetPciInfo_v2", 0, 0)  # clear (any name of the function)
    assert nvml.nvmlDeviceGetPciInfo_v3(h, ctypes.byref(pci)) == NVML_SUCCESS

    fake_gpu.fail("nvmlDeviceGetCurrentClocksThrottleReasons", NVML_ERROR_NOT_SUPPORTED, 1)
    v = ctypes.c_ulonglong()
    assert nvml.nvmlDeviceGetCurrentClocksEventReasons(h, ctypes.byref(v)) == NVML_ERROR_NOT_SUPPORTED

    base = fake_gpu.refcount()
    fake_gpu.fail("nvmlInit", 9, 1)
    assert nvml.nvmlInit_v2() == 9 and fake_gpu.refcount() == base

    fake_gpu.fail_field(NVML_FI_DEV_POWER_INSTANT, NVML_ERROR_NOT_SUPPORTED, 1)
    r, (inst, avg) = nvml.fields(h, NVML_FI_DEV_POWER_INSTANT, NVML_FI_DEV_POWER_AVERAGE)
    assert r == NVML_SUCCESS and inst.nvmlReturn == NVML_ERROR_NOT_SUPPORTED and avg.nvmlReturn == 0
    r, (inst,) = nvml.fields(h, NVML_FI_DEV_POWER_INSTANT)
    assert inst.nvmlReturn == NVML_SUCCESS

    assert fake_gpu.call_count("nvmlDeviceGetSamples") == 3
    assert fake_gpu.call_count("nvmlDeviceGetPciInfo") == 7
    assert fake_gpu.call_count_exact("nvmlDeviceGetPciInfo_v2") == 3
    with pytest.raises(FakeControlError):
        fake_gpu.fail("nvmlDeviceGetBogus", 3, 1)


def test_latency_injection(fake_gpu, nvml):
    h = nvml.handle()
    fake_gpu.set_latency_ms("nvmlDeviceGetTotalEnergyConsumption", 30)
    t0 = time.monotonic()
    nvml.energy_mj(h)
    assert time.monotonic() - t0 >= 0.03
    fake_gpu.set_latency_ms("nvmlDeviceGetTotalEnergyConsumption", 0)


# -- variants -------------------------------------------------------------------------------------
@pytest.mark.fake_gpu(variant="minimal")
def test_minimal_variant_works_through_fallback_names(fake_gpu):
    n = Nvml(fake_gpu.lib)
    assert n.init() == NVML_SUCCESS
    try:
        h = n.handle()
        p = PciInfo()
        assert n.nvmlDeviceGetPciInfo_v2(h, ctypes.byref(p)) == NVML_SUCCESS
        v = ctypes.c_ulonglong(7)
        assert n.nvmlDeviceGetCurrentClocksThrottleReasons(h, ctypes.byref(v)) == 0 and v.value == 0
        assert n.uint("nvmlDeviceGetPowerUsage", h) == (NVML_SUCCESS, 300000)
        assert fake_gpu.call_count_exact("nvmlInit") == 1
    finally:
        n.nvmlShutdown()


def test_variants_share_the_state_file(fake_gpu, fake_nvml_minimal_lib):
    """A process may have two variants loaded (the package and a test's ctypes): one GPU."""
    fake_gpu.set_power_w(250.0)
    fake_gpu.set_processes([11])
    other = FakeGpu(fake_nvml_minimal_lib)
    assert other.power_at(time.time() + 0.01) == 250.0
    other.set_permission(False)
    n = Nvml(fake_gpu.lib)
    assert n.init() == NVML_SUCCESS
    try:
        assert n.lock(n.handle(), 1005, 1005) == NVML_ERROR_NO_PERMISSION
    finally:
        n.nvmlShutdown()


# -- processes, threads, files --------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import ctypes, os, sys
    lib = ctypes.CDLL(os.environ["LLM_DVFS_NVML_LIBRARY"])
    h = ctypes.c_void_p()
    assert lib.nvmlInit_v2() == 0 and lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(h)) == 0
    v = ctypes.c_uint()
    assert lib.nvmlDeviceGetPowerManagementLimit(h, ctypes.byref(v)) == 0
    print("limit", v.value)
    assert lib.nvmlDeviceSetGpuLockedClocks(h, 1200, 1200) == 0
    lib.nvmlShutdown()
""")


def test_state_is_shared_with_a_subprocess(fake_gpu, nvml):
    assert nvml.nvmlDeviceSetPowerManagementLimit(nvml.handle(), 333000) == NVML_SUCCESS
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["limit", "333000"]
    assert fake_gpu.locked_clocks() == (1200, 1200)
    assert nvml.sm_mhz(nvml.handle()) == 1200
    assert fake_gpu.call_count("nvmlDeviceSetGpuLockedClocks") == 1  # counted across processes


def test_a_process_killed_holding_the_lock_does_not_wedge_the_gpu(fake_gpu):
    code = ("import ctypes, os; lib = ctypes.CDLL(os.environ['LLM_DVFS_NVML_LIBRARY']); "
            "lib.fake_nvml_debug_hold_lock(ctypes.c_double(30.0))")
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 20
        while fake_gpu.lib.fake_nvml_debug_lock_holder() != child.pid:
            assert time.monotonic() < deadline and child.poll() is None, "child never took the lock"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
        fake_gpu.set_power_w(123.0)  # would block for 30 s without a robust mutex
        assert fake_gpu.power_at(time.time() + 0.01) == 123.0
        assert fake_gpu.lib.fake_nvml_debug_lock_holder() == 0
    finally:
        if child.poll() is None:
            child.kill()


def test_concurrent_threads_see_consistent_state(fake_gpu, nvml):
    h = nvml.handle()
    stop = time.monotonic() + 0.4
    problems: list[str] = []

    def drain():
        last = 0
        while time.monotonic() < stop:
            r, _, s = nvml.samples(h, last_seen=last)
            if r == NVML_ERROR_NOT_FOUND:
                continue
            if r != NVML_SUCCESS or any(t <= last for t, _ in s):
                problems.append(f"drain {r}")
                return
            last = s[-1][0]

    def fields():
        while time.monotonic() < stop:
            r, fv = nvml.fields(h, NVML_FI_DEV_POWER_INSTANT, NVML_FI_DEV_POWER_AVERAGE)
            if r != NVML_SUCCESS or fv[0].nvmlReturn != 0:
                problems.append(f"fields {r}")
                return

    def control():
        k = 0
        while time.monotonic() < stop:
            k += 1
            fake_gpu.set_power_w(200.0 + k % 300)
            f = GRAPHICS_CLOCKS_MHZ[2619][k % 110]
            if nvml.lock(h, f, f) != NVML_SUCCESS:
                problems.append("lock")
                return

    def guarded(fn):
        def run():
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported through `problems`
                problems.append(f"{fn.__name__}: {e!r}")
        return run

    threads = [threading.Thread(target=guarded(fn)) for fn in (drain, drain, fields, control)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert problems == []
    lo, hi = fake_gpu.locked_clocks()
    assert lo == hi and lo in GRAPHICS_CLOCKS_MHZ[2619]


def test_state_follows_fake_nvml_state_and_survives_a_corrupt_file(fake_gpu, monkeypatch, tmp_path):
    fake_gpu.set_power_w(222.0)
    other = tmp_path / "other.state"
    other.write_bytes(b"garbage" * 100)  # wrong size and magic: reinitialised
    monkeypatch.setenv("FAKE_NVML_STATE", str(other))
    assert fake_gpu.mapped_state_path() == str(other)
    t = time.time() + 0.01
    assert fake_gpu.power_at(t) == 300.0 and fake_gpu.power_limit_w() == 700.0
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake_gpu.state_path))
    assert fake_gpu.power_at(t) == 222.0


def test_device_count_follows_the_environment(fake_gpu, monkeypatch):
    assert fake_gpu.device_count == 1
    with pytest.raises(FakeControlError):
        fake_gpu.set_power_w(100.0, device=1)
    monkeypatch.setenv("FAKE_NVML_DEVICES", "3")
    assert fake_gpu.device_count == 3
    fake_gpu.set_power_w(100.0, device=2)


def test_control_arguments_are_checked(fake_gpu):
    with pytest.raises(FakeControlError):
        fake_gpu.set_trace([0.0, 0.2, 0.1], [1.0, 2.0, 3.0])  # not sorted
    with pytest.raises(FakeControlError):
        fake_gpu.set_trace([], [])
    with pytest.raises(FakeControlError):
        fake_gpu.set_power_w(float("nan"))
    with pytest.raises(FakeControlError):
        fake_gpu.set_processes(range(65))
    start = fake_gpu.set_trace([0.05], [400.0])  # before 50 ms the previous power holds
    assert fake_gpu.energy_between(start, start + 0.15) == pytest.approx(300 * 0.05 + 400 * 0.1, abs=1e-3)


# -- guard ----------------------------------------------------------------------------------------
def test_guard_passes_on_the_emulator_and_skips_otherwise(fake_gpu, monkeypatch):
    assert assert_emulated_nvml() == fake_gpu.lib_path
    monkeypatch.delenv("LLM_DVFS_NVML_LIBRARY")
    with pytest.raises(pytest.skip.Exception, match="not set"):
        assert_emulated_nvml()
    import _ctypes  # a loadable shared object that is not the emulator
    monkeypatch.setenv("LLM_DVFS_NVML_LIBRARY", _ctypes.__file__)
    with pytest.raises(pytest.skip.Exception, match="not the emulated GPU"):
        assert_emulated_nvml()


@pytest.mark.changes_clocks
def test_changes_clocks_marker_provides_the_emulator(request):
    gpu = request.getfixturevalue("fake_gpu")
    assert os.environ["LLM_DVFS_NVML_LIBRARY"] == str(gpu.lib_path)
