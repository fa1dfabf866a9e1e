# Zeus on the GPU machine (no registry there), from the wheels in .whl/ (bench/gpu_meter.sh runs this):
#   pip install --no-index --find-links .whl zeus || { pip install --no-index --find-links .whl \
#       nvidia-ml-py pydantic rich tyro httpx amdsmi python-dateutil \
#     && pip install --no-index --find-links .whl --no-deps zeus; }
"""llm_dvfs side by side with Zeus on one real GPU, in one run. Read-only: no clock or power-limit change.

Zeus is optional. On the GPU machine (no registry access) install it from the wheels in .whl/ (what
bench/gpu_meter.sh does; the fallback is for a machine without scipy, which scikit-learn needs and whose
wheel alone is 35 MB):

    pip install --no-index --find-links .whl zeus || { pip install --no-index --find-links .whl \\
        nvidia-ml-py pydantic rich tyro httpx amdsmi python-dateutil \\
      && pip install --no-index --find-links .whl --no-deps zeus; }

zeus.monitor uses scikit-learn only for ``sklearn.metrics.auc`` (the trapezoidal area under Zeus's power
samples); without scikit-learn this script provides the same function (same checks, numpy's trapezoid)
and says so. Without Zeus the Zeus columns are skipped.

Phases (GPU --device, default 0):

1. Long windows: --trials windows of 0.5 s idle + --load-s of random bf16 8192² matmul bursts (the load
   of bench/energy_accuracy.py) + 0.5 s idle. Signed error against the truth of llm_dvfs
   ``with mon.window()`` (energy_j, energy_method; per trial also the rule, ``calibration``:
   counter_edges or counter, and the ``gain`` applied; the raw buffer's error), its counter delta
   (energy_j_counter), Zeus ``PowerMonitor.get_energy`` over the same interval, and a ZeusMonitor
   window around it.
2. Per-request energy: GPU-bound requests of k x six bf16 8192² matmuls (default k = 5, 30, 200:
   about 40 ms, 300 ms, 2 s), launched without synchronisation, in shuffled order with random idle
   gaps. Truth per request type by repetition: the same request back-to-back in one long block
   measured with the counter, before and after the interleaved requests. Mean absolute % error of
   ``with mon.window()`` (default sync=True), ``llm_dvfs.attribute()`` over the same intervals (on
   the calibrated trace of a window around all of them, lag estimated from the trace), the counter
   delta per window, Zeus PowerMonitor over the same interval,
   and a ZeusMonitor window (the llm_dvfs window nests inside it: Zeus's own counter reads add no
   idle time to llm_dvfs's window).
3. Throughput cost on HF generate (--model, random weights, bf16, batch 1, --new-tokens tokens):
   --rounds rounds, each running once, in shuffled order: no meter | llm_dvfs PowerMonitor running
   with a window per generate | Zeus PowerMonitor running | a ZeusMonitor window per generate. Each
   variant's tokens/s is divided by the no-meter run of the same round; median ratio and bootstrap
   95 % CI (10 000 resamples, seeded). Monitors are started before and stopped after each timed
   generate (their start-up is not timed). Sampler CPU per wall second: llm_dvfs from
   PowerMonitor.stats()['thread_cpu_s'] (read after the window's end-edge bracket, so the counter
   reads that bracket both edges are included; brackets and their reads are counted per run), Zeus
   from /proc/PID/stat of its poller processes.

Truth for phases 1 and 2 is the GPU's energy counter (nvmlDeviceGetTotalEnergyConsumption) read by this
script through ctypes, independently of llm_dvfs and Zeus. The counter changes only every ~100 ms, so
at each edge of a span (the GPU idle) the script polls it until it changes and takes the change instant
(midway between the last old and the first new read) with the new value; the idle sliver between that
instant and the measured interval's edge is corrected with the idle power measured over the two
neighbouring counter updates at the same edge. Every method is judged against the truth of its own interval.

    python bench/vs_zeus.py --out vs_zeus.json          # the default run: about 5.5 min on an H200
    python bench/vs_zeus.py --quick --out smoke.json    # smoke run, about 1.5 min
    python bench/vs_zeus.py --phases 1,2 --no-zeus      # llm_dvfs only, phases 1 and 2

Prints a compact table per phase; --out writes every per-trial, per-request and per-run number as
JSON (rewritten after each phase). Without a GPU (no NVIDIA driver, or torch without CUDA) it prints
one line and exits 0.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

AUC_SHIM_ENV = "VS_ZEUS_AUC_SHIM"
ZEUS_INSTALL = "pip install --no-index --find-links .whl zeus (see the top of bench/vs_zeus.py)"


def log(msg: str = "") -> None:
    print(msg, flush=True)


# -- Zeus (optional) -----------------------------------------------------------------------------
def _auc(x: Any, y: Any) -> float:
    """``sklearn.metrics.auc``: trapezoidal area under (x, y) for monotonic x (same checks)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape[0] < 2:
        raise ValueError(f"At least 2 points are needed to compute area under curve, but x.shape = {x.shape[0]}")
    direction = 1.0
    dx = np.diff(x)
    if np.any(dx < 0):
        if np.all(dx <= 0):
            direction = -1.0
        else:
            raise ValueError(f"x is neither increasing nor decreasing : {x}.")
    trapezoid = getattr(np, "trapezoid", None) or np.trapz
    return float(direction * trapezoid(y, x))


