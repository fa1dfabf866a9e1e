"""``python -m llm_dvfs.report RUN_DIR``: statistics, figures and a readable report of a run.

Reads a run directory written by ``python -m llm_dvfs.run`` (manifest.json, requests.parquet —
requests.csv as a fallback —, tokens.parquet, power.parquet), computes the statistics of
:mod:`llm_dvfs.analysis`, draws the figures of :mod:`llm_dvfs.plots`, and writes into
``RUN_DIR/report/`` (or ``--out``):

- ``report.html``: one self-contained page (inline CSS, figures embedded as base64 PNG, no
  scripts, no external resources);
- ``report.md`` (figures referenced from ``figures/``), ``figures/*.png``;
- CSV tables: ``key_table.csv``, ``summary.csv``, ``optimal_clocks.csv``, ``phase_points.csv``,
  ``phase_fits.csv``, ``correlations.csv``, ``regression.csv``;

and prints the key table to the terminal. Works for a single clock point (observe mode) as well
as for a full sweep, and lists what cannot be concluded from what was measured.
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from . import analysis as an
from .errors import ConfigError, DataNotFound, LlmDvfsError
from .results import SCHEMAS, feature_columns

# NVML clock-event (throttle) reason bits that mean the GPU may not have held the clock.
# (nvml.h: nvmlClocksEventReason*; idle, application-clock and display bits are benign.)
THROTTLE_BITS: dict[int, str] = {
    0x4: "SW power cap", 0x8: "HW slowdown", 0x20: "sync boost", 0x40: "SW thermal slowdown",
    0x80: "HW thermal slowdown", 0x100: "HW power brake slowdown",
}
# Energy-method precision, from the measurements in DESIGN.md (H100, vs the hardware counter).
METHOD_NOTES: dict[str, str] = {
    "instant": "the instant power field (updated every ~100 ms; read about 1-2 % low on an H100, "
               "and bursts shorter than ~100 ms are aliased)",
    "average": "the averaged power reading (a 1 s moving average on an H100; ~4 % low and unable to "
               "resolve requests or tokens shorter than about a second)",
    "counter": "the hardware energy counter alone (updated every ~100 ms: per-token and prefill/decode "
               "splits of short requests are interpolated, not measured)",
}
SMALL_N = 10                  # requests per clock point below which CIs are called wide
CLOCK_MISMATCH_MHZ = 30.0     # observed vs requested SM clock difference worth reporting
CSV_TABLES = ("key_table", "summary", "optimal_clocks", "phase_points", "phase_fits", "correlations",
              "regression")


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------
@dataclass
class RunData:
    """The tables of a run directory. ``tokens``/``power`` are None when absent; ``notes``
    collects what was missing or repaired while loading."""
    path: Path
    manifest: dict[str, Any]
    requests: pd.DataFrame
    tokens: pd.DataFrame | None
    power: pd.DataFrame | None
    notes: list[str] = field(default_factory=list)


def _typed(df: pd.DataFrame, kind: str, notes: list[str], source: str) -> pd.DataFrame:
    """Bring a table read from disk to the schema's dtypes; add missing columns as NA."""
    schema = SCHEMAS[kind]
    missing = [c for c in schema if c not in df.columns]
    if missing:
        notes.append(f"{source} lacks column(s) {', '.join(missing)}; treated as missing values.")
    for col, dtype in schema.items():
        if col not in df.columns:
            df[col] = {"string": pd.NA, "float64": np.nan, "int64": -1, "bool": False}[dtype]
        try:
            if dtype == "bool":
                v = df[col]
                if v.dtype == object or str(v.dtype) == "string":
                    v = v.astype("string").str.lower().isin(["true", "1"])
                df[col] = v.fillna(False).astype(bool)
            elif dtype == "int64":
                df[col] = pd.to_numeric(df[col], errors="coerce").fillna(-1).astype("int64")
            elif dtype == "float64":
                df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
            else:
                df[col] = df[col].astype("string")
        except (TypeError, ValueError):
            notes.append(f"{source}: column {col} could not be read as {dtype}.")
    for col in df.columns:
        if col.startswith("feat_"):
            df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    return df


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory.

    Raises:
        DataNotFound: the directory does not exist, or has neither requests.parquet nor
            requests.csv, or its requests table is empty.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise DataNotFound(f"run directory {str(path)!r} does not exist")
    notes: list[str] = []
    manifest: dict[str, Any] = {}
    mpath = path / "manifest.json"
    if mpath.is_file():
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            notes.append(f"manifest.json could not be read ({e}).")
    else:
        notes.append("manifest.json is missing: the run's configuration and versions are unknown.")
    if (path / "requests.parquet").is_file():
        requests = pd.read_parquet(path / "requests.parquet")
        src = "requests.parquet"
    elif (path / "requests.csv").is_file():
        requests = pd.read_csv(path / "requests.csv", keep_default_na=True)
        src = "requests.csv"
        notes.append("requests.parquet is missing; read requests.csv instead.")
    else:
        raise DataNotFound(f"{path} has no requests.parquet or requests.csv: is it a run directory "
                           "written by `python -m llm_dvfs.run`?")
    if requests.empty:
        raise DataNotFound(f"{path / src} has no rows: the run measured nothing yet")
    requests = _typed(requests, "requests", notes, src)

    def optional(name: str, kind: str) -> pd.DataFrame | None:
        p = path / f"{name}.parquet"
        if not p.is_file():
            notes.append(f"{name}.parquet is missing: no power trace can be drawn.")
            return None
        return _typed(pd.read_parquet(p), kind, notes, p.name)

    return RunData(path, manifest, requests, optional("tokens", "tokens"), optional("power", "power"), notes)


# --------------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------------
def _isnan(x: Any) -> bool:
    try:
        return x is None or x is pd.NA or math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def fmt_num(x: Any, sig: int = 3, nan: str = "-") -> str:
    """A number in ``sig`` significant digits without exponent for everyday magnitudes."""
    if _isnan(x):
        return nan
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 10 ** sig:
        return f"{x:.0f}"
    if abs(x) < 1e-4:
        return f"{x:.{sig - 1}e}"
    digits = max(sig - 1 - int(math.floor(math.log10(abs(x)))), 0)
    return f"{x:.{digits}f}"


def fmt_pct(x: Any, nan: str = "-", plus: bool = True) -> str:
    if _isnan(x):
        return nan
    return f"{float(x):+.1f}" if plus else f"{float(x):.1f}"


