"""Prefill vs decode weighting of a step's energy, measured on the GPU (for PhaseWeights).

Attribution under concurrency (llm_dvfs.meter.concurrency) splits one engine step's energy over
its requests in proportion to ``w_p · prefill tokens + w_d · decode tokens``. This script
measures the ratio: it runs an HF model's forward pass in

* prefill-only steps: ``k`` prompt tokens, batch 1, no KV cache (``--prefill`` sizes);
* decode-only steps: batch ``b``, one new token per sequence on a KV cache of ``--context``
  tokens, cropped back after every step so the context stays fixed (``--decode`` sizes);

each as a block of identical steps back to back inside one ``PowerMonitor`` window (lag-
compensated, counter-anchored; idle gaps between blocks), energy per step = window energy /
steps. Blocks of all sizes run in random order, ``--rounds`` times. It fits

    E_step = c0 + c_p · prefill_tokens + c_d · decode_tokens

by least squares (c0: the per-step constant, chiefly the weights' read and launches, shared by
both kinds of step) and prints ``c_p / c_d`` with a 95 % bootstrap CI over blocks (resampled
within each kind), a separate-intercept fit as a check, and the line to pass:
``PhaseWeights(prefill_per_token=<ratio>, decode_per_token=1.0, source=...)``. Energies are total
(idle power included), as attribution splits total energy; the active-energy ratio (idle power ×
step time removed) is printed too.

What it does not capture: attention cost growing with the context (measure at the context
your workload has, ``--context``), mixed steps (prefill chunk + decodes in one step; the fit
assumes their costs add), and the host overhead of a real engine's scheduler. HF eager decode at
small batch is host-launch-bound, so its per-step time, and energy, have a large constant.

    python bench/phase_weights.py [--model arch:llama-3.2-1b] [--dtype bfloat16] [--device 0]
        [--prefill 32,64,128,256,512,1024] [--decode 1,2,4,8,16,32,64] [--context 256]
        [--rounds 3] [--block-s 0.6] [--gap-s 0.3] [--boot 2000] [--out DIR]

Read-only on the GPU. Without torch or a CUDA GPU it prints a skip line and exits 0;
``--cpu-dry-run`` runs the whole script on CPU with ``arch:tiny`` to check it (energy from the
emulated GPU when LLM_DVFS_NVML_LIBRARY points at it, else time x 100 W: numbers meaningless).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np


def log(msg: str) -> None:
    print(msg, flush=True)


def fit(rows: list[dict], key: str = "energy_j") -> dict:
    """Least squares E = c0 + c_p·P + c_d·D over blocks; also separate intercepts per kind."""
    P = np.array([r["prefill_tokens"] for r in rows], dtype=float)
    D = np.array([r["decode_tokens"] for r in rows], dtype=float)
    E = np.array([r[key] for r in rows], dtype=float)
    X = np.column_stack([np.ones_like(P), P, D])
    c, *_ = np.linalg.lstsq(X, E, rcond=None)
    resid = E - X @ c
    r2 = 1.0 - float(resid @ resid) / float(((E - E.mean()) ** 2).sum()) if E.size > 1 else math.nan
    is_p = (P > 0).astype(float)
    X2 = np.column_stack([is_p, 1.0 - is_p, P, D])
    c2, *_ = np.linalg.lstsq(X2, E, rcond=None)
    return {"c0": float(c[0]), "c_p": float(c[1]), "c_d": float(c[2]),
            "ratio": float(c[1] / c[2]) if c[2] != 0 else math.nan, "r2": r2,
            "c0_prefill": float(c2[0]), "c0_decode": float(c2[1]), "c_p_sep": float(c2[2]), "c_d_sep": float(c2[3]),
            "ratio_sep": float(c2[2] / c2[3]) if c2[3] != 0 else math.nan}


def bootstrap_ratio(rows: list[dict], key: str, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile CI of c_p/c_d, resampling blocks with replacement within each kind."""
    rng = np.random.default_rng(seed)
    kinds = [[r for r in rows if r["kind"] == k] for k in ("prefill", "decode")]
    out = []
    for _ in range(n_boot):
        sample = [g[i] for g in kinds for i in rng.integers(0, len(g), len(g))]
        if len({r["prefill_tokens"] for r in sample}) < 2 or len({r["decode_tokens"] for r in sample}) < 2:
            continue  # a resample without two sizes of each kind cannot fit a slope
        out.append(fit(sample, key)["ratio"])
    out = np.array([x for x in out if math.isfinite(x)])
    if out.size < 10:
        return math.nan, math.nan
    return float(np.quantile(out, 0.025)), float(np.quantile(out, 0.975))


