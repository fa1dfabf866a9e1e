"""Statistics over the result tables: what a clock point costs and what drives energy.

Pure functions over pandas DataFrames in the schema of :mod:`llm_dvfs.schema`; nothing here
reads files, draws, or touches a GPU. The report (:mod:`llm_dvfs.report`) strings them together.
This module holds the per-clock-point summary and the optimum; the bootstrap lives in
:mod:`llm_dvfs.analysis.stats`, the phase fits in :mod:`llm_dvfs.analysis.dvfs_fit`, the
feature statistics in :mod:`llm_dvfs.analysis.feature_stats`.

Vocabulary
----------
*group*: one model × task × batch size (plus ``weights``, ``dtype``, ``gpu_name``, and for served
traffic ``engine``, ``concurrency``, ``arrival_rate_rps``, when they vary within the run; see
:func:`default_group_keys`).
*clock point*: one combination of :data:`CLOCK_KEYS` (requested SM clock, memory clock, power
limit). A NaN SM clock means observe mode ("as found"): its position on a clock axis,
``clock_mhz``, is then the median of the SM clock observed during its requests.
*reference*: per group, the clock point with the highest ``clock_mhz`` (ties: the highest memory
clock, then the highest power limit, NaN counting as "default" = highest). Savings are relative
to it.

Units follow the column names: J, s, W, MHz. Percentages are named ``*_pct``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Sequence

import numpy as np
import pandas as pd

from llm_dvfs.analysis.stats import bootstrap_medians, keyed_rng
from llm_dvfs.schema import numeric_view

#: Per-request metrics summarised per clock point (medians with bootstrap CIs).
METRICS: tuple[str, ...] = (
    "energy_j", "j_per_token", "latency_s", "ttft_s", "tpot_s", "avg_power_w", "quality",
)
#: The statistic summarising each metric: the median (robust to outlier requests), except for
#: quality, whose per-request values are often 0/1 (accuracy) so that only the mean is useful.
CENTER: dict[str, str] = {"quality": "mean"}
#: The columns that identify a clock point.
CLOCK_KEYS: tuple[str, ...] = ("sm_mhz_requested", "mem_mhz_requested", "power_limit_w_requested")
#: Always part of a group.
BASE_GROUP_KEYS: tuple[str, ...] = ("model", "task", "batch_size")
#: Part of a group only when they take more than one value in the table.
OPTIONAL_GROUP_KEYS: tuple[str, ...] = ("weights", "dtype", "gpu_name", "engine", "concurrency", "arrival_rate_rps")


# --------------------------------------------------------------------------------------------
# groups and clock points
# --------------------------------------------------------------------------------------------
def default_group_keys(requests: pd.DataFrame) -> list[str]:
    """Group columns for ``requests``: model, task, batch_size, and any of weights / dtype /
    gpu_name that take more than one value (so that e.g. random and pretrained weights of the
    same model are never pooled). Columns absent from the table are skipped."""
    keys = [k for k in BASE_GROUP_KEYS if k in requests.columns]
    for k in OPTIONAL_GROUP_KEYS:
        if k in requests.columns and requests[k].nunique(dropna=False) > 1:
            keys.insert(keys.index("task") if "task" in keys else len(keys), k)
    return keys


def valid_mask(quality_valid: pd.Series) -> np.ndarray:
    """Bool array: ``quality_valid`` is True. Null (nothing to judge) and False (random weights)
    both exclude the row's quality from every statistic."""
    return pd.Series(quality_valid).astype("boolean").fillna(False).to_numpy(dtype=bool)


def _nan_high(s: pd.Series) -> np.ndarray:
    """Sort key where NaN ("as found" = the default setting) ranks above every number."""
    v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
    return np.where(np.isnan(v), np.inf, v)


