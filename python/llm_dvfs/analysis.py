"""Statistics over the result tables: what a clock point costs and what drives energy.

Pure functions over pandas DataFrames in the schema of :mod:`llm_dvfs.results`; nothing here
reads files, draws, or touches a GPU. The report (:mod:`llm_dvfs.report`) strings them together.

Vocabulary
----------
*group*: one model × task × batch size (plus ``weights``, ``dtype``, ``gpu_name`` when they vary
within the run; see :func:`default_group_keys`).
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
import zlib
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize, stats

from .results import feature_columns

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
OPTIONAL_GROUP_KEYS: tuple[str, ...] = ("weights", "dtype", "gpu_name")
#: Phases of a request, for :func:`phase_scaling`.
PHASES: tuple[str, ...] = ("prefill", "decode")

# Bootstrap matrices larger than this many elements are drawn in chunks (memory, not speed).
_BOOT_CHUNK_ELEMS = 4_000_000
# Up to this many pairs, correlation p-values come from the exact permutation distribution
# (n! orderings; 7! = 5040 is fast): the t approximation is poor there and gives p = 0 at |r| = 1.
EXACT_P_MAX_N = 7


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


def _nan_high(s: pd.Series) -> np.ndarray:
    """Sort key where NaN ("as found" = the default setting) ranks above every number."""
    v = pd.to_numeric(s, errors="coerce").to_numpy(dtype=float)
    return np.where(np.isnan(v), np.inf, v)


def with_clock_mhz(requests: pd.DataFrame, group_keys: Sequence[str] | None = None) -> pd.DataFrame:
    """A copy of ``requests`` with ``clock_mhz`` (MHz) and ``observe`` (bool) columns.

    ``clock_mhz`` is the requested SM clock; for observe-mode rows (requested NaN) it is the
    median observed SM clock of that row's group and clock point, so all rows of one clock
    point share one position on the clock axis. NaN when neither is known.
    """
    keys = list(group_keys) if group_keys is not None else default_group_keys(requests)
    df = requests.copy(deep=False)
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


def _rng(seed: int, *parts: Any) -> np.random.Generator:
    # One stream per (group, clock point, metric): results do not depend on group order.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF] + [zlib.crc32(repr(p).encode()) for p in parts])


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------
def center_column(metric: str) -> str:
    """Name of the summary column holding ``metric``'s central value: ``<metric>_median``, or
    ``<metric>_mean`` for metrics listed in :data:`CENTER` (quality)."""
    return f"{metric}_{CENTER.get(metric, 'median')}"


def bootstrap_medians(values: np.ndarray, n_boot: int, rng: np.random.Generator,
                      stat: str = "median") -> np.ndarray:
    """``n_boot`` medians (or means, ``stat="mean"``) of resamples with replacement of
    ``values``; vectorised (one ``n_boot × n`` index draw, in chunks for very large n).

    Returns an empty array when ``values`` is empty. NaNs must be removed by the caller.
    """
    if stat not in ("median", "mean"):
        raise ValueError(f"stat must be 'median' or 'mean', got {stat!r}")
    v = np.sort(np.asarray(values, dtype=float))
    n = v.size
    if n == 0 or n_boot <= 0:
        return np.empty(0)
    out = np.empty(n_boot)
    step = max(1, _BOOT_CHUNK_ELEMS // n)
    lo, hi = (n - 1) // 2, n // 2
    for i in range(0, n_boot, step):
        m = min(step, n_boot - i)
        idx = rng.integers(0, n, size=(m, n), dtype=np.int64 if n > 2**31 - 1 else np.int32)
        if stat == "mean":
            out[i:i + m] = v[idx].mean(axis=1)
        else:
            # v is sorted, so the median of v[idx] is v at the median of idx: sorting small
            # integer rows is several times faster than a float median of the gathered values.
            idx.sort(axis=1)
            out[i:i + m] = 0.5 * (v[idx[:, lo]] + v[idx[:, hi]])
    return out


def median_ci(values: Iterable[float], *, n_boot: int = 2000, ci: float = 0.95,
              seed: int = 0) -> tuple[float, float, float]:
    """Median of ``values`` (NaNs ignored) and its percentile-bootstrap ``ci`` interval.

    Returns ``(median, low, high)``; ``low``/``high`` are NaN with fewer than 2 finite values
    (one sample says nothing about spread), all three are NaN with none.
    """
    v = np.asarray(list(values), dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return (math.nan, math.nan, math.nan)
    med = float(np.median(v))
    if v.size < 2:
        return (med, math.nan, math.nan)
    boots = bootstrap_medians(v, n_boot, np.random.default_rng(seed))
    lo, hi = np.percentile(boots, [50 * (1 - ci), 50 * (1 + ci)])
    return (med, float(lo), float(hi))


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
        ``sm_mhz_observed_median/min/max``, ``clock_event_reasons`` (OR over the rows),
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
        df["quality"] = df["quality"].where(df["quality_valid"].astype(bool))
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
            reasons = pd.to_numeric(g["clock_event_reasons"], errors="coerce").dropna().astype("int64")
            row["clock_event_reasons"] = int(np.bitwise_or.reduce(reasons[reasons > 0].to_numpy(), initial=0))
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
            bm = bootstrap_medians(v, n_boot, _rng(seed, key, m), stat) if v.size >= 2 else np.empty(0)
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


# --------------------------------------------------------------------------------------------
# phase scaling fits
# --------------------------------------------------------------------------------------------
def _fit_quality(y: np.ndarray, yhat: np.ndarray) -> tuple[float, float]:
    res = y - yhat
    sse = float(np.sum(res ** 2))
    sst = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - sse / sst if sst > 0 else math.nan
    return r2, math.sqrt(sse / y.size)


def _clean_xy(f_mhz: Iterable[float], y: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(list(f_mhz), dtype=float)
    v = np.asarray(list(y), dtype=float)
    ok = np.isfinite(f) & np.isfinite(v) & (f > 0)
    return f[ok], v[ok]


def fit_time_model(f_mhz: Iterable[float], time_s: Iterable[float]) -> dict[str, Any]:
    """Fit ``time_s ≈ a + b / f_mhz`` (a in s, b in s·MHz) by least squares (scipy curve_fit).

    Returns a dict: ``a``, ``b``, ``r2``, ``rmse`` (s), ``n`` (points used), ``status``
    (``ok`` or ``not enough data: ...`` with NaN parameters when fewer than 3 distinct clocks).
    """
    f, t = _clean_xy(f_mhz, time_s)
    out: dict[str, Any] = {"a": math.nan, "b": math.nan, "r2": math.nan, "rmse": math.nan,
                           "n": int(f.size), "status": "ok"}
    if np.unique(f).size < 3:
        out["status"] = f"not enough data: {np.unique(f).size} distinct clocks, need >= 3"
        return out
    A = np.column_stack([np.ones_like(f), 1.0 / f])
    p0 = np.linalg.lstsq(A, t, rcond=None)[0]
    try:
        (a, b), _ = optimize.curve_fit(lambda x, a, b: a + b / x, f, t, p0=p0, maxfev=10000)
    except (RuntimeError, optimize.OptimizeWarning):  # lstsq is already the LS optimum
        a, b = p0
    out.update(a=float(a), b=float(b))
    out["r2"], out["rmse"] = _fit_quality(t, a + b / f)
    return out


def fit_power_model(f_mhz: Iterable[float], power_w: Iterable[float]) -> dict[str, Any]:
    """Fit ``power_w ≈ c + d · f_mhz**k`` (c in W, d in W/MHz^k, k dimensionless, 0.05..10).

    The clock is scaled by its maximum inside the fit (conditioning); ``k`` is first chosen on
    a grid with (c, d) solved linearly, then refined by scipy ``curve_fit``.

    Returns a dict: ``c``, ``d``, ``k``, ``r2``, ``rmse`` (W), ``n``, ``status`` (``ok``;
    ``not enough data: ...`` when fewer than 4 distinct clocks; ``grid fit (curve_fit did not
    converge)``).
    """
    f, p = _clean_xy(f_mhz, power_w)
    out: dict[str, Any] = {"c": math.nan, "d": math.nan, "k": math.nan, "r2": math.nan,
                           "rmse": math.nan, "n": int(f.size), "status": "ok"}
    if np.unique(f).size < 4:
        out["status"] = f"not enough data: {np.unique(f).size} distinct clocks, need >= 4"
        return out
    fref = float(f.max())
    x = f / fref
    best = (math.inf, 0.0, 0.0, 1.0)
    for k in np.linspace(0.1, 8.0, 80):
        A = np.column_stack([np.ones_like(x), x ** k])
        (c, d), *_ = np.linalg.lstsq(A, p, rcond=None)
        sse = float(np.sum((A @ np.array([c, d]) - p) ** 2))
        if sse < best[0]:
            best = (sse, c, d, k)
    _, c, d, k = best
    model = lambda x, c, d, k: c + d * x ** k  # noqa: E731
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optimize.OptimizeWarning)
            (c, d, k), _ = optimize.curve_fit(model, x, p, p0=[c, d, k],
                                              bounds=([-np.inf, -np.inf, 0.05], [np.inf, np.inf, 10.0]),
                                              maxfev=20000)
    except (RuntimeError, ValueError):
        out["status"] = "grid fit (curve_fit did not converge)"
    out.update(c=float(c), d=float(d / fref ** k), k=float(k))
    out["r2"], out["rmse"] = _fit_quality(p, model(x, c, d, k))
    return out


def phase_metrics(requests: pd.DataFrame) -> pd.DataFrame:
    """Per request and phase: time, average power and energy per token.

    Rows: the request's columns plus ``phase``, ``phase_time_s`` (prefill: ``ttft_s`` per
    request; decode: ``tpot_s`` per token), ``phase_power_w`` (phase energy / phase duration;
    decode duration = ``latency_s - ttft_s``), ``phase_j_per_token`` (prefill: J per input token,
    ``prefill_energy_j / tokens_in``; decode: ``decode_energy_j / (tokens_out - 1)``). Values
    that cannot be formed (no decode tokens, zero durations, missing energy) are NaN.
    """
    def num(c: str) -> np.ndarray:
        return pd.to_numeric(requests[c], errors="coerce").to_numpy(dtype=float)

    ttft, tpot, lat = num("ttft_s"), num("tpot_s"), num("latency_s")
    e_pre, e_dec = num("prefill_energy_j"), num("decode_energy_j")
    tin, tout = num("tokens_in"), num("tokens_out")
    with np.errstate(divide="ignore", invalid="ignore"):
        dec_time = lat - ttft
        dec_tok = tout - 1
        parts = {
            "prefill": (ttft, np.where(ttft > 0, e_pre / ttft, np.nan),
                        np.where(tin > 0, e_pre / tin, np.nan)),
            "decode": (np.where(dec_tok > 0, tpot, np.nan), np.where(dec_time > 0, e_dec / dec_time, np.nan),
                       np.where(dec_tok > 0, e_dec / dec_tok, np.nan)),
        }
    frames = []
    for phase in PHASES:
        t, p, e = parts[phase]
        f = requests.copy()
        f["phase"] = phase
        f["phase_time_s"] = t
        f["phase_power_w"] = p
        f["phase_j_per_token"] = e
        frames.append(f)
    return pd.concat(frames, ignore_index=True)


def phase_points(requests: pd.DataFrame, *, group_keys: Sequence[str] | None = None) -> pd.DataFrame:
    """Median phase time / power / J-per-token per group × clock point × phase (the points
    that :func:`phase_scaling` fits). Columns: group and clock keys, ``clock_mhz``, ``phase``,
    ``n``, ``phase_time_s``, ``phase_power_w``, ``phase_j_per_token`` (medians)."""
    keys = list(group_keys) if group_keys is not None else default_group_keys(requests)
    df = phase_metrics(with_clock_mhz(requests, keys))
    pkeys = keys + list(CLOCK_KEYS) + ["phase"]
    cols = ["phase_time_s", "phase_power_w", "phase_j_per_token"]
    if df.empty:
        return pd.DataFrame(columns=pkeys + ["clock_mhz", "n"] + cols)
    g = df.groupby(pkeys, dropna=False, sort=True)
    out = g[cols].median()
    out["clock_mhz"] = g["clock_mhz"].first()
    out["n"] = g.size()
    return out.reset_index()[pkeys + ["clock_mhz", "n"] + cols]


def phase_scaling(requests: pd.DataFrame, *, group_keys: Sequence[str] | None = None,
                  grid_points: int = 2001) -> pd.DataFrame:
    """How time and power scale with the SM clock, per group × memory clock × power limit × phase.

    Fits :func:`fit_time_model` and :func:`fit_power_model` to the per-clock-point medians of
    :func:`phase_points` (x = ``clock_mhz``), then finds the clock that minimises energy per
    token: from the fits (argmin of ``power(f) · time(f)`` on a grid over the measured clock
    range, no extrapolation) and from the data (the clock point with the lowest median
    ``phase_j_per_token``).

    Returns one row per fit group and phase: keys, ``phase``, ``n_points``, ``f_min_mhz``,
    ``f_max_mhz``, ``time_a_s``, ``time_b_s_mhz``, ``time_r2``, ``time_rmse_s``, ``power_c_w``,
    ``power_d_w_per_mhz_k``, ``power_k``, ``power_r2``, ``power_rmse_w``,
    ``power_dyn_at_f_max_w`` (= d·f_max^k, the readable size of d), ``f_opt_fit_mhz``,
    ``f_opt_data_mhz``, ``j_per_token_at_opt_data``, ``j_per_token_at_f_max``,
    ``saving_at_opt_data_pct``, ``status`` (``ok`` or why a fit is missing).
    """
    keys = list(group_keys) if group_keys is not None else default_group_keys(requests)
    pts = phase_points(requests, group_keys=keys)
    fkeys = keys + ["mem_mhz_requested", "power_limit_w_requested", "phase"]
    rows = []
    for key, g in pts.groupby(fkeys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(fkeys, key))
        f = g["clock_mhz"].to_numpy(dtype=float)
        tf = fit_time_model(f, g["phase_time_s"])
        pf = fit_power_model(f, g["phase_power_w"])
        fin = f[np.isfinite(f)]
        row.update(n_points=int(np.unique(fin).size),
                   f_min_mhz=float(fin.min()) if fin.size else math.nan,
                   f_max_mhz=float(fin.max()) if fin.size else math.nan,
                   time_a_s=tf["a"], time_b_s_mhz=tf["b"], time_r2=tf["r2"], time_rmse_s=tf["rmse"],
                   power_c_w=pf["c"], power_d_w_per_mhz_k=pf["d"], power_k=pf["k"],
                   power_r2=pf["r2"], power_rmse_w=pf["rmse"])
        row["power_dyn_at_f_max_w"] = (pf["d"] * row["f_max_mhz"] ** pf["k"]
                                       if np.isfinite(pf["d"]) else math.nan)
        if tf["status"] == "ok" and np.isfinite(pf["c"]):
            grid = np.linspace(row["f_min_mhz"], row["f_max_mhz"], grid_points)
            e = (pf["c"] + pf["d"] * grid ** pf["k"]) * (tf["a"] + tf["b"] / grid)
            row["f_opt_fit_mhz"] = float(grid[int(np.argmin(e))])
        else:
            row["f_opt_fit_mhz"] = math.nan
        e_data = g["phase_j_per_token"].to_numpy(dtype=float)
        okd = np.isfinite(e_data) & np.isfinite(f)
        if okd.any():
            i = int(np.argmin(np.where(okd, e_data, np.inf)))
            row["f_opt_data_mhz"] = float(f[i])
            row["j_per_token_at_opt_data"] = float(e_data[i])
            j = int(np.argmax(np.where(okd, f, -np.inf)))
            row["j_per_token_at_f_max"] = float(e_data[j])
            row["saving_at_opt_data_pct"] = (1 - e_data[i] / e_data[j]) * 100 if e_data[j] else math.nan
        else:
            row.update(f_opt_data_mhz=math.nan, j_per_token_at_opt_data=math.nan,
                       j_per_token_at_f_max=math.nan, saving_at_opt_data_pct=math.nan)
        why = [f"time: {tf['status']}"] if tf["status"] != "ok" else []
        why += [f"power: {pf['status']}"] if pf["status"] != "ok" else []
        row["status"] = "ok" if not why else "; ".join(why)
        rows.append(row)
    cols = fkeys + ["n_points", "f_min_mhz", "f_max_mhz", "time_a_s", "time_b_s_mhz", "time_r2",
                    "time_rmse_s", "power_c_w", "power_d_w_per_mhz_k", "power_k", "power_r2",
                    "power_rmse_w", "power_dyn_at_f_max_w", "f_opt_fit_mhz", "f_opt_data_mhz", "j_per_token_at_opt_data",
                    "j_per_token_at_f_max", "saving_at_opt_data_pct", "status"]
    return pd.DataFrame(rows, columns=cols)


# --------------------------------------------------------------------------------------------
# features: correlations and regression
# --------------------------------------------------------------------------------------------
def bh_qvalues(p: Iterable[float]) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (false discovery rate); NaNs stay NaN."""
    p = np.asarray(list(p), dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.clip(ranked, 0, 1)
    q[ok] = res
    return q


def _analysis_groups(requests: pd.DataFrame, group_keys: Sequence[str] | None, per_clock: bool
                     ) -> tuple[pd.DataFrame, list[str]]:
    keys = list(group_keys) if group_keys is not None else default_group_keys(requests)
    df = with_clock_mhz(requests, keys)
    if per_clock:
        keys = keys + list(CLOCK_KEYS)
    return df, keys


def feature_correlations(requests: pd.DataFrame, *, features: Sequence[str] | None = None,
                         targets: Sequence[str] = ("energy_j", "latency_s"),
                         group_keys: Sequence[str] | None = None, per_clock: bool = True,
                         min_n: int = 3) -> pd.DataFrame:
    """Pearson and Spearman correlation (with two-sided p-values) of every feature with every
    target, per group (and per clock point when ``per_clock``: energy differs by clock far more
    than by prompt, so pooling clocks would mostly measure the clock).

    Args:
        features: columns to correlate; default all ``feat_*`` columns.
        targets: request columns, e.g. ``energy_j``, ``latency_s``, ``j_per_token``.
        min_n: fewer paired finite values than this gives NaN statistics.

    Returns one row per group × feature × target: keys, ``clock_mhz`` (when per clock),
    ``feature``, ``target``, ``n``, ``pearson_r``, ``pearson_p``, ``spearman_rho``,
    ``spearman_p``, ``pearson_q``/``spearman_q`` (Benjamini–Hochberg over the whole table:
    many tests are run at once), ``p_method`` (``exact permutation`` for n <=
    :data:`EXACT_P_MAX_N`, else ``t approximation``; p is never below 2/n!, the smallest
    p-value any test on n pairs can honestly give), and ``note`` (``constant feature``,
    ``constant target``, ``n < min_n`` or empty). No features gives an empty table.
    """
    features = list(features) if features is not None else feature_columns(requests)
    df, keys = _analysis_groups(requests, group_keys, per_clock)
    cols = keys + (["clock_mhz"] if per_clock else []) + [
        "feature", "target", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p",
        "pearson_q", "spearman_q", "p_method", "note"]
    rows = []
    if not features or df.empty:
        return pd.DataFrame(columns=cols)
    perm = getattr(stats, "PermutationMethod", None)  # scipy >= 1.11
    for key, g in df.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        base = dict(zip(keys, key))
        if per_clock:
            base["clock_mhz"] = float(g["clock_mhz"].iloc[0])
        for t in targets:
            y_all = pd.to_numeric(g[t], errors="coerce").to_numpy(dtype=float)
            for feat in features:
                x_all = pd.to_numeric(g[feat], errors="coerce").to_numpy(dtype=float)
                ok = np.isfinite(x_all) & np.isfinite(y_all)
                x, y = x_all[ok], y_all[ok]
                row = dict(base, feature=feat, target=t, n=int(ok.sum()), pearson_r=math.nan,
                           pearson_p=math.nan, spearman_rho=math.nan, spearman_p=math.nan, p_method="",
                           note="")
                if x.size < min_n:
                    row["note"] = f"n < {min_n}"
                elif np.ptp(x) == 0:
                    row["note"] = "constant feature"
                elif np.ptp(y) == 0:
                    row["note"] = "constant target"
                else:
                    if x.size <= EXACT_P_MAX_N and perm is not None:
                        pm = perm(n_resamples=np.inf)
                        pr = stats.pearsonr(x, y, method=pm)
                        sr = stats.pearsonr(stats.rankdata(x), stats.rankdata(y), method=pm)
                        row["p_method"] = "exact permutation"
                    else:
                        pr = stats.pearsonr(x, y)
                        sr = stats.spearmanr(x, y)
                        row["p_method"] = "t approximation"
                    p_floor = 2.0 * math.exp(-math.lgamma(x.size + 1))
                    row.update(pearson_r=float(pr[0]), pearson_p=max(float(pr[1]), p_floor),
                               spearman_rho=float(sr[0]), spearman_p=max(float(sr[1]), p_floor))
                rows.append(row)
    out = pd.DataFrame(rows)
    out["pearson_q"] = bh_qvalues(out["pearson_p"])
    out["spearman_q"] = bh_qvalues(out["spearman_p"])
    return out[cols]


def _regress_one(X: pd.DataFrame, y: np.ndarray, *, missing_frac: float = 0.5
                 ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """OLS of standardised y on standardised X. Returns (group stats, per-feature stats)."""
    feats: dict[str, dict[str, Any]] = {
        f: {"beta": math.nan, "coef": math.nan, "se": math.nan, "p_value": math.nan, "note": ""}
        for f in X.columns}
    yok = np.isfinite(y)
    Xv = X.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    cand = []
    for j, f in enumerate(X.columns):
        frac = np.isfinite(Xv[yok, j]).mean() if yok.any() else 0.0
        if frac == 0:
            feats[f]["note"] = "no data"
        elif frac < 1 - missing_frac:
            feats[f]["note"] = f"mostly missing ({frac:.0%} present)"
        else:
            cand.append(j)
    rows_ok = yok & np.isfinite(Xv[:, cand]).all(axis=1) if cand else yok
    Xc, yc = Xv[rows_ok][:, cand], y[rows_ok]
    n = int(rows_ok.sum())
    gstat: dict[str, Any] = {"n": n, "p": 0, "r2": math.nan, "adj_r2": math.nan, "status": "ok"}
    varying = []
    for pos, j in enumerate(cand):
        if n == 0 or np.ptp(Xc[:, pos]) == 0:
            feats[X.columns[j]]["note"] = "constant"
        else:
            varying.append(pos)
    # With too few rows every extra feature looks "collinear" (rank <= n - 1): say what it is.
    if varying and n < len(varying) + 2:
        gstat["p"] = len(varying)
        gstat["status"] = (f"not enough data: n={n} rows for p={len(varying)} features, "
                           f"need n >= {len(varying) + 2}")
        return gstat, feats
    keep: list[int] = []  # positions within cand
    for pos in varying:
        j = cand[pos]
        col = Xc[:, pos]
        z = (col - col.mean()) / col.std()
        if keep:
            K = np.column_stack([(Xc[:, q] - Xc[:, q].mean()) / Xc[:, q].std() for q in keep])
            sol, *_ = np.linalg.lstsq(K, z, rcond=None)
            resid = z - K @ sol
            # z has unit variance: residual variance is 1 - R² of z on the kept features.
            if float(np.mean(resid ** 2)) < 1e-8:
                partners = [X.columns[cand[q]] for q, s in zip(keep, sol) if abs(s) > 1e-6]
                feats[X.columns[j]]["note"] = "collinear with " + ", ".join(partners)
                continue
        keep.append(pos)
    p = len(keep)
    gstat["p"] = p
    if p == 0:
        gstat["status"] = "no usable features"
        return gstat, feats
    if n < p + 2:
        gstat["status"] = f"not enough data: n={n} rows for p={p} features, need n >= {p + 2}"
        return gstat, feats
    if np.ptp(yc) == 0:
        gstat["status"] = "target is constant"
        return gstat, feats
    Z = np.column_stack([(Xc[:, q] - Xc[:, q].mean()) / Xc[:, q].std() for q in keep])
    sy = yc.std()
    zy = (yc - yc.mean()) / sy
    beta, *_ = np.linalg.lstsq(Z, zy, rcond=None)
    resid = zy - Z @ beta
    sse = float(resid @ resid)
    r2 = 1.0 - sse / float(zy @ zy)
    dof = n - p - 1
    gstat["r2"] = r2
    gstat["adj_r2"] = 1.0 - (1.0 - r2) * (n - 1) / dof
    try:
        cov = (sse / dof) * np.linalg.inv(Z.T @ Z)
        se = np.sqrt(np.clip(np.diag(cov), 0, None))
    except np.linalg.LinAlgError:
        se = np.full(p, np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        tval = beta / se
    pval = 2 * stats.t.sf(np.abs(tval), dof)
    for i, q in enumerate(keep):
        f = X.columns[cand[q]]
        sx = Xc[:, q].std()
        feats[f].update(beta=float(beta[i]), coef=float(beta[i] * sy / sx), se=float(se[i]),
                        p_value=float(pval[i]) if np.isfinite(pval[i]) else math.nan)
    return gstat, feats


def feature_regression(requests: pd.DataFrame, *, target: str = "energy_j",
                       features: Sequence[str] | None = None, group_keys: Sequence[str] | None = None,
                       per_clock: bool = True) -> pd.DataFrame:
    """Multiple linear regression of ``target`` on the features, per group (× clock point).

    Features and target are standardised (z-scores), so ``beta`` is the change of the target in
    standard deviations per standard deviation of the feature, holding the others fixed;
    ``coef`` is the same in raw units (target unit per feature unit). Features that are
    constant, mostly missing (> 50 % NaN) or collinear with earlier ones are dropped and say
    so in ``note``; remaining rows with any NaN are dropped. With fewer than p + 2 rows the
    group gets ``status`` ``not enough data: ...`` and NaN coefficients instead of an error.

    Returns one row per group × feature: keys, ``clock_mhz`` (when per clock), ``target``,
    ``feature``, ``beta``, ``coef``, ``se`` (of beta), ``p_value`` (t-test), ``note``, and the
    group's ``n`` (rows used), ``p`` (features used), ``r2``, ``adj_r2``, ``status``.
    No features gives an empty table.
    """
    features = list(features) if features is not None else feature_columns(requests)
    df, keys = _analysis_groups(requests, group_keys, per_clock)
    cols = keys + (["clock_mhz"] if per_clock else []) + [
        "target", "feature", "beta", "coef", "se", "p_value", "note", "n", "p", "r2", "adj_r2", "status"]
    rows = []
    if not features or df.empty:
        return pd.DataFrame(columns=cols)
    for key, g in df.groupby(keys, dropna=False, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        base = dict(zip(keys, key))
        if per_clock:
            base["clock_mhz"] = float(g["clock_mhz"].iloc[0])
        y = pd.to_numeric(g[target], errors="coerce").to_numpy(dtype=float)
        gstat, feats = _regress_one(g[features], y)
        for f in features:
            rows.append(dict(base, target=target, feature=f, **feats[f], **gstat))
    return pd.DataFrame(rows, columns=cols)
