"""Building a report: compute the statistics, draw the figures and write every file.

:func:`build_report` is what ``python -m llm_dvfs.report`` runs. It writes into
``RUN_DIR/report/`` (or ``out_dir``): ``report.html``, ``report.md``, ``figures/*.png`` and the
CSV tables of :data:`~llm_dvfs.analysis.rundata.CSV_TABLES`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from llm_dvfs.analysis.dvfs_fit import phase_points, phase_scaling
from llm_dvfs.analysis.feature_stats import feature_correlations, feature_regression
from llm_dvfs.analysis.findings import cannot_conclude, edp_notes, findings, key_table, power_notes, saving_notes
from llm_dvfs.analysis.render import render_html, render_markdown
from llm_dvfs.analysis.rundata import CSV_TABLES, Report, RunData, load_run
from llm_dvfs.analysis.served import accounting_lines, caveats, is_served, load_table, steady_rows
from llm_dvfs.analysis.summary import CLOCK_KEYS, default_group_keys, optimal_clocks, summarize
from llm_dvfs.analysis.tradeoffs import cell_power, edp_optima, edp_table
from llm_dvfs.errors import ConfigError, DataNotFound
from llm_dvfs.schema import feature_columns, numeric_view

#: Power-timeline panels drawn at most (every cell is in cell_power.csv).
MAX_TIMELINE_CELLS = 24


def _reference_subset(requests: pd.DataFrame, summary: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """The requests measured at their group's reference clock point."""
    ref = summary[summary["is_reference"]][list(keys) + list(CLOCK_KEYS)]
    if ref.empty:
        return requests.iloc[0:0]
    for k in ref.columns:  # an all-null key (served traffic's batch_size) comes back as object
        if ref[k].dtype != requests[k].dtype:
            ref = ref.assign(**{k: ref[k].astype(requests[k].dtype)})
    m = requests.merge(ref.assign(_ref=True), on=list(keys) + list(CLOCK_KEYS), how="left")
    return requests[m["_ref"].eq(True).to_numpy(dtype=bool)]  # unmatched rows: NaN, not the reference


