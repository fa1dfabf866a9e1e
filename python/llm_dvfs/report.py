"""``python -m llm_dvfs.report RUN_DIR``: statistics, figures and a readable report of a run.

Reads a run directory written by ``python -m llm_dvfs.run`` (manifest.json, requests.parquet —
requests.csv as a fallback —, tokens.parquet, power.parquet), computes the statistics of
:mod:`llm_dvfs.analysis.summary`, ``dvfs_fit`` and ``feature_stats``, draws the figures of
:mod:`llm_dvfs.analysis.plots`, and writes into ``RUN_DIR/report/`` (or ``--out``):

- ``report.html``: one self-contained page (inline CSS, figures embedded as base64 PNG, no
  scripts, no external resources);
- ``report.md`` (figures referenced from ``figures/``), ``figures/*.png``;
- CSV tables: ``key_table.csv``, ``summary.csv``, ``optimal_clocks.csv``, ``phase_points.csv``,
  ``phase_fits.csv``, ``correlations.csv``, ``regression.csv``;

and prints the key table to the terminal. Works for a single clock point (observe mode) as well
as for a full sweep, and lists what cannot be concluded from what was measured.

This module is only the command line; the work is done by :func:`llm_dvfs.analysis.build.build_report`
(loading: :mod:`llm_dvfs.analysis.rundata`, sentences: :mod:`llm_dvfs.analysis.findings`,
text and HTML: :mod:`llm_dvfs.analysis.render`).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from llm_dvfs.analysis.build import build_report
from llm_dvfs.analysis.render import format_key_table
from llm_dvfs.analysis.rundata import CSV_TABLES, Report, RunData, load_run
from llm_dvfs.errors import ConfigError, DataNotFound, LlmDvfsError

# Defined in llm_dvfs.analysis (build, rundata); re-exported so that
# `from llm_dvfs import report; report.build_report(...)` / `report.load_run(...)` keep working.
__all__ = ["CSV_TABLES", "Report", "RunData", "build_report", "load_run", "main"]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _parser(prog: str = "python -m llm_dvfs.report") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Statistics, figures and a readable report of an llm_dvfs run directory: per model x task x "
                    "clock point, medians with 95 %% bootstrap intervals of energy per request, J/token, latency, "
                    "TTFT, TPOT, average power and quality; the saving vs the highest clock; the energy-optimal "
                    "clock (overall and within a latency limit); prefill/decode scaling fits; and how input "
                    "features relate to energy and latency.",
        epilog="Writes report.html (self-contained), report.md, figures/*.png and CSV tables (%s) into "
               "RUN_DIR/report/ or --out, and prints the key table. Works for a single observe-mode clock point "
               "as well as for a sweep; the report says what cannot be concluded from what was measured.\n\n"
               "Examples:\n  python -m llm_dvfs.report runs/2025-01-01_sweep\n"
               "  python -m llm_dvfs.report runs/x --latency-limit 0.10 --out /tmp/report --no-html\n\n"
               "Exit status: 0 ok, 2 bad arguments or missing data." % ", ".join(f"{t}.csv" for t in CSV_TABLES),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (manifest.json, requests.parquet, ...)")
    p.add_argument("--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/report)")
    p.add_argument("--latency-limit", metavar="FRACTION", type=float, default=0.05,
                   help="allowed latency increase vs the highest clock for the constrained optimum, as a fraction "
                        "(default 0.05 = +5 %%)")
    p.add_argument("--request", metavar="ID", default=None,
                   help="request_id whose power trace to draw (default: a median-latency request at the highest "
                        "clock)")
    p.add_argument("--html", action=argparse.BooleanOptionalAction, default=True,
                   help="write report.html (default: on; --no-html skips it)")
    p.add_argument("--n-boot", metavar="N", type=int, default=2000,
                   help="bootstrap resamples per confidence interval (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0; results are reproducible)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "python -m llm_dvfs.report") -> int:
    """Entry point of ``python -m llm_dvfs.report``; returns the exit status. ``prog`` names the
    command in usage lines (``llm-dvfs report`` from the console script)."""
    args = _parser(prog).parse_args(argv)
    if args.n_boot < 1:
        print("llm_dvfs.report: error: --n-boot must be >= 1", file=sys.stderr)
        return 2
    try:
        rep = build_report(args.run_dir, args.out, latency_limit=args.latency_limit, request_id=args.request,
                           html_page=args.html, n_boot=args.n_boot, seed=args.seed)
    except (ConfigError, DataNotFound) as e:
        print(f"llm_dvfs.report: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output went away or filled up while the report was written
        print(f"llm_dvfs.report: error: cannot write the report: {e.strerror or e}: "
              f"{getattr(e, 'filename', '') or args.out or ''}", file=sys.stderr)
        return 2
    except LlmDvfsError as e:  # pragma: no cover - nothing else is expected here
        print(f"llm_dvfs.report: error: {e}", file=sys.stderr)
        return 1
    print(f"llm_dvfs report: {rep.run.path}")
    print()
    print(format_key_table(rep.key, rep.group_keys))
    print()
    print("Findings:")
    for f in rep.findings:
        print(f"  - {f}")
    print()
    print("What cannot be concluded:")
    for c in rep.cannot_conclude:
        print(f"  - {c}")
    print()
    print(f"Wrote {rep.out_dir}/: " + ", ".join(sorted({p.name for p in rep.files if p.parent == rep.out_dir}))
          + f", figures/ ({len(rep.figures)} PNG)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. `... | head`: not an error of the report
        sys.exit(0)