def _import_with_auc_shim(name: str) -> Any:
    """Import ``name`` with a stand-in ``sklearn.metrics`` (only ``auc``) present during the import
    only: the importing module keeps its reference to ``auc``, and nothing else (transformers,
    torch._dynamo) sees a fake scikit-learn afterwards."""
    import importlib.machinery
    import types

    added = []
    for mod_name in ("sklearn", "sklearn.metrics"):
        if mod_name not in sys.modules:
            mod = types.ModuleType(mod_name)
            mod.__spec__ = importlib.machinery.ModuleSpec(mod_name, None, is_package=mod_name == "sklearn")
            sys.modules[mod_name] = mod
            added.append(mod_name)
    sys.modules["sklearn.metrics"].auc = _auc
    sys.modules["sklearn"].metrics = sys.modules["sklearn.metrics"]
    try:
        return importlib.import_module(name)
    finally:
        for mod_name in added:
            sys.modules.pop(mod_name, None)


# Zeus's PowerMonitor polls in processes started with "spawn"; they import this file again (as
# __mp_main__, main() not run) before unpickling their target from zeus.monitor.power, so that
# module is imported here first, with the stand-in for scikit-learn.
if os.environ.get(AUC_SHIM_ENV) == "1":
    _import_with_auc_shim("zeus.monitor.power")


def load_zeus(disabled: bool) -> tuple[Optional[dict], str]:
    """Zeus's classes, or None and why not."""
    if disabled:
        return None, "disabled (--no-zeus)"
    try:
        import zeus
    except ImportError as e:
        return None, f"not installed ({e}); to compare, install it: {ZEUS_INSTALL}"
    note = ""
    try:
        try:
            importlib.import_module("sklearn.metrics")
        except ImportError:
            os.environ[AUC_SHIM_ENV] = "1"  # inherited by Zeus's spawned pollers
            _import_with_auc_shim("zeus.monitor.power")
            note = " (scikit-learn not installed: sklearn.metrics.auc provided by this script)"
        from zeus.monitor import ZeusMonitor
        from zeus.monitor.power import PowerMonitor as ZeusPowerMonitor
    except Exception as e:  # a broken install must not stop the llm_dvfs side
        return None, f"import failed ({type(e).__name__}: {e})"
    version = getattr(zeus, "__version__", "?")
    return {"ZeusMonitor": ZeusMonitor, "PowerMonitor": ZeusPowerMonitor, "version": version}, \
        f"zeus {version}{note}"


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc), NaN if unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def wall_of(t_mono: float) -> float:
    """time.time() of a time.monotonic() instant (Zeus stamps samples with time.time())."""
    return t_mono + (time.time() - time.monotonic())


class ZeusSide:
    """ZeusMonitor (counter reads at window edges on Volta+) and Zeus's PowerMonitor (instant
    power polled in spawned processes, integrated with auc) on one GPU. Errors become NaN."""

    def __init__(self, mods: dict, device: int) -> None:
        self.mods, self.device = mods, device
        self.version = mods["version"]
        self.zm = mods["ZeusMonitor"](gpu_indices=[device], cpu_indices=[])
        self.pm = None
        self.errors: dict[str, dict] = {}

    def _err(self, what: str, e: Exception) -> None:
        kind = f"{what}: {type(e).__name__}"
        if kind not in self.errors:  # print the first of each kind
            log(f"  zeus error, {kind}: {e} (counted in the JSON's meta.zeus_errors)")
            self.errors[kind] = {"count": 0, "first": str(e)}
        self.errors[kind]["count"] += 1

    @property
    def zm_has_poller(self) -> bool:
        return getattr(self.zm, "power_monitor", None) is not None

    def start_pm(self) -> float:
        """Start a Zeus PowerMonitor (defaults: update period inferred, all domains); start-up s."""
        t0 = time.monotonic()
        try:
            self.pm = self.mods["PowerMonitor"](gpu_indices=[self.device])
        except Exception as e:
            self._err("PowerMonitor()", e)
            self.pm = None
        return time.monotonic() - t0

    def stop_pm(self) -> None:
        if self.pm is not None:
            try:
                self.pm.stop()
            except Exception as e:
                self._err("PowerMonitor.stop", e)
            self.pm = None

    def pm_info(self) -> dict:
        if self.pm is None:
            return {}
        return {"update_period_s": getattr(self.pm, "update_period", None),
                "domains": sorted(d.value for d in getattr(self.pm, "measurement_domains", []))}

    def pm_pids(self) -> list[int]:
        """PIDs of the poller processes (zeus >= 0.12: one per power domain; before: one)."""
        if self.pm is None:
            return []
        procs = list(getattr(self.pm, "processes", {}).values())
        if not procs and getattr(self.pm, "process", None) is not None:
            procs = [self.pm.process]
        return [p.pid for p in procs if p.pid is not None]

    def pm_cpu_s(self) -> float:
        return float(sum(proc_cpu_s(p) for p in self.pm_pids())) if self.pm is not None else float("nan")

    def pm_energy(self, a: float, b: float) -> float:
        """Zeus PowerMonitor energy of [a, b] (monotonic s), J."""
        if self.pm is None:
            return float("nan")
        try:
            e = self.pm.get_energy(wall_of(a), wall_of(b))
        except Exception as ex:
            self._err("PowerMonitor.get_energy", ex)
            return float("nan")
        return float(e.get(self.device, float("nan"))) if e else float("nan")

    def begin(self, key: str) -> float:
        """ZeusMonitor.begin_window (sync_execution=True); the counter-read instant, monotonic s."""
        t0 = time.monotonic()
        try:
            self.zm.begin_window(key, sync_execution=True)
        except Exception as e:
            self._err("begin_window", e)
        return 0.5 * (t0 + time.monotonic())

    def end(self, key: str) -> tuple[float, float]:
        """ZeusMonitor.end_window: (energy J, counter-read instant monotonic s)."""
        t0 = time.monotonic()
        try:
            m = self.zm.end_window(key, sync_execution=True)
            e = float(m.gpu_energy.get(self.device, float("nan")))
        except Exception as ex:
            self._err("end_window", ex)
            e = float("nan")
        return e, 0.5 * (t0 + time.monotonic())


