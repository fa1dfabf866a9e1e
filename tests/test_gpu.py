"""Checks against a real NVIDIA GPU (marker ``gpu``: conftest skips them where no NVIDIA kernel
driver is loaded). Read-only: nothing here changes clocks or power limits.

Each check runs in a fresh Python process whose environment has none of the emulator's settings
(``LLM_DVFS_NVML_LIBRARY``, ``LLM_DVFS_CUDA_LIBRARY``, ``FAKE_NVML_*``, ``FAKE_CUDA_*``), so it measures the real GPU
even inside a full test session, and the real libnvidia-ml is never mapped into the pytest process
(where it would make the clock-change guard skip every later emulator test that changes clocks).

    python -m pytest -q -m gpu tests/test_gpu.py          # on a machine with a GPU
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.gpu

_EMULATOR_VARS = ("LLM_DVFS_NVML_LIBRARY", "LLM_DVFS_CUDA_LIBRARY")
_EMULATOR_PREFIXES = ("FAKE_NVML_", "FAKE_CUDA_")

# Shared start of every child: skip (as JSON) without torch+CUDA or a real NVML device 0.
_PRELUDE = """
import ctypes, json, sys, time

def done(**kw):
    print(json.dumps(kw), flush=True)
    sys.exit(0)

try:
    import torch
except ImportError:
    done(skip="torch is not installed")
if not torch.cuda.is_available():
    done(skip=f"torch {torch.__version__} has no CUDA device")
import llm_dvfs as ld
from llm_dvfs.devices import last_error, library_path
if not ld.devices():
    done(skip=f"NVML sees no GPU ({last_error()})")
if hasattr(ctypes.CDLL(library_path()), "fake_nvml_reset"):
    done(skip=f"NVML is the emulator ({library_path()}), not a real GPU")
torch.cuda.set_device(0)
n = 8192
a = torch.randn(n, n, device="cuda:0", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda:0", dtype=torch.bfloat16)
c = torch.empty_like(a)
for _ in range(8):  # warm-up: cuBLAS handles, kernels, clocks
    torch.mm(a, b, out=c)
torch.cuda.synchronize()
"""


def _real_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in _EMULATOR_VARS and not k.startswith(_EMULATOR_PREFIXES)}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run_child(body: str, timeout_s: float = 300.0) -> dict:
    """Run the prelude + ``body`` in a fresh interpreter; its last JSON line is the result."""
    code = _PRELUDE + textwrap.dedent(body)
    p = subprocess.run([sys.executable, "-c", code], env=_real_env(), capture_output=True, text=True,
                       timeout=timeout_s)
    assert p.returncode == 0, f"child exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}"
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"child printed no result\nstdout:\n{p.stdout}\nstderr:\n{p.stderr[-4000:]}"
    res = json.loads(lines[-1])
    if "skip" in res:
        pytest.skip(res["skip"])
    return res


def test_window_energy_matches_counter_on_5s_burst() -> None:
    """A window of 0.5 s idle + 5 s of bf16 matmuls + 0.5 s idle: the buffer integral is within
    ±2 % of the hardware counter delta (idle edges keep the counter's ~100 ms steps on low power)."""
    r = _run_child("""
        with ld.PowerMonitor(devices=[0]) as mon:
            time.sleep(1.0)
            with mon.window("burst") as w:
                time.sleep(0.5)
                t_end = time.monotonic() + 5.0
                while time.monotonic() < t_end:
                    for _ in range(4):
                        torch.mm(a, b, out=c)
                    torch.cuda.synchronize()
                time.sleep(0.5)
            time.sleep(0.3)
            done(energy_j=w.energy_j, energy_method=w.energy_method, counter_j=w.energy_j_counter,
                 duration_s=w.duration_s, avg_power_w=w.avg_power_w)
    """)
    assert r["energy_method"] == "buffer", r
    assert r["counter_j"] is not None and r["counter_j"] > 0, r
    err = (r["energy_j"] - r["counter_j"]) / r["counter_j"]
    assert abs(err) <= 0.02, f"window {r['energy_j']:.1f} J vs counter {r['counter_j']:.1f} J ({100 * err:+.2f} %): {r}"


def test_info_json_matches_nvidia_smi() -> None:
    """``python -m llm_dvfs.info --json`` agrees with nvidia-smi on name, UUID, driver, power
    limit and memory of every GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        pytest.skip("nvidia-smi is not on PATH")
    env = _real_env()
    env.pop("CUDA_VISIBLE_DEVICES", None)  # nvidia-smi lists every GPU; so must info
    p = subprocess.run([sys.executable, "-m", "llm_dvfs.info", "--json"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    q = subprocess.run([smi, "--query-gpu=name,uuid,driver_version,power.limit,memory.total",
                        "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=60)
    assert q.returncode == 0, q.stderr
    rows = [[x.strip() for x in ln.split(",")] for ln in q.stdout.splitlines() if ln.strip()]
    assert rows and len(rows) == len(info["devices"]), (rows, info["devices"])
    by_uuid = {d["uuid"]: d for d in info["devices"]}
    for name, uuid, driver, power_limit, memory in rows:
        assert uuid in by_uuid, f"nvidia-smi's {uuid} missing from info: {sorted(by_uuid)}"
        d = by_uuid[uuid]
        assert d["name"] == name
        assert d["driver_version"] == driver
        if power_limit.replace(".", "", 1).isdigit():
            assert d["power_limit_w"] is not None and abs(d["power_limit_w"] - float(power_limit)) <= 0.5, \
                (d["power_limit_w"], power_limit)
        assert d["memory_total_bytes"] is not None
        assert abs(d["memory_total_bytes"] / 2**20 - float(memory)) <= 1.0, (d["memory_total_bytes"], memory)


def test_window_sync_holds_asynchronous_work() -> None:
    """~300 ms of matmuls launched inside a window without any synchronize by the caller: with the
    default ``sync=True`` the window lasts until the GPU is done; with ``sync=False`` it holds
    only the launches."""
    r = _run_child("""
        t0 = time.perf_counter()
        for _ in range(20):
            torch.mm(a, b, out=c)
        torch.cuda.synchronize()
        per_mm_s = (time.perf_counter() - t0) / 20
        k = max(1, min(900, round(0.3 / per_mm_s)))  # below the launch queue's depth
        with ld.PowerMonitor(devices=[0]) as mon:
            time.sleep(0.3)
            with mon.window("synced") as w_sync:
                for _ in range(k):
                    torch.mm(a, b, out=c)
            torch.cuda.synchronize()  # between the windows only
            t1 = time.perf_counter()
            with mon.window("launch only", sync=False) as w_nosync:
                for _ in range(k):
                    torch.mm(a, b, out=c)
            torch.cuda.synchronize()
            work_s = time.perf_counter() - t1
            done(synced_s=w_sync.duration_s, nosync_s=w_nosync.duration_s, work_s=work_s, k=k,
                 per_mm_s=per_mm_s)
    """)
    assert r["synced_s"] >= 0.25, r
    assert r["work_s"] >= 0.25, r
    assert r["nosync_s"] < 0.05 and r["nosync_s"] < 0.2 * r["work_s"], r
