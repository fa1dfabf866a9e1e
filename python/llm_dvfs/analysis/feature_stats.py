"""Which input features go with energy and latency: correlations and multiple regression.

Per group (and per clock point): Pearson/Spearman correlations with Benjamini–Hochberg q-values
(:func:`feature_correlations`) and a standardised OLS (:func:`feature_regression`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from llm_dvfs.analysis.stats import bh_qvalues
from llm_dvfs.analysis.summary import CLOCK_KEYS, default_group_keys, with_clock_mhz
from llm_dvfs.schema import feature_columns

# Up to this many pairs, correlation p-values come from the exact permutation distribution
# (n! orderings; 7! = 5040 is fast): the t approximation is poor there and gives p = 0 at |r| = 1.
EXACT_P_MAX_N = 7


def _analysis_groups(requests: pd.DataFrame, group_keys: Sequence[str] | None, per_clock: bool
                     ) -> tuple[list[str], list[tuple[dict[str, Any], pd.DataFrame]]]:
    """The key columns of a result table (the group keys, then the clock keys and
    ``clock_mhz`` when ``per_clock``) and, per group in key order (NaN keys kept), its key
    values as a row dict and its requests. No requests: no groups."""
    keys = list(group_keys) if group_keys is not None else default_group_keys(requests)
    df = with_clock_mhz(requests, keys)
    if per_clock:
        keys = keys + list(CLOCK_KEYS)
    groups = []
    if not df.empty:
        for key, g in df.groupby(keys, dropna=False, sort=True):
            base = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
            if per_clock:
                base["clock_mhz"] = float(g["clock_mhz"].iloc[0])
            groups.append((base, g))
    return keys + (["clock_mhz"] if per_clock else []), groups


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
    key_cols, groups = _analysis_groups(requests, group_keys, per_clock)
    cols = key_cols + [
        "feature", "target", "n", "pearson_r", "pearson_p", "spearman_rho", "spearman_p",
        "pearson_q", "spearman_q", "p_method", "note"]
    rows = []
    if not features or not groups:
        return pd.DataFrame(columns=cols)
    for base, g in groups:
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
                    if x.size <= EXACT_P_MAX_N:
                        pm = stats.PermutationMethod(n_resamples=np.inf)
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
    key_cols, groups = _analysis_groups(requests, group_keys, per_clock)
    cols = key_cols + [
        "target", "feature", "beta", "coef", "se", "p_value", "note", "n", "p", "r2", "adj_r2", "status"]
    rows = []
    if not features or not groups:
        return pd.DataFrame(columns=cols)
    for base, g in groups:
        y = pd.to_numeric(g[target], errors="coerce").to_numpy(dtype=float)
        gstat, feats = _regress_one(g[features], y)
        for f in features:
            rows.append(dict(base, target=target, feature=f, **feats[f], **gstat))
    return pd.DataFrame(rows, columns=cols)
