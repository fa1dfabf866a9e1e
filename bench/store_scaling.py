"""Cost of measuring one window vs how much history the monitor holds (no GPU needed).

Fills a PowerMonitor's sample store with synthetic lanes as the sampler would deliver them
(50 Hz buffer, 20 Hz instant-field changes, clocks, 1 Hz counter) for 10 s, 1 h and 10 h of
history, then times measuring 1 s windows at the end of it (what a long sweep does after every
request). The store appends in amortised O(1) and reads lanes as views, so the cost should not
grow with history; the previous store re-sorted all of it on every pull (58 ms per window after
10 h, review of issue 12). Then the same for the errors in force during a window, against an
error lane of 1k to 1M records: found by bisection (``SampleStore.error_episodes``), so the cost
should stay flat; the previous code replayed the whole error history before every window.

    python bench/store_scaling.py
"""
from __future__ import annotations

import argparse
import time
import types

import numpy as np

from llm_dvfs.meter import sensors
from llm_dvfs.meter.monitor import PowerMonitor
from llm_dvfs.meter.store import SampleStore

KINDS = {"buffer": 0, "instant": 1, "average": 2, "sm_clock": 3, "mem_clock": 4, "temperature": 5,
         "clock_events": 6, "counter": 7, "error": 8, "gap": 9}


def _drain(t0: float, t1: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    parts = []
    for kind, rate in (("buffer", 50.0), ("instant", 10.0), ("average", 10.0), ("sm_clock", 1.0),
                       ("counter", 1.0)):
        t = np.arange(t0, t1, 1.0 / rate)
        v = rng.uniform(100, 700, len(t)) if kind != "sm_clock" else np.full(len(t), 1980.0)
        x = (t * 400e3).astype(np.uint64) if kind == "counter" else np.zeros(len(t), np.uint64)
        parts.append((t, np.full(len(t), KINDS[kind], np.uint8), v, x))
    t = np.concatenate([p[0] for p in parts])
    order = np.argsort(t, kind="stable")
    n = len(t)
    return {"t_ns": (t[order] * 1e9).astype(np.int64), "kind": np.concatenate([p[1] for p in parts])[order],
            "device": np.zeros(n, np.uint32), "value": np.concatenate([p[2] for p in parts])[order],
            "extra": np.concatenate([p[3] for p in parts])[order], "aux": np.zeros(n, np.uint16)}


def _monitor(history_s: float, rng: np.random.Generator) -> tuple[PowerMonitor, float]:
    mon = PowerMonitor(devices=[0])
    mon._store = SampleStore(KINDS)
    t, fill_s, step = 0.0, 0.0, 0.25   # drains of 0.25 s, as the sampler delivers them
    t_fill = time.perf_counter()
    while t < history_s:
        mon._store.add(_drain(t, t + step, rng))
        t += step
    fill_s = time.perf_counter() - t_fill
    mon.device_indices = [0]
    mon.device_info = [types.SimpleNamespace(uuid="GPU-synthetic", name="synthetic",
                                             has_power_samples=True, has_energy_counter=True)]
    mon._load_sensor_models()
    mon.sensor_models = [sensors.SensorModel(uuid="GPU-synthetic")]
    return mon, fill_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=200, help="windows measured per history length")
    args = ap.parse_args()
    from llm_dvfs import _core

    rng = np.random.default_rng(0)
    print(f"{'history':>10} {'records':>12} {'fill s':>8} {'per window ms (median, p90)':>30}")
    base = None
    for hist in (10.0, 3600.0, 36000.0):
        mon, fill_s = _monitor(hist, rng)
        times = []
        for k in range(args.windows):
            b = hist - 2.0 - 0.005 * k
            t0 = time.perf_counter()
            mon._measure_device(0, 0, b - 1.0, b, _core, 0)
            times.append(time.perf_counter() - t0)
        med, p90 = np.median(times) * 1e3, np.percentile(times, 90) * 1e3
        base = base or med
        print(f"{hist:>9.0f}s {mon._store.n_records():>12,} {fill_s:>8.1f} {med:>17.3f} {p90:>8.3f}"
              f"   ({med / base:.2f}x the 10 s cost)")
    _error_lane_cost(args.windows)


def _error_lane_cost(n_windows: int) -> None:
    print(f"\n{'error records':>14} {'error_episodes us (median)':>27}")
    base = None
    for n in (1_000, 100_000, 1_000_000):
        st = SampleStore(KINDS)
        starts = np.arange(n // 2) * 0.01           # 5 ms episodes every 10 ms on one lane
        t = np.column_stack([starts, starts + 0.005]).ravel()
        st.add({"t_ns": (t * 1e9).astype(np.int64), "kind": np.full(len(t), KINDS["error"], np.uint8),
                "device": np.zeros(len(t), np.uint32), "value": np.zeros(len(t)),
                "extra": np.tile(np.array([15, 0], np.uint64), n // 2), "aux": np.full(len(t), 3, np.uint16)})
        end = float(t[-1])
        times = []
        for k in range(n_windows):
            lo = end - 1.0 - 0.001 * k
            t0 = time.perf_counter()
            st.error_episodes(0, lo, lo + 0.5, transient_codes=(3,))
            times.append(time.perf_counter() - t0)
        med = float(np.median(times)) * 1e6
        base = base or med
        print(f"{n:>14,} {med:>27.1f}   ({med / base:.2f}x the 1k cost)")


if __name__ == "__main__":
    main()
