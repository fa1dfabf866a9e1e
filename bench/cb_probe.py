"""Why is a continuous-batching step slow? Time transformers' continuous batching engine steps on
one GPU under a few ContinuousBatchingConfig variants (default; CUDA graphs off; no warm-up) at
several concurrencies, with closed-loop users and fixed-length outputs.

Per variant × concurrency prints: wall time, steps, median step duration (host interval of a
forward pass + update), median and max gap between consecutive steps (time the generation
thread spent waiting, e.g. transformers' 100 ms wait for new requests), TPOT p50, and the share
of wall time inside steps. No power measurement and nothing changed on the GPU.

Usage: python bench/cb_probe.py [--model arch:llama-3.2-1b] [--requests 16] [--new-tokens 64]
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

VARIANTS = {"default": {}, "no_cuda_graph": {"use_cuda_graph": False}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="arch:llama-3.2-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from llm_dvfs.workload.continuous import ContinuousEngine
    from llm_dvfs.workload.models import load_model
    from llm_dvfs.workload.runner import GenerationSettings
    from llm_dvfs.workload.serving import ServeRequest, run_closed_loop
    from llm_dvfs.workload.tasks import get_task

    lm = load_model(a.model, dtype=a.dtype)
    prompts = [s.prompt for s in get_task("synthetic").samples(a.requests, 0)]
    st = GenerationSettings(max_new_tokens=a.new_tokens, fixed_output_length=True)
    out = []
    for name in a.variants.split(","):
        for c in (int(x) for x in a.concurrency.split(",")):
            with ContinuousEngine(lm, st, cb_options=VARIANTS[name], warmup=name != "no_warmup") as eng:
                eng.clear_records()
                reqs = [ServeRequest(prompt=q, request_id=f"{name}{c}-{i}") for i, q in enumerate(prompts)]
                t0 = time.perf_counter()
                res = run_closed_loop(eng.submit, reqs, c, timeout_s=300)
                wall = time.perf_counter() - t0
                steps = eng.steps()
            dur = np.array([s.t_end_s - s.t_start_s for s in steps])
            gaps = np.array([b.t_start_s - a_.t_end_s for a_, b in zip(steps, steps[1:])])
            tpot = [r.tpot_s for r in res if r.tpot_s == r.tpot_s]
            row = {"variant": name, "concurrency": c, "wall_s": wall, "steps": len(steps),
                   "step_ms_p50": 1e3 * float(np.median(dur)), "step_ms_p90": 1e3 * float(np.quantile(dur, .9)),
                   "gap_ms_p50": 1e3 * float(np.median(gaps)) if len(gaps) else None,
                   "gap_ms_max": 1e3 * float(gaps.max()) if len(gaps) else None,
                   "tpot_ms_p50": 1e3 * float(np.median(tpot)), "in_steps": float(dur.sum() / wall),
                   "failed": sum(1 for r in res if r.failed)}
            out.append(row)
            print(json.dumps(row), flush=True)
    if a.json:
        open(a.json, "w").write(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