def _nothing_to_report(requests: pd.DataFrame, run_path: Path) -> str:
    """Why a run with rows has no request the statistics can use, and what to do."""
    err = requests["error"].dropna().astype(str) if "error" in requests.columns else pd.Series(dtype=str)
    why = (f"all {len(requests)} request(s) failed, e.g.: {err.iloc[0]}" if len(err) == len(requests) and len(err)
           else f"none of its {len(requests)} request(s) is a measured, successful one")
    return (f"nothing to report in {run_path}: {why}. Fix the cause (run.log has every error) and run the "
            f"cells again, e.g. python -m llm_dvfs.run --resume {run_path}")


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
        ConfigError: ``latency_limit`` is negative / not finite, ``request_id`` is unknown, or
            ``out_dir`` cannot be written.
    """
    if not (latency_limit >= 0 and math.isfinite(latency_limit)):
        raise ConfigError(f"--latency-limit must be a fraction >= 0 (0.05 = +5 %), got {latency_limit!r}")
    run = load_run(run_dir)
    if request_id is not None and request_id not in set(run.requests["request_id"].astype(str)):
        raise ConfigError(f"request {request_id!r} is not in {run.path / 'requests.parquet'}; "
                          "pick a request_id from requests.csv")
    out = Path(out_dir) if out_dir is not None else run.path / "report"
    figdir = out / "figures"
    try:
        figdir.mkdir(parents=True, exist_ok=True)
        probe = figdir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")  # a real write (root passes os.access and mkdir on read-only mounts)
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"cannot write the report to {str(out)!r}: {e.strerror}; pass --out DIR "
                          "with a writable directory") from None

    # load_run keeps the schema's nullable dtypes (what the files hold); the statistics compute on
    # numpy floats, where a null is NaN
    run_np = dataclasses.replace(run, requests=numeric_view(run.requests),
                                 tokens=None if run.tokens is None else numeric_view(run.tokens),
                                 power=None if run.power is None else numeric_view(run.power))
    # served traffic: the load table from every row; the statistics below from the steady state
    served_load = load_table(run_np.requests, run.manifest) if is_served(run_np.requests) else pd.DataFrame()
    req, left_out = steady_rows(run_np.requests)
    if req.empty:
        raise DataNotFound(_nothing_to_report(run_np.requests, run.path))
    keys = default_group_keys(req)
    summary = summarize(req, group_keys=keys, n_boot=n_boot, seed=seed)
    optimal = optimal_clocks(summary, latency_limit=latency_limit, group_keys=keys)
    ppoints = phase_points(req, group_keys=keys)
    fits = phase_scaling(req, group_keys=keys)
    corr = feature_correlations(req, group_keys=keys, per_clock=True)
    reg = feature_regression(req, group_keys=keys, per_clock=True)
    ref_req = _reference_subset(req, summary, keys)
    corr_ref = feature_correlations(ref_req, group_keys=keys, per_clock=False)
    reg_ref = feature_regression(ref_req, group_keys=keys, per_clock=False)
    key = key_table(summary, optimal, keys)
    edp = edp_table(summary, keys)
    edp_opt = edp_optima(edp, keys)
    cells = cell_power(run_np.power)

    from llm_dvfs.analysis import plots  # matplotlib only when drawing

    figures: dict[str, tuple[Path, str]] = {}
    notes: dict[str, list[str]] = {}

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
    if (edp_opt["status"] == "ok").any():
        fig("edp_vs_clock", "Energy–delay product EDP = E·t and ED²P = E·t² vs SM clock per model and task, "
            "each divided by its value at the highest clock (E: median energy per request, t: median latency).",
            plots.plot_edp_vs_clock, edp)
        notes["edp_vs_clock"] = edp_notes(edp_opt, keys)
        fig("saving_vs_slowdown", "Energy saving % vs slowdown % against the highest clock, one marker per clock "
            "point; the Pareto front is filled and joined in red.", plots.plot_saving_vs_slowdown, edp)
        notes["saving_vs_slowdown"] = saving_notes(edp, keys)
    if len(cells):
        fig("power_timeline", "Power vs time of each cell (model × task × clock point × batch size), from "
            "power.parquet; titles: time-weighted mean power and energy of the trace.",
            plots.plot_power_timeline, run_np.power, cells, max_cells=MAX_TIMELINE_CELLS)
        notes["power_timeline"] = power_notes(cells, MAX_TIMELINE_CELLS)
    if len(fits) and (fits["n_points"] > 1).any():
        fig("phase_fits", "Prefill (time to first token) and decode (time per token) time and average power vs "
            "clock, with the fitted models time ≈ a + b/f and power ≈ c + d·f^k.",
            plots.plot_phase_fits, ppoints, fits)
    if len(served_load):
        fig("load_energy", "Served traffic: median energy per request and energy per output token (Σ energy / "
            "Σ tokens) vs load, one line per clock point.", plots.plot_load_energy, served_load)
        fig("load_latency", "Served traffic: time to first token, time per output token and queueing delay vs load: "
            "p50 solid, p90 dashed, p99 dotted.", plots.plot_load_latency, served_load)
    trace_note = None
    rid = request_id or _choose_request(run_np, summary, keys)
    if rid is not None and run.tokens is not None and run.power is not None:
        try:
            fig("power_trace", f"Power during request {rid}: prefill (orange) and decode (green) spans, token "
                "boundaries (grey lines) and the energy attributed to each token (bottom).",
                plots.plot_power_trace, run_np.power, run_np.tokens, rid, requests=req)
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
                 cannot_conclude=cannot_conclude(run_np, summary, optimal, fits, corr, reg_ref, keys, trace_note)
                 + caveats(run_np.requests) + left_out,
                 figures=figures, trace_request=rid if "power_trace" in figures else None, files=[],
                 edp=edp, edp_optima=edp_opt, cell_power=cells, figure_notes=notes, served_load=served_load,
                 served_notes=accounting_lines(run.manifest) if len(served_load) else [])
    tables = {"key_table": key, "summary": summary, "optimal_clocks": optimal, "phase_points": ppoints,
              "phase_fits": fits, "correlations": corr, "regression": reg, "edp": edp, "edp_optima": edp_opt,
              "cell_power": cells}
    for name in CSV_TABLES:
        p = out / f"{name}.csv"
        tables[name].to_csv(p, index=False)
        rep.files.append(p)
    if len(served_load):  # only for runs with served traffic
        p = out / "served_load.csv"
        served_load.to_csv(p, index=False)
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
