"""What a window-edge bracket costs, with and without grid prediction (counter_grid_s), on one
long-lived PowerMonitor with brackets on every edge (bracket_min_interval_s=0).

Per variant (interleaved blocks): windows of --window-s around a GPU load (bf16 matmuls; on the
CPU the emulator, if loaded, or nothing), then the sampler's stats: brackets, reads per bracket,
brackets predicted, misses, unresolved, and sampler CPU per wall second; plus each window's
stitching rule (counter_edges share). Read-only on the GPU.

Usage: python bench/bracket_cost.py [--windows 30] [--window-s 1.2] [--blocks 2]
"""
from __future__ import annotations

import argparse
import json
import time


def _load(seconds: float) -> None:
    try:
        import torch
    except ImportError:
        time.sleep(seconds)
        return
    if not torch.cuda.is_available():
        time.sleep(seconds)
        return
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        for _ in range(8):
            a = (a @ a).clamp_(-1, 1)
        torch.cuda.synchronize()


def run(grid_s: float, n: int, window_s: float) -> dict:
    import llm_dvfs as ld

    mon = ld.PowerMonitor(bracket_min_interval_s=0.0, counter_grid_s=grid_s).start()
    try:
        time.sleep(0.5)
        a, t0 = mon.stats(), time.monotonic()
        rules = []
        for _ in range(n):
            with mon.window("w") as w:
                _load(window_s)
            time.sleep(0.05)
            rules.append(w.devices[0].calibration if w.devices else None)
        time.sleep(0.3)
        b, wall = mon.stats(), time.monotonic() - t0
    finally:
        mon.stop()
    d = {k: b[k] - a[k] for k in b if isinstance(b[k], (int, float))}
    return {"counter_grid_s": grid_s, "windows": n, "wall_s": wall, "brackets": d["brackets"],
            "reads_per_bracket": d["bracket_reads"] / max(1, d["brackets"]),
            "predicted": d.get("brackets_predicted"), "misses": d.get("bracket_misses"),
            "unresolved": d["brackets_unresolved"], "cpu_core_pct": 100 * d["thread_cpu_s"] / wall,
            "counter_edges_share": sum(r == "counter_edges" for r in rules) / max(1, len(rules))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=30)
    p.add_argument("--window-s", type=float, default=1.2)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    out = []
    for blk in range(a.blocks):
        for grid in ((0.1, 0.0) if blk % 2 == 0 else (0.0, 0.1)):
            r = run(grid, a.windows, a.window_s)
            r["block"] = blk
            out.append(r)
            print(json.dumps(r), flush=True)
    for grid in (0.1, 0.0):
        rs = [r for r in out if r["counter_grid_s"] == grid]
        print(f"counter_grid_s={grid}: reads/bracket {[round(r['reads_per_bracket'], 1) for r in rs]}, "
              f"sampler CPU % core {[round(r['cpu_core_pct'], 2) for r in rs]}, "
              f"counter_edges {[r['counter_edges_share'] for r in rs]}")
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