def fmt_ci(lo: Any, hi: Any, kind: str = "num", nan: str = "", plus: bool = True) -> str:
    if _isnan(lo) or _isnan(hi):
        return nan
    if kind == "pct":
        return f"[{fmt_pct(lo, plus=plus)}, {fmt_pct(hi, plus=plus)}]"
    return f"[{fmt_num(lo)}, {fmt_num(hi)}]"


def _group_label(row: pd.Series | dict, keys: Sequence[str]) -> str:
    parts = []
    for k in keys:
        v = row[k]
        if _isnan(v):
            continue
        parts.append(f"batch {v}" if k == "batch_size" else str(v))
    return " · ".join(parts)


# --------------------------------------------------------------------------------------------
# the key table
# --------------------------------------------------------------------------------------------
KEY_METRICS = ("energy_j", "j_per_token", "latency_s", "ttft_s", "tpot_s", "avg_power_w", "quality")


def key_table(summary: pd.DataFrame, optimal: pd.DataFrame, group_keys: Sequence[str]) -> pd.DataFrame:
    """Per group × clock point: the central value of each key metric with its CI, Δ % of energy,
    J/token and latency vs the reference (with CIs), and ``note`` (``reference``,
    ``lowest energy``, ``lowest energy within limit``, ``Pareto``). Numbers, not strings."""
    cols = list(group_keys) + ["clock", "clock_mhz", "observe", "n"]
    rows = []
    best = {}
    for _, o in optimal.iterrows():
        k = tuple(o[g] for g in group_keys)
        best[k] = (o.get("best_label"), o.get("limited_label"), o.get("status"))
    for _, r in summary.iterrows():
        row: dict[str, Any] = {g: r[g] for g in group_keys}
        row.update(clock=r["clock_label"], clock_mhz=r["clock_mhz"], observe=bool(r["observe"]), n=int(r["n"]))
        for m in KEY_METRICS:
            c = an.center_column(m)
            row[m] = r.get(c, math.nan)
            row[f"{m}_ci_low"] = r.get(f"{m}_ci_low", math.nan)
            row[f"{m}_ci_high"] = r.get(f"{m}_ci_high", math.nan)
        for m in ("energy_j", "j_per_token", "latency_s"):
            row[f"{m}_delta_pct"] = r.get(f"{m}_delta_pct", math.nan)
            row[f"{m}_delta_pct_ci_low"] = r.get(f"{m}_delta_pct_ci_low", math.nan)
            row[f"{m}_delta_pct_ci_high"] = r.get(f"{m}_delta_pct_ci_high", math.nan)
        notes = []
        b, lim, status = best.get(tuple(r[g] for g in group_keys), (None, None, None))
        multi = status == "ok"
        if r["is_reference"] and multi:
            notes.append("reference")
        if multi and b == r["clock_label"] and not r["is_reference"]:
            notes.append("lowest energy")
        if multi and lim == r["clock_label"] and not r["is_reference"] and lim != b:
            notes.append("lowest energy within limit")
        if multi and r["pareto"]:
            notes.append("Pareto")
        row["note"] = ", ".join(notes)
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return pd.DataFrame(columns=cols)
    return out


_SHORT_NOTES = {"reference": "ref", "lowest energy": "E-min", "lowest energy within limit": "E-min<=limit",
                "Pareto": "pareto"}


