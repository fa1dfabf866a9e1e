"""The plain-text end-of-run summary that ``python -m llm_dvfs.run`` prints (and its summary.csv).

Per model × task × batch size × clock point: medians (energy/request, J/token, latency, TTFT,
TPOT, average power), mean quality, and the change vs the highest clock — the columns of
:func:`llm_dvfs.analysis.summary.summarize`, rendered as the report's key table where it can be
built, else as a plain table. The full report is ``python -m llm_dvfs.report``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from llm_dvfs.analysis.findings import key_table
from llm_dvfs.analysis.render import format_key_table
from llm_dvfs.analysis.served import is_served, steady_rows
from llm_dvfs.analysis.summary import default_group_keys, optimal_clocks, summarize
from llm_dvfs.atomic import atomic_write_with

log = logging.getLogger("llm_dvfs.analysis.console")


def summarize_run(requests: Optional[pd.DataFrame], n_boot: int = 200) -> tuple[Optional[pd.DataFrame], str]:
    """The summary table of a run's requests (None when there are none) and its text rendering."""
    if requests is not None and is_served(requests):
        requests, _ = steady_rows(requests)  # warm-up, cool-down and failed requests are not pooled
    if requests is None or requests.empty:
        return None, "(no requests were measured)"
    keys = default_group_keys(requests)
    summary = summarize(requests, group_keys=keys, n_boot=n_boot)
    try:
        optimal = optimal_clocks(summary, group_keys=keys)
        text = format_key_table(key_table(summary, optimal if optimal is not None else pd.DataFrame(), keys), keys)
    except Exception as e:  # noqa: BLE001 - the plain table below is always possible
        log.debug("report key table unavailable (%s); plain summary", e)
        text = _plain_summary(summary, keys)
    return summary, text


def write_summary(run_dir: str | Path, requests: Optional[pd.DataFrame], n_boot: int = 200
                  ) -> tuple[Optional[pd.DataFrame], str]:
    """:func:`summarize_run`, and the table written to ``run_dir/summary.csv`` (atomically) when
    there is one. Returns what :func:`summarize_run` returns."""
    summary, text = summarize_run(requests, n_boot=n_boot)
    if summary is not None:
        atomic_write_with(Path(run_dir) / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    return summary, text


def _plain_summary(summary: pd.DataFrame, keys: Sequence[str]) -> str:
    cols = list(keys) + ["clock_label", "n", "energy_j_median", "j_per_token_median", "latency_s_median",
                         "ttft_s_median", "tpot_s_median", "avg_power_w_median", "quality_mean",
                         "energy_j_delta_pct", "latency_s_delta_pct"]
    cols = [c for c in cols if c in summary.columns]
    return summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


__all__ = ["summarize_run", "write_summary"]