def with_clock_mhz(requests: pd.DataFrame, group_keys: Sequence[str] | None = None) -> pd.DataFrame:
    """A copy of ``requests`` with ``clock_mhz`` (MHz) and ``observe`` (bool) columns, its float
    columns as numpy float64 (:func:`llm_dvfs.schema.numeric_view`: null → NaN), the form every
    statistic here computes on.

    ``clock_mhz`` is the requested SM clock; for observe-mode rows (requested null) it is the
    median observed SM clock of that row's group and clock point, so all rows of one clock
    point share one position on the clock axis. NaN when neither is known.
    """
    keys = list(group_keys) if group_keys is not None else default_group_keys(requests)
    df = numeric_view(requests)
    df.attrs = {}  # pandas deep-copies attrs on every operation; metadata is not needed here
    req = pd.to_numeric(df["sm_mhz_requested"], errors="coerce").astype(float)
    obs = pd.to_numeric(df["sm_mhz_observed"], errors="coerce").astype(float)
    df["observe"] = req.isna().to_numpy()
    if df["observe"].any():
        pkeys = keys + list(CLOCK_KEYS)
        med_obs = obs.groupby([df[k] for k in pkeys], dropna=False).transform("median")
        df["clock_mhz"] = req.where(~req.isna(), med_obs).to_numpy()
    else:
        df["clock_mhz"] = req.to_numpy()
    return df


def clock_label(sm_mhz_requested: float, mem_mhz_requested: float = math.nan,
                power_limit_w_requested: float = math.nan, clock_mhz: float = math.nan) -> str:
    """Human label of a clock point, e.g. ``"1410 MHz"``, ``"as found (~1755 MHz)"``,
    ``"1410 MHz, mem 1593, PL 300 W"``."""
    def isnan(x: Any) -> bool:
        return x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x))

    if isnan(sm_mhz_requested):
        text = "as found" + ("" if isnan(clock_mhz) else f" (~{clock_mhz:.0f} MHz)")
    else:
        text = f"{float(sm_mhz_requested):.0f} MHz"
    if not isnan(mem_mhz_requested):
        text += f", mem {float(mem_mhz_requested):.0f}"
    if not isnan(power_limit_w_requested):
        text += f", PL {float(power_limit_w_requested):.0f} W"
    return text


def center_column(metric: str) -> str:
    """Name of the summary column holding ``metric``'s central value: ``<metric>_median``, or
    ``<metric>_mean`` for metrics listed in :data:`CENTER` (quality)."""
    return f"{metric}_{CENTER.get(metric, 'median')}"


