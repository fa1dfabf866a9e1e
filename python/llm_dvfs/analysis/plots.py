"""Figures of a run (PNG through matplotlib's Agg canvas).

Every function takes tables from :mod:`llm_dvfs.analysis.summary` or the run directory, returns a
:class:`matplotlib.figure.Figure`, and writes it to ``path`` (PNG) when one is given. Figures
are built without ``pyplot``, so nothing here touches matplotlib's global backend or state and
they work on a machine without a display.

A panel with nothing to draw says so in the panel ("no data") instead of raising; functions
raise ``ValueError`` only when asked for something that does not exist (an unknown request).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from llm_dvfs.analysis.dvfs_fit import PHASES
from llm_dvfs.analysis.summary import (BASE_GROUP_KEYS, CLOCK_KEYS, OPTIONAL_GROUP_KEYS, center_column,
                                       default_group_keys)

#: Axis labels with units.
METRIC_LABELS: dict[str, str] = {
    "energy_j": "energy per request (J)",
    "j_per_token": "energy per output token (J)",
    "latency_s": "latency per request (s)",
    "ttft_s": "time to first token (s)",
    "tpot_s": "time per output token (s)",
    "avg_power_w": "average power (W)",
    "quality": "quality (mean)",
}
DPI = 100
_PANEL_W, _PANEL_H = 4.4, 3.3


def _group_keys(df: pd.DataFrame) -> list[str]:
    return [k for k in BASE_GROUP_KEYS + OPTIONAL_GROUP_KEYS if k in df.columns]


def _panel_keys(df: pd.DataFrame) -> list[str]:
    """Panels are per model × task (and weights/dtype/gpu when present); batch size and the
    non-SM clock settings become series within a panel."""
    return [k for k in _group_keys(df) if k != "batch_size"]


def _label(keys: Sequence[str], vals: Sequence[Any]) -> str:
    parts = []
    for k, v in zip(keys, vals):
        if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
            continue
        parts.append(f"bs={v}" if k == "batch_size" else str(v))
    return " · ".join(parts) if parts else "all"


def _series_label(df: pd.DataFrame, row: pd.Series) -> str:
    parts = []
    if "batch_size" in df.columns and df["batch_size"].nunique() > 1:
        parts.append(f"batch {row['batch_size']}")
    for col, fmt in (("mem_mhz_requested", "mem {:.0f} MHz"), ("power_limit_w_requested", "PL {:.0f} W")):
        if col in df.columns and df[col].nunique(dropna=False) > 1:
            v = row[col]
            parts.append("default " + col.split("_")[0] if pd.isna(v) else fmt.format(v))
    return ", ".join(parts)


def _figure(n_panels: int, ncols: int = 3, *, size: tuple[float, float] = (_PANEL_W, _PANEL_H),
            sharex: bool = False) -> tuple[Figure, list[Any]]:
    n = max(n_panels, 1)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows + 0.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=sharex).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _no_data(ax: Any, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def _save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        fig.savefig(path, format="png", dpi=DPI)
    return fig


def _panels(df: pd.DataFrame, keys: Sequence[str]) -> tuple[Figure, list[tuple[Any, pd.DataFrame]]]:
    """A figure with one panel per group of ``df`` by ``keys`` (in key order, NaN keys kept),
    each titled with its group's label; (the figure, [(axes, group rows)]). Without rows: one
    panel that says "no data", and no groups."""
    groups = list(df.groupby(list(keys), dropna=False, sort=True)) if len(df) else []
    fig, axes = _figure(len(groups))
    if not groups:
        _no_data(axes[0])
    for ax, (key, _) in zip(axes, groups):
        ax.set_title(_label(keys, key if isinstance(key, tuple) else (key,)), fontsize=10)
    return fig, [(ax, g) for ax, (_, g) in zip(axes, groups)]


def _yerr(g: pd.DataFrame, metric: str) -> np.ndarray:
    c = g[center_column(metric)].to_numpy(dtype=float)
    lo = g[f"{metric}_ci_low"].to_numpy(dtype=float)
    hi = g[f"{metric}_ci_high"].to_numpy(dtype=float)
    return np.vstack([np.nan_to_num(c - lo, nan=0.0).clip(0), np.nan_to_num(hi - c, nan=0.0).clip(0)])


# --------------------------------------------------------------------------------------------
def plot_metric_vs_clock(summary: pd.DataFrame, metric: str = "energy_j", *,
                         path: str | Path | None = None) -> Figure:
    """``metric`` (median, 95 % CI bars) vs SM clock, one panel per model × task.

    Series within a panel: batch size, memory clock, power limit. The reference (highest)
    clock point is drawn as a star, the lowest value of each series is ringed. Observe-mode
    points sit at their median observed clock, with a horizontal bar over the observed range.
    """
    fig, panels = _panels(summary, _panel_keys(summary))
    cc = center_column(metric)
    skeys = [k for k in ("batch_size", "mem_mhz_requested", "power_limit_w_requested", "observe")
             if k in summary.columns]

    def series_label(row: pd.Series) -> str:
        lab = _series_label(summary, row)
        if row.get("observe", False):
            lab = (lab + ", " if lab else "") + "as found"
        return lab

    # one colour per series across all panels
    labels = sorted({series_label(r) for _, r in summary.iterrows()}) if len(summary) else []
    color_of = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    for ax, g in panels:
        if cc not in g.columns or not np.isfinite(g[cc].to_numpy(dtype=float)).any():
            _no_data(ax, f"no {metric} data")
            continue
        for _, s in g.groupby(skeys, dropna=False, sort=True):
            s = s.sort_values("clock_mhz")
            x = s["clock_mhz"].to_numpy(dtype=float)
            y = s[cc].to_numpy(dtype=float)
            lab = series_label(s.iloc[0])
            color = color_of.get(lab, "C0")
            xerr = None
            observe = bool(s["observe"].any())
            if observe:  # as-found points: a square at the median observed clock, bar = observed range
                xerr = np.vstack([np.nan_to_num(x - s["sm_mhz_observed_min"].to_numpy(dtype=float), nan=0),
                                  np.nan_to_num(s["sm_mhz_observed_max"].to_numpy(dtype=float) - x, nan=0)]).clip(0)
            ax.errorbar(x, y, yerr=_yerr(s, metric), xerr=xerr, marker="s" if observe else "o", ms=5 if observe else 4,
                        capsize=3, lw=1.4, ls="none" if observe else "-", color=color, label=lab or None)
            ref = s[s["is_reference"]]
            if len(ref):
                ax.plot(ref["clock_mhz"], ref[cc], marker="*", ms=13, color=color, ls="none", mec="k", mew=0.6)
            if np.isfinite(y).any() and len(s) > 1:
                i = int(np.nanargmin(y))
                ax.plot(x[i], y[i], marker="o", ms=13, mfc="none", mec=color, mew=1.6, ls="none")
        ax.set_xlabel("SM clock (MHz)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(alpha=0.3)
        if any(h.get_label() and not h.get_label().startswith("_") for h in ax.get_legend_handles_labels()[0]):
            ax.legend(fontsize=8)
    fig.suptitle(f"{METRIC_LABELS.get(metric, metric)} vs SM clock  (★ reference, ◯ lowest; bars: 95 % CI)",
                 fontsize=11)
    return _save(fig, path)


def plot_pareto(summary: pd.DataFrame, *, path: str | Path | None = None) -> Figure:
    """Median energy per request vs median latency per clock point, one panel per model ×
    task (× batch size); the Pareto frontier (``summary.pareto``) is connected, points are
    labelled with their clock."""
    fig, panels = _panels(summary, _group_keys(summary))
    for ax, g in panels:
        x = g["latency_s_median"].to_numpy(dtype=float)
        y = g["energy_j_median"].to_numpy(dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any():
            _no_data(ax, "no energy/latency data")
            continue
        ax.errorbar(x[ok], y[ok], xerr=_yerr(g, "latency_s")[:, ok], yerr=_yerr(g, "energy_j")[:, ok],
                    ls="none", marker="o", ms=5, capsize=2, color="tab:blue", alpha=0.8, label="clock point")
        front = g[g["pareto"].astype(bool) & ok].sort_values("latency_s_median")
        if len(front):
            ax.plot(front["latency_s_median"], front["energy_j_median"], "-", color="tab:red", lw=1.6,
                    label="Pareto frontier")
        for (_, r), okr in zip(g.iterrows(), ok):
            if okr:
                lab = f"{r['clock_mhz']:.0f}" if np.isfinite(r["clock_mhz"]) else "?"
                ax.annotate(lab + ("★" if r["is_reference"] else ""), (r["latency_s_median"], r["energy_j_median"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(METRIC_LABELS["latency_s"])
        ax.set_ylabel(METRIC_LABELS["energy_j"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Energy–latency trade-off (labels: SM clock in MHz, ★ reference)", fontsize=11)
    return _save(fig, path)


def plot_power_trace(power: pd.DataFrame, tokens: pd.DataFrame, request_id: str, *,
                     requests: pd.DataFrame | None = None, margin_s: float | None = None,
                     max_token_lines: int = 300, path: str | Path | None = None) -> Figure:
    """Power around one request, with its prefill and decode spans shaded and token boundaries
    marked (top), and the energy attributed to each token (bottom).

    The trace is drawn as steps (zero-order hold, how the energy is integrated), one line per
    device × source. Times are seconds from the request's first token mark.

    Raises:
        ValueError: ``request_id`` has no rows in ``tokens``.
    """
    tok = tokens[tokens["request_id"] == request_id].sort_values("token_index")
    if tok.empty:
        raise ValueError(f"request {request_id!r} has no token marks in tokens.parquet")
    t0 = float(tok["t_start_s"].min())
    t1 = float(tok["t_end_s"].max())
    margin = margin_s if margin_s is not None else 0.08 * (t1 - t0) + 0.05
    cell = tok["cell_id"].iloc[0]
    pw = power
    if "cell_id" in pw.columns and (pw["cell_id"] == cell).any():
        pw = pw[pw["cell_id"] == cell]
    pw = pw[(pw["t_s"] >= t0 - margin) & (pw["t_s"] <= t1 + margin)].sort_values("t_s")

    fig = Figure(figsize=(11, 5.6), dpi=DPI, layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1.4])
    pre = tok[tok["phase"] == "prefill"]
    dec = tok[tok["phase"] == "decode"]
    if len(pre):
        ax.axvspan(pre["t_start_s"].min() - t0, pre["t_end_s"].max() - t0, color="tab:orange", alpha=0.18,
                   label="prefill")
    if len(dec):
        ax.axvspan(dec["t_start_s"].min() - t0, dec["t_end_s"].max() - t0, color="tab:green", alpha=0.12,
                   label="decode")
    if len(tok) <= max_token_lines:
        for t in tok["t_end_s"].to_numpy(dtype=float):
            for a in (ax, ax2):
                a.axvline(t - t0, color="0.35", lw=0.5, alpha=0.35)
    if pw.empty:
        ax.text(0.5, 0.5, "no power samples in this window", ha="center", va="center", transform=ax.transAxes)
    else:
        for (dev, src), s in pw.groupby(["device", "source"], sort=True):
            ax.step(s["t_s"] - t0, s["power_w"], where="post", lw=1.3, label=f"GPU {dev} ({src})")
    ax.set_ylabel("power (W)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    mid = (tok["t_start_s"] + tok["t_end_s"]) / 2 - t0
    width = (tok["t_end_s"] - tok["t_start_s"]).to_numpy(dtype=float)
    colors = np.where(tok["phase"].to_numpy() == "prefill", "tab:orange", "tab:green")
    e = tok["energy_j"].to_numpy(dtype=float)
    if np.isfinite(e).any():
        ax2.bar(mid, np.nan_to_num(e), width=width * 0.9, color=colors)
    else:
        ax2.text(0.5, 0.5, "no per-token energy", ha="center", va="center", transform=ax2.transAxes)
    ax2.set_ylabel("energy per\ntoken (J)")
    ax2.set_xlabel("time since request start (s)")
    ax2.grid(alpha=0.3)
    title = f"Request {request_id}"
    if requests is not None and "request_id" in requests.columns:
        r = requests[requests["request_id"] == request_id]
        if len(r):
            r = r.iloc[0]
            clk = (f"{r['sm_mhz_requested']:.0f} MHz" if pd.notna(r["sm_mhz_requested"])
                   else f"as found (~{r['sm_mhz_observed']:.0f} MHz)")
            title = (f"{r['model']} · {r['task']} · {clk} — {int(r['tokens_in'])} tokens in, "
                     f"{int(r['tokens_out'])} out, {r['energy_j']:.3g} J, {r['latency_s']:.3g} s\n{request_id}")
    fig.suptitle(title, fontsize=10)
    ax.set_xlim(-margin, t1 - t0 + margin)
    return _save(fig, path)


def plot_feature_scatter(requests: pd.DataFrame, features: Sequence[str], *, target: str = "energy_j",
                         group_keys: Sequence[str] | None = None, max_features: int = 12,
                         path: str | Path | None = None) -> Figure:
    """``target`` vs each feature (one panel per feature, first ``max_features``), coloured
    by group (one legend for the figure), each group with its least-squares line; the panel
    title gives Pearson r per group."""
    features = list(features)[:max_features]
    gk = list(group_keys) if group_keys is not None else default_group_keys(requests)
    gk = [k for k in gk if requests[k].nunique(dropna=False) > 1]  # label only what differs
    fig, axes = _figure(len(features), ncols=4, size=(3.8, 3.0))
    groups = list(requests.groupby(gk, dropna=False, sort=True)) if len(requests) and gk else [((), requests)]
    cmap = [f"C{i % 10}" for i in range(len(groups))]
    handles: dict[str, Any] = {}
    for ax, feat in zip(axes, features):
        drew = False
        rs = []
        for color, (key, g) in zip(cmap, groups):
            key = key if isinstance(key, tuple) else (key,)
            x = pd.to_numeric(g[feat], errors="coerce").to_numpy(dtype=float)
            y = pd.to_numeric(g[target], errors="coerce").to_numpy(dtype=float)
            ok = np.isfinite(x) & np.isfinite(y)
            if not ok.any():
                continue
            drew = True
            if ok.sum() >= 3 and np.ptp(x[ok]) > 0 and np.ptp(y[ok]) > 0:
                slope, icpt = np.polyfit(x[ok], y[ok], 1)
                rs.append(f"{float(np.corrcoef(x[ok], y[ok])[0, 1]):+.2f}")
                xs = np.linspace(x[ok].min(), x[ok].max(), 50)
                ax.plot(xs, icpt + slope * xs, color=color, lw=1.4)
            handles[_label(gk, key)] = ax.scatter(x[ok], y[ok], s=12, alpha=0.65, color=color)
        title = feat.removeprefix("feat_")
        vals = pd.to_numeric(requests[feat], errors="coerce").dropna()
        if drew and len(vals) and np.ptp(vals) == 0:
            title += " (constant)"
        elif rs:
            title += "\nr = " + ", ".join(rs[:6])
        ax.set_title(title, fontsize=9)
        if not drew:
            _no_data(ax)
            continue
        ax.set_xlabel(feat, fontsize=8)
        ax.set_ylabel(METRIC_LABELS.get(target, target), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    if not features:
        _no_data(axes[0], "no input features (feat_* columns)")
    if len(handles) > 1:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(4, len(handles)), fontsize=8)
    fig.suptitle(f"{METRIC_LABELS.get(target, target)} vs input features (lines: least squares)", fontsize=11)
    return _save(fig, path)


def plot_correlation_heatmap(corr: pd.DataFrame, *, method: str = "spearman",
                             path: str | Path | None = None) -> Figure:
    """Heatmap of ``spearman_rho`` (or ``pearson_r``) from :func:`analysis.feature_correlations`:
    rows = features, columns = group × target. Cells show the coefficient; ``*`` marks a
    Benjamini–Hochberg q < 0.05; grey = undefined (constant feature, too few rows)."""
    val_col, q_col = ("spearman_rho", "spearman_q") if method == "spearman" else ("pearson_r", "pearson_q")
    skip = {"feature", "target", "n", "note", "clock_mhz", "pearson_r", "pearson_p", "spearman_rho",
            "spearman_p", "pearson_q", "spearman_q"} | set(CLOCK_KEYS)
    gk = [c for c in corr.columns if c not in skip]
    if corr.empty:
        fig, axes = _figure(1)
        _no_data(axes[0], "no correlations (no input features)")
        return _save(fig, path)
    df = corr.copy()
    shown_gk = [k for k in gk if df[k].nunique(dropna=False) > 1] or gk[:2]
    df["_col"] = [(_label(shown_gk, [r[k] for k in shown_gk]) + "\n" + str(r["target"])) for _, r in df.iterrows()]
    feats = list(dict.fromkeys(df["feature"]))
    cols = list(dict.fromkeys(df["_col"]))
    mat = np.full((len(feats), len(cols)), np.nan)
    qs = np.full_like(mat, np.nan)
    for _, r in df.iterrows():
        i, j = feats.index(r["feature"]), cols.index(r["_col"])
        mat[i, j] = r[val_col]
        qs[i, j] = r[q_col]
    fig = Figure(figsize=(max(5.0, 1.15 * len(cols) + 3.0), max(3.0, 0.45 * len(feats) + 2.0)),
                 dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.set_facecolor("0.85")
    im = ax.imshow(np.ma.masked_invalid(mat), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    for i in range(len(feats)):
        for j in range(len(cols)):
            v = mat[i, j]
            txt = "–" if not np.isfinite(v) else f"{v:+.2f}" + ("*" if np.isfinite(qs[i, j]) and qs[i, j] < 0.05 else "")
            ax.text(j, i, txt, ha="center", va="center", fontsize=8,
                    color="white" if np.isfinite(v) and abs(v) > 0.6 else "black")
    ax.set_xticks(range(len(cols)), cols, fontsize=8, rotation=30, ha="right")
    ax.set_yticks(range(len(feats)), [f.removeprefix("feat_") for f in feats], fontsize=8)
    fig.colorbar(im, ax=ax, label="Spearman ρ" if method == "spearman" else "Pearson r", shrink=0.8)
    ax.set_title(f"{'Spearman' if method == 'spearman' else 'Pearson'} correlation of input features "
                 "with energy and latency (* q < 0.05)", fontsize=10)
    return _save(fig, path)


def plot_phase_fits(points: pd.DataFrame, fits: pd.DataFrame, *, max_groups: int = 6,
                    path: str | Path | None = None) -> Figure:
    """Per fit group (rows, first ``max_groups``): prefill and decode time and power vs clock,
    medians per clock point with the fitted ``a + b/f`` and ``c + d·f^k`` curves."""
    fk = [c for c in fits.columns if c in _group_keys(fits) or c in ("mem_mhz_requested", "power_limit_w_requested")]
    rows = list(fits.drop(columns="phase").drop_duplicates(fk).itertuples(index=False)) if len(fits) else []
    rows = rows[:max_groups]
    ncols = 2 * len(PHASES)
    fig = Figure(figsize=(3.6 * ncols, 2.9 * max(len(rows), 1) + 0.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(max(len(rows), 1), ncols, squeeze=False)
    if not rows:
        for ax in axes.ravel():
            _no_data(ax)
    for r_i, row in enumerate(rows):
        key = {k: getattr(row, k) for k in fk}

        def match(df: pd.DataFrame) -> pd.Series:
            m = pd.Series(True, index=df.index)
            for k, v in key.items():
                m &= df[k].isna() if pd.isna(v) else (df[k] == v)
            return m

        for p_i, phase in enumerate(PHASES):
            pts = points[match(points) & (points["phase"] == phase)].sort_values("clock_mhz")
            fit = fits[match(fits) & (fits["phase"] == phase)]
            fit = fit.iloc[0] if len(fit) else None
            f = pts["clock_mhz"].to_numpy(dtype=float)
            grid = np.linspace(np.nanmin(f), np.nanmax(f), 200) if np.isfinite(f).any() else np.array([])
            for c_i, (col, unit, model) in enumerate((("phase_time_s", "s", "time"), ("phase_power_w", "W", "power"))):
                ax = axes[r_i, 2 * p_i + c_i]
                y = pts[col].to_numpy(dtype=float)
                what = ("time to first token" if phase == "prefill" else "time per token") if model == "time" else "power"
                ax.set_title(f"{_label(list(key), list(key.values()))}\n{phase}: {what}", fontsize=8.5)
                if not np.isfinite(y).any():
                    _no_data(ax)
                    continue
                ax.plot(f, y, "o", ms=4, color="k")
                if fit is not None and grid.size:
                    if model == "time" and np.isfinite(fit["time_a_s"]):
                        ax.plot(grid, fit["time_a_s"] + fit["time_b_s_mhz"] / grid, "-", color="tab:blue",
                                label=f"a+b/f, R²={fit['time_r2']:.3f}")
                    if model == "power" and np.isfinite(fit["power_c_w"]):
                        ax.plot(grid, fit["power_c_w"] + fit["power_d_w_per_mhz_k"] * grid ** fit["power_k"], "-",
                                color="tab:red", label=f"c+d·f^{fit['power_k']:.2f}, R²={fit['power_r2']:.3f}")
                    if ax.get_legend_handles_labels()[0]:
                        ax.legend(fontsize=7)
                ax.set_xlabel("SM clock (MHz)", fontsize=8)
                ax.set_ylabel(f"{model} ({unit})", fontsize=8)
                ax.tick_params(labelsize=7)
                ax.grid(alpha=0.3)
    fig.suptitle("Prefill and decode scaling with clock (points: medians per clock point; lines: fits)",
                 fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# trade-offs (llm_dvfs.analysis.tradeoffs)
# --------------------------------------------------------------------------------------------
def _series_groups(df: pd.DataFrame) -> list[str]:
    return [k for k in ("batch_size", "mem_mhz_requested", "power_limit_w_requested") if k in df.columns]


def plot_edp_vs_clock(edp: pd.DataFrame, *, path: str | Path | None = None) -> Figure:
    """EDP (E·t, solid) and ED²P (E·t², dashed) vs SM clock, normalised to the highest clock
    (= 1, dotted line), one panel per model × task; series: batch size, memory clock, power
    limit. The lowest point of each curve is ringed. Input: :func:`tradeoffs.edp_table`."""
    fig, panels = _panels(edp, _panel_keys(edp))
    skeys = _series_groups(edp)
    labels = sorted({_series_label(edp, r) for _, r in edp.iterrows()}) if len(edp) else []
    color_of = {lab: f"C{i % 10}" for i, lab in enumerate(labels)}
    for ax, g in panels:
        if not np.isfinite(g["edp_rel"].to_numpy(dtype=float)).any():
            _no_data(ax, "no energy data" if len(g) > 1 or not np.isfinite(g["edp_j_s"].to_numpy(dtype=float)).any()
                     else "one clock point")
            continue
        for _, s in g.groupby(skeys, dropna=False, sort=True) if skeys else [((), g)]:
            s = s.sort_values("clock_mhz")
            lab = _series_label(edp, s.iloc[0])
            color = color_of.get(lab, "C0")
            x = s["clock_mhz"].to_numpy(dtype=float)
            for col, ls, flag, name in (("edp_rel", "-", "edp_min", "EDP"), ("ed2p_rel", "--", "ed2p_min", "ED²P")):
                y = s[col].to_numpy(dtype=float)
                ax.plot(x, y, ls=ls, marker="o", ms=4, lw=1.4, color=color,
                        label=f"{name}" + (f", {lab}" if lab else ""))
                m = s[flag].astype(bool).to_numpy()
                if m.any():
                    ax.plot(x[m], y[m], marker="o", ms=12, mfc="none", mec=color, mew=1.6, ls="none")
        ax.axhline(1.0, color="0.5", lw=0.8, ls=":")
        ax.set_xlabel("SM clock (MHz)")
        ax.set_ylabel("relative to the highest clock")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Energy–delay product E·t (solid) and ED²P E·t² (dashed) vs SM clock, ÷ the highest clock's "
                 "(◯ lowest)", fontsize=11)
    return _save(fig, path)


def plot_saving_vs_slowdown(edp: pd.DataFrame, *, path: str | Path | None = None) -> Figure:
    """Energy saving % (y) vs slowdown % (x) against the highest clock, one marker per clock point
    (labelled with its SM clock), one panel per model × task × batch size. Pareto points (no other
    point saves more energy with less slowdown) are filled and joined in red; dominated points
    are hollow. Input: :func:`tradeoffs.edp_table`."""
    fig, panels = _panels(edp, _group_keys(edp))
    for ax, g in panels:
        x = g["slowdown_pct"].to_numpy(dtype=float)
        y = g["saving_pct"].to_numpy(dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        if not ok.any() or len(g) < 2:
            _no_data(ax, "one clock point" if len(g) < 2 else "no energy/latency data")
            continue
        par = g["pareto"].astype(bool).to_numpy() & ok
        ax.axhline(0, color="0.5", lw=0.8)
        ax.axvline(0, color="0.5", lw=0.8)
        ax.plot(x[ok & ~par], y[ok & ~par], "o", ms=7, mfc="none", mec="tab:blue", mew=1.4, ls="none",
                label="dominated")
        order = np.argsort(x[par])
        ax.plot(x[par][order], y[par][order], "-o", ms=7, color="tab:red", lw=1.6, label="Pareto front")
        for xi, yi, r in zip(x[ok], y[ok], g[ok].itertuples(index=False)):
            lab = f"{r.clock_mhz:.0f}" if np.isfinite(r.clock_mhz) else "?"
            ax.annotate(lab + ("★" if r.is_reference else ""), (xi, yi), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel("slowdown vs highest clock (%)")
        ax.set_ylabel("energy saving vs highest clock (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Energy saving vs slowdown per clock point (labels: SM clock in MHz, ★ reference)", fontsize=11)
    return _save(fig, path)


def plot_power_timeline(power: pd.DataFrame, cells: pd.DataFrame, *, max_cells: int = 24,
                        max_points: int = 4000, path: str | Path | None = None) -> Figure:
    """Power vs time since the cell's first sample, one panel per cell (the first ``max_cells``
    in run order), drawn as steps (zero-order hold) per device × source; the panel title gives
    the cell's time-weighted mean power and energy of its preferred source (``cells`` is
    :func:`tradeoffs.cell_power`). Traces longer than ``max_points`` samples are thinned for
    drawing only (every n-th sample); the numbers use every sample."""
    ids = list(dict.fromkeys(cells["cell_id"]))[:max_cells] if len(cells) else []
    fig, axes = _figure(len(ids), ncols=3, size=(4.6, 2.6))
    pw = power[power["cell_id"].isin(ids).to_numpy(dtype=bool, na_value=False)] if len(ids) else power.iloc[0:0]
    pw = pd.DataFrame({"cell_id": pw["cell_id"].astype(str).to_numpy(), "device": pw["device"].astype(str).to_numpy(),
                       "source": pw["source"].astype(str).to_numpy(),
                       "t_s": pd.to_numeric(pw["t_s"], errors="coerce").to_numpy(dtype=float, na_value=np.nan),
                       "power_w": pd.to_numeric(pw["power_w"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)})
    pmax = float(np.nanmax(pw["power_w"])) if np.isfinite(pw["power_w"]).any() else 1.0
    by_cell = dict(list(pw.groupby("cell_id", sort=False)))
    for ax, cid in zip(axes, ids):
        c = cells[(cells["cell_id"] == cid) & cells["preferred"].astype(bool)]
        head = c.iloc[0] if len(c) else None
        title = " · ".join(str(cid).split("|")[:4])
        if head is not None:
            e_j = float(head["energy_j"])
            title += (f"\nmean {head['mean_power_w']:.0f} W, {e_j:.0f} J" if abs(e_j) >= 100 else
                      f"\nmean {head['mean_power_w']:.0f} W, {e_j:.3g} J") + f" over {head['duration_s']:.2f} s"
        ax.set_title(title, fontsize=8)
        sub = by_cell.get(str(cid), pw.iloc[0:0])
        t0 = float(sub["t_s"].min()) if len(sub) else 0.0
        for (dev, src), sr in sub.groupby(["device", "source"], sort=True):
            sr = sr.sort_values("t_s", kind="stable")
            step = max(1, int(math.ceil(len(sr) / max_points)))
            ax.step(sr["t_s"].to_numpy()[::step] - t0, sr["power_w"].to_numpy()[::step], where="post", lw=1.0,
                    label=f"GPU {dev} ({src})")
        ax.set_ylim(0, pmax * 1.08)
        ax.set_xlabel("time since cell start (s)", fontsize=8)
        ax.set_ylabel("power (W)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if sub["source"].nunique() > 1:
            ax.legend(fontsize=6)
    if not ids:
        _no_data(axes[0], "no power samples")
    n_all = cells["cell_id"].nunique() if len(cells) else 0
    fig.suptitle("Power per cell" + (f" (first {len(ids)} of {n_all} cells)" if n_all > len(ids) else ""),
                 fontsize=11)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# served traffic (llm_dvfs.analysis.served.load_table)
# --------------------------------------------------------------------------------------------
def _load_panels(load: pd.DataFrame, metrics: Sequence[tuple[str, str]], title: str,
                 draw: Any, path: str | Path | None) -> Figure:
    """One row per model × task × engine, one column per metric; ``draw(ax, g, metric, color)``
    draws one clock point's series of ``g`` (sorted by load)."""
    keys = [k for k in ("model", "task", "engine") if k in load.columns]
    groups = list(load.groupby(keys, dropna=False, sort=True)) if len(load) else []
    fig, axes = _figure(max(len(groups), 1) * len(metrics), ncols=len(metrics))
    clocks = sorted(load["clock_label"].astype(str).unique()) if len(load) else []
    color_of = {c: f"C{i % 10}" for i, c in enumerate(clocks)}
    for gi, (key, g) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        xlab = "concurrency (users)" if (g["load_kind"] == "concurrency").all() else "arrival rate (req/s)"
        for mi, (metric, ylab) in enumerate(metrics):
            ax = axes[gi * len(metrics) + mi]
            ax.set_title(_label(keys, key), fontsize=9)
            for clk, s in g.groupby("clock_label", sort=True):
                draw(ax, s.sort_values("load"), metric, color_of[str(clk)], str(clk))
            if not ax.lines:
                _no_data(ax, f"no {ylab}")
                continue
            ax.set_xlabel(xlab)
            ax.set_ylabel(ylab)
            if g["load"].min() > 0 and g["load"].max() / g["load"].min() >= 8:
                ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    if not groups:
        _no_data(axes[0], "no served traffic")
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_load_energy(load: pd.DataFrame, *, path: str | Path | None = None) -> Figure:
    """Energy per request (median) and energy per output token (Σ energy / Σ tokens) vs load,
    one line per clock point, one row of panels per model × task × engine."""
    def draw(ax: Any, s: pd.DataFrame, metric: str, color: str, clk: str) -> None:
        y = s[metric].to_numpy(dtype=float)
        if np.isfinite(y).any():
            ax.plot(s["load"], y, "o-", color=color, ms=4, label=clk)

    return _load_panels(load, [("energy_j_median", METRIC_LABELS["energy_j"]),
                               ("j_per_token", METRIC_LABELS["j_per_token"])],
                        "Served traffic: energy vs load (per request: median; per token: Σ energy / Σ tokens)",
                        draw, path)


def plot_load_latency(load: pd.DataFrame, *, path: str | Path | None = None) -> Figure:
    """TTFT, TPOT and queueing delay vs load: p50 (solid), p90 (dashed), p99 (dotted), one colour
    per clock point, one row of panels per model × task × engine (queueing delay: empty for an
    endpoint, which does not say when it admitted a request)."""
    styles = {50: "-", 90: "--", 99: ":"}

    def draw(ax: Any, s: pd.DataFrame, metric: str, color: str, clk: str) -> None:
        for q, ls in styles.items():
            y = s[f"{metric}_p{q}"].to_numpy(dtype=float) * 1e3
            if np.isfinite(y).any():
                ax.plot(s["load"], y, ls, marker="o", ms=3, color=color, label=f"{clk} p{q}")

    return _load_panels(load, [("ttft_s", "time to first token (ms)"), ("tpot_s", "time per output token (ms)"),
                               ("queue_s", "queueing delay (ms)")],
                        "Served traffic: latency percentiles vs load (p50 solid, p90 dashed, p99 dotted)", draw, path)
