"""Rendering a report: number formatting, the terminal key table, report.md and report.html.

Nothing here computes a statistic; every function turns tables of a
:class:`~llm_dvfs.analysis.rundata.Report` into text. The HTML page is self-contained (inline
CSS, figures embedded as base64 PNG, no scripts, no external resources).
"""
from __future__ import annotations

import base64
import html
import json
import math
from typing import Any, Sequence

import pandas as pd

from llm_dvfs.analysis.rundata import CSV_TABLES, Report
from llm_dvfs.analysis.served import PERCENTILES
from llm_dvfs.analysis.summary import CLOCK_KEYS


# --------------------------------------------------------------------------------------------
# formatting helpers
# --------------------------------------------------------------------------------------------
def is_missing(x: Any) -> bool:
    """True for None, pd.NA and NaN (anything that is not a number is not missing)."""
    try:
        return x is None or x is pd.NA or math.isnan(float(x))
    except (TypeError, ValueError):
        return False


def fmt_num(x: Any, sig: int = 3, nan: str = "-") -> str:
    """A number in ``sig`` significant digits without exponent for everyday magnitudes."""
    if is_missing(x):
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
    if is_missing(x):
        return nan
    return f"{float(x):+.1f}" if plus else f"{float(x):.1f}"


def fmt_ci(lo: Any, hi: Any, kind: str = "num", nan: str = "", plus: bool = True) -> str:
    if is_missing(lo) or is_missing(hi):
        return nan
    if kind == "pct":
        return f"[{fmt_pct(lo, plus=plus)}, {fmt_pct(hi, plus=plus)}]"
    return f"[{fmt_num(lo)}, {fmt_num(hi)}]"


def group_label(row: pd.Series | dict, keys: Sequence[str]) -> str:
    """``model · task · batch 4`` for the group columns ``keys`` of ``row`` (missing ones skipped)."""
    parts = []
    for k in keys:
        v = row[k]
        if is_missing(v):
            continue
        parts.append(f"batch {v}" if k == "batch_size" else str(v))
    return " · ".join(parts)