# --------------------------------------------------------------------------------------------
# per clock point summary
# --------------------------------------------------------------------------------------------
def summarize(requests: pd.DataFrame, *, group_keys: Sequence[str] | None = None,
              metrics: Sequence[str] = METRICS, n_boot: int = 2000, ci: float = 0.95,
              seed: int = 0) -> pd.DataFrame:
    """Medians with bootstrap CIs per group × clock point, and the change vs the reference.

    Args:
        requests: the ``requests`` table (one row per request × clock point).
        group_keys: grouping columns; default :func:`default_group_keys`.
        metrics: request columns to summarise; ``quality`` only counts rows whose
            ``quality_valid`` is True (random weights make the metric meaningless).
        n_boot: bootstrap resamples per median (percentile method).
        ci: confidence level of the intervals (0.95 = 95 %).
        seed: bootstrap seed; the result is a deterministic function of (table, seed).

    Returns:
        One row per group × clock point, sorted by group and descending ``clock_mhz``, with the
        group and clock columns, ``clock_mhz``, ``clock_label``, ``observe``, ``n`` (requests),
        ``sm_mhz_observed_median/min/max``, ``clock_event_reasons`` (OR over the rows that read
        it; null when none did),
        ``energy_method`` (the methods seen, joined by ``+``), and per metric ``M``:
        ``M_median`` (``quality_mean`` for quality, see :data:`CENTER`), ``M_ci_low``,
        ``M_ci_high``, ``M_n`` (finite values used), ``M_delta_pct`` (vs the reference's
        median, in %), ``M_delta_pct_ci_low/high`` (bootstrap of the ratio of medians;
        independent resampling of both points), plus
        ``is_reference`` and ``pareto`` (on the energy–latency frontier of its group, see
        :func:`pareto_frontier`). Metrics with no finite value give NaN, never an error.
        An empty input gives an empty table with these columns.
    """
    keys = list(group_keys) if group_keys is not None else default_group_keys(requests)
    metrics = [m for m in metrics if m in requests.columns]
    df = with_clock_mhz(requests, keys)
    if "quality" in df.columns and "quality_valid" in df.columns:
        df["quality"] = df["quality"].where(valid_mask(df["quality_valid"]))
    pkeys = keys + list(CLOCK_KEYS)
    lo_q, hi_q = 50 * (1 - ci), 50 * (1 + ci)

    rows: list[dict[str, Any]] = []
    boots: list[dict[str, np.ndarray]] = []
    for key, g in df.groupby(pkeys, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(pkeys, key))
        obs = pd.to_numeric(g["sm_mhz_observed"], errors="coerce").to_numpy(dtype=float)
        obs = obs[np.isfinite(obs)]
        row["clock_mhz"] = float(g["clock_mhz"].iloc[0])
        row["observe"] = bool(g["observe"].iloc[0])
        row["clock_label"] = clock_label(row["sm_mhz_requested"], row["mem_mhz_requested"],
                                         row["power_limit_w_requested"], row["clock_mhz"])
        row["n"] = int(len(g))
        row["sm_mhz_observed_median"] = float(np.median(obs)) if obs.size else math.nan
        row["sm_mhz_observed_min"] = float(obs.min()) if obs.size else math.nan
        row["sm_mhz_observed_max"] = float(obs.max()) if obs.size else math.nan
        if "clock_event_reasons" in g.columns:
            # null = not read (no GPU): the OR of what was read, null when nothing was
            reasons = pd.to_numeric(g["clock_event_reasons"], errors="coerce").dropna().astype("int64")
            row["clock_event_reasons"] = (int(np.bitwise_or.reduce(reasons.to_numpy(), initial=0)) if len(reasons)
                                          else pd.NA)
        if "energy_method" in g.columns:
            row["energy_method"] = "+".join(sorted(str(x) for x in g["energy_method"].dropna().unique()))
        b: dict[str, np.ndarray] = {}
        for m in metrics:
            v = pd.to_numeric(g[m], errors="coerce").to_numpy(dtype=float)
            v = np.sort(v[np.isfinite(v)])  # sorted: the CI must not depend on the row order
            row[f"{m}_n"] = int(v.size)
            cc, stat = center_column(m), CENTER.get(m, "median")
            if v.size == 0:
                row[cc] = row[f"{m}_ci_low"] = row[f"{m}_ci_high"] = math.nan
                b[m] = np.empty(0)
                continue
            row[cc] = float(np.median(v) if stat == "median" else np.mean(v))
            bm = bootstrap_medians(v, n_boot, keyed_rng(seed, key, m), stat) if v.size >= 2 else np.empty(0)
            b[m] = bm if bm.size else np.full(max(n_boot, 1), row[cc])
            if bm.size:
                row[f"{m}_ci_low"], row[f"{m}_ci_high"] = (float(x) for x in np.percentile(bm, [lo_q, hi_q]))
            else:
                row[f"{m}_ci_low"] = row[f"{m}_ci_high"] = math.nan
        rows.append(row)
        boots.append(b)

    base_cols = pkeys + ["clock_mhz", "clock_label", "observe", "n", "sm_mhz_observed_median",
                         "sm_mhz_observed_min", "sm_mhz_observed_max", "clock_event_reasons",
                         "energy_method"]
    metric_cols = [center_column(m) if s == "center" else f"{m}_{s}" for m in metrics for s in
                   ("center", "ci_low", "ci_high", "n", "delta_pct", "delta_pct_ci_low", "delta_pct_ci_high")]
    if not rows:
        return pd.DataFrame(columns=base_cols + metric_cols + ["is_reference", "pareto"])
    # Reference and deltas, per group; on the row dicts (pandas cell writes are slow).
    for r in rows:
        r["is_reference"] = False
    if keys:
        gidx = pd.DataFrame([{k: r[k] for k in keys} for r in rows]).groupby(keys, dropna=False, sort=False).indices
    else:
        gidx = {(): np.arange(len(rows))}
    for _, idx in gidx.items():
        idx = [int(i) for i in idx]
        clk = np.array([rows[i]["clock_mhz"] for i in idx], dtype=float)
        mem = _nan_high(pd.Series([rows[i]["mem_mhz_requested"] for i in idx], dtype="float64"))
        plim = _nan_high(pd.Series([rows[i]["power_limit_w_requested"] for i in idx], dtype="float64"))
        ref = idx[int(np.lexsort((plim, mem, np.nan_to_num(clk, nan=-np.inf)))[-1])]
        rows[ref]["is_reference"] = True
        for m in metrics:
            cc = center_column(m)
            ref_med, ref_b = rows[ref][cc], boots[ref][m]
            with_ci = []
            for i in idx:
                r = rows[i]
                r[f"{m}_delta_pct"] = r[f"{m}_delta_pct_ci_low"] = r[f"{m}_delta_pct_ci_high"] = math.nan
                if not (np.isfinite(ref_med) and np.isfinite(r[cc])) or ref_med == 0:
                    continue
                if i == ref:
                    r[f"{m}_delta_pct"] = r[f"{m}_delta_pct_ci_low"] = r[f"{m}_delta_pct_ci_high"] = 0.0
                    continue
                r[f"{m}_delta_pct"] = (r[cc] / ref_med - 1.0) * 100.0
                if r[f"{m}_n"] >= 2 and rows[ref][f"{m}_n"] >= 2:
                    with_ci.append(i)
            if with_ci:
                # CI of the ratio of medians: pair the i-th resample of each point with the i-th
                # of the reference (independent draws), all points of the group at once.
                k = min([ref_b.size] + [boots[i][m].size for i in with_ci])
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.stack([boots[i][m][:k] for i in with_ci]) / ref_b[:k]
                ratio[~np.isfinite(ratio)] = np.nan
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows stay NaN
                    q = (np.nanpercentile(ratio, [lo_q, hi_q], axis=1) - 1.0) * 100.0
                for j, i in enumerate(with_ci):
                    rows[i][f"{m}_delta_pct_ci_low"] = float(q[0, j])
                    rows[i][f"{m}_delta_pct_ci_high"] = float(q[1, j])
    out = pd.DataFrame(rows)
    if "clock_event_reasons" in out.columns:
        out["clock_event_reasons"] = out["clock_event_reasons"].astype("Int64")
    out["pareto"] = pareto_frontier(out, group_keys=keys)

    for c in base_cols + metric_cols:
        if c not in out.columns:
            out[c] = math.nan
    out = out[base_cols + metric_cols + ["is_reference", "pareto"]]
    sort_cols = keys + ["clock_mhz"]
    out = out.sort_values(sort_cols, ascending=[True] * len(keys) + [False],
                          na_position="last", kind="stable").reset_index(drop=True)
    return out


