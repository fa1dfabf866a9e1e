"""Statistics of served traffic (issue 15): energy and latency vs load, and the energy accounting.

Pure functions over the ``requests`` table and the run's manifest (``manifest["served"]``: one
entry per served cell, written by :mod:`llm_dvfs.sweep.served`). Lock-step runs have no served
rows: :func:`is_served` is False and every function here returns an empty result.

* :func:`steady_rows`: the rows the statistics use: lock-step rows, and served rows of the
  measured phase that did not fail (warm-up/cool-down requests and failed ones are counted, not
  pooled with the steady state).
* :func:`load_table`: per model × task × engine × clock point × load level: the requests, failed
  ones, energy per request (median), J/token (Σ energy / Σ output tokens, the batch-level figure
  servers are compared by, and the median of the requests'), TTFT / TPOT / queueing delay /
  latency percentiles (p50, p90, p99), the load achieved (arrived and completed req/s, mean
  concurrency, averaged over the level's cells) and the energy accounting summed over its cells.
* :func:`accounting_lines`: the sum check in words.

Units follow the column names (J, s, req/s). Percentiles are linear-interpolated
(``numpy.percentile``); with fewer than 100 requests p99 is close to the maximum.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from llm_dvfs.analysis.summary import CLOCK_KEYS, clock_label

SERVED_ENGINES = ("continuous", "endpoint")
PERCENTILES = (50, 90, 99)
#: Latency metrics reported as percentiles in :func:`load_table`.
LATENCY_METRICS = ("ttft_s", "tpot_s", "queue_s", "latency_s")
_GROUP = ("model", "task", "engine")


def served_mask(requests: pd.DataFrame) -> np.ndarray:
    """Bool array: the row is served traffic (engine continuous or endpoint)."""
    if "engine" not in requests.columns:
        return np.zeros(len(requests), dtype=bool)
    return requests["engine"].astype("string").isin(SERVED_ENGINES).fillna(False).to_numpy(dtype=bool)


def is_served(requests: pd.DataFrame) -> bool:
    """True when the table has served-traffic rows."""
    return bool(served_mask(requests).any())


def steady_rows(requests: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """(the rows statistics use, notes on what was left out). Lock-step rows are all kept."""
    served = served_mask(requests)
    if not served.any():
        return requests, []
    phase = requests["load_phase"].astype("string") if "load_phase" in requests.columns else \
        pd.Series(pd.NA, index=requests.index, dtype="string")
    err = requests["error"].notna().to_numpy(dtype=bool) if "error" in requests.columns else np.zeros(len(requests), bool)
    excl = served & (phase.fillna("measured").ne("measured").to_numpy(dtype=bool) | err)
    notes = []
    n_ph = int((served & phase.fillna("measured").ne("measured").to_numpy(dtype=bool)).sum())
    if n_ph:
        notes.append(f"{n_ph} served request(s) of warm-up or cool-down phases are left out of the statistics "
                     "(they are in requests.parquet, load_phase).")
    if int((served & err).sum()):
        notes.append(f"{int((served & err).sum())} served request(s) failed (error column); they are left out of "
                     "the energy and latency statistics and counted in served_load.csv (failed).")
    return requests[~excl], notes


def _load_axis(df: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """(kind, value) of each served row's load: concurrency N, else the arrival rate R."""
    conc = pd.to_numeric(df.get("concurrency"), errors="coerce").astype(float)
    rate = pd.to_numeric(df.get("arrival_rate_rps"), errors="coerce").astype(float)
    kind = pd.Series(np.where(conc.notna(), "concurrency", np.where(rate.notna(), "rate", "unknown")), index=df.index)
    return kind, conc.where(conc.notna(), rate)


def _pct(v: np.ndarray, q: float) -> float:
    v = v[np.isfinite(v)]
    return float(np.percentile(v, q)) if v.size else math.nan


