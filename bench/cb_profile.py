"""Profile transformers' continuous-batching generation thread (cProfile inside that thread) while
closed-loop users are served: where does the host time of an engine step go?

Usage: python bench/cb_profile.py [--model arch:llama-3.2-1b] [--concurrency 4] [--requests 8]
Prints the top functions by own time and by cumulative time (also written to --out).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="arch:llama-3.2-1b")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    from llm_dvfs.workload.continuous import ContinuousEngine
    from llm_dvfs.workload.models import load_model
    from llm_dvfs.workload.runner import GenerationSettings
    from llm_dvfs.workload.serving import ServeRequest, run_closed_loop
    from llm_dvfs.workload.tasks import get_task

    lm = load_model(a.model, dtype=a.dtype)
    prompts = [s.prompt for s in get_task("synthetic").samples(a.requests, 0)]
    prof = cProfile.Profile()
    eng = ContinuousEngine(lm, GenerationSettings(max_new_tokens=a.new_tokens, fixed_output_length=True))
    orig_init = lm.model.init_continuous_batching

    def init_profiled(*args, **kw):  # the generation thread's target is bound in mgr.start()
        mgr = orig_init(*args, **kw)
        loop = mgr._run_generation_loop

        def profiled(*la, **lk):
            prof.enable()
            try:
                return loop(*la, **lk)
            finally:
                prof.disable()
        mgr._run_generation_loop = profiled
        return mgr

    lm.model.init_continuous_batching = init_profiled
    with eng:
        reqs = [ServeRequest(prompt=q, request_id=f"r{i}") for i, q in enumerate(prompts)]
        run_closed_loop(eng.submit, reqs, a.concurrency, timeout_s=300)
        n_steps = len(eng.steps())
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    print(f"{n_steps} steps", file=s)
    st.sort_stats("tottime").print_stats(30)
    st.sort_stats("cumulative").print_stats(40)
    print(s.getvalue())
    if a.out:
        open(a.out, "w").write(s.getvalue())


if __name__ == "__main__":
    main()
