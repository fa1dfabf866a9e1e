"""Raw NVML facts of one GPU, read-only, through ctypes (independent of llm_dvfs itself).

Re-measures what docs/design.md states about the power sources: how often the energy counter,
the instant field (186) and the driver's sample buffer change value, the buffer's spacing, the
buffer's lag behind GPU work, and how far buffer and counter integrals drift apart over 1 s and
10 s segments. Work comes from a child process (torch bf16 matmul bursts with host timestamps),
so the polling loop here never competes with it for the GIL.

    python bench/nvml_probe.py --gpu 0 --seconds 20 --out probe.json

Changes no GPU setting.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np


class _Value(ctypes.Union):
    _fields_ = [("dVal", ctypes.c_double), ("uiVal", ctypes.c_uint), ("ulVal", ctypes.c_ulong),
                ("ullVal", ctypes.c_ulonglong), ("sllVal", ctypes.c_longlong)]


class _Sample(ctypes.Structure):
    _fields_ = [("timeStamp", ctypes.c_ulonglong), ("sampleValue", _Value)]


class _Field(ctypes.Structure):
    _fields_ = [("fieldId", ctypes.c_uint), ("scopeId", ctypes.c_uint), ("timestamp", ctypes.c_longlong),
                ("latencyUsec", ctypes.c_longlong), ("valueType", ctypes.c_int),
                ("nvmlReturn", ctypes.c_int), ("value", _Value)]


WORKER = textwrap.dedent("""
    import sys, time, torch
    gpu, seconds = int(sys.argv[1]), float(sys.argv[2])
    torch.cuda.set_device(gpu)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3): a @ a
    torch.cuda.synchronize(); time.sleep(1.0)
    rng = __import__("random").Random(1)
    t_end = time.time() + seconds
    while time.time() < t_end:
        on = rng.choice([0.04, 0.1, 0.3, 0.8]); off = rng.choice([0.05, 0.2, 0.5])
        torch.cuda.synchronize(); t0 = time.time()
        while time.time() - t0 < on:
            for _ in range(2): a @ a
            torch.cuda.synchronize()
        t1 = time.time()
        print(f"{t0:.6f} {t1:.6f}", flush=True)
        time.sleep(off)
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the burst phase (s)")
    ap.add_argument("--out", default=None, help="write the summary (JSON) here")
    args = ap.parse_args()

    nv = ctypes.CDLL("libnvidia-ml.so.1")
    assert nv.nvmlInit_v2() == 0
    h = ctypes.c_void_p()
    assert nv.nvmlDeviceGetHandleByIndex_v2(args.gpu, ctypes.byref(h)) == 0

    def counter_mj() -> float:  # NaN: the read failed
        v = ctypes.c_ulonglong()
        rc = nv.nvmlDeviceGetTotalEnergyConsumption(h, ctypes.byref(v))
        return float(v.value) if rc == 0 else float("nan")

    fv = (_Field * 1)()

    def instant_mw() -> float:  # NaN: the read failed
        fv[0].fieldId = 186
        fv[0].scopeId = 0
        nv.nvmlDeviceGetFieldValues(h, 1, fv)
        return float(fv[0].value.uiVal) if fv[0].nvmlReturn == 0 else float("nan")

    last_seen = ctypes.c_ulonglong(0)
    buf_t: list[int] = []
    buf_v: list[int] = []

    def drain() -> None:
        vt = ctypes.c_int()
        cnt = ctypes.c_uint(0)
        rc = nv.nvmlDeviceGetSamples(h, 0, last_seen, ctypes.byref(vt), ctypes.byref(cnt), None)
        if rc != 0 or cnt.value == 0:
            return
        arr = (_Sample * cnt.value)()
        rc = nv.nvmlDeviceGetSamples(h, 0, last_seen, ctypes.byref(vt), ctypes.byref(cnt), arr)
        if rc != 0:
            return
        for i in range(cnt.value):
            buf_t.append(arr[i].timeStamp)
            buf_v.append(arr[i].sampleValue.uiVal)
        last_seen.value = arr[cnt.value - 1].timeStamp

    drain()
    buf_t.clear(); buf_v.clear()
    child = subprocess.Popen([sys.executable, "-c", WORKER, str(args.gpu), str(args.seconds)],
                             stdout=subprocess.PIPE, text=True)
    ctr_t, ctr_v, ctr_lat, ins_t, ins_v = [], [], [], [], []
    t_drain = 0.0
    while child.poll() is None:
        t0 = time.time()
        c = counter_mj()
        t1 = time.time()
        ctr_t.append((t0 + t1) / 2); ctr_v.append(c); ctr_lat.append(t1 - t0)
        ins_t.append(time.time()); ins_v.append(instant_mw())
        if t1 - t_drain > 0.2:
            drain(); t_drain = t1
        time.sleep(0.0005)
    drain()
    bursts = [tuple(map(float, ln.split())) for ln in child.stdout.read().split("\n") if ln.strip()]

    ct, cv = np.array(ctr_t), np.array(ctr_v, dtype=np.float64)
    it, iv = np.array(ins_t), np.array(ins_v, dtype=np.float64)
    # failed reads are NaN, never a value: leave them out of every statistic
    ct, cv = ct[np.isfinite(cv)], cv[np.isfinite(cv)]
    it, iv = it[np.isfinite(iv)], iv[np.isfinite(iv)]
    bt, bv = np.array(buf_t, dtype=np.float64) * 1e-6, np.array(buf_v, dtype=np.float64) * 1e-3

    def change_intervals(t, v):
        ch = t[1:][np.diff(v) != 0]
        return np.diff(ch)

    def q(x):
        x = np.asarray(x)
        return {k: float(np.percentile(x, p)) for k, p in (("p10", 10), ("median", 50), ("p90", 90))} if len(x) else {}

    out = {
        "counter_read_latency_s": q(ctr_lat),
        "counter_change_interval_s": q(change_intervals(ct, cv)),
        "counter_step_mj": q(np.diff(cv)[np.diff(cv) > 0]),
        "instant_change_interval_s": q(change_intervals(it, iv)),
        "buffer_spacing_s": q(np.diff(bt)),
        "buffer_change_interval_s": q(change_intervals(bt, bv)),
        "n_buffer": int(len(bt)), "n_counter_reads": int(len(ct)), "n_bursts": len(bursts),
    }
    # Lag: the shift of the buffer trace that best aligns it with the burst on/off pattern.
    if len(bursts) > 3 and len(bt) > 10:
        grid = np.arange(bt[0], bt[-1], 0.001)
        on = np.zeros_like(grid)
        for b0, b1 in bursts:
            on[(grid >= b0) & (grid < b1)] = 1.0
        scores = []
        lags = np.arange(0.0, 0.1, 0.0005)
        for lag in lags:
            idx = np.clip(np.searchsorted(bt - lag, grid, side="right") - 1, 0, len(bt) - 1)
            p = bv[idx]
            scores.append(float(np.corrcoef(p, on)[0, 1]))
        out["buffer_lag_s"] = float(lags[int(np.argmax(scores))])
        # the same for the counter's derivative (counter staleness)
    # Buffer vs counter over segments (buffer shifted by its lag, zero-order hold).
    lag = out.get("buffer_lag_s", 0.0)
    tb = bt - lag
    cum = np.concatenate(([0.0], np.cumsum(bv[:-1] * np.diff(tb))))

    def buf_j(x):
        k = np.clip(np.searchsorted(tb, x, side="right") - 1, 0, len(tb) - 1)
        return cum[k] + bv[k] * (x - tb[k])

    ct2, cv2 = ct, cv * 1e-3
    seg = {}
    for length in (1.0, 10.0):
        ratios = []
        s = ct2[0] + 1.0
        while s + length < ct2[-1] - 0.5:
            i0, i1 = np.searchsorted(ct2, [s, s + length])
            e_c = cv2[i1] - cv2[i0]
            e_b = buf_j(ct2[i1]) - buf_j(ct2[i0])
            if e_b > 0:
                ratios.append(e_c / e_b - 1.0)
            s += length / 2
        seg[f"{length:g}s"] = {"n": len(ratios), "ctr_over_buf_minus_1": q(ratios),
                               "trials": [round(r * 100, 3) for r in ratios]}
    out["segments"] = seg
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
        np.savez_compressed(os.path.splitext(args.out)[0] + ".npz", ct=ct, cv=cv, it=it, iv=iv, bt=bt, bv=bv,
                            bursts=np.array(bursts))


if __name__ == "__main__":
    main()