class Steps:
    """Prefill-only and decode-only forward steps of one model, inputs prepared outside windows."""

    def __init__(self, model, device: str, context: int, seed: int) -> None:
        import torch

        self.torch, self.model, self.device, self.context = torch, model, device, context
        self.vocab = int(model.config.vocab_size)
        self.g = torch.Generator().manual_seed(seed)
        # transformers renamed ``past_key_values`` to ``cache`` (5.x); use what forward takes
        import inspect

        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"

    def _ids(self, b: int, n: int):
        return self.torch.randint(3, self.vocab, (b, n), generator=self.g).to(self.device)

    def prepare(self, kind: str, size: int) -> Any:
        torch = self.torch
        with torch.inference_mode():
            if kind == "prefill":
                return self._ids(1, size)
            ids = self._ids(size, self.context)
            out = self.model(input_ids=ids, use_cache=True)
            cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            return cache, self._ids(size, 1)

    def run(self, kind: str, prepared: Any, reps: int) -> None:
        torch = self.torch
        with torch.inference_mode():
            if kind == "prefill":
                for _ in range(reps):
                    self.model(input_ids=prepared, use_cache=False)
                return
            cache, tok = prepared
            for _ in range(reps):
                self.model(input_ids=tok, use_cache=True, **{self.cache_kw: cache})
                extra = cache.get_seq_length() - self.context
                if extra > 0:
                    cache.crop(-extra)  # negative: remove from the end (old and new transformers)

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            self.torch.cuda.synchronize(self.device)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model spec (default arch:llama-3.2-1b; arch:tiny in a dry run)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", type=int, default=0, help="CUDA ordinal")
    p.add_argument("--prefill", default=None, help="prompt sizes of the prefill-only steps")
    p.add_argument("--decode", default=None, help="batch sizes of the decode-only steps")
    p.add_argument("--context", type=int, default=None, help="KV-cache length of the decode steps (256)")
    p.add_argument("--rounds", type=int, default=3, help="blocks per size")
    p.add_argument("--block-s", type=float, default=0.6, help="target duration of one block of steps, s")
    p.add_argument("--gap-s", type=float, default=0.3, help="idle gap between blocks, s")
    p.add_argument("--boot", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for summary.json and blocks.csv")
    p.add_argument("--cpu-dry-run", action="store_true", help="check the script on CPU (numbers meaningless)")
    args = p.parse_args(argv)
    dry = args.cpu_dry_run
    try:
        import torch
    except ImportError:
        log("phase_weights: torch is not installed: skipped")
        return 0
    if not dry and not torch.cuda.is_available():
        log("phase_weights: no CUDA GPU: skipped (measure on a GPU; --cpu-dry-run checks the script)")
        return 0
    import llm_dvfs as ld
    from llm_dvfs.workload.models import load_model

    model_spec = args.model or ("arch:tiny" if dry else "arch:llama-3.2-1b")
    prefill = [int(x) for x in (args.prefill or ("8,16,32" if dry else "32,64,128,256,512,1024")).split(",")]
    decode = [int(x) for x in (args.decode or ("1,2,4" if dry else "1,2,4,8,16,32,64")).split(",")]
    context = args.context or (16 if dry else 256)
    if len(prefill) < 2 or len(decode) < 2:
        log("phase_weights: need at least two prefill sizes and two decode sizes to fit slopes")
        return 2
    device = "cpu" if dry else f"cuda:{args.device}"
    if not dry:
        torch.cuda.set_device(device)
    gpu = "CPU dry run" if dry else torch.cuda.get_device_name(device)
    lm = load_model(model_spec, dtype="float32" if dry else args.dtype, device=device, seed=args.seed)
    model = lm.model
    model.eval()
    steps = Steps(model, device, context, args.seed)
    log(f"== phase_weights on {gpu}: {model_spec} ({lm.dtype}), prefill {prefill}, decode batch {decode} "
        f"at context {context}")

    have_gpu = any(d.index == args.device for d in ld.devices())
    mon = ld.PowerMonitor(devices=[args.device]) if have_gpu else None
    if mon is None and not dry:
        log(f"phase_weights: GPU {args.device} not visible to NVML: skipped")
        return 0
    configs = [("prefill", k) for k in prefill] + [("decode", b) for b in decode]
    rng = random.Random(args.seed)
    rows: list[dict] = []
    if mon is not None:
        mon.start()
    try:
        # warm-up and step time per size (kernels, allocator, clocks), then reps per block
        reps = {}
        for kind, size in configs:
            prep = steps.prepare(kind, size)
            steps.run(kind, prep, 2)
            steps.sync()
            t0 = time.perf_counter()
            steps.run(kind, prep, 3)
            steps.sync()
            reps[(kind, size)] = max(3, math.ceil(args.block_s / ((time.perf_counter() - t0) / 3)))
        idle_w = mon.measure_idle(2.0) if mon is not None else 0.0
        log(f"idle power {idle_w:.1f} W" if mon is not None else "no power meter: energy = time x 100 W")
        for rnd in range(args.rounds):
            order = configs[:]
            rng.shuffle(order)
            for kind, size in order:
                prep = steps.prepare(kind, size)
                steps.sync()
                time.sleep(args.gap_s)
                n = reps[(kind, size)]
                if mon is not None:
                    with mon.window(f"{kind}:{size}") as w:  # syncs the device at both edges
                        steps.run(kind, prep, n)
                    e, dur, method = w.energy_j, w.duration_s, w.energy_method
                else:
                    t0 = time.perf_counter()
                    steps.run(kind, prep, n)
                    dur = time.perf_counter() - t0
                    e, method = 100.0 * dur, "time_x_100W"
                del prep
                rows.append({"round": rnd, "kind": kind, "size": size, "steps": n,
                             "prefill_tokens": size if kind == "prefill" else 0,
                             "decode_tokens": size if kind == "decode" else 0,
                             "energy_j": e / n, "active_energy_j": (e - idle_w * dur) / n,
                             "step_s": dur / n, "energy_method": method})
    finally:
        if mon is not None:
            mon.stop()

    bad = [r for r in rows if not math.isfinite(r["energy_j"])]
    if bad:
        log(f"phase_weights: {len(bad)} blocks without energy (energy_method {bad[0]['energy_method']}): no fit")
        return 1
    log("")
    log(f"{'kind':<8} {'tokens':>6} {'steps':>6} {'ms/step':>8} {'J/step':>9} {'J/token':>9}")
    for kind, size in configs:
        rs = [r for r in rows if r["kind"] == kind and r["size"] == size]
        e = float(np.median([r["energy_j"] for r in rs]))
        log(f"{kind:<8} {size:>6} {rs[0]['steps']:>6} {1e3 * float(np.median([r['step_s'] for r in rs])):>8.2f} "
            f"{e:>9.4f} {e / size:>9.5f}")
    summary: dict[str, Any] = {"gpu": gpu, "model": model_spec, "dtype": lm.dtype, "context": context,
                               "prefill": prefill, "decode": decode, "idle_power_w": idle_w, "args": vars(args)}
    log("")
    for key in ("energy_j", "active_energy_j"):
        f = fit(rows, key)
        lo, hi = bootstrap_ratio(rows, key, args.boot, args.seed)
        f.update({"ratio_ci95": [lo, hi]})
        summary[key] = f
        log(f"{key}: c0 {f['c0']:.4f} J/step, c_p {f['c_p'] * 1e3:.4f} mJ/prefill token, "
            f"c_d {f['c_d'] * 1e3:.4f} mJ/decode token, R^2 {f['r2']:.4f}")
        log(f"  c_p / c_d = {f['ratio']:.3f}  [95 % CI {lo:.3f}, {hi:.3f}]   "
            f"(separate intercepts: {f['ratio_sep']:.3f}; c0 prefill {f['c0_prefill']:.4f}, decode {f['c0_decode']:.4f} J)")
    r = summary["energy_j"]
    src = (f"bench/phase_weights.py: {gpu}, {model_spec} {lm.dtype}, context {context}, "
           f"c_p/c_d {r['ratio']:.3f} [{r['ratio_ci95'][0]:.3f}, {r['ratio_ci95'][1]:.3f}]")
    summary["phase_weights"] = {"prefill_per_token": r["ratio"], "decode_per_token": 1.0, "source": src}
    log("")
    log(f"PhaseWeights(prefill_per_token={r['ratio']:.3f}, decode_per_token=1.0, source={src!r})")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        import pandas as pd

        pd.DataFrame(rows).to_csv(out / "blocks.csv", index=False)
        log(f"wrote {out}/summary.json, blocks.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