def load_table(requests: pd.DataFrame, manifest: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Served traffic per model × task × engine × clock point × load (module docstring); empty
    for a lock-step run. Columns: the group and clock columns, ``clock_label``, ``load_kind``
    (concurrency | rate), ``load`` (users or req/s), ``cells``, ``n`` (measured requests that
    finished), ``n_failed`` (measured ones that failed), ``energy_j_median``, ``j_per_token``
    (Σ/Σ), ``j_per_token_median``, ``M_pPP`` for M in :data:`LATENCY_METRICS` and PP in
    :data:`PERCENTILES`, ``arrived_rps``, ``completed_rps``, ``mean_concurrency``,
    ``window_energy_j``, ``requests_energy_j``, ``idle_energy_j``, ``unattributed_energy_j``,
    ``sum_check_rel`` (the largest over the cells), ``monitor_rel_diff``, ``energy_method``."""
    served = served_mask(requests)
    if not served.any():
        return pd.DataFrame()
    all_rows = requests[served].copy()
    kind, value = _load_axis(all_rows)
    all_rows["load_kind"], all_rows["load"] = kind.to_numpy(), value.to_numpy()
    phase = all_rows["load_phase"].astype("string").fillna("measured") if "load_phase" in all_rows else "measured"
    measured = all_rows[(phase == "measured").to_numpy(dtype=bool)] if not isinstance(phase, str) else all_rows
    cells = dict((manifest or {}).get("served") or {})
    keys = [k for k in _GROUP if k in all_rows.columns] + list(CLOCK_KEYS) + ["load_kind", "load"]
    out = []
    for key, g_all in all_rows.groupby(keys, dropna=False, sort=True):
        row: dict[str, Any] = dict(zip(keys, key))
        g = measured.loc[measured.index.intersection(g_all.index)]
        ok = g[g["error"].isna()] if "error" in g.columns else g
        obs = pd.to_numeric(g_all["sm_mhz_observed"], errors="coerce").dropna()
        row["clock_label"] = clock_label(row["sm_mhz_requested"], row["mem_mhz_requested"],
                                         row["power_limit_w_requested"], float(obs.median()) if len(obs) else math.nan)
        ids = sorted(set(g_all["cell_id"].astype(str)))
        row["cells"] = len(ids)
        row["n"], row["n_failed"] = int(len(ok)), int(len(g) - len(ok))
        e = pd.to_numeric(ok["energy_j"], errors="coerce").to_numpy(dtype=float)
        tok = pd.to_numeric(ok["tokens_out"], errors="coerce").to_numpy(dtype=float)
        fin = np.isfinite(e) & np.isfinite(tok)
        row["energy_j_median"] = _pct(e, 50)
        row["j_per_token"] = float(e[fin].sum() / tok[fin].sum()) if fin.any() and tok[fin].sum() > 0 else math.nan
        row["j_per_token_median"] = _pct(pd.to_numeric(ok["j_per_token"], errors="coerce").to_numpy(dtype=float), 50)
        for m in LATENCY_METRICS:
            v = pd.to_numeric(ok[m], errors="coerce").to_numpy(dtype=float)
            for q in PERCENTILES:
                row[f"{m}_p{q}"] = _pct(v, q)
        sums = [cells[c] for c in ids if c in cells]
        for k in ("arrived_rps", "completed_rps", "mean_concurrency"):
            vals = [s.get("achieved", {}).get(k) for s in sums]
            vals = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
            row[k] = float(np.mean(vals)) if vals else math.nan
        en = [s["energy"] for s in sums if s.get("energy")]
        for k, src in (("window_energy_j", "window_energy_j"), ("requests_energy_j", "attributed_energy_j"),
                       ("idle_energy_j", "idle_energy_j"), ("unattributed_energy_j", "unattributed_energy_j")):
            row[k] = float(sum(x.get(src) or 0.0 for x in en)) if en else math.nan
        row["sum_check_rel"] = max((x.get("sum_check_rel") or 0.0 for x in en), default=math.nan)
        row["monitor_rel_diff"] = max((x.get("monitor_rel_diff") or 0.0 for x in en), default=math.nan)
        row["energy_method"] = "+".join(sorted(str(x) for x in g_all["energy_method"].dropna().unique()))
        out.append(row)
    return pd.DataFrame(out)


def accounting_lines(manifest: Mapping[str, Any] | None) -> list[str]:
    """The energy accounting of the served cells as sentences (empty without any)."""
    cells = [s for s in ((manifest or {}).get("served") or {}).values() if s.get("energy")]
    served = (manifest or {}).get("served") or {}
    if not served:
        return []
    if not cells:
        return [f"{len(served)} served cell(s), no energy measured (no GPU): times only."]
    en = [s["energy"] for s in cells]
    tot = {k: sum(float(e.get(k) or 0.0) for e in en) for k in
           ("window_energy_j", "attributed_energy_j", "idle_energy_j", "unattributed_energy_j")}
    worst = max(float(e.get("sum_check_rel") or 0.0) for e in en)
    mon = [float(e["monitor_rel_diff"]) for e in en if e.get("monitor_rel_diff") is not None]
    methods = sorted({str(e.get("energy_method")) for e in en})
    lines = [f"Energy accounting over {len(cells)} served cell(s) ({', '.join(methods)}): requests "
             f"{tot['attributed_energy_j']:.4g} J + idle {tot['idle_energy_j']:.4g} J + unattributed "
             f"{tot['unattributed_energy_j']:.4g} J = window {tot['window_energy_j']:.4g} J; sum check: the "
             f"residual is at most {worst:.1e} of a cell's window energy (float rounding)"
             + (f", and the window energy agrees with the power monitor's own integral to "
                f"{max(mon) * 100:.2g} %." if mon else ".")]
    failed = sum(int(s.get("failed") or 0) for s in served.values())
    aborted = [c for c, s in served.items() if s.get("aborted")]
    if failed:
        lines.append(f"{failed} served request(s) failed; their rows carry the error and get energy only for the "
                     "tokens they produced.")
    if aborted:
        lines.append(f"{len(aborted)} served cell(s) were aborted mid-run (server gone or engine dead); "
                     "`python -m llm_dvfs.run --resume` measures them again.")
    return lines


def caveats(requests: pd.DataFrame) -> list[str]:
    """What per-request energy under concurrency cannot mean (docs/attribution.md), for the
    report's 'cannot be concluded' list; empty for a lock-step run."""
    if not is_served(requests):
        return []
    out = ["Per-request energy of served traffic is a share of joint costs (weight reads, launches, static power) "
           "split in proportion to each request's tokens in the engine steps it shared: J/request falling with "
           "load is the batching gain shared out, not what a request would cost alone (docs/attribution.md)."]
    meth = set(requests.loc[served_mask(requests), "energy_method"].dropna().astype(str))
    if "token_timestamps" in meth:
        out.append("Endpoint cells are split by the client's token timestamps (the server exposes no engine steps): "
                   "a prefill is spread over its whole first interval, queueing included, and another client's "
                   "requests to the same server would be charged to these.")
    return out


__all__ = ["SERVED_ENGINES", "PERCENTILES", "LATENCY_METRICS", "served_mask", "is_served", "steady_rows",
           "load_table", "accounting_lines", "caveats"]
