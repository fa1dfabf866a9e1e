"""What a report says: the key table, the headline findings and what cannot be concluded.

Sentences and tables built from the statistics of :mod:`llm_dvfs.analysis.summary`,
:mod:`llm_dvfs.analysis.dvfs_fit` and :mod:`llm_dvfs.analysis.feature_stats`. Clock-event
(throttle) bits are named through :mod:`llm_dvfs.control.clock_events`, the one table of them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from llm_dvfs.analysis.render import fmt_num, fmt_pct, group_label, is_missing
from llm_dvfs.analysis.rundata import RunData
from llm_dvfs.analysis.summary import center_column, valid_mask
from llm_dvfs.control.clock_events import THROTTLE_MASK, throttle_labels
from llm_dvfs.schema import feature_columns

# Energy-method precision, from the measurements in docs/design.md (H100, vs the hardware counter).
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
            c = center_column(m)
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


# --------------------------------------------------------------------------------------------
# findings and caveats
# --------------------------------------------------------------------------------------------
def findings(summary: pd.DataFrame, optimal: pd.DataFrame, corr_ref: pd.DataFrame,
             keys: Sequence[str], latency_limit: float) -> list[str]:
    """Headline sentences, one or two per group, plus the strongest feature associations."""
    out = []
    for _, o in optimal.iterrows():
        g = group_label(o, keys)
        sub = summary
        for k in keys:
            sub = sub[sub[k].isna()] if is_missing(o[k]) else sub[sub[k] == o[k]]
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
                where = (group_label(t.iloc[0], keys) if n_groups == 1 else
                         f"in {len(t)} of {n_groups} model × task groups" if len(t) > 1 else
                         f"for {group_label(t.iloc[0], keys)}")
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
            "; ".join(group_label(r, keys) for _, r in one.iterrows())
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
    valid_q = valid_mask(req["quality_valid"]) & req["quality"].notna().to_numpy(dtype=bool)
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
                   "request (docs/design.md measured ±20 % throughput spread between identical runs) is not separated "
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
    # only the limiting bits (power cap, slowdowns, power brake) count: idle, application clocks,
    # sync boost and display clock are not throttling
    reasons = pd.to_numeric(summary["clock_event_reasons"], errors="coerce").fillna(0).astype("int64")
    throttled = summary[(reasons & THROTTLE_MASK) != 0]
    if len(throttled):
        parts = []
        for _, r in throttled.iterrows():
            bits = throttle_labels(int(r["clock_event_reasons"]) & THROTTLE_MASK)
            parts.append(f"{group_label(r, keys)} at {r['clock_label']} ({', '.join(bits)})")
        out.append("The GPU reported clock throttling for " + "; ".join(parts[:8]) + (" …" if len(parts) > 8 else "")
                   + ": those requests did not necessarily run at the requested clock.")
    locked = summary[~summary["observe"]]
    off = locked[(locked["sm_mhz_observed_median"] - locked["sm_mhz_requested"]).abs() > CLOCK_MISMATCH_MHZ]
    if len(off):
        parts = [f"{group_label(r, keys)} at {r['clock_label']} ran at ~{r['sm_mhz_observed_median']:.0f} MHz"
                 for _, r in off.iterrows()]
        out.append("The observed SM clock differs from the requested one by more than "
                   f"{CLOCK_MISMATCH_MHZ:.0f} MHz: " + "; ".join(parts[:8]) + (" …" if len(parts) > 8 else "")
                   + ". Effects are attributed to the requested clock on the clock axes.")
    if len(optimal) and (optimal["status"] == "ok").any():
        ok = optimal[optimal["status"] == "ok"]
        ns = ok[~ok["best_significant"].astype(bool) & (ok["best_label"] != ok["ref_label"])]
        if len(ns):
            out.append("For " + "; ".join(group_label(r, keys) for _, r in ns.iterrows()) + ", the lowest-energy "
                       "clock's saving has a 95 % interval that includes 0: it may be noise.")
        edge = ok[(ok["best_clock_mhz"] <= summary["clock_mhz"].min()) & (ok["best_label"] != ok["ref_label"])]
        if len(edge):
            out.append("For " + "; ".join(group_label(r, keys) for _, r in edge.iterrows()) + ", the lowest "
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
    # gpu_name is null when no GPU was measured (a CPU run), not an unnamed GPU
    where = ", ".join(gpus) if gpus else "this machine (no GPU was measured)"
    out.append("All results hold for " + where + ", this driver, "
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
# how to read the trade-off figures (with their numbers)
# --------------------------------------------------------------------------------------------
EDP_HOWTO = ("How to read: each curve multiplies the median energy per request E by the median latency t "
             "at each SM clock — EDP = E·t (solid), ED²P = E·t² (dashed), which weighs time more — and "
             "divides by its value at the highest clock, so 1 is the highest clock and below 1 is better. "
             "Energy alone favours low clocks and ED²P favours high ones; a minimum inside the range is a clock "
             "that saves energy without giving up much speed. The ringed point is each curve's lowest.")
SAVING_HOWTO = ("How to read: each marker is one clock point; up is energy saved against the highest clock, "
                "right is the latency given up. The filled red points are the Pareto front: for every hollow "
                "point some front point saves at least as much energy with no more slowdown, so only front "
                "points are worth choosing; the steepness of the front is how much energy each percent of "
                "slowdown buys. Points below 0 use more energy than the highest clock.")
POWER_HOWTO = ("How to read: the raw power samples of each cell (all its requests back to back, warm-up "
               "excluded), each held until the next as the meter integrates them; time runs from the cell's "
               "first sample. Plateaus are steady decoding, steps between batches show the host's work in "
               "between (tokenising, scoring). The title gives the time-weighted mean power and the energy of "
               "the whole trace of the preferred source (buffer, then instant, then average; raw samples, "
               "before the meter's lag shift and counter gain), which includes the time between batches and "
               "can therefore exceed the sum of the cell's request energies (cell_power.csv has every cell).")


def edp_notes(optima: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """How to read the EDP figure, then per group where EDP and ED²P are lowest (from
    :func:`llm_dvfs.analysis.tradeoffs.edp_optima`)."""
    out = [EDP_HOWTO]
    for _, o in optima.iterrows():
        g = group_label(o, keys)
        if o["status"] != "ok":
            out.append(f"{g}: {o['status']}; no energy–delay comparison.")
            continue
        out.append(f"{g}: EDP is lowest at {o['edp_label']} ({fmt_num(o['edp_rel'])} × the value at "
                   f"{o['ref_label']}); ED²P is lowest at {o['ed2p_label']} ({fmt_num(o['ed2p_rel'])} ×).")
    return out


def saving_notes(edp: pd.DataFrame, keys: Sequence[str], max_points: int = 6) -> list[str]:
    """How to read the saving-vs-slowdown figure, then per group the Pareto points other than
    the reference (from :func:`llm_dvfs.analysis.tradeoffs.edp_table`)."""
    out = [SAVING_HOWTO]
    if edp.empty:
        return out
    for _, g in edp.groupby(list(keys), dropna=False, sort=True):
        front = g[g["pareto"].astype(bool) & ~g["is_reference"].astype(bool)].sort_values("slowdown_pct")
        if len(g) < 2 or front.empty:
            continue
        pts = [f"{r['clock_label']} ({fmt_pct(r['saving_pct'], plus=False)} % saving at "
               f"{fmt_pct(r['slowdown_pct'])} % latency)" for _, r in front.head(max_points).iterrows()]
        out.append(f"{group_label(g.iloc[0], keys)}: Pareto front beyond the reference: " + "; ".join(pts)
                   + (" …" if len(front) > max_points else "") + ".")
    return out


def power_notes(cells: pd.DataFrame, max_cells: int = 24) -> list[str]:
    """How to read the power timeline, and how many cells it shows."""
    n = cells["cell_id"].nunique() if len(cells) else 0
    shown = f"It shows the first {max_cells} of {n} cells." if n > max_cells else f"It shows all {n} cell(s)."
    return [POWER_HOWTO + " " + shown]