# -- truth: the energy counter, read here --------------------------------------------------------
@dataclass
class Edge:
    """A counter change instant at an idle edge: time (monotonic s), counter (J), idle power (W)."""

    t_s: float
    energy_j: float
    power_w: float


@dataclass
class CounterSpan:
    """Counter energy between a start and an end edge."""

    start: Edge
    end: Edge

    def energy_j(self, a: float, b: float) -> float:
        """Energy of [a, b] inside the span: the counter delta between the change instants minus the
        idle slivers [start, a] and [b, end] at each edge's idle power."""
        return ((self.end.energy_j - self.start.energy_j) - self.start.power_w * (a - self.start.t_s)
                - self.end.power_w * (self.end.t_s - b))


class EnergyCounter:
    """``nvmlDeviceGetTotalEnergyConsumption`` through ctypes (the truth; independent of llm_dvfs)."""

    def __init__(self, lib_path: str, nvml_index: int) -> None:
        nv = ctypes.CDLL(lib_path)
        if nv.nvmlInit_v2() != 0:
            raise RuntimeError("nvmlInit_v2 failed")
        self.h = ctypes.c_void_p()
        rc = nv.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(nvml_index), ctypes.byref(self.h))
        if rc != 0:
            raise RuntimeError(f"nvmlDeviceGetHandleByIndex_v2({nvml_index}) returned {rc}")
        self._get = nv.nvmlDeviceGetTotalEnergyConsumption
        self._get.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulonglong)]
        self._v = ctypes.c_ulonglong()
        self.read_s: list[float] = []

    def read(self) -> tuple[float, float]:
        """(read instant monotonic s, counter J)."""
        t0 = time.monotonic()
        rc = self._get(self.h, ctypes.byref(self._v))
        t1 = time.monotonic()
        if rc != 0:
            raise RuntimeError(f"nvmlDeviceGetTotalEnergyConsumption returned {rc}")
        self.read_s.append(t1 - t0)
        return 0.5 * (t0 + t1), self._v.value * 1e-3

    def next_change(self, timeout_s: float = 2.0) -> tuple[float, float]:
        """Poll until the counter changes: (change instant, new value J)."""
        t_prev, e0 = self.read()
        deadline = t_prev + timeout_s
        while True:
            t, e = self.read()
            if e != e0:
                return 0.5 * (t_prev + t), e
            if t > deadline:
                raise RuntimeError(f"the energy counter did not change within {timeout_s} s")
            t_prev = t

    def edge(self, side: str, intervals: int = 2) -> Edge:
        """A start edge ends on its last change (open the windows right after); an end edge starts
        on its first change (after the windows closed). Idle power over ``intervals`` updates."""
        pts = [self.next_change() for _ in range(intervals + 1)]
        power = (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])
        t, e = pts[-1] if side == "start" else pts[0]
        return Edge(t, e, power)


TRUTH_METHOD = ("truth = the GPU energy counter read by this script (ctypes NVML): at each idle edge it "
                "is polled until it changes and the change instant is used; the idle slivers between "
                "the change instants and each method's own interval are subtracted at the idle power "
                "measured over the two neighbouring counter updates at that edge")


# -- helpers ---------------------------------------------------------------------------------------
def err_pct(x: Optional[float], truth: float) -> float:
    """Signed % error (NaN when x is missing or the truth is 0)."""
    if x is None or not math.isfinite(x) or not truth:
        return float("nan")
    return 100.0 * (x - truth) / truth


