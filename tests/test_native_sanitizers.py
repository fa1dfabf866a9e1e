"""The sampler's C++ under ThreadSanitizer and AddressSanitizer+UBSan, against the emulated GPU.

Compiles tests/native/*.cpp with the sampler sources (no Python involved, so the sanitizers
see only our code) and runs them. sampler_stress: 1000 start/stop cycles, a concurrent consumer
and flush/request callers, and ring overflow. ring_stress: SpscRing::size() read from a third
thread while producer and consumer wrap the ring. clock_step: the buffer lane across steps of
CLOCK_REALTIME (clock_gettime wrapped at link time). Any sanitizer report fails the test.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "csrc" / f for f in ("dynlib.cpp", "nvml.cpp", "device.cpp", "sampler.cpp")]

pytestmark = [pytest.mark.native, pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")]


def _build(tmp_path: Path, sanitize: str, name: str = "sampler_stress", sources=SOURCES,
           ldflags: tuple[str, ...] = ()) -> Path:
    exe = tmp_path / f"{name}_{sanitize.replace(',', '_')}"
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
           "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "native" / f"{name}.cpp"), *map(str, sources),
           "-o", str(exe), *ldflags, "-ldl", "-lpthread"]
    b = subprocess.run(cmd, capture_output=True, text=True)
    assert b.returncode == 0, b.stderr[-4000:]
    return exe


def _run(tmp_path: Path, exe: Path, fake_nvml_lib: Path, *args: str) -> str:
    env = dict(os.environ,
               LLM_DVFS_NVML_LIBRARY=str(fake_nvml_lib),
               FAKE_NVML_STATE=str(tmp_path / "gpu.state"),
               TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1",
               ASAN_OPTIONS="halt_on_error=1:detect_leaks=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    env.pop("LD_PRELOAD", None)  # CI runs pytest with the ASan runtime preloaded; TSan can't share it
    r = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=600)
    report = r.stdout + r.stderr
    assert r.returncode == 0, report[-4000:]
    assert "WARNING: ThreadSanitizer" not in report and "ERROR: AddressSanitizer" not in report
    assert "runtime error" not in report, report[-4000:]
    return report


@pytest.mark.parametrize("sanitize,cycles", [("thread", 300), ("address,undefined", 1000)])
def test_sampler_under_sanitizer(tmp_path, fake_nvml_lib, sanitize, cycles):
    report = _run(tmp_path, _build(tmp_path, sanitize), fake_nvml_lib, str(cycles))
    assert f"cycles={cycles}" in report and "OK" in report
    # the lanes produced data and overflow was counted
    dropped = int(report.split("dropped=")[1].split()[0])
    assert dropped > 0


def test_ring_size_from_a_third_thread_stays_within_capacity(tmp_path, fake_nvml_lib):
    """size() read by neither producer nor consumer (as PowerSampler::pending() is) must never
    wrap below zero or exceed the capacity."""
    report = _run(tmp_path, _build(tmp_path, "thread", "ring_stress", sources=()), fake_nvml_lib,
                  "1000000", "3")  # 10^6 items or 3 s
    assert "OK ring" in report and "bad=0" in report
    assert int(report.split("items=")[1].split()[0]) >= 1000
    assert int(report.split("size_reads=")[1].split()[0]) > 10000


def test_buffer_lane_across_realtime_clock_steps(tmp_path, fake_nvml_lib):
    """Steps of CLOCK_REALTIME (back 5 s and 0.3 s, forward 3 s and 0.3 s) seen by both the
    sampler and the emulated driver: every buffer sample is kept once, at its true time.
    (ASan+UBSan only: the sampler's threading is TSan's in test_sampler_under_sanitizer.)"""
    exe = _build(tmp_path, "address,undefined", "clock_step",
                 ldflags=("-Wl,--wrap=clock_gettime",))
    report = _run(tmp_path, exe, fake_nvml_lib)
    assert "OK clock steps" in report
    for step in ("-5000", "-300", "+3000", "+300"):
        line = next(ln for ln in report.splitlines() if ln.startswith("step") and f"{step} ms:" in ln)
        assert line.endswith(" 0 wrong"), line
