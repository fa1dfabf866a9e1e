"""How long input features take: non-NER features for 10 000 prompts, and NER per prompt.

Prompts are the synthetic task's (16..1024 words, ~1.4 kB on average), tokens from the offline
BPE tokenizer. Prints seconds per stage and per 10k prompts; NER with nltk is timed on a subset
when its data is installed, else reported as skipped.

    PYTHONPATH=python python bench/features_speed.py [--n 10000] [--ner-n 200]
"""
from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="prompts for the non-NER features")
    ap.add_argument("--ner-n", type=int, default=200, help="prompts for the nltk NER timing")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from llm_dvfs.errors import DataNotFound
    from llm_dvfs.workload.features import check_nltk_data, compute_features
    from llm_dvfs.workload.models import build_offline_tokenizer
    from llm_dvfs.workload.tasks import get_task

    t0 = time.perf_counter()
    prompts = [s.prompt for s in get_task("synthetic").samples(limit=args.n, seed=args.seed)]
    t_gen = time.perf_counter() - t0
    mb = sum(len(p.encode()) for p in prompts) / 1e6
    tok = build_offline_tokenizer(128256)
    print(f"{len(prompts)} synthetic prompts, {mb:.1f} MB, mean "
          f"{sum(len(p.split()) for p in prompts) / len(prompts):.0f} words "
          f"(generated in {t_gen:.1f} s)")

    def timed(label: str, **kw) -> float:
        t = time.perf_counter()
        compute_features(prompts, **kw)
        dt = time.perf_counter() - t
        print(f"  {label:<42s} {dt:6.2f} s   {dt / len(prompts) * 1e6:7.1f} us/prompt   "
              f"{dt * 10_000 / len(prompts):6.2f} s per 10k")
        return dt

    base = timed("text features (no tokenizer, no NER)", tokenizer=None, ner=None)
    with_tok = timed("+ tokens (offline BPE)", tokenizer=tok, ner=None)
    heur = timed("+ tokens + heuristic NER", tokenizer=tok, ner="heuristic")
    print(f"  ratios: tokenizer adds {with_tok / base:.2f}x, heuristic NER {heur / with_tok:.2f}x")

    try:
        check_nltk_data()
    except (DataNotFound, ImportError) as e:
        print(f"  nltk NER: skipped ({str(e).split('.')[0]})")
        return
    sub = prompts[: args.ner_n]
    t = time.perf_counter()
    compute_features(sub, tokenizer=None, ner="nltk")  # includes loading the models once
    dt_first = time.perf_counter() - t
    t = time.perf_counter()
    compute_features(sub, tokenizer=None, ner="nltk")
    dt = time.perf_counter() - t
    print(f"  nltk NER: {dt / len(sub) * 1e3:.2f} ms/prompt over {len(sub)} prompts "
          f"(first call incl. model loading {dt_first:.1f} s); "
          f"{dt / len(sub) * 10_000:.0f} s per 10k")


if __name__ == "__main__":
    main()
