"""Per-request energy accuracy of llm_dvfs attribution against what other tools report (GPU).

Workload: Hugging Face ``generate`` on a Llama-3.2-1B-shaped model with random weights (bf16,
batch 1, greedy, no EOS so every request has exactly its token count), three request types of
different lengths (default ``32:4,128:24,512:160`` = prompt:new tokens, about 50 ms, 300 ms and
2 s on an H100).

1. Ground truth per request type, by repetition: the same request back-to-back N times inside a
   window that starts and ends in idle (so the energy counter's ~100 ms update steps land on
   idle power), counter delta minus idle power over the idle padding, divided by N. Measured
   before and after phase 2; the mean is the truth, the difference is printed.
2. Requests of all types interleaved in random order with short random idle gaps. For each
   request, the mean absolute % error against its type's truth of
     (a)  llm_dvfs: TokenTimer event marks + attribution (lag estimated from the trace)
     (a0) the same without lag compensation
     (b)  the energy-counter delta over the request's host window (what Zeus reports)
     (c)  the 1 s average power (NVML power usage) integrated over the request's window
          (what nvidia-smi-based tools report)
     (d)  the monitor's buffer integral over the request's host window (no marks, no lag)
3. Timeline: alignment uncertainty of event marks; host-callback marks' lateness against event
   marks on the same stream; host cost of mark().
4. Overhead: generate latency with TokenTimer (event + logits processor, event + stopping
   criterion, callback + logits processor) against none, interleaved rounds, medians; and the
   CPU time of attribution per request.

    python bench/attribution_accuracy.py --out DIR [--quick] [--model 1b|small] [--device 0]

``--workload matmul`` replaces ``generate`` by GPU-bound requests: each "token" is a chain of
bf16 matmuls enqueued without a host sync (types ``steps:matmuls_per_step``, default
``5:6,30:6,200:6``, about 50 ms, 300 ms and 2 s on an H100), marked with the same CUDA-event
timeline. Their duration does not depend on host scheduling, so the repetition ground truth is
stable; HF ``generate`` at batch 1 is host-launch-bound and identical requests vary by ±20 % in
time and energy on a busy VM, which bounds any per-request comparison with a per-type truth.

``--cpu-dry-run --model small`` exercises the script on CPU against the emulated GPU
(LLM_DVFS_NVML_LIBRARY, FAKE_NVML_STATE; LLM_DVFS_CUDA_LIBRARY = fake libcuda for event marks).

Prints the tables; with --out also writes summary.json, requests.csv and trace.parquet there.
Read-only on the GPU: no clock or power-limit change. Without a CUDA GPU it prints a skip line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np


def log(msg: str) -> None:
    print(msg, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(device)


def build_model(kind: str, device: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if kind == "1b":  # Llama-3.2-1B shape
        cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                          max_position_embeddings=4096, tie_word_embeddings=True,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0)
    else:
        cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4, vocab_size=32000,
                          max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # random weights: run every request to length
    model.generation_config.pad_token_id = 0
    return model


class Requests:
    def __init__(self, model, types: list[tuple[int, int]], device: str, seed: int = 0) -> None:
        import torch

        self.device = device
        self.model = model
        self.types = types
        g = torch.Generator().manual_seed(seed)
        vocab = model.config.vocab_size
        self.ids = [torch.randint(3, vocab, (1, p), generator=g).to(device) for p, _ in types]

    def kwargs(self, k: int) -> dict:
        import torch

        ids = self.ids[k]
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.types[k][1], do_sample=False)

    def make_timer(self, device: str, mode: str):
        from llm_dvfs.meter.timeline import TokenTimer

        return TokenTimer(device=device, mode=mode)

    def run(self, k: int, timer=None):
        import torch

        if timer is None:
            out = self.model.generate(**self.kwargs(k))
        else:
            out = timer.generate(self.model, **self.kwargs(k))
        sync(self.device)
        return out


class _StepTimer:
    """Marks for :class:`MatmulRequests`: one CUDA event per step on the current stream."""

    def __init__(self, device: str, mode: str) -> None:
        from llm_dvfs.meter.timeline import Timeline

        self.tl = Timeline(mode=mode, device=device)
        self.timing = None


class MatmulRequests:
    """GPU-bound requests: ``steps`` "tokens", each ``mm`` bf16 matmuls of n×n, all enqueued
    before a single synchronisation (no host round trip per step, unlike HF generate)."""

    def __init__(self, types: list[tuple[int, int]], device: str, n: int = 8192, seed: int = 0) -> None:
        import torch

        self.device, self.types, self.model = device, types, None
        g = torch.Generator(device=device).manual_seed(seed)
        self.a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
        self.b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
        self.c = torch.empty_like(self.a)

    def make_timer(self, device: str, mode: str) -> _StepTimer:
        return _StepTimer(device, mode)

    def _step(self, mm: int) -> None:
        import torch

        for _ in range(mm):
            torch.mm(self.a, self.b, out=self.c)

    def run(self, k: int, timer: Optional[_StepTimer] = None) -> None:
        steps, mm = self.types[k]
        if timer is None:
            for _ in range(steps):
                self._step(mm)
            sync(self.device)
            return
        from llm_dvfs.meter.timeline import TokenTiming

        tl = timer.tl
        tl.clear()
        tl.use_current_stream()
        tl.mark(0)
        for _ in range(steps):
            self._step(mm)
            tl.mark(1)
        tl.mark(2)
        sync(self.device)
        m = tl.resolve()
        t = np.asarray(m.t_s, dtype=np.float64)
        timer.timing = TokenTiming(t_start_s=float(t[0]), step_end_s=t[1:-1], t_end_s=float(t[-1]),
                                   steps=steps, tokens_per_sequence=np.array([steps]),
                                   uncertainty_s=float(m.max_uncertainty_s), mode=tl.mode)


def pct_err(x: Optional[float], truth: float) -> float:
    if x is None or not math.isfinite(x) or truth == 0:
        return float("nan")
    return 100.0 * abs(x - truth) / truth


def nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else float("nan")


def fmt(x: float, spec: str = ".1f") -> str:
    return "n/a" if x is None or not math.isfinite(x) else format(x, spec)


# ---------------------------------------------------------------------------------------------


def measure_truth(mon, reqs: Requests, k: int, reps: int, pad_s: float, idle_w: float) -> dict:
    sync(reqs.device)
    w = mon.begin_window(f"truth{k}")
    time.sleep(pad_s)
    from llm_dvfs.meter.timeline import host_monotonic_ns

    t_first = host_monotonic_ns() * 1e-9
    for _ in range(reps):
        reqs.run(k)
    t_last = host_monotonic_ns() * 1e-9
    time.sleep(pad_s)
    w.end()
    m = w.measurement()
    pad = (t_first - m.t_start_s) + (m.t_end_s - t_last)
    counter = m.energy_j_counter
    per_req_buf = (m.energy_j - idle_w * pad) / reps
    # Without an energy counter the buffer integral over the long window is the best reference.
    per_req = (counter - idle_w * pad) / reps if counter is not None else per_req_buf
    return {"energy_j": per_req, "energy_j_buffer": per_req_buf, "reps": reps,
            "source": "counter" if counter is not None else m.energy_method,
            "duration_s": (t_last - t_first) / reps, "pad_s": pad}


def phase_interleaved(mon, reqs: Requests, per_type: int, gap_ms: float, pad_s: float,
                      rng: random.Random, device: str, mode: str):
    timer = reqs.make_timer(device, mode)
    order = [k for k in range(len(reqs.types)) for _ in range(per_type)]
    rng.shuffle(order)
    recs = []
    w_all = mon.begin_window("interleaved")
    time.sleep(pad_s)
    for k in order:
        time.sleep(rng.uniform(0.0, gap_ms) / 1e3)
        wr = mon.begin_window("request")
        reqs.run(k, timer)
        wr.end()
        recs.append({"type": k, "timing": timer.timing, "window": wr})
    time.sleep(pad_s)
    w_all.end()
    return w_all.measurement(), recs


def evaluate(mon, m_all, recs, truths, lag_s: Optional[float]):
    from llm_dvfs.meter.attribution import PowerTrace, attribute

    trace = mon.trace(m_all.t_start_s - 1.0, m_all.t_end_s + 1.0)
    timings = [r["timing"] for r in recs]
    ids = [[str(i)] for i in range(len(recs))]
    t0 = time.perf_counter()
    att = attribute(trace, timings, request_ids=ids, window_s=(m_all.t_start_s, m_all.t_end_s),
                    counter_energy_j=m_all.energy_j_counter, default_lag_s=lag_s)
    att_cpu_s = time.perf_counter() - t0
    att0 = attribute(trace, timings, request_ids=ids, lag_s=0.0)
    avg = trace[trace["source"] == "average"]
    avg_tr = PowerTrace(avg["t_s"], avg["power_w"], source="average") if len(avg) else None
    rows = []
    for i, r in enumerate(recs):
        wm = r["window"].measurement()
        truth = truths[r["type"]]
        row = {
            "request": i, "type": r["type"], "truth_j": truth,
            "latency_s": r["timing"].latency_s, "ttft_s": r["timing"].ttft_s,
            "uncertainty_us": r["timing"].uncertainty_s * 1e6,
            "a_attribution_j": att.requests[i]["energy_j"],
            "a0_no_lag_j": att0.requests[i]["energy_j"],
            "b_counter_j": wm.energy_j_counter if wm.energy_j_counter is not None else float("nan"),
            "c_avg_power_j": avg_tr.energy_j(wm.t_start_s, wm.t_end_s) if avg_tr else float("nan"),
            "d_window_buffer_j": wm.energy_j,
        }
        rows.append(row)
    return att, rows, trace, att_cpu_s


def timeline_checks(reqs: Requests, device: str, n_marks: int = 1000) -> dict:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from llm_dvfs.meter.timeline import Timeline

    ev = Timeline("event", device=device)
    cb = Timeline("callback", device=device)

    class Dual(LogitsProcessor):
        def __call__(self, input_ids, scores):
            ev.mark(2)
            cb.mark(2)
            return scores

    k = len(reqs.types) - 1
    lateness, unc = [], []
    for _ in range(3):
        ev.clear()
        cb.clear()
        ev.use_current_stream()
        cb.use_current_stream()
        ev.mark(1)
        cb.mark(1)
        reqs.model.generate(**reqs.kwargs(k), logits_processor=LogitsProcessorList([Dual()]))
        ev.mark(3)
        cb.mark(3)
        sync(device)
        me, mc = ev.resolve(), cb.resolve()
        lateness.extend((mc.t_s - me.t_s) * 1e6)
        unc.extend(me.uncertainty_s * 1e6)
    cost = {}
    for name, tl in (("event", ev), ("callback", cb)):
        tl.clear()
        tl.use_current_stream()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n_marks):
            tl.mark(2)
        cost[name] = (time.perf_counter() - t0) / n_marks * 1e6
        tl.resolve()
        tl.clear()
    hist = [p["half_width_ns"] / 1e3 for p in ev._native.calibration_history()]
    late = np.array(lateness)
    return {
        "event_uncertainty_us_median": float(np.median(unc)),
        "event_uncertainty_us_max": float(np.max(unc)),
        "calibration_half_width_us_median": float(np.median(hist)) if hist else float("nan"),
        "callback_late_us_median": float(np.median(late)),
        "callback_late_us_p90": float(np.percentile(late, 90)),
        "callback_late_us_max": float(np.max(late)),
        "callback_early_marks": int((late < 0).sum()),
        "mark_cost_us_event": cost["event"],
        "mark_cost_us_callback": cost["callback"],
    }


def overhead(reqs: Requests, device: str, rounds: int, new_tokens: int, mode: str = "event") -> dict:
    from llm_dvfs.meter.timeline import TokenTimer

    variants = {
        "none": None,
        f"{mode}+logits_processor": TokenTimer(device=device, mode=mode, hook="logits_processor"),
        f"{mode}+stopping_criteria": TokenTimer(device=device, mode=mode, hook="stopping_criteria"),
    }
    if mode == "event":
        variants["callback+logits_processor"] = TokenTimer(device=device, mode="callback",
                                                           hook="logits_processor")
    saved = reqs.types[0]
    reqs.types[0] = (saved[0], new_tokens)
    times: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    try:
        for name in names:  # warm each path once
            reqs.run(0, variants[name])
        for r in range(rounds):
            random.Random(r).shuffle(names)
            for name in names:
                t0 = time.perf_counter()
                reqs.run(0, variants[name])
                times[name].append(time.perf_counter() - t0)
    finally:
        reqs.types[0] = saved
    base = statistics.median(times["none"])
    return {name: {"median_s": statistics.median(v), "ratio": statistics.median(v) / base}
            for name, v in times.items()}


# ---------------------------------------------------------------------------------------------


def print_tables(types, rows, truth1, truth2, truths, reps, att, att_cpu_s, tl, ov, device):
    """Print the accuracy, timeline and overhead tables; returns (per_type, lag, att_ratio)."""
    methods = [("a_attribution_j", "(a) llm_dvfs"), ("a0_no_lag_j", "(a0) no lag"),
               ("b_counter_j", "(b) counter"), ("c_avg_power_j", "(c) avg×dur"),
               ("d_window_buffer_j", "(d) window")]
    print()
    print("Per-request energy: mean absolute % error against the repetition ground truth")
    hdr = f"{'type':>10} {'n':>3} {'dur ms':>7} {'truth J':>9} {'truth Δ%':>8}"
    for _, name in methods:
        hdr += f" {name:>13}"
    print(hdr)
    per_type = []
    for k, (pl, nt) in enumerate(types):
        rs = [r for r in rows if r["type"] == k]
        dur = nanmean([r["latency_s"] for r in rs]) * 1e3
        d_truth = 100 * abs(truth1[k]["energy_j"] - truth2[k]["energy_j"]) / truths[k]
        line = f"{pl:>5}:{nt:<4} {len(rs):>3} {dur:>7.1f} {truths[k]:>9.2f} {d_truth:>8.2f}"
        errs = {}
        for key, _ in methods:
            errs[key] = nanmean([pct_err(r[key], r["truth_j"]) for r in rs])
            line += f" {fmt(errs[key], '.2f') + ' %':>13}"
        print(line)
        per_type.append({"type": f"{pl}:{nt}", "n": len(rs), "duration_ms": dur, "truth_j": truths[k],
                         "truth_pass1_j": truth1[k]["energy_j"], "truth_pass2_j": truth2[k]["energy_j"],
                         "truth_buffer_j": 0.5 * (truth1[k]["energy_j_buffer"] + truth2[k]["energy_j_buffer"]),
                         "reps": reps[k], "mape_pct": errs})
    lag = att.lags[device] if device in att.lags else next(iter(att.lags.values()))
    print(f"lag used: {lag.lag_s * 1e3:.1f} ms ({lag.method}, contrast {lag.contrast:.3f}); "
          f"window {att.window_energy_j:.1f} J vs counter "
          f"{fmt(att.counter_energy_j, '.1f')} J (residual {fmt(att.residual_pct, '+.2f')} %), "
          f"coverage {att.coverage:.3f}, attribution CPU {att_cpu_s * 1e3:.1f} ms for {len(rows)} requests")
    print()
    print("Timeline (µs)")
    for key, v in tl.items():
        print(f"  {key:<36} {v:>10.2f}" if isinstance(v, float) else f"  {key:<36} {v:>10}")
    print()
    print("Overhead on generate (median latency; ratio to no timer)" if ov else "Overhead: n/a for this workload")
    for name, v in ov.items():
        print(f"  {name:<28} {v['median_s'] * 1e3:>9.1f} ms  {v['ratio']:.4f}")
    mean_latency = nanmean([r["latency_s"] for r in rows])
    att_ratio = att_cpu_s / len(rows) / mean_latency if rows else float("nan")
    print(f"  attribution CPU per request / mean request latency: {att_ratio:.5f}")

    return per_type, lag, att_ratio


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="directory for summary.json, requests.csv, trace.parquet")
    p.add_argument("--device", type=int, default=0, help="CUDA ordinal")
    p.add_argument("--model", choices=("1b", "small"), default="1b")
    p.add_argument("--workload", choices=("generate", "matmul"), default="generate",
                   help="HF generate (default) or GPU-bound matmul steps (stable ground truth)")
    p.add_argument("--types", default=None,
                   help="generate: prompt:new_tokens,... (default 32:4,128:24,512:160); "
                        "matmul: steps:matmuls_per_step,... (default 5:6,30:6,200:6)")
    p.add_argument("--truth-s", type=float, default=6.0, help="seconds of repetitions per type and pass")
    p.add_argument("--per-type", type=int, default=15, help="interleaved requests per type")
    p.add_argument("--gap-ms", type=float, default=60.0, help="max random idle gap between requests")
    p.add_argument("--pad-s", type=float, default=0.6, help="idle padding around windows")
    p.add_argument("--lag-s", type=float, default=None, help="fallback lag (default: per-source default)")
    p.add_argument("--overhead-rounds", type=int, default=7)
    p.add_argument("--overhead-tokens", type=int, default=96)
    p.add_argument("--quick", action="store_true", help="small counts, for a smoke run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="exercise the script on CPU against the emulated GPU (LLM_DVFS_NVML_LIBRARY; "
                        "event/callback marks need LLM_DVFS_CUDA_LIBRARY=fake libcuda): numbers are meaningless")
    args = p.parse_args(argv)
    if args.quick:
        args.truth_s, args.per_type, args.overhead_rounds = 2.0, 4, 3

    try:
        import torch
    except ImportError:
        log("attribution_accuracy: torch is not installed: skipped")
        return 0
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        log("attribution_accuracy: no CUDA GPU: skipped")
        return 0
    import llm_dvfs as ld

    if not any(d.index == args.device for d in ld.devices()):
        log(f"attribution_accuracy: GPU {args.device} not visible to NVML: skipped")
        return 0
    if args.cpu_dry_run:
        device, gpu_name = "cpu", "CPU dry run (emulated GPU)"
        mode = "event" if os.environ.get("LLM_DVFS_CUDA_LIBRARY") else "host"
    else:
        device, mode = f"cuda:{args.device}", "event"
        torch.cuda.set_device(device)
        gpu_name = torch.cuda.get_device_name(device)
    if args.types is None:
        args.types = "5:6,30:6,200:6" if args.workload == "matmul" else "32:4,128:24,512:160"
    types = [tuple(int(x) for x in t.split(":")) for t in args.types.split(",")]
    rng = random.Random(args.seed)
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)

    log(f"== attribution_accuracy on {gpu_name} ({args.workload}, {args.model if args.workload == 'generate' else 'bf16 matmul'}, "
        f"types {types}, {mode} marks)")
    if args.workload == "matmul":
        reqs = MatmulRequests(types, device, n=512 if args.cpu_dry_run else 8192, seed=args.seed)
    else:
        reqs = Requests(build_model(args.model, device), types, device, seed=args.seed)
    summary: dict[str, Any] = {"gpu": gpu_name, "model": args.model, "workload": args.workload,
                               "mark_mode": mode,
                               "types": types, "args": vars(args)}

    with ld.PowerMonitor(devices=[args.device]) as mon:
        for k in range(len(types)):  # warm-up (kernels, allocator, clocks)
            for _ in range(2):
                reqs.run(k)
        idle_w = mon.measure_idle(2.0)
        log(f"idle power {idle_w:.1f} W")
        durations = []
        for k in range(len(types)):
            t0 = time.perf_counter()
            reqs.run(k)
            durations.append(time.perf_counter() - t0)
        reps = [max(3, round(args.truth_s / d)) for d in durations]

        log("-- ground truth, pass 1")
        truth1 = [measure_truth(mon, reqs, k, reps[k], args.pad_s, idle_w) for k in range(len(types))]
        log("-- interleaved requests")
        m_all, recs = phase_interleaved(mon, reqs, args.per_type, args.gap_ms, args.pad_s, rng, device,
                                         mode)
        log("-- ground truth, pass 2")
        truth2 = [measure_truth(mon, reqs, k, reps[k], args.pad_s, idle_w) for k in range(len(types))]
        truths = [0.5 * (a["energy_j"] + b["energy_j"]) for a, b in zip(truth1, truth2)]
        log(f"truth source: {sorted({t['source'] for t in truth1 + truth2})}")
        att, rows, trace, att_cpu_s = evaluate(mon, m_all, recs, truths, args.lag_s)

        hf = args.workload == "generate"  # the timeline/overhead checks drive HF generate
        log("-- timeline")
        tl = timeline_checks(reqs, device) if mode == "event" and hf else {}
        log("-- overhead")
        ov = overhead(reqs, device, args.overhead_rounds, args.overhead_tokens, mode) if hf else {}

    per_type, lag, att_ratio = print_tables(types, rows, truth1, truth2, truths, reps, att,
                                            att_cpu_s, tl, ov, args.device)

    summary.update({
        "idle_power_w": idle_w, "per_type": per_type, "lag_s": lag.lag_s, "lag_method": lag.method,
        "lag_contrast": lag.contrast, "attribution_summary": att.summary(), "attribution_cpu_s": att_cpu_s,
        "attribution_cpu_ratio": att_ratio, "timeline": tl, "overhead": ov,
        "truth_pass1": truth1, "truth_pass2": truth2,
    })
    if out_dir:
        import pandas as pd

        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        pd.DataFrame(rows).to_csv(out_dir / "requests.csv", index=False)
        from llm_dvfs.schema import write_parquet

        # the run directory's schema (llm_dvfs.schema): nulls, units as field metadata
        write_parquet("power", trace.assign(cell_id="attribution_accuracy"), out_dir / "trace.parquet")
        write_parquet("tokens", att.tokens, out_dir / "tokens.parquet")
        print(f"\nwrote {out_dir}/summary.json, requests.csv, trace.parquet, tokens.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
