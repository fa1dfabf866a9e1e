"""Measuring a GPU's sensor model (meter/sensors.py): dense sampling and, for the lag, short
GPU bursts. Read-only: nothing here changes a GPU setting."""
from __future__ import annotations

import random
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from llm_dvfs.meter.attribution import DEFAULT_LAG_S, estimate_lag
from llm_dvfs.meter.monitor import PowerMonitor, now_ns
from llm_dvfs.meter.sensors import SensorModel, model_from_lanes


def _torch_cuda(device: int) -> Any:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available() or device >= torch.cuda.device_count():
        return None
    return torch


def _bursts(torch: Any, device: int, n: int, on_s: float, off_s: float, now_s) -> list[tuple[float, float]]:
    """n GPU-bound bursts with idle gaps; returns their [start, end] host times (synchronised).
    The gaps vary by up to 20 ms so that the burst edges fall at every phase of the buffer's
    ~20 ms sample grid (the estimate then holds the average hold delay, not one phase's)."""
    rng = random.Random(0)
    dev = torch.device("cuda", device)
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize(dev)
    out = []
    for _ in range(n):
        time.sleep(off_s + rng.uniform(0.0, 0.02))
        torch.cuda.synchronize(dev)
        t0 = now_s()
        while now_s() - t0 < on_s:
            for _ in range(4):
                a @ a
            torch.cuda.synchronize(dev)
        out.append((t0, now_s()))
    time.sleep(off_s)
    return out


def measure(device: int = 0, *, seconds: float = 2.0, bursts: Optional[bool] = None, n_bursts: int = 10,
            workload: Optional[Callable[[], Sequence[tuple[float, float]]]] = None) -> SensorModel:
    """Measure the sensor model of CUDA device ``device`` (a few seconds, read-only).

    Dense sampling (instant field every 2 ms, counter every 5 ms) for ``seconds``; then, if
    ``bursts`` (default: when torch with CUDA is available), ``n_bursts`` bursts of bf16 matmuls
    of 150 ms with 250 ms idle gaps, from which the buffer lag is estimated (the shift that puts
    the most energy inside the bursts, ``attribution.estimate_lag``). ``workload`` replaces the
    bursts: a callable that makes the GPU busy and returns the busy ``[start, end]`` intervals
    (host monotonic s). Without either, ``lag_s`` is the default and ``lag_method`` says so.

    Raises: what ``PowerMonitor.start`` raises (no driver, bad index); RuntimeError when
    ``bursts=True`` but torch with CUDA is missing.
    """
    if workload is None and bursts is not False:
        torch = _torch_cuda(device)
        if torch is None and bursts:
            raise RuntimeError("measuring the sensor lag needs torch with CUDA (pass bursts=False to skip it)")
        if torch is not None:
            def workload() -> list[tuple[float, float]]:
                return _bursts(torch, device, n_bursts, 0.15, 0.25, lambda: now_ns() * 1e-9)
    mon = PowerMonitor(devices=[device], poll_period_s=0.002, counter_period_s=0.005, lag_s=0.0,
                       calibration_horizon_s=0.0)
    with mon:
        time.sleep(seconds)
        windows = list(workload()) if workload is not None else []
        mon._wait_covered(now_ns() * 1e-9 + 0.1, 1.0)
        info = mon.device_info[0]
        lanes = {k: mon._store.get(k, 0) for k in ("buffer", "instant", "counter")}
        model = model_from_lanes(info.uuid, info.name, lanes)
    model.lag_s = DEFAULT_LAG_S["buffer"]
    bt, bv, _ = lanes["buffer"]
    if windows and len(bt) > 10:
        est = estimate_lag(bt, bv, np.asarray(windows, dtype=np.float64))
        if est.method == "trace":
            model.lag_s, model.lag_method, model.n_bursts = est.lag_s, "measured", len(windows)
    return model
