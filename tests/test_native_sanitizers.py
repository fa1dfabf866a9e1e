"""The sampler's C++ under ThreadSanitizer and AddressSanitizer+UBSan, against the emulated GPU.

Compiles tests/native/sampler_stress.cpp with the sampler sources (no Python involved, so the
sanitizers see only our code) and runs it: 1000 start/stop cycles, a concurrent consumer and
flush/request callers, and ring overflow. Any sanitizer report fails the test.
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


def _build(tmp_path: Path, sanitize: str) -> Path:
    exe = tmp_path / f"sampler_stress_{sanitize.replace(',', '_')}"
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
           "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}",
           str(ROOT / "tests" / "native" / "sampler_stress.cpp"), *map(str, SOURCES),
           "-o", str(exe), "-ldl", "-lpthread"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


@pytest.mark.parametrize("sanitize,cycles", [("thread", 300), ("address,undefined", 1000)])
def test_sampler_under_sanitizer(tmp_path, fake_nvml_lib, sanitize, cycles):
    exe = _build(tmp_path, sanitize)
    env = dict(os.environ,
               LLM_DVFS_NVML_LIBRARY=str(fake_nvml_lib),
               FAKE_NVML_STATE=str(tmp_path / "gpu.state"),
               TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1",
               ASAN_OPTIONS="halt_on_error=1:detect_leaks=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    env.pop("LD_PRELOAD", None)  # CI runs pytest with the ASan runtime preloaded; TSan can't share it
    r = subprocess.run([str(exe), str(cycles)], env=env, capture_output=True, text=True, timeout=600)
    report = r.stdout + r.stderr
    assert r.returncode == 0, report[-4000:]
    assert "WARNING: ThreadSanitizer" not in report and "ERROR: AddressSanitizer" not in report
    assert "runtime error" not in report, report[-4000:]
    assert f"cycles={cycles}" in report and "OK" in report
    # the lanes produced data and overflow was counted
    dropped = int(report.split("dropped=")[1].split()[0])
    assert dropped > 0
