"""What the sweep's measurement costs: tokens/s of the runner with full measurement against bare
``model.generate`` on the same model, prompts and settings.

"Full measurement" is what ``python -m llm_dvfs.run`` does per cell: the PowerMonitor's native
sampler running, a monitor window per batch, ``torch.cuda.synchronize`` at each window edge,
TokenTimer marks at every generation step, decoding and scoring outside the windows, and the
per-token energy attribution at the end of the cell. "Bare" is ``model.generate`` in the same
batches with the same tokenization (``llm_dvfs.runner.bare_generate``) and no monitor.

Both generate exactly ``--max-new-tokens`` tokens per request (fixed output length), so tokens/s
compares the same work. Runs are interleaved (bare/measured, then measured/bare, ...); the
script prints every run, the medians and their ratio, for the whole runner call (``end-to-end``,
including the attribution after the cell) and for the generate calls alone (``in-window``, the
sum of the batch windows). Target on an H100 with arch:llama-3.2-1b in bf16: ratio >= 0.98.

    python bench/harness_overhead.py                       # GPU; skips cleanly without one
    python bench/harness_overhead.py --cpu --model arch:tiny --max-new-tokens 16
    python bench/harness_overhead.py --batch-size 8 --runs 8 --json out.json

Read-only on the GPU (never changes clocks).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time


def _skip(msg: str) -> int:
    print(f"harness_overhead: skipped: {msg}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model spec (default arch:llama-3.2-1b on a GPU, "
                                                 "arch:tiny with --cpu)")
    p.add_argument("--dtype", default=None, help="default bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--task", default="synthetic:min_words=64,max_words=256",
                   help="task spec giving the prompts (default: synthetic, 64-256 words)")
    p.add_argument("--samples", type=int, default=16, help="requests per run (default 16)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=6, help="runs of each kind, interleaved (default 6)")
    p.add_argument("--device", default="cuda:0", help="torch device on the GPU path (default cuda:0)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (no GPU needed; energy is "
                   "measured only if an NVML, e.g. the emulator, is configured)")
    p.add_argument("--json", metavar="OUT", help="also write the numbers as JSON")
    a = p.parse_args(argv)

    import torch

    from llm_dvfs.devices import devices, last_error

    if a.cpu:
        device = "cpu"
    else:
        if not torch.cuda.is_available():
            return _skip("no CUDA device visible to torch (use --cpu to run on the CPU)")
        device = a.device
    gpus = devices()
    gpu = None
    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        gpu = next((g for g in gpus if g.index == idx), None)
        if gpu is None:
            return _skip(f"NVML does not see GPU {idx} ({last_error() or 'no driver'})")
    elif gpus:
        gpu = gpus[0]

    from llm_dvfs.workload.models import load_model
    from llm_dvfs.meter.monitor import PowerMonitor
    from llm_dvfs.workload.runner import GenerationSettings, Runner, bare_generate
    from llm_dvfs.workload.tasks import get_task

    model = a.model or ("arch:tiny" if device == "cpu" else "arch:llama-3.2-1b")
    dtype = a.dtype or ("float32" if device == "cpu" else "bfloat16")
    lm = load_model(model, dtype=dtype, device=device, seed=0)
    task = get_task(a.task)
    samples = task.samples(a.samples, 0)
    prompts = [s.prompt for s in samples]
    st = GenerationSettings(max_new_tokens=a.max_new_tokens, fixed_output_length=True)
    n_tokens = len(samples) * a.max_new_tokens
    print(f"harness_overhead: {model} ({dtype}) on {device}"
          + (f", measuring GPU {gpu.index} ({gpu.name})" if gpu is not None else ", time only (no GPU measured)"))
    print(f"  {len(samples)} requests x {a.max_new_tokens} tokens, batch size {a.batch_size}, "
          f"{a.runs} interleaved runs of each kind")

    def bare() -> dict:
        tok, secs = bare_generate(lm, prompts, a.batch_size, st)
        assert tok == n_tokens, (tok, n_tokens)
        return {"tok_s": tok / secs, "in_window_tok_s": tok / secs}

    def measured() -> dict:
        mon = PowerMonitor(devices=[gpu.index]).start() if gpu is not None else None
        try:
            runner = Runner(lm, mon, st, gpu_name=gpu.name if gpu is not None else "")
            t0 = time.perf_counter()
            res = runner.run(task, samples, batch_size=a.batch_size, cell_id="bench", context={}, warmup=0)
            secs = time.perf_counter() - t0
        finally:
            if mon is not None:
                mon.stop()
        tok = sum(r["tokens_out"] for r in res.requests)
        assert tok == n_tokens, (tok, n_tokens)
        # each batch's duration once: its rows share it; a batch starts at batch_index 0
        win = sum(float(r["latency_s"]) for r in res.requests if r["batch_index"] == 0)
        e = [r["energy_j"] for r in res.requests if math.isfinite(r["energy_j"])]
        return {"tok_s": tok / secs, "in_window_tok_s": tok / win if win > 0 else math.nan,
                "energy_j": sum(e) if e else math.nan, "warnings": res.warnings}

    # warm-up of both paths (kernels, allocator, tokenizer caches, sampler start)
    bare()
    measured()
    runs: dict[str, list[dict]] = {"bare": [], "measured": []}
    for i in range(a.runs):
        order = ("bare", "measured") if i % 2 == 0 else ("measured", "bare")
        for kind in order:
            r = bare() if kind == "bare" else measured()
            runs[kind].append(r)
            print(f"  run {i + 1} {kind:<8} {r['tok_s']:10.1f} tokens/s end-to-end"
                  + (f", {r['in_window_tok_s']:10.1f} in-window" if kind == "measured" else ""))

    med = {k: statistics.median(r["tok_s"] for r in v) for k, v in runs.items()}
    med_win = statistics.median(r["in_window_tok_s"] for r in runs["measured"])
    ratio = med["measured"] / med["bare"]
    ratio_win = med_win / med["bare"]
    spread = {k: (min(r["tok_s"] for r in v), max(r["tok_s"] for r in v)) for k, v in runs.items()}
    print(f"median bare      {med['bare']:10.1f} tokens/s (range {spread['bare'][0]:.1f}-{spread['bare'][1]:.1f})")
    print(f"median measured  {med['measured']:10.1f} tokens/s end-to-end (range "
          f"{spread['measured'][0]:.1f}-{spread['measured'][1]:.1f}), {med_win:.1f} in-window")
    print(f"ratio measured/bare: {ratio:.3f} end-to-end ({(1 - ratio) * 100:+.1f} % slower), "
          f"{ratio_win:.3f} in-window   [target >= 0.98 on an H100]")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"model": model, "dtype": dtype, "device": device, "batch_size": a.batch_size,
                       "samples": len(samples), "max_new_tokens": a.max_new_tokens, "runs": runs,
                       "median_tok_s": med, "median_in_window_tok_s": med_win, "ratio": ratio,
                       "ratio_in_window": ratio_win, "gpu": gpu.name if gpu is not None else None},
                      f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