def pareto_frontier(summary: pd.DataFrame, *, x: str = "latency_s_median", y: str = "energy_j_median",
                    group_keys: Sequence[str] | None = None) -> pd.Series:
    """Bool Series: is the row on the (x, y) Pareto frontier of its group (both minimised)?

    A row is on the frontier when no other row of its group has ``x <=`` and ``y <=`` with at
    least one strict. Rows with a NaN in x or y are never on it. ``group_keys`` default:
    the base group keys present in ``summary``.
    """
    keys = list(group_keys) if group_keys is not None else [
        k for k in BASE_GROUP_KEYS + OPTIONAL_GROUP_KEYS if k in summary.columns]
    res = pd.Series(False, index=summary.index)
    if summary.empty:
        return res
    xs = pd.to_numeric(summary[x], errors="coerce").to_numpy(dtype=float)
    ys = pd.to_numeric(summary[y], errors="coerce").to_numpy(dtype=float)
    groups = summary.groupby(keys, dropna=False, sort=False).indices if keys else {(): np.arange(len(summary))}
    for _, idx in groups.items():
        idx = np.asarray(idx)
        gx, gy = xs[idx], ys[idx]
        ok = np.isfinite(gx) & np.isfinite(gy)
        # dominated[i] = any j with x_j<=x_i, y_j<=y_i and one strict
        le = (gx[None, :] <= gx[:, None]) & (gy[None, :] <= gy[:, None])
        lt = (gx[None, :] < gx[:, None]) | (gy[None, :] < gy[:, None])
        dom = (le & lt & ok[None, :]).any(axis=1)
        res.iloc[idx] = ok & ~dom
    return res


