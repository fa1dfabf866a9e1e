"""What the meter costs: sampler CPU time, and the slowdown it causes to the measured work.

(a) CPU seconds of the sampler thread per wall second, at the default and the fastest settings,
    and at the defaults with back-to-back 1 s windows (each edge's counter bracket: reads until
    the counter changes, ~100 ms of ~3 ms reads on an H200; PowerMonitor(bracket_edges=...)).
(b) Slowdown of a Python-heavy loop and (with a GPU) of Hugging Face ``generate`` on a
    Llama-3.2-1B-shaped model in bf16 (random weights, batch 1, 128 new tokens), comparing:
    no meter | PowerMonitor (defaults) | a Python thread polling NVML via pynvml at the same
    poll period | PowerMonitor at 1 ms | pynvml thread at 1 ms.
    Runs are interleaved (round-robin over configurations) and medians are reported.

    python bench/sampler_overhead.py [--rounds 6] [--skip-generate] [--json OUT]

Read-only on the GPU. Without a GPU (and without LLM_DVFS_NVML_LIBRARY) it prints a skip line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from typing import Callable, Optional

DEFAULT = dict(buffer_period_s=0.25, poll_period_s=0.05, counter_period_s=1.0)
FASTEST = dict(buffer_period_s=0.02, poll_period_s=0.001, counter_period_s=0.1)


class PynvmlPoller:
    """The hand-written alternative: a Python thread polling power and SM clock via pynvml."""

    def __init__(self, period_s: float) -> None:
        import pynvml

        self.nv = pynvml
        self.period_s = period_s
        self._stop = threading.Event()
        self.samples = 0

    def __enter__(self):
        nv = self.nv
        nv.nvmlInit()
        self.h = nv.nvmlDeviceGetHandleByIndex(0)
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()
        return self

    def _run(self) -> None:
        nv = self.nv
        while not self._stop.is_set():
            nv.nvmlDeviceGetPowerUsage(self.h)
            nv.nvmlDeviceGetClockInfo(self.h, nv.NVML_CLOCK_SM)
            self.samples += 1
            time.sleep(self.period_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.t.join()
        self.nv.nvmlShutdown()


def meter_cpu(settings: dict, seconds: float, window_s: Optional[float] = None) -> tuple[float, dict]:
    """Sampler CPU s per wall s; with ``window_s``, back-to-back windows of that length (their
    edges' counter brackets included). Also the stats' deltas."""
    import llm_dvfs as ld

    with ld.PowerMonitor(devices=[0], **settings) as mon:
        s0, t0 = mon.stats(), time.monotonic()
        if window_s is None:
            time.sleep(seconds)
        else:
            while time.monotonic() - t0 < seconds:
                with mon.window("w", sync=False):
                    time.sleep(window_s)
        s = mon.stats()
        delta = {k: s[k] - s0[k] for k in ("thread_cpu_s", "counter_reads", "brackets", "bracket_reads")}
        return delta["thread_cpu_s"] / (time.monotonic() - t0), delta


def python_loop() -> float:
    t0 = time.perf_counter()
    acc = 0
    d = {}
    for i in range(1_500_000):
        acc += i * i % 7
        d[i & 1023] = acc
    return time.perf_counter() - t0


def make_generate() -> Optional[Callable[[], float]]:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 64), device="cuda")

    def run() -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=128,
                           min_new_tokens=128, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return 128 / (time.perf_counter() - t0)  # tokens/s

    run()  # warm-up
    return run


def interleaved(work: Callable[[], float], configs: dict, rounds: int, higher_is_better: bool) -> dict:
    import llm_dvfs as ld

    res: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(rounds):
        for name, kind in configs.items():
            if kind is None:
                res[name].append(work())
            elif kind[0] == "monitor":
                with ld.PowerMonitor(devices=[0], **kind[1]):
                    res[name].append(work())
            else:
                with PynvmlPoller(kind[1]):
                    res[name].append(work())
    med = {k: statistics.median(v) for k, v in res.items()}
    base = med["none"]
    return {k: {"median": m, "ratio": (m / base if higher_is_better else base / m), "runs": res[k]}
            for k, m in med.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--cpu-seconds", type=float, default=5.0)
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    import llm_dvfs as ld

    devs = ld.devices()
    if not devs:
        print("sampler_overhead: no GPU/NVML (set LLM_DVFS_NVML_LIBRARY for the emulated one): skipped")
        return 0
    out: dict = {"device": devs[0].name}
    print(f"device: {devs[0].name}")
    for name, s, win in (("default", DEFAULT, None), ("fastest", FASTEST, None),
                         ("default_1s_windows", DEFAULT, 1.0)):
        frac, delta = meter_cpu(s, args.cpu_seconds, win)
        out[f"cpu_{name}"] = frac
        out[f"stats_{name}"] = delta
        extra = f" ({delta['brackets']} edge brackets, {delta['bracket_reads']} bracket reads)" if win else ""
        print(f"(a) sampler CPU at {name:18s} {s}: {100 * frac:.3f} % of one core{extra}")
    try:
        import pynvml  # noqa: F401
        have_pynvml = True
    except ImportError:
        have_pynvml = False
        print("pynvml not installed: the pynvml comparison is skipped (pip install nvidia-ml-py)")
    configs: dict = {"none": None, "monitor": ("monitor", DEFAULT)}
    if have_pynvml:
        configs["pynvml@50ms"] = ("pynvml", DEFAULT["poll_period_s"])
    configs["monitor@1ms"] = ("monitor", FASTEST)
    if have_pynvml:
        configs["pynvml@1ms"] = ("pynvml", 0.001)
    works = [("python loop (s)", python_loop, False)]
    if not args.skip_generate:
        gen = make_generate()
        if gen is None:
            print("no CUDA torch: generate benchmark skipped")
        else:
            works.append(("generate tok/s", gen, True))
    for label, fn, hib in works:
        r = interleaved(fn, configs, args.rounds, hib)
        out[label] = r
        print(f"(b) {label}: medians of {args.rounds} interleaved runs; ratio = speed vs no meter")
        for k, v in r.items():
            print(f"    {k:12s} median {v['median']:10.4f}   speed ratio {v['ratio']:.4f}"
                  f"   slowdown {100 * (1 - v['ratio']):+.2f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
