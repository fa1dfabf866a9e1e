"""How time and power scale with the SM clock: the phase models and the energy-optimal clock.

``time ≈ a + b/f`` and ``power ≈ c + d·f^k`` per phase (prefill, decode), fitted to the
per-clock-point medians; see :func:`phase_scaling`. Tables follow :mod:`llm_dvfs.schema`.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import optimize

from llm_dvfs.analysis.summary import CLOCK_KEYS, default_group_keys, with_clock_mhz

#: Phases of a request, for :func:`phase_scaling`.
PHASES: tuple[str, ...] = ("prefill", "decode")


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
    """Fit ``time_s ≈ a + b / f_mhz`` (a in s, b in s·MHz) by least squares.

    The model is linear in (a, b) (regressors 1 and 1/f), so the least-squares optimum is the
    solution of a linear problem (:func:`numpy.linalg.lstsq`); no iterative fit is needed.

    Returns a dict: ``a``, ``b``, ``r2``, ``rmse`` (s), ``n`` (points used), ``status``
    (``ok`` or ``not enough data: ...`` with NaN parameters when fewer than 3 distinct clocks).
    Non-finite values and clocks <= 0 are dropped first.
    """
    f, t = _clean_xy(f_mhz, time_s)
    out: dict[str, Any] = {"a": math.nan, "b": math.nan, "r2": math.nan, "rmse": math.nan,
                           "n": int(f.size), "status": "ok"}
    if np.unique(f).size < 3:
        out["status"] = f"not enough data: {np.unique(f).size} distinct clocks, need >= 3"
        return out
    A = np.column_stack([np.ones_like(f), 1.0 / f])
    a, b = np.linalg.lstsq(A, t, rcond=None)[0]
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