def optimal_clocks(summary: pd.DataFrame, *, latency_limit: float = 0.05, metric: str = "energy_j",
                   latency_metric: str = "latency_s", group_keys: Sequence[str] | None = None) -> pd.DataFrame:
    """The energy-optimal clock point per group, overall and under a latency limit.

    Args:
        summary: output of :func:`summarize`.
        latency_limit: allowed latency increase vs the reference, as a fraction (0.05 = +5 %),
            compared with the median latency.
        metric: ``energy_j`` (per request) or ``j_per_token``.
        latency_metric: ``latency_s`` (default), ``ttft_s`` or ``tpot_s``.

    Returns:
        One row per group: ``n_points``, the reference (``ref_label``, ``ref_clock_mhz``,
        ``ref_<metric>``, ``ref_<latency>``), the overall optimum (``best_*``:
        label, clock_mhz, metric median, ``best_saving_pct`` = −Δ% with its CI as
        ``best_saving_pct_ci_low/high``, ``best_latency_delta_pct``), the optimum within the
        limit (``limited_*``, same fields), ``latency_limit_pct``, and ``status``:
        ``ok``, ``one clock point`` (no DVFS conclusion possible) or ``no <metric> data``.
        A saving is *significant* (``best_significant``/``limited_significant``) when its CI
        excludes 0.
    """
    if latency_limit < 0 or not np.isfinite(latency_limit):
        raise ValueError(f"latency_limit must be a finite fraction >= 0, got {latency_limit!r}")
    keys = list(group_keys) if group_keys is not None else [
        k for k in BASE_GROUP_KEYS + OPTIONAL_GROUP_KEYS if k in summary.columns]
    rows = []
    if summary.empty:
        return pd.DataFrame(rows)
    for key, g in summary.groupby(keys, dropna=False, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key))
        row["n_points"] = int(len(g))
        row["latency_limit_pct"] = latency_limit * 100.0
        ref = g[g["is_reference"]].iloc[0]
        row["ref_label"] = ref["clock_label"]
        row["ref_clock_mhz"] = ref["clock_mhz"]
        row[f"ref_{metric}"] = ref[center_column(metric)]
        row[f"ref_{latency_metric}"] = ref[center_column(latency_metric)]
        vals = g[center_column(metric)].to_numpy(dtype=float)
        if not np.isfinite(vals).any():
            row["status"] = f"no {metric} data"
            rows.append(row)
            continue
        lat_d = g[f"{latency_metric}_delta_pct"].to_numpy(dtype=float)
        allowed = (lat_d <= latency_limit * 100.0 + 1e-9) | g["is_reference"].to_numpy()
        for prefix, mask in (("best", np.ones(len(g), bool)), ("limited", allowed)):
            cand = np.where(mask & np.isfinite(vals), vals, np.inf)
            i = int(np.argmin(cand))
            r = g.iloc[i]
            row[f"{prefix}_label"] = r["clock_label"]
            row[f"{prefix}_clock_mhz"] = r["clock_mhz"]
            row[f"{prefix}_{metric}"] = r[center_column(metric)]
            # 0.0 - x, not -x: the reference's saving is 0.0, not -0.0
            row[f"{prefix}_saving_pct"] = 0.0 - r[f"{metric}_delta_pct"]
            row[f"{prefix}_saving_pct_ci_low"] = 0.0 - r[f"{metric}_delta_pct_ci_high"]
            row[f"{prefix}_saving_pct_ci_high"] = 0.0 - r[f"{metric}_delta_pct_ci_low"]
            row[f"{prefix}_latency_delta_pct"] = r[f"{latency_metric}_delta_pct"]
            lo = row[f"{prefix}_saving_pct_ci_low"]
            row[f"{prefix}_significant"] = bool(np.isfinite(lo) and lo > 0)
        row["status"] = "ok" if len(g) > 1 else "one clock point"
        rows.append(row)
    return pd.DataFrame(rows)