def fmt(x: Optional[float], spec: str = "+.2f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


def nan_stats(xs: list[float]) -> dict:
    v = np.array([x for x in xs if x is not None and math.isfinite(x)], dtype=np.float64)
    if not v.size:
        return {"n": 0, "mean": float("nan"), "mean_abs": float("nan"), "max_abs": float("nan")}
    return {"n": int(v.size), "mean": float(v.mean()), "mean_abs": float(np.abs(v).mean()),
            "max_abs": float(np.abs(v).max())}


@dataclass
class Ctx:
    device: int
    counter: EnergyCounter
    mon: Any                         # llm_dvfs PowerMonitor of phases 1 and 2
    zeus: Optional[ZeusSide]


# -- phase 1 ---------------------------------------------------------------------------------------
LONG_METHODS = ("llm_dvfs", "counter_delta", "zeus_power_monitor", "zeus_monitor")


def long_window_trial(ctx: Ctx, trial: int, load_s: float, rng: random.Random) -> dict:
    from energy_accuracy import gpu_load  # bench/ is sys.path[0] when run as a script

    time.sleep(0.3 if trial == 0 else 0.05)  # later trials follow the previous one's idle tail
    start = ctx.counter.edge("start")
    key = f"trial{trial}"
    z_a = ctx.zeus.begin(key) if ctx.zeus else float("nan")
    with ctx.mon.window(key) as w:
        time.sleep(0.5)
        gpu_load(load_s, rng)
        time.sleep(0.5)
    z_e, z_b = ctx.zeus.end(key) if ctx.zeus else (float("nan"), float("nan"))
    span = CounterSpan(start, ctx.counter.edge("end"))
    m = w.measurement()
    a, b = m.t_start_s, m.t_end_s
    truth = span.energy_j(a, b)
    zpm = ctx.zeus.pm_energy(a, b) if ctx.zeus else float("nan")
    truth_z = span.energy_j(z_a, z_b) if ctx.zeus else float("nan")
    d = m.devices.get(ctx.device)
    by_source = dict(getattr(d, "energy_j_by_source", {}) or {})
    return {
        "trial": trial, "duration_s": b - a, "truth_j": truth, "truth_zeus_monitor_j": truth_z,
        "llm_dvfs_j": m.energy_j, "energy_method": m.energy_method,
        "counter_delta_j": m.energy_j_counter, "zeus_power_monitor_j": zpm, "zeus_monitor_j": z_e,
        "err_pct": {"llm_dvfs": err_pct(m.energy_j, truth),
                    "counter_delta": err_pct(m.energy_j_counter, truth),
                    "zeus_power_monitor": err_pct(zpm, truth),
                    "zeus_monitor": err_pct(z_e, truth_z)},
        "err_pct_by_source": {s: err_pct(e, truth) for s, e in by_source.items()},
        "idle_w": [span.start.power_w, span.end.power_w],
        "edge_slivers_s": [a - span.start.t_s, span.end.t_s - b],
        "avg_power_w": m.avg_power_w,
        "gain": getattr(d, "gain", None), "gain_se": getattr(d, "gain_se", None),
        "gain_span_s": getattr(d, "gain_span_s", None), "calibration": getattr(d, "calibration", None),
        "edges": getattr(d, "edges", None), "lag_s": getattr(d, "lag_s", None),
    }


def phase_long_windows(ctx: Ctx, args: argparse.Namespace) -> dict:
    from energy_accuracy import gpu_load

    log(f"\n== 1. long windows: {args.trials} trials of 0.5 s idle + {args.load_s:g} s random bf16 "
        "matmul bursts + 0.5 s idle")
    log(f"   {TRUTH_METHOD}")
    gpu_load(2.0, random.Random(0))  # warm-up outside any window (cuBLAS, clocks)
    rng = random.Random(args.seed)
    methods = [m for m in LONG_METHODS if ctx.zeus or not m.startswith("zeus")]
    heads = {"llm_dvfs": "llm_dvfs %", "counter_delta": "ctr Δ %", "zeus_power_monitor": "zeusPM %",
             "zeus_monitor": "zeusMon %"}
    cols = lambda vals: " ".join(f"{v:>10}" for v in vals)  # noqa: E731
    log(f"{'trial':>5} {'dur s':>6} {'truth J':>9} {'llm_dvfs J':>10} {'method':>8} {'calibration':>13} "
        f"{'gain':>7} " + cols(heads[m] for m in methods) + f" {'buffer %':>9}")
    rows = []
    for trial in range(args.trials):
        r = long_window_trial(ctx, trial, args.load_s, rng)
        rows.append(r)
        log(f"{trial:>5} {r['duration_s']:>6.2f} {r['truth_j']:>9.1f} {r['llm_dvfs_j']:>10.1f} "
            f"{r['energy_method']:>8} {str(r['calibration']):>13.13} {fmt(r['gain'], '.4f'):>7} "
            + cols(fmt(r["err_pct"][m]) for m in methods)
            + f" {fmt(r['err_pct_by_source'].get('buffer')):>9}")
        if r["calibration"] != "counter_edges":
            log(f"      not stitched to the counter's change instants: {r['edges']}")
    summary = {k: nan_stats([r["err_pct"][k] for r in rows]) for k in methods}
    for label, key in (("mean", "mean"), ("|mean|", "mean_abs"), ("max||", "max_abs")):
        log(f"{label:>5} {'':>6} {'':>9} {'':>10} {'':>8} {'':>13} {'':>7} "
            + cols(fmt(summary[m][key], "+.2f" if key == "mean" else ".2f") for m in methods))
    log("   % = signed error against the truth of each method's own interval (mean |error| in |mean|); "
        "calibration: counter_edges = energy from the counter at the change instants bracketed at the "
        "window's edges (gain = that / raw buffer), counter = buffer x running gain; buffer % = raw buffer")
    used = {str(c): sum(r["calibration"] == c for r in rows) for c in {r["calibration"] for r in rows}}
    log(f"   rule per trial: {used}")
    return {"truth_method": TRUTH_METHOD, "trials": rows, "summary_err_pct": summary, "calibration_counts": used}


# -- phase 2 ---------------------------------------------------------------------------------------
REQ_METHODS = ("window", "attribute", "counter_delta", "zeus_power_monitor", "zeus_monitor")


class MatmulRequests:
    """GPU-bound requests: ``k`` x ``mm`` bf16 n x n matmuls enqueued without a host sync."""

    def __init__(self, device: int, n: int = 8192, mm: int = 6, seed: int = 0) -> None:
        import torch

        self.torch, self.device, self.mm = torch, device, mm
        g = torch.Generator(device=f"cuda:{device}").manual_seed(seed)
        self.a = torch.randn(n, n, device=f"cuda:{device}", dtype=torch.bfloat16, generator=g)
        self.b = torch.randn(n, n, device=f"cuda:{device}", dtype=torch.bfloat16, generator=g)
        self.c = torch.empty_like(self.a)

    def launch(self, k: int) -> None:
        for _ in range(k * self.mm):
            self.torch.mm(self.a, self.b, out=self.c)

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def timed(self, k: int) -> float:
        self.sync()
        t0 = time.monotonic()
        self.launch(k)
        self.sync()
        return time.monotonic() - t0


def repetition_truth(ctx: Ctx, reqs: MatmulRequests, k: int, reps: int, pad_s: float) -> dict:
    """J per request of type k: ``reps`` back-to-back requests in one counter-measured block."""
    reqs.sync()
    time.sleep(pad_s)
    start = ctx.counter.edge("start")
    t_first = time.monotonic()
    for _ in range(reps):
        reqs.launch(k)
        reqs.sync()
    t_last = time.monotonic()
    time.sleep(pad_s)  # the counter reports late: let the block's tail reach it
    span = CounterSpan(start, ctx.counter.edge("end"))
    return {"k": k, "reps": reps, "energy_j": span.energy_j(t_first, t_last) / reps,
            "duration_s": (t_last - t_first) / reps}


def interleaved_requests(ctx: Ctx, reqs: MatmulRequests, ks: list[int], counts: list[int],
                         gap_s: tuple[float, float], rng: random.Random) -> tuple[list[dict], Any]:
    order = [i for i, n in enumerate(counts) for _ in range(n)]
    rng.shuffle(order)
    reqs.sync()
    time.sleep(0.5)
    block = ctx.mon.begin_window("interleaved")  # its calibrated trace feeds attribute()
    recs = []
    for j, i in enumerate(order):
        time.sleep(rng.uniform(*gap_s))
        key = f"req{j}"
        if ctx.zeus:
            ctx.zeus.begin(key)
        with ctx.mon.window(key) as w:  # sync=True: the window closes when the GPU is done
            reqs.launch(ks[i])
        z = ctx.zeus.end(key)[0] if ctx.zeus else float("nan")
        recs.append({"type": i, "window": w, "zeus_monitor_j": z})
    time.sleep(0.5)
    block.end()
    return recs, block


def evaluate_requests(ctx: Ctx, recs: list[dict], block: Any,
                      truths: list[float]) -> tuple[list[dict], dict]:
    """Every estimate of every request. attribute() gets the block window's trace (scaled by the
    block's counter-anchored gain where llm_dvfs applies one) and the request windows' bounds."""
    from llm_dvfs import attribute

    ms = [r["window"].measurement() for r in recs]
    mb = block.measurement()
    trace = mb.trace(margin_s=1.0)
    batches = [{"bounds_s": [m.t_start_s, m.t_end_s], "tokens_per_sequence": [1]} for m in ms]
    att = attribute(trace, batches, window_s=(mb.t_start_s, mb.t_end_s), counter_energy_j=mb.energy_j_counter)
    d = mb.devices.get(ctx.device)
    lag = {"lag": {str(k): {"lag_s": v.lag_s, "method": v.method} for k, v in att.lags.items()},
           "block_gain": getattr(d, "gain", None), "block_calibration": getattr(d, "calibration", None),
           "residual_vs_counter_pct": att.residual_pct}
    rows = []
    for j, (r, m) in enumerate(zip(recs, ms)):
        truth = truths[r["type"]]
        est = {"window": m.energy_j, "attribute": att.requests[j]["energy_j"],
               "counter_delta": m.energy_j_counter,
               "zeus_power_monitor": ctx.zeus.pm_energy(m.t_start_s, m.t_end_s) if ctx.zeus else float("nan"),
               "zeus_monitor": r["zeus_monitor_j"]}
        rows.append({"request": j, "type": r["type"], "t_start_s": m.t_start_s, "duration_s": m.duration_s,
                     "truth_j": truth, "energy_method": m.energy_method,
                     "energy_j": {k: (float(v) if v is not None else None) for k, v in est.items()},
                     "err_pct": {k: err_pct(v, truth) for k, v in est.items()}})
    return rows, lag


def phase_per_request(ctx: Ctx, args: argparse.Namespace) -> dict:
    ks = [int(x) for x in args.types.split(",")]
    counts = [int(x) for x in args.requests.split(",")]
    if len(counts) != len(ks):
        raise SystemExit(f"--requests needs one count per type ({len(ks)}), got {args.requests!r}")
    log(f"\n== 2. per-request energy: requests of k x 6 bf16 8192² matmuls, k = {ks}, "
        f"{counts} requests, gaps {args.gap_ms[0]:g}-{args.gap_ms[1]:g} ms")
    reqs = MatmulRequests(ctx.device, seed=args.seed)
    for k in ks:  # warm-up (kernels, clocks)
        reqs.timed(k)
    durations = [reqs.timed(k) for k in ks]
    reps = [max(2, round(args.truth_s / d)) for d in durations]
    rng = random.Random(args.seed + 1)
    pad_s = 0.4
    log(f"   truth by repetition, {args.truth_s:g} s per type and pass (reps {reps}); {TRUTH_METHOD}")
    pass1 = [repetition_truth(ctx, reqs, k, n, pad_s) for k, n in zip(ks, reps)]
    recs, block = interleaved_requests(ctx, reqs, ks, counts,
                                       (args.gap_ms[0] / 1e3, args.gap_ms[1] / 1e3), rng)
    pass2 = [repetition_truth(ctx, reqs, k, n, pad_s) for k, n in zip(ks, reps)]
    truths = [0.5 * (p["energy_j"] + q["energy_j"]) for p, q in zip(pass1, pass2)]
    rows, lag = evaluate_requests(ctx, recs, block, truths)
    del reqs

    methods = [m for m in REQ_METHODS if ctx.zeus or not m.startswith("zeus")]
    heads = {"window": "window", "attribute": "attribute", "counter_delta": "ctr Δ",
             "zeus_power_monitor": "zeusPM", "zeus_monitor": "zeusMon"}
    per_type = []
    log(f"{'k':>4} {'n':>3} {'dur ms':>7} {'truth J':>8} {'Δpass %':>7} "
        + " ".join(f"{heads[m]:>10}" for m in methods))
    for i, k in enumerate(ks):
        rs = [r for r in rows if r["type"] == i]
        mape = {m: nan_stats([r["err_pct"][m] for r in rs])["mean_abs"] for m in methods}
        dur = float(np.mean([r["duration_s"] for r in rs])) * 1e3 if rs else float("nan")
        spread = 100.0 * abs(pass1[i]["energy_j"] - pass2[i]["energy_j"]) / truths[i]
        per_type.append({"k": k, "n": len(rs), "duration_ms": dur, "truth_j": truths[i],
                         "truth_pass1": pass1[i], "truth_pass2": pass2[i], "truth_pass_diff_pct": spread,
                         "mape_pct": mape})
        log(f"{k:>4} {len(rs):>3} {dur:>7.1f} {truths[i]:>8.2f} {spread:>7.2f} "
            + " ".join(f"{fmt(mape[m], '.2f') + ' %':>10}" for m in methods))
    log(f"   MAPE = mean |error| against the type's truth; attribute(): {lag}")
    return {"truth_method": TRUTH_METHOD, "types": ks, "per_type": per_type, "requests": rows,
            "attribute": lag}


# -- phase 3 ---------------------------------------------------------------------------------------
def make_generate(args: argparse.Namespace, device: int) -> Callable[[], int]:
    import torch

    from llm_dvfs.workload.models import load_model

    lm = load_model(args.model, dtype="bfloat16", device=f"cuda:{device}", seed=0)
    model = lm.model
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), generator=g).to(f"cuda:{device}")
    mask = torch.ones_like(ids)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    n = args.new_tokens

    def generate() -> int:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=pad)
        return int(out.shape[1] - ids.shape[1])

    return generate