def format_key_table(key: pd.DataFrame, group_keys: Sequence[str]) -> str:
    """The key table as aligned plain text (ASCII) for a terminal.

    Columns: the group keys (model, task, bs, ...), ``clock``, ``n``, ``E/req J``, ``J/tok``,
    ``lat s``, ``TTFT ms``, ``TPOT ms``, ``P W``, ``quality``, ``dE % [95% CI]`` and ``dLat %``
    (vs the reference), ``note`` (ref = reference, E-min = lowest energy, E-min<=limit =
    lowest energy within the latency limit, pareto = on the energy-latency frontier).
    Missing values print as ``-``, as do the Δ columns of a group with one clock point; the
    reference row's Δ columns read ``ref``. Groups are separated by a blank line.
    """
    head = [("bs" if k == "batch_size" else k) for k in group_keys] + [
        "clock", "n", "E/req J", "J/tok", "lat s", "TTFT ms", "TPOT ms", "P W", "quality",
        "dE % [95% CI]", "dLat %", "note"]
    lines: list[list[str]] = []
    groups: list[tuple] = []
    n_points = key.groupby(list(group_keys), dropna=False)["clock"].transform("size") if len(key) else []
    for (_, r), npts in zip(key.iterrows(), n_points):
        note = ",".join(_SHORT_NOTES.get(n.strip(), n.strip()) for n in str(r["note"]).split(",") if n.strip())
        if npts < 2:      # nothing to compare with
            d_e = d_l = "-"
            ci = ""
        elif "reference" in str(r["note"]):
            d_e = d_l = "ref"
            ci = ""
        else:
            d_e = fmt_pct(r["energy_j_delta_pct"])
            d_l = fmt_pct(r["latency_s_delta_pct"])
            ci = fmt_ci(r["energy_j_delta_pct_ci_low"], r["energy_j_delta_pct_ci_high"], "pct")
        lines.append([("-" if _isnan(r[k]) else str(r[k])) for k in group_keys] + [
            str(r["clock"]), str(r["n"]), fmt_num(r["energy_j"]), fmt_num(r["j_per_token"]),
            fmt_num(r["latency_s"]), fmt_num(r["ttft_s"] * 1e3), fmt_num(r["tpot_s"] * 1e3),
            fmt_num(r["avg_power_w"]), fmt_num(r["quality"]), (d_e + " " + ci).strip(), d_l, note])
        groups.append(tuple(str(r[k]) for k in group_keys))
    numeric = set(range(len(group_keys) + 1, len(head) - 1))
    widths = [max([len(h)] + [len(l[i]) for l in lines]) for i, h in enumerate(head)]

    def join(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [join(head), join(["-" * w for w in widths])]
    prev = None
    for g, l in zip(groups, lines):
        if prev is not None and g != prev:
            out.append("")
        out.append(join(l))
        prev = g
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# findings and caveats
# --------------------------------------------------------------------------------------------
def _reference_subset(requests: pd.DataFrame, summary: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The requests measured at their group's reference clock point."""
    ref = summary[summary["is_reference"]][list(keys) + list(an.CLOCK_KEYS)]
    if ref.empty:
        return requests.iloc[0:0]
    m = requests.merge(ref.assign(_ref=True), on=list(keys) + list(an.CLOCK_KEYS), how="left")
    return requests[m["_ref"].fillna(False).astype(bool).to_numpy()]


def findings(summary: pd.DataFrame, optimal: pd.DataFrame, corr_ref: pd.DataFrame,
             keys: Sequence[str], latency_limit: float) -> list[str]:
    """Headline sentences, one or two per group, plus the strongest feature associations."""
    out = []
    for _, o in optimal.iterrows():
        g = _group_label(o, keys)
        sub = summary
        for k in keys:
            sub = sub[sub[k].isna()] if _isnan(o[k]) else sub[sub[k] == o[k]]
        ref = sub[sub["is_reference"]].iloc[0]
        if o["status"] == "one clock point":
            out.append(f"{g}: one clock point, {ref['clock_label']}: {fmt_num(ref['energy_j_median'])} J per "
                       f"request, {fmt_num(ref['j_per_token_median'])} J per token, "
                       f"{fmt_num(ref['latency_s_median'])} s latency, {fmt_num(ref['avg_power_w_median'])} W "
                       f"(medians of {int(ref['n'])} requests). No clock comparison is possible.")
            continue
        if o["status"] != "ok":
            out.append(f"{g}: {o['status']}; latency at {ref['clock_label']}: {fmt_num(ref['latency_s_median'])} s.")
            continue
        lim_pct = latency_limit * 100

        def saving(prefix: str) -> str:
            if o[f"{prefix}_label"] == o["ref_label"]:
                return f"no clock point uses less energy than the reference {o['ref_label']}"
            sig = "" if o[f"{prefix}_significant"] else " (95 % CI includes 0: not distinguishable from noise)"
            return (f"{o[f'{prefix}_label']} saves {fmt_pct(o[f'{prefix}_saving_pct'], plus=False)} % energy per "
                    f"request [95 % CI {fmt_pct(o[f'{prefix}_saving_pct_ci_low'], plus=False)} to "
                    f"{fmt_pct(o[f'{prefix}_saving_pct_ci_high'], plus=False)}] vs {o['ref_label']}, at "
                    f"{fmt_pct(o[f'{prefix}_latency_delta_pct'])} % latency{sig}")
        text = f"{g}: lowest energy: {saving('best')}."
        if o["limited_label"] != o["best_label"]:
            text += f" Within +{lim_pct:g} % latency: {saving('limited')}."
        else:
            text += f" This point is also within the +{lim_pct:g} % latency limit."
        out.append(text)
    energy_corr = corr_ref[corr_ref["target"] == "energy_j"] if not corr_ref.empty else corr_ref
    if len(energy_corr) and energy_corr["spearman_rho"].isna().all():
        out.append("No association of input features with energy could be computed (no energy values, or "
                   "constant features / too few requests).")
    elif len(energy_corr):
        c = corr_ref[(corr_ref["target"] == "energy_j") & (corr_ref["spearman_q"] < 0.05)]
        if len(c):
            # the strongest significant feature of each group, then one sentence per feature
            c = c.assign(_abs=c["spearman_rho"].abs())
            c = c[c["_abs"] >= c.groupby(list(keys), dropna=False)["_abs"].transform("max") - 1e-12]
            # features tied at the top of a group (e.g. two collinear ones) are named together
            tied = c.groupby(list(keys), dropna=False)["feature"].transform(lambda f: " / ".join(sorted(f)))
            top = c.assign(feature=tied).drop_duplicates(list(keys), keep="first")
            n_groups = len(energy_corr.drop_duplicates(list(keys)))
            for feat, t in top.groupby("feature", sort=False):
                lo, hi = t["spearman_rho"].min(), t["spearman_rho"].max()
                rho = f"ρ = {lo:+.2f}" if len(t) == 1 else f"ρ from {lo:+.2f} to {hi:+.2f}"
                where = (_group_label(t.iloc[0], keys) if n_groups == 1 else
                         f"in {len(t)} of {n_groups} model × task groups" if len(t) > 1 else
                         f"for {_group_label(t.iloc[0], keys)}")
                out.append(f"At the reference clock, energy per request is most strongly associated with {feat} "
                           f"{where if n_groups > 1 else '(' + where + ')'} (Spearman {rho}, "
                           f"largest q = {fmt_num(t['spearman_q'].max(), 2)}, n = {int(t['n'].min())}"
                           f"{'' if t['n'].nunique() == 1 else '+'} requests per group).")
        else:
            out.append("No input feature is significantly associated with energy per request at the reference "
                       "clock (Spearman, Benjamini-Hochberg q < 0.05).")
    return out


def cannot_conclude(run: RunData, summary: pd.DataFrame, optimal: pd.DataFrame, fits: pd.DataFrame,
                    corr: pd.DataFrame, reg_ref: pd.DataFrame, keys: Sequence[str],
                    trace_note: str | None = None) -> list[str]:
    """What the measurements do not support, each as one sentence or two (never empty)."""
    req = run.requests
    out: list[str] = []
    one = optimal[optimal["status"] == "one clock point"]
    if len(one):
        which = "every model and task" if len(one) == len(optimal) else \
            "; ".join(_group_label(r, keys) for _, r in one.iterrows())
        out.append(f"Only one clock point was measured for {which}: nothing can be concluded about DVFS — "
                   "not how energy or latency change with the clock, not the energy-optimal clock, not a saving, "
                   "not a Pareto frontier. Sweep clock points (`python -m llm_dvfs.run`) to learn that.")
    if summary["observe"].any():
        obs = pd.to_numeric(req.loc[req["sm_mhz_requested"].isna(), "sm_mhz_observed"], errors="coerce").dropna()
        rng = (f" the observed SM clock ranged {obs.min():.0f}–{obs.max():.0f} MHz (median {obs.median():.0f})"
               if len(obs) else " no SM clock was observed")
        out.append("Clocks were not controlled (observe mode):" + rng + ", so differences between requests mix "
                   "prompt effects with what the GPU's own boost and power management did.")
    random_models = sorted(req.loc[req["weights"].astype("string") == "random", "model"].dropna().unique())
    if random_models:
        out.append(f"Weights are random for {', '.join(map(str, random_models))}: the quality metric is "
                   "meaningless and not reported, and output lengths and token statistics need not resemble "
                   "a trained model's, so energy per request may not transfer to real use.")
    valid_q = req["quality_valid"].astype(bool) & req["quality"].notna()
    no_q = sorted(set(req["task"].dropna()) - set(req.loc[valid_q, "task"].dropna()))
    if no_q and not random_models:
        out.append(f"No valid quality metric for task(s) {', '.join(map(str, no_q))}: whether a clock point "
                   "changes answer quality was not measured.")
    n_min = int(summary["n"].min()) if len(summary) else 0
    if n_min < SMALL_N:
        hw = ((summary["energy_j_ci_high"] - summary["energy_j_ci_low"]) / 2 / summary["energy_j_median"] * 100)
        hw_txt = (f" (median half-width of the energy CIs: ±{np.nanmedian(hw):.1f} %)"
                  if np.isfinite(hw).any() else "")
        out.append(f"Few requests per clock point (as few as {n_min}){hw_txt}: the 95 % intervals are wide "
                   "and smaller differences cannot be resolved; with fewer than 2 requests there is no interval.")
    if "repeat" in req.columns and pd.to_numeric(req["repeat"], errors="coerce").max() <= 0:
        out.append("Each prompt was measured once per clock point (no repeats): run-to-run variation of the same "
                   "request (DESIGN.md measured ±20 % throughput spread between identical runs) is not separated "
                   "from prompt-to-prompt variation.")
    meth = req["energy_method"].astype("string").fillna("none")
    no_e = req["energy_j"].isna() | (meth == "none")
    if no_e.all():
        out.append("No energy was measured (energy_method none or no energy values): every energy, J/token, "
                   "power, saving and optimal-clock statement is missing; only latency results stand.")
    elif no_e.any():
        out.append(f"{int(no_e.sum())} of {len(req)} requests have no energy value (energy_method none): energy "
                   "statistics rest on the others.")
    for m, note in METHOD_NOTES.items():
        if (meth == m).any():
            out.append(f"{int((meth == m).sum())} requests were measured with {note}: their energies are less "
                       "precise than the driver sample buffer's (±0.5 %).")
    throttled = summary[summary["clock_event_reasons"].fillna(0).astype("int64") & sum(THROTTLE_BITS) > 0]
    if len(throttled):
        parts = []
        for _, r in throttled.iterrows():
            bits = [name for b, name in THROTTLE_BITS.items() if int(r["clock_event_reasons"]) & b]
            parts.append(f"{_group_label(r, keys)} at {r['clock_label']} ({', '.join(bits)})")
        out.append("The GPU reported clock throttling for " + "; ".join(parts[:8]) + (" …" if len(parts) > 8 else "")
                   + ": those requests did not necessarily run at the requested clock.")
    locked = summary[~summary["observe"]]
    off = locked[(locked["sm_mhz_observed_median"] - locked["sm_mhz_requested"]).abs() > CLOCK_MISMATCH_MHZ]
    if len(off):
        parts = [f"{_group_label(r, keys)} at {r['clock_label']} ran at ~{r['sm_mhz_observed_median']:.0f} MHz"
                 for _, r in off.iterrows()]
        out.append("The observed SM clock differs from the requested one by more than "
                   f"{CLOCK_MISMATCH_MHZ:.0f} MHz: " + "; ".join(parts[:8]) + (" …" if len(parts) > 8 else "")
                   + ". Effects are attributed to the requested clock on the clock axes.")
    if len(optimal) and (optimal["status"] == "ok").any():
        ok = optimal[optimal["status"] == "ok"]
        ns = ok[~ok["best_significant"].astype(bool) & (ok["best_label"] != ok["ref_label"])]
        if len(ns):
            out.append("For " + "; ".join(_group_label(r, keys) for _, r in ns.iterrows()) + ", the lowest-energy "
                       "clock's saving has a 95 % interval that includes 0: it may be noise.")
        edge = ok[(ok["best_clock_mhz"] <= summary["clock_mhz"].min()) & (ok["best_label"] != ok["ref_label"])]
        if len(edge):
            out.append("For " + "; ".join(_group_label(r, keys) for _, r in edge.iterrows()) + ", the lowest "
                       "energy is at the lowest clock measured: the optimum may lie below the swept range.")
    if len(fits):
        bad = fits[fits["status"] != "ok"]
        if len(bad) and (fits["n_points"] > 1).any():
            out.append("Phase scaling fits need at least 3 clock points (time) and 4 (power); "
                       f"{len(bad)} of {len(fits)} phase fits could not be made, so their f_opt_fit is missing.")
        poor = fits[(fits["status"] == "ok") & ((fits["time_r2"] < 0.9) | (fits["power_r2"] < 0.9))]
        if len(poor):
            out.append(f"{len(poor)} phase fit(s) have R² < 0.9: the simple models time ≈ a + b/f and power ≈ "
                       "c + d·f^k do not describe those data well, and their fitted optimum is not reliable.")
        at_edge = fits[np.isfinite(fits["f_opt_fit_mhz"]) &
                       ((fits["f_opt_fit_mhz"] <= fits["f_min_mhz"] + 1e-6) |
                        (fits["f_opt_fit_mhz"] >= fits["f_max_mhz"] - 1e-6))]
        if len(at_edge):
            out.append(f"{len(at_edge)} fitted per-phase optimum/optima lie at the edge of the measured clock range; "
                       "the fits are not extrapolated, so the true optimum may lie outside it.")
    feats = feature_columns(req)
    if not feats:
        out.append("The run has no input features (feat_* columns): nothing can be said about which prompt "
                   "properties drive energy or latency.")
    else:
        out.append("Feature correlations and the regression describe associations across the prompts of one task at "
                   "one clock point, not causes; features are correlated with one another (and with prompt length), "
                   "so one feature's association may be another's effect. p-values are per test; q-values "
                   "(Benjamini-Hochberg) control the false discovery rate over all tests in the table.")
        notes = reg_ref["note"].dropna().astype(str) if len(reg_ref) else pd.Series(dtype=str)
        coll = sorted(set(reg_ref.loc[notes.str.startswith("collinear").reindex(reg_ref.index, fill_value=False),
                                      "feature"])) if len(reg_ref) else []
        if coll:
            out.append(f"Feature(s) {', '.join(coll)} are collinear with others and were left out of the "
                       "regression: their separate effect cannot be estimated from this data.")
        if len(reg_ref):
            ne = reg_ref[reg_ref["status"].astype(str).str.startswith("not enough data")]
            if len(ne):
                out.append(f"The regression had not enough data for {ne.drop_duplicates(list(keys)).shape[0]} "
                           "group(s) (needs at least p + 2 requests for p features).")
    if len(req) and (pd.to_numeric(req["batch_size"], errors="coerce") > 1).any():
        out.append("With batch size > 1 a request's energy is its share of the batch's energy: per-request "
                   "differences inside a batch are not measured.")
    gpus = sorted(str(g) for g in req["gpu_name"].dropna().unique())
    out.append("All results hold for " + (", ".join(gpus) if gpus else "an unnamed GPU") + ", this driver, "
               "these models, dtypes and prompts; other GPUs or software versions can behave differently.")
    m = run.manifest
    status = m.get("status")
    if status not in (None, "complete"):
        done, total = m.get("cells_done"), m.get("cells_total")
        cells = f"; {done} of {total} cells done" if done is not None and total is not None else ""
        out.append(f"The run is not complete (status: {status}{cells}): model × task × clock combinations may "
                   "be missing, and what is here is not the planned grid.")
    notes = [str(n) for n in m.get("notes", []) if n] if isinstance(m.get("notes"), list) else []
    if notes:
        out.append("Notes recorded by the run: " + " ".join(n if n.endswith(".") else n + "." for n in notes))
    if trace_note:
        out.append(trace_note)
    for n in run.notes:
        out.append(n)
    return out


# --------------------------------------------------------------------------------------------
# building the report
# --------------------------------------------------------------------------------------------
@dataclass
class Report:
    """Everything a report contains; :func:`build_report` also writes it to ``out_dir``."""
    run: RunData
    out_dir: Path
    group_keys: list[str]
    latency_limit: float
    summary: pd.DataFrame
    optimal: pd.DataFrame
    phase_points: pd.DataFrame
    phase_fits: pd.DataFrame
    correlations: pd.DataFrame
    regression: pd.DataFrame
    key: pd.DataFrame
    findings: list[str]
    cannot_conclude: list[str]
    figures: dict[str, tuple[Path, str]]     # name -> (png path, caption)
    trace_request: str | None
    files: list[Path]

    def key_text(self) -> str:
        return format_key_table(self.key, self.group_keys)


def _choose_request(run: RunData, summary: pd.DataFrame, keys: Sequence[str]) -> str | None:
    """The median-latency request at the first group's reference clock that has token marks."""
    if run.tokens is None or run.tokens.empty:
        return None
    have = set(run.tokens["request_id"].dropna().astype(str))
    ref = _reference_subset(run.requests, summary, keys)
    for _, g in ref.groupby(list(keys), dropna=False, sort=True):
        g = g[g["request_id"].astype(str).isin(have)]
        if "batch_size" in g.columns and (g["batch_size"] == 1).any():
            g = g[g["batch_size"] == 1]
        if len(g):
            lat = pd.to_numeric(g["latency_s"], errors="coerce")
            i = (lat - lat.median()).abs().fillna(np.inf).to_numpy().argmin()
            return str(g["request_id"].iloc[int(i)])
    # no reference-clock request has marks (e.g. traces of part of a run): any request that has
    any_ = run.requests[run.requests["request_id"].astype(str).isin(have)]
    if len(any_):
        lat = pd.to_numeric(any_["latency_s"], errors="coerce")
        return str(any_["request_id"].iloc[int((lat - lat.median()).abs().fillna(np.inf).to_numpy().argmin())])
    return None


def build_report(run_dir: str | Path, out_dir: str | Path | None = None, *, latency_limit: float = 0.05,
                 request_id: str | None = None, html_page: bool = True, n_boot: int = 2000,
                 seed: int = 0) -> Report:
    """Compute, draw and write the report of ``run_dir`` (see the module docstring).

    Args:
        out_dir: default ``RUN_DIR/report``; created if needed, files in it are overwritten.
        latency_limit: allowed latency increase for the constrained optimum (0.05 = +5 %).
        request_id: request whose power trace is drawn; default: a median-latency request at
            the reference clock of the first model × task.
        html_page: write report.html.

    Raises:
        DataNotFound: see :func:`load_run`.
        ConfigError: ``latency_limit`` is negative / not finite, or ``request_id`` is unknown.
    """
    if not (latency_limit >= 0 and math.isfinite(latency_limit)):
        raise ConfigError(f"--latency-limit must be a fraction >= 0 (0.05 = +5 %), got {latency_limit!r}")
    run = load_run(run_dir)
    if request_id is not None and request_id not in set(run.requests["request_id"].astype(str)):
        raise ConfigError(f"request {request_id!r} is not in {run.path / 'requests.parquet'}; "
                          "pick a request_id from requests.csv")
    out = Path(out_dir) if out_dir is not None else run.path / "report"
    figdir = out / "figures"
    figdir.mkdir(parents=True, exist_ok=True)

    req = run.requests
    keys = an.default_group_keys(req)
    summary = an.summarize(req, group_keys=keys, n_boot=n_boot, seed=seed)
    optimal = an.optimal_clocks(summary, latency_limit=latency_limit, group_keys=keys)
    ppoints = an.phase_points(req, group_keys=keys)
    fits = an.phase_scaling(req, group_keys=keys)
    corr = an.feature_correlations(req, group_keys=keys, per_clock=True)
    reg = an.feature_regression(req, group_keys=keys, per_clock=True)
    ref_req = _reference_subset(req, summary, keys)
    corr_ref = an.feature_correlations(ref_req, group_keys=keys, per_clock=False)
    reg_ref = an.feature_regression(ref_req, group_keys=keys, per_clock=False)
    key = key_table(summary, optimal, keys)

    from . import plots  # matplotlib only when drawing

    figures: dict[str, tuple[Path, str]] = {}

    def fig(name: str, caption: str, fn, *args, **kw) -> None:
        p = figdir / f"{name}.png"
        f = fn(*args, path=p, **kw)
        f.clear()
        figures[name] = (p, caption)

    fig("energy_vs_clock", "Median energy per request vs SM clock, per model and task, with 95 % bootstrap CIs.",
        plots.plot_metric_vs_clock, summary, "energy_j")
    fig("latency_vs_clock", "Median latency per request vs SM clock, with 95 % bootstrap CIs.",
        plots.plot_metric_vs_clock, summary, "latency_s")
    fig("j_per_token_vs_clock", "Median energy per output token vs SM clock, with 95 % bootstrap CIs.",
        plots.plot_metric_vs_clock, summary, "j_per_token")
    fig("pareto", "Energy–latency trade-off per clock point; the red line is the Pareto frontier "
        "(no other point is both faster and cheaper).", plots.plot_pareto, summary)
    if len(fits) and (fits["n_points"] > 1).any():
        fig("phase_fits", "Prefill (time to first token) and decode (time per token) time and average power vs "
            "clock, with the fitted models time ≈ a + b/f and power ≈ c + d·f^k.",
            plots.plot_phase_fits, ppoints, fits)
    trace_note = None
    rid = request_id or _choose_request(run, summary, keys)
    if rid is not None and run.tokens is not None and run.power is not None:
        try:
            fig("power_trace", f"Power during request {rid}: prefill (orange) and decode (green) spans, token "
                "boundaries (grey lines) and the energy attributed to each token (bottom).",
                plots.plot_power_trace, run.power, run.tokens, rid, requests=req)
        except ValueError as e:
            if request_id is not None:
                raise ConfigError(str(e)) from e
            trace_note = f"No power trace drawn: {e}."
    elif run.tokens is None or run.power is None:
        trace_note = None  # load_run already noted the missing file
    else:
        trace_note = "No power trace drawn: no request has token marks."
    feats = feature_columns(req)
    if feats:
        fig("feature_scatter", "Energy per request vs each input feature at the reference clock, with "
            "least-squares lines per model and task.", plots.plot_feature_scatter, ref_req, feats,
            group_keys=keys)
        fig("correlation_heatmap", "Spearman rank correlation of each input feature with energy and latency at "
            "the reference clock; * = Benjamini-Hochberg q < 0.05, grey = undefined.",
            plots.plot_correlation_heatmap, corr_ref)

    rep = Report(run=run, out_dir=out, group_keys=keys, latency_limit=latency_limit, summary=summary,
                 optimal=optimal, phase_points=ppoints, phase_fits=fits, correlations=corr, regression=reg,
                 key=key, findings=findings(summary, optimal, corr_ref, keys, latency_limit),
                 cannot_conclude=cannot_conclude(run, summary, optimal, fits, corr, reg_ref, keys, trace_note),
                 figures=figures, trace_request=rid if "power_trace" in figures else None, files=[])
    tables = {"key_table": key, "summary": summary, "optimal_clocks": optimal, "phase_points": ppoints,
              "phase_fits": fits, "correlations": corr, "regression": reg}
    for name in CSV_TABLES:
        p = out / f"{name}.csv"
        tables[name].to_csv(p, index=False)
        rep.files.append(p)
    md = out / "report.md"
    md.write_text(render_markdown(rep, corr_ref, reg_ref), encoding="utf-8")
    rep.files.append(md)
    if html_page:
        h = out / "report.html"
        h.write_text(render_html(rep, corr_ref, reg_ref), encoding="utf-8")
        rep.files.append(h)
    rep.files.extend(p for p, _ in figures.values())
    return rep


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _display_key(rep: Report, *, ci: bool) -> tuple[list[str], list[list[Any]], list[str]]:
    """Header, cells and row classes of the key table for HTML/Markdown. A cell is a string or
    a (value, interval) pair of strings."""
    k = rep.key
    head = [("batch" if g == "batch_size" else g) for g in rep.group_keys] + [
        "clock", "n", "energy / request (J)", "J / token", "latency (s)", "TTFT (ms)", "TPOT (ms)",
        "avg power (W)", "quality", "Δ energy %", "Δ J/token %", "Δ latency %", "note"]
    rows, classes = [], []
    n_points = k.groupby(list(rep.group_keys), dropna=False)["clock"].transform("size") if len(k) else []
    for (_, r), npts in zip(k.iterrows(), n_points):
        def cell(m: str, scale: float = 1.0) -> Any:
            v = fmt_num(r[m] * scale if not _isnan(r[m]) else r[m])
            c = fmt_ci(r[f"{m}_ci_low"] * scale, r[f"{m}_ci_high"] * scale) if ci else ""
            return (v, c) if c else v

        def delta(m: str) -> Any:
            if npts < 2:
                return "–"
            if "reference" in str(r["note"]):
                return "ref"
            v = fmt_pct(r[f"{m}_delta_pct"])
            c = fmt_ci(r[f"{m}_delta_pct_ci_low"], r[f"{m}_delta_pct_ci_high"], "pct") if ci else ""
            return (v, c) if c else v
        rows.append([("–" if _isnan(r[g]) else str(r[g])) for g in rep.group_keys] + [
            str(r["clock"]), str(r["n"]), cell("energy_j"), cell("j_per_token"), cell("latency_s"),
            cell("ttft_s", 1e3), cell("tpot_s", 1e3), cell("avg_power_w"), cell("quality"),
            delta("energy_j"), delta("j_per_token"), delta("latency_s"), str(r["note"])])
        note = str(r["note"])
        classes.append("best" if "lowest energy" in note.split(", ") else
                       "limited" if "lowest energy within limit" in note else
                       "ref" if "reference" in note else "")
    return head, rows, classes


def _md_table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def esc(c: Any) -> str:
        c = " ".join(c) if isinstance(c, tuple) else str(c)
        return c.replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(esc(h) for h in head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _optimal_rows(rep: Report) -> tuple[list[str], list[list[str]]]:
    head = [("batch" if g == "batch_size" else g) for g in rep.group_keys] + [
        "clock points", "reference", "lowest energy", "saving % [95 % CI]", "Δ latency %",
        f"lowest within +{rep.latency_limit * 100:g} % latency", "saving % [95 % CI]", "Δ latency %", "status"]
    rows = []
    for _, o in rep.optimal.iterrows():
        def s(prefix: str) -> list[str]:
            if f"{prefix}_label" not in o or _isnan(o.get(f"{prefix}_saving_pct")):
                return ["–", "–", "–"]
            if o[f"{prefix}_label"] == o["ref_label"]:
                return [str(o[f"{prefix}_label"]), "0 (reference)", "+0.0"]
            ci = fmt_ci(o[f"{prefix}_saving_pct_ci_low"], o[f"{prefix}_saving_pct_ci_high"], "pct", plus=False)
            return [str(o[f"{prefix}_label"]), f"{fmt_pct(o[f'{prefix}_saving_pct'], plus=False)} {ci}".strip(),
                    fmt_pct(o[f"{prefix}_latency_delta_pct"])]
        rows.append([("–" if _isnan(o[g]) else str(o[g])) for g in rep.group_keys] +
                    [str(o["n_points"]), str(o["ref_label"])] + s("best") + s("limited") + [str(o["status"])])
    return head, rows


def _fit_rows(rep: Report) -> tuple[list[str], list[list[str]]]:
    f = rep.phase_fits
    head = [("batch" if g == "batch_size" else g) for g in rep.group_keys] + [
        "phase", "points", "time a (s)", "time b (s·MHz)", "time R²", "power c (W)", "power d·f_max^k (W)",
        "power k", "power R²", "f_opt fit (MHz)", "f_opt data (MHz)", "J/token saving at f_opt data %", "status"]
    rows = []
    for _, r in f.iterrows():
        rows.append([("–" if _isnan(r[g]) else str(r[g])) for g in rep.group_keys] + [
            str(r["phase"]), str(r["n_points"]), fmt_num(r["time_a_s"]), fmt_num(r["time_b_s_mhz"]),
            fmt_num(r["time_r2"], 4), fmt_num(r["power_c_w"]), fmt_num(r["power_dyn_at_f_max_w"]),
            fmt_num(r["power_k"]), fmt_num(r["power_r2"], 4), fmt_num(r["f_opt_fit_mhz"], 4),
            fmt_num(r["f_opt_data_mhz"], 4), fmt_pct(r["saving_at_opt_data_pct"], plus=False), str(r["status"])])
    return head, rows


def _corr_rows(rep: Report, corr_ref: pd.DataFrame, limit: int = 40) -> tuple[list[str], list[list[str]]]:
    head = [("batch" if g == "batch_size" else g) for g in rep.group_keys] + [
        "feature", "target", "n", "Pearson r", "p", "Spearman ρ", "p", "q (Spearman)", "note"]
    if corr_ref.empty:
        return head, []
    c = corr_ref.reindex(corr_ref["spearman_rho"].abs().sort_values(ascending=False, na_position="last").index)
    rows = []
    for _, r in c.head(limit).iterrows():
        rows.append([("–" if _isnan(r[g]) else str(r[g])) for g in rep.group_keys] + [
            str(r["feature"]), str(r["target"]), str(r["n"]), fmt_num(r["pearson_r"]), fmt_num(r["pearson_p"], 2),
            fmt_num(r["spearman_rho"]), fmt_num(r["spearman_p"], 2), fmt_num(r["spearman_q"], 2), str(r["note"])])
    return head, rows


def _reg_rows(rep: Report, reg_ref: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    head = [("batch" if g == "batch_size" else g) for g in rep.group_keys] + [
        "feature", "standardised β", "coef (J per unit)", "p", "note", "n", "R²", "adj. R²", "status"]
    rows = []
    for _, r in reg_ref.iterrows():
        rows.append([("–" if _isnan(r[g]) else str(r[g])) for g in rep.group_keys] + [
            str(r["feature"]), fmt_num(r["beta"]), fmt_num(r["coef"]), fmt_num(r["p_value"], 2), str(r["note"]),
            str(r["n"]), fmt_num(r["r2"]), fmt_num(r["adj_r2"]), str(r["status"])])
    return head, rows


def _run_facts(rep: Report) -> list[tuple[str, str]]:
    req = rep.run.requests
    m = rep.run.manifest
    facts = [("run directory", str(rep.run.path.resolve())), ("requests", str(len(req))),
             ("models", ", ".join(sorted(map(str, req["model"].dropna().unique())))),
             ("tasks", ", ".join(sorted(map(str, req["task"].dropna().unique())))),
             ("clock points", str(rep.summary[list(an.CLOCK_KEYS)].drop_duplicates().shape[0])),
             ("GPU", ", ".join(sorted(map(str, req["gpu_name"].dropna().unique()))) or "–"),
             ("energy method", ", ".join(sorted(map(str, req["energy_method"].dropna().unique()))) or "–")]
    for k, v in m.items():
        if isinstance(v, (str, int, float, bool)) and v is not None:
            facts.append((f"manifest: {k}", str(v)))
    return facts


def render_markdown(rep: Report, corr_ref: pd.DataFrame, reg_ref: pd.DataFrame) -> str:
    """report.md: the same content as the HTML page, figures referenced as ``figures/*.png``."""
    L = [f"# llm_dvfs report: {rep.run.path.resolve().name}", ""]
    L += [_md_table(["", ""], _run_facts(rep)), "", "## Findings", ""]
    L += [f"- {f}" for f in rep.findings] + [""]
    head, rows, _ = _display_key(rep, ci=True)
    L += ["## Key table", "", "Medians per clock point [95 % bootstrap CI]; quality is a mean. Δ is relative to "
          "the reference (highest) clock of each model and task.", "", _md_table(head, rows), ""]
    L += ["## What cannot be concluded", ""] + [f"- {c}" for c in rep.cannot_conclude] + [""]
    L += ["## Figures", ""]
    for name, (p, cap) in rep.figures.items():
        L += [f"![{name}](figures/{p.name})", "", f"*{cap}*", ""]
    h, r = _optimal_rows(rep)
    L += ["## Energy-optimal clocks", "", _md_table(h, r), ""]
    h, r = _fit_rows(rep)
    L += ["## Prefill and decode scaling", "", "time ≈ a + b/f (prefill: time to first token per request; decode: "
          "time per output token), power ≈ c + d·f^k; f in MHz.", "", _md_table(h, r), ""]
    h, r = _corr_rows(rep, corr_ref)
    L += ["## Input features", "", "Correlations at the reference clock (strongest first; all clock points are in "
          "correlations.csv).", "", _md_table(h, r) if r else "No input features.", ""]
    h, r = _reg_rows(rep, reg_ref)
    L += ["Multiple linear regression of energy per request on the features at the reference clock.", "",
          _md_table(h, r) if r else "No input features.", ""]
    L += ["## Files", ""] + [f"- `{p.name}`" for p in rep.out_dir.glob("*.csv")] + [""]
    return "\n".join(L)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2329}
main{max-width:1320px;margin:0 auto;padding:24px 32px 64px;background:#fff;min-height:100vh}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;margin:34px 0 10px;border-bottom:2px solid #e4e7eb;padding-bottom:4px}
.sub{color:#59636e;margin:0 0 18px}
ul.findings li{margin:6px 0;line-height:1.45}
ul.caveats li{margin:6px 0;line-height:1.45}
section.caveats{background:#fff8e6;border-left:4px solid #e0a100;padding:4px 18px 10px;margin-top:26px}
table{border-collapse:collapse;font-size:12.5px;margin:8px 0 4px;width:100%}
th,td{padding:4px 7px;border-bottom:1px solid #e4e7eb;text-align:right;white-space:nowrap;vertical-align:top}
th{background:#eef1f4;position:sticky;top:0}
td.t,th.t{text-align:left}
td .ci{display:block;font-size:10.5px;color:#6b7580;font-weight:400}
th{white-space:normal}
tr:nth-child(even) td{background:#fafbfc}
tr.ref td{font-weight:600}
tr.best td{background:#e3f5e6}
tr.limited td{background:#eef9f0}
.scroll{overflow-x:auto}
figure{margin:18px 0 26px}figure img{max-width:100%;border:1px solid #e4e7eb}
figcaption{color:#59636e;font-size:13px;margin-top:4px}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 16px;font-size:13px}
dl.facts dt{color:#59636e}dl.facts dd{margin:0;word-break:break-all}
pre{background:#f3f4f6;padding:10px;font-size:12px;overflow-x:auto}
"""


def _html_table(head: Sequence[str], rows: Sequence[Sequence[str]], classes: Sequence[str] | None = None,
                text_cols: Sequence[int] = ()) -> str:
    tc = set(text_cols)
    out = ['<div class="scroll"><table><thead><tr>']
    out += [f'<th class="{"t" if i in tc else ""}">{html.escape(str(h))}</th>' for i, h in enumerate(head)]
    out.append("</tr></thead><tbody>")
    for j, r in enumerate(rows):
        cls = classes[j] if classes else ""
        cells = []
        for i, c in enumerate(r):
            body = (f'{html.escape(c[0])}<span class="ci">{html.escape(c[1])}</span>' if isinstance(c, tuple)
                    else html.escape(str(c)))
            cells.append(f'<td class="{"t" if i in tc else ""}">{body}</td>')
        out.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    return "".join(out)


def render_html(rep: Report, corr_ref: pd.DataFrame, reg_ref: pd.DataFrame) -> str:
    """report.html: self-contained (inline CSS, base64 PNG figures, no scripts or links)."""
    e = html.escape
    ng = len(rep.group_keys)
    name = rep.run.path.resolve().name
    P = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>llm_dvfs report: {e(name)}</title><style>{_CSS}</style></head><body><main>",
         f"<h1>llm_dvfs report: {e(name)}</h1>"]
    req = rep.run.requests
    P.append(f'<p class="sub">{len(req)} requests · {req["model"].nunique()} model(s) · {req["task"].nunique()} '
             f'task(s) · {rep.summary[list(an.CLOCK_KEYS)].drop_duplicates().shape[0]} clock point(s) · '
             f'{e(", ".join(sorted(map(str, req["gpu_name"].dropna().unique()))) or "unknown GPU")}</p>')
    P.append('<h2 id="findings">Findings</h2><ul class="findings">' +
             "".join(f"<li>{e(f)}</li>" for f in rep.findings) + "</ul>")
    head, rows, classes = _display_key(rep, ci=True)
    P.append('<h2 id="key-table">Key table</h2><p class="sub">Medians per clock point with 95 % bootstrap '
             'intervals in brackets (quality: mean). Δ is relative to the reference (highest) clock of each model '
             'and task. Bold: reference; green: lowest energy; light green: lowest energy within the latency '
             f'limit (+{rep.latency_limit * 100:g} %).</p>')
    P.append(_html_table(head, rows, classes, text_cols=list(range(ng + 1)) + [len(head) - 1]))
    P.append('<section class="caveats"><h2 id="cannot-conclude">What cannot be concluded</h2><ul class="caveats">' +
             "".join(f"<li>{e(c)}</li>" for c in rep.cannot_conclude) + "</ul></section>")
    P.append('<h2 id="figures">Figures</h2>')
    for fname, (p, cap) in rep.figures.items():
        b64 = base64.b64encode(p.read_bytes()).decode("ascii")
        P.append(f'<figure id="fig-{e(fname)}"><img alt="{e(fname)}" src="data:image/png;base64,{b64}">'
                 f"<figcaption>{e(cap)}</figcaption></figure>")
    h, r = _optimal_rows(rep)
    P.append('<h2 id="optimal">Energy-optimal clocks</h2>' + _html_table(h, r, text_cols=list(range(ng)) + [len(h) - 1]))
    h, r = _fit_rows(rep)
    P.append('<h2 id="phases">Prefill and decode scaling</h2><p class="sub">time ≈ a + b/f (prefill: time to first '
             'token per request; decode: time per output token), power ≈ c + d·f^k, f in MHz; fitted to the medians '
             'per clock point. f_opt: the clock with the lowest energy per token (fit: over the measured range; data: '
             'among the measured points).</p>' + _html_table(h, r, text_cols=list(range(ng + 1)) + [len(h) - 1]))
    h, r = _corr_rows(rep, corr_ref)
    P.append('<h2 id="features">Input features</h2><p class="sub">Correlations at the reference clock, strongest first '
             '(every clock point: correlations.csv).</p>' +
             (_html_table(h, r, text_cols=list(range(ng + 2)) + [len(h) - 1]) if r else "<p>No input features.</p>"))
    h, r = _reg_rows(rep, reg_ref)
    P.append('<p class="sub">Multiple linear regression of energy per request on the features at the reference '
             'clock (standardised β: SD of energy per SD of the feature, others held fixed).</p>' +
             (_html_table(h, r, text_cols=list(range(ng + 1)) + [ng + 4, len(h) - 1]) if r else "<p>No input features.</p>"))
    P.append('<h2 id="run">Run</h2><dl class="facts">' +
             "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in _run_facts(rep)) + "</dl>")
    if rep.run.manifest:
        P.append("<details><summary>manifest.json</summary><pre>" +
                 e(json.dumps(rep.run.manifest, indent=2, default=str)[:20000]) + "</pre></details>")
    P.append("<p class=\"sub\">Tables: " + ", ".join(e(f"{n}.csv") for n in CSV_TABLES) + " (next to this page).</p>")
    P.append("</main></body></html>")
    return "\n".join(P)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llm_dvfs.report",
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
    p.add_argument("--no-html", action="store_true", help="do not write report.html")
    p.add_argument("--n-boot", metavar="N", type=int, default=2000,
                   help="bootstrap resamples per confidence interval (default 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0; results are reproducible)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m llm_dvfs.report``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.n_boot < 1:
        print("llm_dvfs.report: error: --n-boot must be >= 1", file=sys.stderr)
        return 2
    try:
        rep = build_report(args.run_dir, args.out, latency_limit=args.latency_limit, request_id=args.request,
                           html_page=not args.no_html, n_boot=args.n_boot, seed=args.seed)
    except (ConfigError, DataNotFound) as e:
        print(f"llm_dvfs.report: error: {e}", file=sys.stderr)
        return 2
    except LlmDvfsError as e:  # pragma: no cover - nothing else is expected here
        print(f"llm_dvfs.report: error: {e}", file=sys.stderr)
        return 1
    print(f"llm_dvfs report: {rep.run.path}")
    print()
    print(rep.key_text())
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
