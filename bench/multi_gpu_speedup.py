"""Speed-up of a parallel sweep: the same run on 4 emulated GPUs (``--gpus all``, and ``--ray
local`` with ``--ray``) against 1 GPU (``--gpus 0``), wall time of the whole command.

The GPUs are the NVML emulator's (tests/fakes: 4 H100s, set up here in a temporary state file;
no real GPU is touched, and the clock points are set on the emulated ones only); the model,
arch:tiny, runs on the CPU. Runs are interleaved (1 GPU, 4 GPUs, Ray, then the next repeat in
another order) and the script prints every run, the medians, and the ratio median(1 GPU) /
median(4 GPUs) with a bootstrap 95 % interval (resampling the runs of each kind).

What bounds it on the emulator: every worker is a process that imports torch and transformers
and builds its model (CPU work, seconds each), and a cell's generate calls are CPU work too, so
on a machine of C cores the speed-up of the compute part is at most about C; the idle-power
baselines and settle checks (waiting on the emulated GPU) parallelise fully.

    python bench/multi_gpu_speedup.py                     # 3 repeats, local backend
    python bench/multi_gpu_speedup.py --repeats 5 --ray --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ["--models", "arch:tiny", "--tasks", "synthetic:max_words=48", "--samples", "4", "--max-new-tokens", "16",
        "--ner", "heuristic", "--warmup", "1", "-q"]


def _setup(tmp: Path) -> dict[str, str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from fakes import build
    from fakes.fake_gpu import FakeGpu

    FakeGpu.setup(tmp / "fake_nvml.state", devices=4)
    os.environ["LLM_DVFS_CUDA_LIBRARY"] = str(build.build_fake_cuda("full"))
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    return dict(os.environ)


def _run(kind: str, extra: list[str], tmp: Path, env: dict[str, str]) -> float:
    out = tmp / f"run-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "llm_dvfs.run", *GRID, *extra, "--out", str(out)], env=env,
                       capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{kind}: exit {r.returncode}\n{r.stderr[-2000:]}")
    return dt


def _ratio_ci(a: list[float], b: list[float], n: int = 5000, seed: int = 0) -> tuple[float, float]:
    rng = random.Random(seed)
    rs = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                for _ in range(n))
    return rs[int(0.025 * n)], rs[int(0.975 * n) - 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind, interleaved (default 3)")
    p.add_argument("--clocks", default="1980,1680,1380,1080", help="SM clock points (emulated GPUs)")
    p.add_argument("--batch-sizes", default="1,2")
    p.add_argument("--idle-s", default="1.0", help="idle baseline per clock point and worker (s)")
    p.add_argument("--ray", action="store_true", help="also the Ray backend (--ray local)")
    p.add_argument("--json", metavar="OUT")
    a = p.parse_args(argv)
    grid = ["--clocks", a.clocks, "--allow-clock-changes", "--batch-sizes", a.batch_sizes, "--idle-s", a.idle_s]
    kinds = {"1 GPU": ["--gpus", "0"], "4 GPUs (local)": ["--gpus", "all"]}
    if a.ray:
        kinds["4 GPUs (Ray)"] = ["--ray", "local"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    print(f"cpu cores: {os.cpu_count()}; grid: {' '.join(GRID + grid)}")
    with tempfile.TemporaryDirectory(prefix="llm_dvfs-speedup-") as td:
        tmp = Path(td)
        env = _setup(tmp)
        order = list(kinds)
        for r in range(a.repeats):
            for k in (order if r % 2 == 0 else order[::-1]):
                t = _run(k.split()[0] + k.split()[-1].strip("()"), grid + kinds[k], tmp, env)
                times[k].append(t)
                print(f"repeat {r}: {k:>15}: {t:6.1f} s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    res: dict[str, object] = {"times_s": times, "median_s": med, "cpu_cores": os.cpu_count()}
    for k in list(kinds)[1:]:
        lo, hi = _ratio_ci(times["1 GPU"], times[k])
        ratio = med["1 GPU"] / med[k]
        res[f"speedup {k}"] = {"ratio": ratio, "ci95": [lo, hi]}
        print(f"speed-up {k} vs 1 GPU: {ratio:.2f}x [95% CI {lo:.2f}, {hi:.2f}] "
              f"(medians {med['1 GPU']:.1f} s vs {med[k]:.1f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