def run_variant(name: str, gen: Callable[[], int], device: int, zeus: Optional[ZeusSide]) -> dict:
    """One timed generate under the variant's meter. Start-up and teardown are outside the timing."""
    import torch

    import llm_dvfs as ld

    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    res: dict[str, Any] = {"variant": name, "startup_s": 0.0, "cpu_s": float("nan"), "energy_j": float("nan")}
    if name == "none":
        sync()
        t0 = time.monotonic()
        n = gen()
        sync()
        t1 = time.monotonic()
    elif name == "llm_dvfs":
        ts = time.monotonic()
        mon = ld.PowerMonitor(devices=[device]).start()
        res["startup_s"] = time.monotonic() - ts
        try:
            sync()
            s0 = mon.stats()
            t0 = time.monotonic()
            with mon.window("generate") as w:  # bracket_edges on (the default): both edges bracketed
                n = gen()
            t1 = time.monotonic()
            res["energy_j"] = w.energy_j  # waits for the end edge's bracket to finish
            s1 = mon.stats()
            # CPU read after the end bracket: the counter reads of both edges' brackets are in it
            res["cpu_s"] = s1["thread_cpu_s"] - s0["thread_cpu_s"]
            res.update(brackets=s1["brackets"] - s0["brackets"],
                       bracket_reads=s1["bracket_reads"] - s0["bracket_reads"],
                       calibration=w.devices[device].calibration if device in w.devices else None)
        finally:
            mon.stop()
    elif name == "zeus_power_monitor":
        res["startup_s"] = zeus.start_pm()
        res["meter_ok"] = zeus.pm is not None  # a failed start would pass for "no overhead"
        try:
            sync()
            c0 = zeus.pm_cpu_s()
            t0 = time.monotonic()
            n = gen()
            sync()
            t1 = time.monotonic()
            res["cpu_s"] = zeus.pm_cpu_s() - c0
            time.sleep(0.15)  # let the poller's samples past the end arrive
            res["energy_j"] = zeus.pm_energy(t0, t1)
        finally:
            zeus.stop_pm()
    elif name == "zeus_monitor":
        sync()
        t0 = time.monotonic()
        zeus.begin("generate")
        n = gen()
        res["energy_j"] = zeus.end("generate")[0]
        t1 = time.monotonic()
    else:
        raise ValueError(name)
    res.update(tokens=n, wall_s=t1 - t0, tok_s=n / (t1 - t0))
    return res


