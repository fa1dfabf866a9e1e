"""Energy accuracy of each NVML power source against a reference, over 10-20 s windows.

On a real GPU the reference is the hardware energy counter; on the emulated GPU
(LLM_DVFS_NVML_LIBRARY pointing at tests/fakes' library) it is the emulator's exact integral.
Each trial: a window that starts and ends in idle (so the counter's ~100 ms update granularity
lands on low power), enclosing a varied load of matmul bursts of random length and idle gaps.

    python bench/energy_accuracy.py [--trials 3] [--load-s 12] [--json OUT.json]

Prints a table: per source, % error against the reference per trial and the mean.
Read-only on the GPU: no clock or power-limit change.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import sys
import time

import numpy as np


def gpu_load(duration_s: float, rng: random.Random) -> None:
    """Random matmul bursts (20-400 ms) and idle gaps (10-300 ms) for duration_s."""
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        burst = rng.uniform(0.02, 0.4)
        t0 = time.monotonic()
        while time.monotonic() - t0 < burst:
            for _ in range(4):
                a @ b
            torch.cuda.synchronize()
        time.sleep(rng.uniform(0.01, 0.3))


def emulated_load(fake: ctypes.CDLL, duration_s: float, rng: random.Random) -> None:
    """Script a piecewise-constant trace of the same shape on the emulated GPU, then wait."""
    ts, ws, t = [], [], 0.0
    while t < duration_s:
        ts.append(t)
        ws.append(rng.uniform(300, 700))
        t += rng.uniform(0.02, 0.4)
        ts.append(t)
        ws.append(rng.uniform(70, 120))
        t += rng.uniform(0.01, 0.3)
    ts.append(t)
    ws.append(80.0)
    arr = lambda xs: (ctypes.c_double * len(xs))(*xs)  # noqa: E731
    fake.fake_nvml_set_trace(0, arr(ts), arr(ws), len(ts))
    time.sleep(duration_s)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--load-s", type=float, default=12.0)
    p.add_argument("--json", default=None, help="also write the raw numbers here")
    args = p.parse_args()

    import llm_dvfs as ld
    from llm_dvfs import _core

    devs = ld.devices()
    if not devs:
        print("energy_accuracy: no GPU (set LLM_DVFS_NVML_LIBRARY to the emulated one to try it): skipped")
        return 0
    lib = os.environ.get("LLM_DVFS_NVML_LIBRARY", "")
    fake = None
    if lib:
        try:
            fake = ctypes.CDLL(lib)
            fake.fake_nvml_reset  # noqa: B018 - present only in the emulator
            fake.fake_nvml_energy_between.restype = ctypes.c_double
            fake.fake_nvml_energy_between.argtypes = [ctypes.c_uint, ctypes.c_double, ctypes.c_double]
            fake.fake_nvml_set_power_w.argtypes = [ctypes.c_uint, ctypes.c_double]
        except (OSError, AttributeError):
            fake = None
    rng = random.Random(1234)
    if not fake:
        # Warm-up outside any window: CUDA context, cuBLAS handles and the first kernels cost
        # seconds of host work that would otherwise land in trial 0 only.
        gpu_load(2.0, random.Random(0))
    print(f"device: {devs[0].name} ({'emulated' if fake else 'real'}), reference: "
          f"{'exact integral' if fake else 'energy counter'}")
    rows = []
    with ld.PowerMonitor(devices=[0]) as mon:
        for trial in range(args.trials):
            if fake:
                fake.fake_nvml_set_power_w(0, 80.0)
            time.sleep(1.0)
            off = (_core.realtime_ns() - _core.monotonic_ns()) * 1e-9
            with mon.window(f"trial{trial}") as w:
                time.sleep(0.5)
                if fake:
                    emulated_load(fake, args.load_s, rng)
                else:
                    gpu_load(args.load_s, rng)
                time.sleep(1.0)
            time.sleep(0.3)
            m = w.measurement(timeout_s=2.0)
            d = m.devices[0]
            if fake:
                ref = fake.fake_nvml_energy_between(0, m.t_start_s + off, m.t_end_s + off)
            else:
                ref = d.energy_j_counter
            row = {"trial": trial, "duration_s": m.duration_s, "reference_j": ref,
                   "avg_power_w": m.avg_power_w}
            for src, e in d.energy_j_by_source.items():
                row[src] = 100.0 * (e - ref) / ref if ref else float("nan")
            rows.append(row)
    sources = [s for s in ("buffer", "instant", "counter", "average") if any(s in r for r in rows)]
    print(f"{'trial':>5} {'dur s':>7} {'ref J':>9} " + " ".join(f"{s + ' %':>10}" for s in sources))
    for r in rows:
        print(f"{r['trial']:>5} {r['duration_s']:>7.2f} {r['reference_j']:>9.1f} "
              + " ".join(f"{r.get(s, float('nan')):>+10.3f}" for s in sources))
    print(f"{'mean':>5} {'':>7} {'':>9} "
          + " ".join(f"{np.nanmean([r.get(s, np.nan) for r in rows]):>+10.3f}" for s in sources))
    print(f"{'|mean|':>5} {'':>7} {'':>9} "
          + " ".join(f"{np.nanmean([abs(r.get(s, np.nan)) for r in rows]):>10.3f}" for s in sources))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