# --------------------------------------------------------------------------------------------
# the key table as text
# --------------------------------------------------------------------------------------------
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
        lines.append([("-" if is_missing(r[k]) else str(r[k])) for k in group_keys] + [
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
            v = fmt_num(r[m] * scale if not is_missing(r[m]) else r[m])
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
        rows.append([("–" if is_missing(r[g]) else str(r[g])) for g in rep.group_keys] + [
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
            if f"{prefix}_label" not in o or is_missing(o.get(f"{prefix}_saving_pct")):
                return ["–", "–", "–"]
            if o[f"{prefix}_label"] == o["ref_label"]:
                return [str(o[f"{prefix}_label"]), "0 (reference)", "+0.0"]
            ci = fmt_ci(o[f"{prefix}_saving_pct_ci_low"], o[f"{prefix}_saving_pct_ci_high"], "pct", plus=False)
            return [str(o[f"{prefix}_label"]), f"{fmt_pct(o[f'{prefix}_saving_pct'], plus=False)} {ci}".strip(),
                    fmt_pct(o[f"{prefix}_latency_delta_pct"])]
        rows.append([("–" if is_missing(o[g]) else str(o[g])) for g in rep.group_keys] +
                    [str(o["n_points"]), str(o["ref_label"])] + s("best") + s("limited") + [str(o["status"])])
    return head, rows


def _fit_rows(rep: Report) -> tuple[list[str], list[list[str]]]:
    f = rep.phase_fits
    head = [("batch" if g == "batch_size" else g) for g in rep.group_keys] + [
        "phase", "points", "time a (s)", "time b (s·MHz)", "time R²", "power c (W)", "power d·f_max^k (W)",
        "power k", "power R²", "f_opt fit (MHz)", "f_opt data (MHz)", "J/token saving at f_opt data %", "status"]
    rows = []
    for _, r in f.iterrows():
        rows.append([("–" if is_missing(r[g]) else str(r[g])) for g in rep.group_keys] + [
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
        rows.append([("–" if is_missing(r[g]) else str(r[g])) for g in rep.group_keys] + [
            str(r["feature"]), str(r["target"]), str(r["n"]), fmt_num(r["pearson_r"]), fmt_num(r["pearson_p"], 2),
            fmt_num(r["spearman_rho"]), fmt_num(r["spearman_p"], 2), fmt_num(r["spearman_q"], 2), str(r["note"])])
    return head, rows


def _reg_rows(rep: Report, reg_ref: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    head = [("batch" if g == "batch_size" else g) for g in rep.group_keys] + [
        "feature", "standardised β", "coef (J per unit)", "p", "note", "n", "R²", "adj. R²", "status"]
    rows = []
    for _, r in reg_ref.iterrows():
        rows.append([("–" if is_missing(r[g]) else str(r[g])) for g in rep.group_keys] + [
            str(r["feature"]), fmt_num(r["beta"]), fmt_num(r["coef"]), fmt_num(r["p_value"], 2), str(r["note"]),
            str(r["n"]), fmt_num(r["r2"]), fmt_num(r["adj_r2"]), str(r["status"])])
    return head, rows


def _edp_rows(rep: Report) -> tuple[list[str], list[list[str]]]:
    head = [("batch" if g == "batch_size" else g) for g in rep.group_keys] + [
        "clock points", "reference", "lowest EDP", "EDP ÷ reference", "lowest ED²P", "ED²P ÷ reference", "status"]
    rows = []
    for _, o in rep.edp_optima.iterrows():
        rows.append([("–" if is_missing(o[g]) else str(o[g])) for g in rep.group_keys] + [
            str(o["n_points"]), str(o["ref_label"] or "–"), str(o["edp_label"] or "–"), fmt_num(o["edp_rel"]),
            str(o["ed2p_label"] or "–"), fmt_num(o["ed2p_rel"]), str(o["status"])])
    return head, rows


def _cell_power_rows(rep: Report, limit: int = 200) -> tuple[list[str], list[list[str]]]:
    head = ["cell", "GPU", "source", "samples", "duration (s)", "mean power (W)", "peak power (W)", "energy (J)"]
    c = rep.cell_power
    if c.empty:
        return head, []
    rows = [[str(r["cell_id"]), "–" if is_missing(r["device"]) else str(int(r["device"])), str(r["source"]),
             str(r["n_samples"]), fmt_num(r["duration_s"]), fmt_num(r["mean_power_w"]), fmt_num(r["peak_power_w"]),
             fmt_num(r["energy_j"])] for _, r in c[c["preferred"].astype(bool)].head(limit).iterrows()]
    return head, rows


def _served_rows(rep: Report) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the served-traffic table (one row per model × task × engine × clock
    point × load; every column is in served_load.csv)."""
    head = ["model", "task", "engine", "clock", "load", "n", "failed", "E/request (J)", "J/token",
            "TTFT p50/p90/p99 (ms)", "TPOT p50/p90/p99 (ms)", "queue p50/p99 (ms)", "arrived req/s",
            "mean concurrency"]
    rows = []
    for _, r in rep.served_load.iterrows():
        def ms(m: str, qs: Sequence[int]) -> str:
            return " / ".join(fmt_num(r[f"{m}_p{q}"] * 1e3) for q in qs)
        load = (f"{fmt_num(r['load'])} req/s" if r["load_kind"] == "rate" else f"{int(r['load'])} users")
        rows.append([str(r["model"]), str(r["task"]), str(r["engine"]), str(r["clock_label"]), load, str(r["n"]),
                     str(r["n_failed"]), fmt_num(r["energy_j_median"]), fmt_num(r["j_per_token"]),
                     ms("ttft_s", PERCENTILES), ms("tpot_s", PERCENTILES), ms("queue_s", (50, 99)),
                     fmt_num(r["arrived_rps"]), fmt_num(r["mean_concurrency"])])
    return head, rows


_SERVED_INTRO = ("Requests served under load (--engine continuous / --endpoint), per clock point and load level: "
                 "steady-state requests only (warm-up, cool-down and failed requests are counted apart). Energy "
                 "per request is the median; J/token is Σ energy / Σ output tokens; load: closed-loop users or "
                 "open-loop arrival rate; arrived req/s and mean concurrency are what was achieved.")


def _run_facts(rep: Report) -> list[tuple[str, str]]:
    req = rep.run.requests
    m = rep.run.manifest
    facts = [("run directory", str(rep.run.path.resolve())), ("requests", str(len(req))),
             ("models", ", ".join(sorted(map(str, req["model"].dropna().unique())))),
             ("tasks", ", ".join(sorted(map(str, req["task"].dropna().unique())))),
             ("clock points", str(rep.summary[list(CLOCK_KEYS)].drop_duplicates().shape[0])),
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
    if len(rep.served_load):
        h, r = _served_rows(rep)
        L += ["## Served traffic", "", _SERVED_INTRO, ""] + [f"- {x}" for x in rep.served_notes] + \
             ["", _md_table(h, r), ""]
    L += ["## What cannot be concluded", ""] + [f"- {c}" for c in rep.cannot_conclude] + [""]
    L += ["## Figures", ""]
    for name, (p, cap) in rep.figures.items():
        L += [f"![{name}](figures/{p.name})", "", f"*{cap}*", ""]
        for note in rep.figure_notes.get(name, []):
            L += [note, ""]
    h, r = _optimal_rows(rep)
    L += ["## Energy-optimal clocks", "", _md_table(h, r), ""]
    h, r = _edp_rows(rep)
    if r:
        L += ["## Energy–delay products", "", "EDP = E·t, ED²P = E·t² (E: median energy per request, t: median "
              "latency), divided by the value at the highest clock (every point: edp.csv).", "", _md_table(h, r), ""]
    h, r = _cell_power_rows(rep)
    if r:
        L += ["## Power per cell", "", "From power.parquet, preferred source per cell; zero-order hold.", "",
              _md_table(h, r), ""]
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
.howto{font-size:13px;line-height:1.45;max-width:1000px}.howto p{margin:6px 0}
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
             f'task(s) · {rep.summary[list(CLOCK_KEYS)].drop_duplicates().shape[0]} clock point(s) · '
             f'{e(", ".join(sorted(map(str, req["gpu_name"].dropna().unique()))) or "unknown GPU")}</p>')
    P.append('<h2 id="findings">Findings</h2><ul class="findings">' +
             "".join(f"<li>{e(f)}</li>" for f in rep.findings) + "</ul>")
    head, rows, classes = _display_key(rep, ci=True)
    P.append('<h2 id="key-table">Key table</h2><p class="sub">Medians per clock point with 95 % bootstrap '
             'intervals in brackets (quality: mean). Δ is relative to the reference (highest) clock of each model '
             'and task. Bold: reference; green: lowest energy; light green: lowest energy within the latency '
             f'limit (+{rep.latency_limit * 100:g} %).</p>')
    P.append(_html_table(head, rows, classes, text_cols=list(range(ng + 1)) + [len(head) - 1]))
    if len(rep.served_load):
        h, r = _served_rows(rep)
        P.append(f'<h2 id="served">Served traffic</h2><p class="sub">{e(_SERVED_INTRO)}</p><ul class="findings">' +
                 "".join(f"<li>{e(x)}</li>" for x in rep.served_notes) + "</ul>" +
                 _html_table(h, r, text_cols=[0, 1, 2, 3, 4]))
    P.append('<section class="caveats"><h2 id="cannot-conclude">What cannot be concluded</h2><ul class="caveats">' +
             "".join(f"<li>{e(c)}</li>" for c in rep.cannot_conclude) + "</ul></section>")
    P.append('<h2 id="figures">Figures</h2>')
    for fname, (p, cap) in rep.figures.items():
        b64 = base64.b64encode(p.read_bytes()).decode("ascii")
        howto = "".join(f"<p>{e(n)}</p>" for n in rep.figure_notes.get(fname, []))
        P.append(f'<figure id="fig-{e(fname)}"><img alt="{e(fname)}" src="data:image/png;base64,{b64}">'
                 f"<figcaption>{e(cap)}</figcaption>"
                 + (f'<div class="howto">{howto}</div>' if howto else "") + "</figure>")
    h, r = _optimal_rows(rep)
    P.append('<h2 id="optimal">Energy-optimal clocks</h2>' + _html_table(h, r, text_cols=list(range(ng)) + [len(h) - 1]))
    h, r = _edp_rows(rep)
    if r:
        P.append('<h2 id="edp">Energy–delay products</h2><p class="sub">EDP = E·t, ED²P = E·t² (E: median energy per '
                 'request, t: median latency), divided by the value at the highest clock; every clock point is in '
                 'edp.csv.</p>' + _html_table(h, r, text_cols=list(range(ng + 5)) + [len(h) - 1]))
    h, r = _cell_power_rows(rep)
    if r:
        P.append('<h2 id="cell-power">Power per cell</h2><p class="sub">From power.parquet: the preferred source of '
                 'each cell (buffer, instant, average), each sample held until the next; every cell and source is in '
                 'cell_power.csv.</p>' + _html_table(h, r, text_cols=[0, 2]))
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