def phase_throughput(device: int, zeus: Optional[ZeusSide], args: argparse.Namespace) -> dict:
    from llm_dvfs.analysis.stats import median_ci

    log(f"\n== 3. throughput on HF generate: {args.model} (random weights, bf16), batch 1, "
        f"{args.prompt_tokens} prompt + {args.new_tokens} new tokens, {args.rounds} interleaved rounds")
    variants = ["none", "llm_dvfs"] + (["zeus_power_monitor", "zeus_monitor"] if zeus else [])
    gen = make_generate(args, device)
    for _ in range(2):
        gen()
    for v in variants:  # warm each path once (imports, spawn, allocator)
        run_variant(v, gen, device, zeus)
    rng = random.Random(args.seed + 2)
    runs: list[dict] = []
    for r in range(args.rounds):
        order = list(variants)
        rng.shuffle(order)
        got = {}
        for v in order:
            got[v] = run_variant(v, gen, device, zeus)
        for v in order:
            got[v].update(round=r, order=order.index(v), ratio=got[v]["tok_s"] / got["none"]["tok_s"])
            runs.append(got[v])
    summary = {}
    log(f"{'variant':>19} {'tok/s med':>9} {'ratio med':>9} {'95 % CI':>17} {'CPU %core':>9} "
        f"{'start s':>7} {'J/generate':>10}")
    for v in variants:
        rs = [x for x in runs if x["variant"] == v and x.get("meter_ok", True)]
        if not rs:
            log(f"{v:>19} no run with the meter running")
            continue
        med, lo, hi = median_ci([x["ratio"] for x in rs], n_boot=10_000, seed=args.seed)
        wall = sum(x["wall_s"] for x in rs)
        cpu = [x["cpu_s"] for x in rs]
        cpu_frac = sum(cpu) / wall if cpu and all(math.isfinite(c) for c in cpu) and wall > 0 else float("nan")
        if v == "zeus_monitor" and zeus is not None and not zeus.zm_has_poller:
            cpu_frac = 0.0  # counter reads at the window edges only, in the caller's thread
        summary[v] = {"tok_s_median": float(np.median([x["tok_s"] for x in rs])), "ratio_median": med,
                      "ratio_ci95": [lo, hi], "sampler_cpu_per_wall_s": cpu_frac,
                      "startup_s_median": float(np.median([x["startup_s"] for x in rs])),
                      "energy_j_median": float(np.nanmedian([x["energy_j"] for x in rs]))
                      if any(math.isfinite(x["energy_j"]) for x in rs) else float("nan")}
        s = summary[v]
        ci = "" if v == "none" else f"[{fmt(lo, '.4f')}, {fmt(hi, '.4f')}]"
        log(f"{v:>19} {s['tok_s_median']:>9.1f} {fmt(med, '.4f'):>9} {ci:>17} "
            f"{fmt(100 * cpu_frac, '.3f'):>9} {s['startup_s_median']:>7.2f} {fmt(s['energy_j_median'], '.1f'):>10}")
    br = [x for x in runs if x["variant"] == "llm_dvfs" and "brackets" in x]
    if br and "llm_dvfs" in summary:
        summary["llm_dvfs"]["brackets_median"] = float(np.median([x["brackets"] for x in br]))
        summary["llm_dvfs"]["bracket_reads_median"] = float(np.median([x["bracket_reads"] for x in br]))
        log(f"   llm_dvfs: window-edge brackets on, median {summary['llm_dvfs']['brackets_median']:.0f} brackets and "
            f"{summary['llm_dvfs']['bracket_reads_median']:.0f} counter reads per generate; their CPU is in CPU %core "
            "(read after the end edge's bracket, over the generate's wall time)")
    log("   ratio = tokens/s over the same round's no-meter run (median, bootstrap 95 % CI of the median); "
        "CPU = sampler CPU s per wall s during the timed generate (Zeus: its poller processes; "
        "ZeusMonitor has no poller on a GPU with an energy counter)")
    return {"variants": variants, "runs": runs, "summary": summary}


