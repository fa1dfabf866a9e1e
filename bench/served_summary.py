"""Summarise a served-traffic run against a lock-step run of the same workload (issue 15).

Prints, per load level: requests, J/request and J/token (median, with the 95 % bootstrap CI of the
median), TTFT and TPOT p50/p90/p99, queueing delay p50, and the accounting check of each cell
(Σ request energies vs the monitor's window energy minus idle and unattributed energy); then J/token
of lock-step generate per batch size and the ratio continuous/lock-step.

Usage: python bench/served_summary.py SERVED_RUN LOCKSTEP_RUN [--json OUT.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd


def _ci_median(x: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return (float("nan"),) * 3
    rng = np.random.default_rng(seed)
    meds = np.median(rng.choice(x, size=(n, len(x)), replace=True), axis=1)
    return float(np.median(x)), float(np.quantile(meds, 0.025)), float(np.quantile(meds, 0.975))


def _pcts(x: pd.Series) -> dict[str, float]:
    v = pd.to_numeric(x, errors="coerce").to_numpy(dtype=float)
    v = v[np.isfinite(v)]
    return {f"p{q}": float(np.quantile(v, q / 100)) if len(v) else float("nan") for q in (50, 90, 99)}


def served(run: Path) -> tuple[list[dict], list[dict]]:
    every = pd.read_parquet(run / "requests.parquet")  # the sum check is over every row of a cell
    req = every[every["load_phase"].fillna("measured").eq("measured") & every["error"].isna()]
    man = json.loads((run / "manifest.json").read_text())
    rows, checks = [], []
    for conc, g in req.groupby("concurrency"):
        e = g["energy_j"].to_numpy(float)
        jt = (g["energy_j"] / g["tokens_out"]).to_numpy(float)
        rows.append({"concurrency": int(conc), "n": len(g), "j_per_request": _ci_median(e),
                     "j_per_token": _ci_median(jt), "ttft_s": _pcts(g["ttft_s"]), "tpot_s": _pcts(g["tpot_s"]),
                     "queue_s_p50": float(pd.to_numeric(g["queue_s"]).median()),
                     "energy_method": sorted(g["energy_method"].dropna().unique().tolist())})
    for cell_id, s in (man.get("served") or {}).items():
        e = s.get("energy") or {}
        tot = float(every.loc[every["cell_id"] == cell_id, "energy_j"].sum())
        expect = e.get("monitor_energy_j", float("nan")) - e.get("idle_energy_j", 0.0) - e.get("unattributed_energy_j", 0.0)
        checks.append({"cell": cell_id, "requests_sum_j": tot, "window_minus_idle_unattr_j": expect,
                       "rel_diff": abs(tot - expect) / abs(expect) if expect else float("nan"),
                       "idle_j": e.get("idle_energy_j"), "unattributed_j": e.get("unattributed_energy_j"),
                       "monitor_rel_diff": e.get("monitor_rel_diff"), "achieved": s.get("achieved")})
    return rows, checks


def lockstep(run: Path) -> list[dict]:
    req = pd.read_parquet(run / "requests.parquet")
    out = []
    for b, g in req.groupby("batch_size"):
        out.append({"batch_size": int(b), "n": len(g), "j_per_request": _ci_median(g["energy_j"].to_numpy(float)),
                    "j_per_token": _ci_median((g["energy_j"] / g["tokens_out"]).to_numpy(float)),
                    "latency_s_p50": float(g["latency_s"].median())})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("served_run", type=Path)
    p.add_argument("lockstep_run", type=Path)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    rows, checks = served(a.served_run)
    ls = lockstep(a.lockstep_run) if (a.lockstep_run / "requests.parquet").exists() else []
    f = lambda t: f"{t[0]:.4g} [{t[1]:.4g}, {t[2]:.4g}]"  # noqa: E731
    print("continuous batching (measured phase, successful requests):")
    for r in rows:
        print(f"  c={r['concurrency']:>3} n={r['n']:>3}  J/request {f(r['j_per_request'])}  J/token {f(r['j_per_token'])}"
              f"  TTFT p50/p90/p99 {r['ttft_s']['p50']*1e3:.1f}/{r['ttft_s']['p90']*1e3:.1f}/{r['ttft_s']['p99']*1e3:.1f} ms"
              f"  TPOT {r['tpot_s']['p50']*1e3:.2f}/{r['tpot_s']['p90']*1e3:.2f}/{r['tpot_s']['p99']*1e3:.2f} ms"
              f"  queue p50 {r['queue_s_p50']*1e3:.1f} ms  {r['energy_method']}")
    print("accounting (Σ requests vs window - idle - unattributed):")
    for c in checks:
        print(f"  {c['cell']}: Σ {c['requests_sum_j']:.2f} J vs {c['window_minus_idle_unattr_j']:.2f} J "
              f"(rel {c['rel_diff']:.2e}); idle {c['idle_j']} J, unattributed {c['unattributed_j']} J, "
              f"steps-vs-monitor rel {c['monitor_rel_diff']}")
    print("lock-step generate:")
    for r in ls:
        print(f"  batch {r['batch_size']:>2} n={r['n']:>3}  J/request {f(r['j_per_request'])}  J/token {f(r['j_per_token'])}"
              f"  latency p50 {r['latency_s_p50']:.3f} s")
    for r in rows:
        for b in ls:
            print(f"  J/token continuous c={r['concurrency']} / generate batch {b['batch_size']}: "
                  f"{r['j_per_token'][0] / b['j_per_token'][0]:.3f}")
    if a.json:
        a.json.write_text(json.dumps({"served": rows, "checks": checks, "lockstep": ls}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
