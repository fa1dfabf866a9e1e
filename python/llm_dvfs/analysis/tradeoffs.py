"""The trade-offs DVFS studies report: energy–delay products, saving vs slowdown, power per cell.

Pure functions over the tables of :func:`llm_dvfs.analysis.summary.summarize` and the run's
``power`` table (:mod:`llm_dvfs.schema`); the report draws them
(:mod:`llm_dvfs.analysis.plots`) and writes them as ``edp.csv``, ``edp_optima.csv`` and
``cell_power.csv``.

- **EDP and ED²P.** Per group × clock point, from the medians of the summary:
  ``EDP = E · t`` (J·s) and ``ED²P = E · t²`` (J·s²), with E the median energy per request and
  t the median latency per request. ED²P weighs time more (it is independent of a V ∝ f
  voltage scaling to first order), EDP balances both, E alone ignores time. Normalised to the
  group's reference (its highest clock): a value below 1 is better than running at the top.
- **Saving vs slowdown.** ``saving_pct`` = −Δ energy % and ``slowdown_pct`` = Δ latency % vs
  the reference, one point per clock point; the Pareto points (no other point saves more with
  less slowdown) are those of :func:`llm_dvfs.analysis.summary.pareto_frontier`.
- **Power per cell.** Per cell (and device and source) of the power trace: duration, number of
  samples, time-weighted mean power, peak and energy, integrating each sample until the next
  (zero-order hold, as the meter does).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from llm_dvfs.analysis.summary import CLOCK_KEYS

#: Power sources in the order a cell's numbers prefer them (the meter's order of precision).
SOURCE_PREFERENCE: tuple[str, ...] = ("buffer", "instant", "average")

EDP_COLUMNS = ["clock_mhz", "clock_label", "is_reference", "n", "energy_j", "latency_s", "edp_j_s",
               "ed2p_j_s2", "edp_rel", "ed2p_rel", "saving_pct", "slowdown_pct", "pareto", "edp_min", "ed2p_min"]


def edp_table(summary: pd.DataFrame, group_keys: Sequence[str]) -> pd.DataFrame:
    """EDP, ED²P, saving and slowdown per group × clock point (see the module docstring).

    Returns the group and clock columns, then :data:`EDP_COLUMNS`: ``energy_j`` (J) and
    ``latency_s`` (s) are the summary's medians, ``edp_j_s`` (J·s), ``ed2p_j_s2`` (J·s²),
    ``edp_rel``/``ed2p_rel`` (÷ the reference's; NaN when the reference has none),
    ``saving_pct``/``slowdown_pct`` (%), ``pareto`` (bool), ``edp_min``/``ed2p_min`` (the
    group's lowest, only with two or more finite points). Rows without energy or latency have
    NaN products and are never minima. An empty summary gives an empty table.
    """
    keys = list(group_keys)
    cols = keys + list(CLOCK_KEYS) + EDP_COLUMNS
    if summary.empty:
        return pd.DataFrame(columns=cols)
    out = summary[keys + list(CLOCK_KEYS) + ["clock_mhz", "clock_label", "is_reference", "n", "pareto"]].copy()
    e = pd.to_numeric(summary["energy_j_median"], errors="coerce").to_numpy(dtype=float)
    t = pd.to_numeric(summary["latency_s_median"], errors="coerce").to_numpy(dtype=float)
    out["energy_j"], out["latency_s"] = e, t
    out["edp_j_s"] = e * t
    out["ed2p_j_s2"] = e * t * t
    out["saving_pct"] = 0.0 - pd.to_numeric(summary["energy_j_delta_pct"], errors="coerce").to_numpy(dtype=float)
    out["slowdown_pct"] = pd.to_numeric(summary["latency_s_delta_pct"], errors="coerce").to_numpy(dtype=float)
    out["pareto"] = out["pareto"].astype(bool)
    for c in ("edp_rel", "ed2p_rel"):
        out[c] = math.nan
    out["edp_min"] = out["ed2p_min"] = False
    groups = out.groupby(keys, dropna=False, sort=False).indices if keys else {(): np.arange(len(out))}
    for _, idx in groups.items():
        idx = np.asarray(idx)
        ref = idx[out["is_reference"].to_numpy(dtype=bool)[idx]]
        for prod, rel, flag in (("edp_j_s", "edp_rel", "edp_min"), ("ed2p_j_s2", "ed2p_rel", "ed2p_min")):
            v = out[prod].to_numpy(dtype=float)[idx]
            r = float(out[prod].iloc[ref[0]]) if len(ref) else math.nan
            if np.isfinite(r) and r > 0:
                out.iloc[idx, out.columns.get_loc(rel)] = v / r
            ok = np.isfinite(v)
            if ok.sum() >= 2:
                out.iloc[idx[int(np.argmin(np.where(ok, v, np.inf)))], out.columns.get_loc(flag)] = True
    return out[cols].reset_index(drop=True)


def edp_optima(edp: pd.DataFrame, group_keys: Sequence[str]) -> pd.DataFrame:
    """Per group: the clock point with the lowest EDP and the one with the lowest ED²P, and
    their values relative to the reference (highest clock).

    Returns ``n_points``, ``ref_label``, ``edp_label``, ``edp_clock_mhz``, ``edp_rel``,
    ``ed2p_label``, ``ed2p_clock_mhz``, ``ed2p_rel`` and ``status`` (``ok``, ``one clock
    point`` or ``no energy data``) after the group columns.
    """
    keys = list(group_keys)
    cols = keys + ["n_points", "ref_label", "edp_label", "edp_clock_mhz", "edp_rel", "ed2p_label",
                   "ed2p_clock_mhz", "ed2p_rel", "status"]
    rows: list[dict[str, Any]] = []
    if edp.empty:
        return pd.DataFrame(columns=cols)
    for key, g in edp.groupby(keys, dropna=False, sort=False) if keys else [((), edp)]:
        key = key if isinstance(key, tuple) else (key,)
        row: dict[str, Any] = dict(zip(keys, key))
        row["n_points"] = int(len(g))
        ref = g[g["is_reference"].astype(bool)]
        row["ref_label"] = ref["clock_label"].iloc[0] if len(ref) else None
        finite = np.isfinite(g["edp_j_s"].to_numpy(dtype=float))
        row["status"] = "ok" if finite.sum() >= 2 else ("one clock point" if len(g) < 2 else "no energy data")
        for p, flag in (("edp", "edp_min"), ("ed2p", "ed2p_min")):
            best = g[g[flag].astype(bool)]
            if len(best):
                b = best.iloc[0]
                row.update({f"{p}_label": b["clock_label"], f"{p}_clock_mhz": float(b["clock_mhz"]),
                            f"{p}_rel": float(b[f"{p}_rel"])})
            else:
                row.update({f"{p}_label": None, f"{p}_clock_mhz": math.nan, f"{p}_rel": math.nan})
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def cell_power(power: pd.DataFrame | None) -> pd.DataFrame:
    """Per cell × device × source of the power trace: ``n_samples``, ``t_start_s`` (host
    monotonic s), ``duration_s`` (first to last sample), ``mean_power_w`` (time-weighted),
    ``peak_power_w``, ``energy_j`` (zero-order hold: each sample until the next; the last
    sample adds nothing), and ``preferred`` (the source of the cell the report shows: the first
    of :data:`SOURCE_PREFERENCE` present). Null samples are skipped. None or an empty table
    gives an empty table.
    """
    cols = ["cell_id", "device", "source", "n_samples", "t_start_s", "duration_s", "mean_power_w",
            "peak_power_w", "energy_j", "preferred"]
    if power is None or power.empty:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame({
        "cell_id": power["cell_id"].astype("string").to_numpy(dtype=object, na_value=None),
        "device": pd.to_numeric(power["device"], errors="coerce").to_numpy(dtype=float, na_value=np.nan),
        "source": power["source"].astype("string").to_numpy(dtype=object, na_value=None),
        "t_s": pd.to_numeric(power["t_s"], errors="coerce").to_numpy(dtype=float, na_value=np.nan),
        "power_w": pd.to_numeric(power["power_w"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)})
    df = df[np.isfinite(df["t_s"]) & np.isfinite(df["power_w"])]
    rows = []
    order = list(dict.fromkeys(df["cell_id"]))  # cells in the order the run wrote them
    for (cell, dev, src), g in df.groupby(["cell_id", "device", "source"], dropna=False, sort=False):
        g = g.sort_values("t_s", kind="stable")
        t, p = g["t_s"].to_numpy(), g["power_w"].to_numpy()
        dur = float(t[-1] - t[0])
        energy = float(np.sum(p[:-1] * np.diff(t)))
        rows.append({"cell_id": cell, "device": int(dev) if np.isfinite(dev) else None, "source": src,
                     "n_samples": int(len(t)), "t_start_s": float(t[0]), "duration_s": dur,
                     "mean_power_w": energy / dur if dur > 0 else float(p[0]),
                     "peak_power_w": float(p.max()), "energy_j": energy})
    out = pd.DataFrame(rows, columns=cols[:-1])
    if out.empty:
        return pd.DataFrame(columns=cols)
    rank = {s: i for i, s in enumerate(SOURCE_PREFERENCE)}
    out["_rank"] = out["source"].map(lambda s: rank.get(s, len(rank)))
    out["_cell"] = out["cell_id"].map({c: i for i, c in enumerate(order)})
    out = out.sort_values(["_cell", "device", "_rank"], kind="stable")
    best = out.groupby(["_cell", "device"], sort=False)["_rank"].transform("min")
    out["preferred"] = out["_rank"] == best
    return out.drop(columns=["_rank", "_cell"]).reset_index(drop=True)[cols]


__all__ = ["SOURCE_PREFERENCE", "EDP_COLUMNS", "edp_table", "edp_optima", "cell_power"]