# -- main ------------------------------------------------------------------------------------------
def gpu_or_reason(device: int) -> tuple[Any, Optional[str]]:
    """(DeviceInfo, None) for a real NVIDIA GPU usable from torch, else (None, why not)."""
    import llm_dvfs as ld
    from llm_dvfs.devices import last_error, library_path

    devs = ld.devices()
    if not devs:
        return None, f"no NVIDIA GPU or driver ({last_error()})"
    info = next((d for d in devs if d.index == device), None)
    if info is None:
        return None, f"GPU {device} is not visible (visible: {[d.index for d in devs]})"
    lib = library_path()
    if lib:
        try:
            if hasattr(ctypes.CDLL(lib), "fake_nvml_reset"):
                return None, f"NVML is the emulator ({lib}), not a real GPU"
        except OSError:
            pass
    try:
        import torch
    except ImportError:
        return None, "torch is not installed"
    if not torch.cuda.is_available() or device >= torch.cuda.device_count():
        return None, f"torch {torch.__version__} sees no CUDA device {device}"
    return info, None


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, metavar="PATH", help="write every number as JSON here")
    p.add_argument("--device", type=int, default=0, help="CUDA ordinal of the GPU (default 0)")
    p.add_argument("--phases", default="1,2,3", help="which phases to run (default 1,2,3)")
    p.add_argument("--no-zeus", action="store_true", help="skip Zeus even if it is installed")
    p.add_argument("--quick", action="store_true", help="short smoke run (about 1.5 min)")
    p.add_argument("--seed", type=int, default=1)
    g = p.add_argument_group("phase 1: long windows")
    g.add_argument("--trials", type=int, default=8, help="windows (default 8)")
    g.add_argument("--load-s", type=float, default=10.0, help="seconds of matmul bursts per window "
                   "(default 10; the window adds 0.5 s idle at each edge)")
    g = p.add_argument_group("phase 2: per-request energy")
    g.add_argument("--types", default="5,30,200", help="request types: k of k x 6 matmuls (default "
                   "5,30,200: about 40 ms, 300 ms, 2 s)")
    g.add_argument("--requests", default="24,16,6", help="interleaved requests per type (default 24,16,6)")
    g.add_argument("--truth-s", type=float, default=3.0, help="seconds of repetitions per type and "
                   "truth pass (two passes; default 3)")
    g.add_argument("--gap-ms", type=float, nargs=2, default=(20.0, 200.0), metavar=("MIN", "MAX"),
                   help="random idle gap before each request (default 20 200)")
    g = p.add_argument_group("phase 3: throughput on HF generate")
    g.add_argument("--model", default="arch:llama-3.2-1b", help="model spec (default arch:llama-3.2-1b)")
    g.add_argument("--rounds", type=int, default=20, help="interleaved rounds (default 20)")
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--prompt-tokens", type=int, default=64)
    a = p.parse_args(argv)
    if a.quick:
        a.trials, a.load_s, a.requests, a.truth_s, a.rounds, a.new_tokens = 2, 3.0, "4,3,2", 1.0, 4, 16
    a.phases = {int(x) for x in a.phases.split(",") if x.strip()}
    return a


def _json_ready(x: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python, containers recursively."""
    if isinstance(x, dict):
        return {str(k): _json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_ready(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def save(path: Optional[str], out: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(_json_ready(out), f, indent=1, default=str)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    info, why = gpu_or_reason(args.device)
    if info is None:
        log(f"vs_zeus: needs a GPU: {why}. Skipped.")
        return 0
    import torch
    import transformers

    import llm_dvfs as ld
    from llm_dvfs.devices import library_path

    torch.cuda.set_device(args.device)
    mods, zeus_note = load_zeus(args.no_zeus)
    zeus = None
    if mods:
        try:
            zeus = ZeusSide(mods, args.device)
        except Exception as e:  # e.g. Zeus cannot initialise NVML: compare without it
            zeus_note += f", but ZeusMonitor() failed ({type(e).__name__}: {e})"
    log(f"vs_zeus: GPU {args.device} {info.name} ({info.uuid}), driver {info.driver_version}; llm_dvfs "
        f"{ld.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}")
    log(f"Zeus: {zeus_note}" + ("" if zeus else " -> Zeus columns skipped"))
    out: dict[str, Any] = {"meta": {
        "gpu": info.name, "uuid": info.uuid, "driver": info.driver_version, "device": args.device,
        "llm_dvfs": ld.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "zeus": zeus_note if zeus else None, "zeus_skipped": None
        if zeus else zeus_note, "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "truth_method": TRUTH_METHOD, "phase_s": {}}}
    if {1, 2} & args.phases:
        if not info.has_energy_counter:
            log("phases 1 and 2 need the GPU's energy counter (the truth): skipped")
        else:
            ctx = Ctx(args.device, EnergyCounter(library_path() or "libnvidia-ml.so.1", info.nvml_index),
                      ld.PowerMonitor(devices=[args.device]).start(), zeus)
            if zeus:
                zeus.start_pm()
                out["meta"]["zeus_power_monitor"] = zeus.pm_info()
                log(f"Zeus PowerMonitor: {zeus.pm_info()}; ZeusMonitor poller: {zeus.zm_has_poller}")
            try:
                for ph, fn, key in ((1, phase_long_windows, "long_windows"), (2, phase_per_request, "per_request")):
                    if ph in args.phases:
                        t0 = time.monotonic()
                        out[key] = fn(ctx, args)
                        out["meta"]["phase_s"][key] = time.monotonic() - t0
                        save(args.out, out)
            finally:
                ctx.mon.stop()
                if zeus:
                    zeus.stop_pm()
            reads = np.array(ctx.counter.read_s)
            out["meta"]["counter_read_ms"] = {"median": float(np.median(reads) * 1e3),
                                              "p99": float(np.percentile(reads, 99) * 1e3), "n": int(reads.size)}
            torch.cuda.empty_cache()
    if 3 in args.phases:
        t0 = time.monotonic()
        out["throughput"] = phase_throughput(args.device, zeus, args)
        out["meta"]["phase_s"]["throughput"] = time.monotonic() - t0
    if zeus and zeus.errors:
        out["meta"]["zeus_errors"] = zeus.errors
    out["meta"]["total_s"] = time.monotonic() - t_start
    save(args.out, out)
    log("\nphases: " + ", ".join(f"{k} {v:.0f} s" for k, v in out["meta"]["phase_s"].items())
        + f"; total {out['meta']['total_s']:.0f} s" + (f"; wrote {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
