"""`python -m llm_dvfs.report` on synthetic run directories (and the HTML in headless Chromium)."""
from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest

from llm_dvfs import report
from llm_dvfs.analysis.build import build_report
from llm_dvfs.analysis.dvfs_fit import phase_scaling
from llm_dvfs.analysis.feature_stats import feature_correlations, feature_regression
from llm_dvfs.analysis.findings import cannot_conclude
from llm_dvfs.analysis.rundata import CSV_TABLES, RunData
from llm_dvfs.analysis.summary import default_group_keys, optimal_clocks, summarize

from report_fixtures import check_html_in_chromium, find_chromium, make_requests, make_run_dir

PYTHON_DIR = Path(__file__).resolve().parents[1] / "python"


def run_main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = report.main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def sweep_report(tmp_path_factory):
    """A 6-clock sweep (planted optimum 1200 MHz) and its report, built once."""
    base = tmp_path_factory.mktemp("sweep")
    run = make_run_dir(base / "run", n_samples=12, seed=1)
    rc, out, err = run_main([str(base / "run"), "--n-boot", "400"])
    assert rc == 0, err
    return run, base / "run" / "report", out


def _png_ok(data: bytes) -> np.ndarray:
    img = mpimg.imread(io.BytesIO(data), format="png")
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert float(np.std(img[..., :3])) > 0.01  # not a blank canvas
    return img


def test_sweep_report_writes_every_file(sweep_report):
    _, out_dir, _ = sweep_report
    for name in CSV_TABLES:
        assert (out_dir / f"{name}.csv").stat().st_size > 0, name
    assert (out_dir / "report.html").is_file() and (out_dir / "report.md").is_file()
    figs = sorted(p.name for p in (out_dir / "figures").glob("*.png"))
    assert figs == sorted(["energy_vs_clock.png", "latency_vs_clock.png", "j_per_token_vs_clock.png",
                           "pareto.png", "phase_fits.png", "power_trace.png", "feature_scatter.png",
                           "correlation_heatmap.png", "edp_vs_clock.png", "saving_vs_slowdown.png",
                           "power_timeline.png"])
    for f in figs:
        _png_ok((out_dir / "figures" / f).read_bytes())
    md = (out_dir / "report.md").read_text()
    for f in figs:
        assert f"(figures/{f})" in md
    assert "## What cannot be concluded" in md and "## Key table" in md


def test_sweep_report_shows_the_planted_optimum(sweep_report):
    run, out_dir, stdout = sweep_report
    opt = pd.read_csv(out_dir / "optimal_clocks.csv")
    assert list(opt["best_clock_mhz"]) == [run.planted_optimum_mhz] * 2 == [1200.0, 1200.0]
    assert opt["best_significant"].all()
    # terminal key table: header, the 1200 MHz rows marked as the energy minimum, reference rows
    lines = stdout.splitlines()
    header = next(l for l in lines if l.startswith("model"))
    for col in ("task", "bs", "clock", "E/req J", "J/tok", "lat s", "TTFT ms", "TPOT ms", "P W", "quality",
                "dE % [95% CI]", "dLat %", "note"):
        assert col in header
    emin = [l for l in lines if "E-min" in l and "toy/llama-tiny" in l]
    assert len(emin) == 2 and all("1200 MHz" in l for l in emin)
    refs = [l for l in lines if re.search(r"1980 MHz .* ref\s+ref\s+ref", l)]
    assert len(refs) == 2
    row = next(l for l in emin if " qa " in l)
    d_e = float(re.search(r"(-\d+\.\d) \[", row).group(1))
    assert -32 < d_e < -20
    findings = stdout.split("Findings:")[1]
    assert "1200 MHz saves" in findings and "feat_prompt_tokens" in findings


def test_key_table_csv_agrees_with_the_raw_requests(sweep_report):
    run, out_dir, _ = sweep_report
    key = pd.read_csv(out_dir / "key_table.csv")
    raw = pd.read_parquet(out_dir.parent / "requests.parquet")
    med = raw.groupby(["task", "sm_mhz_requested"])[["energy_j", "latency_s", "tpot_s"]].median()
    assert len(key) == len(med) == 12
    for _, r in key.iterrows():
        m = med.loc[(r["task"], r["clock_mhz"])]
        assert r["energy_j"] == pytest.approx(m["energy_j"])
        assert r["latency_s"] == pytest.approx(m["latency_s"])
        assert r["tpot_s"] == pytest.approx(m["tpot_s"])
    ref = key[key["clock_mhz"] == 1980.0]
    assert (ref["note"].str.contains("reference")).all() and (ref["energy_j_delta_pct"] == 0).all()


def _medians(out_dir: Path) -> pd.DataFrame:
    """Median energy and latency per task × clock, straight from requests.parquet."""
    raw = pd.read_parquet(out_dir.parent / "requests.parquet")
    return raw.groupby(["model", "task", "sm_mhz_requested"])[["energy_j", "latency_s"]].median().astype(float)


def test_edp_figure_and_its_text_match_a_direct_computation(sweep_report):
    from llm_dvfs.analysis.render import fmt_num

    _, out_dir, _ = sweep_report
    med = _medians(out_dir)
    md = (out_dir / "report.md").read_text()
    page = (out_dir / "report.html").read_text()
    assert "(figures/edp_vs_clock.png)" in md and 'id="fig-edp_vs_clock"' in page
    _png_ok((out_dir / "figures" / "edp_vs_clock.png").read_bytes())
    assert "How to read: each curve multiplies the median energy per request" in page
    edp_csv = pd.read_csv(out_dir / "edp.csv")
    for (model, task), g in med.groupby(level=[0, 1]):
        g = g.droplevel([0, 1])
        edp, ed2p = g["energy_j"] * g["latency_s"], g["energy_j"] * g["latency_s"] ** 2
        f_edp, f_ed2p = float(edp.idxmin()), float(ed2p.idxmin())
        rel_edp, rel_ed2p = edp[f_edp] / edp[1980.0], ed2p[f_ed2p] / ed2p[1980.0]
        sentence = (f"{model} · {task} · batch 1: EDP is lowest at {f_edp:.0f} MHz ({fmt_num(rel_edp)} × the value "
                    f"at 1980 MHz); ED²P is lowest at {f_ed2p:.0f} MHz ({fmt_num(rel_ed2p)} ×).")
        assert sentence in md and sentence in page
        rows = edp_csv[edp_csv["task"] == task].set_index("clock_mhz")
        np.testing.assert_allclose(rows.loc[g.index, "edp_j_s"], edp, rtol=1e-12)
        np.testing.assert_allclose(rows.loc[g.index, "ed2p_rel"], ed2p / ed2p[1980.0], rtol=1e-12)
        assert rows.index[rows["edp_min"]].tolist() == [f_edp]
    # the planted physics: ED²P, which weighs time more, never prefers a lower clock than EDP
    opt = pd.read_csv(out_dir / "edp_optima.csv")
    assert (opt["ed2p_clock_mhz"] >= opt["edp_clock_mhz"]).all() and (opt["edp_rel"] <= 1).all()


def test_saving_vs_slowdown_marks_the_pareto_front(sweep_report):
    _, out_dir, _ = sweep_report
    med = _medians(out_dir)
    md = (out_dir / "report.md").read_text()
    assert "(figures/saving_vs_slowdown.png)" in md
    _png_ok((out_dir / "figures" / "saving_vs_slowdown.png").read_bytes())
    edp_csv = pd.read_csv(out_dir / "edp.csv")
    for (model, task), g in med.groupby(level=[0, 1]):
        g = g.droplevel([0, 1])
        saving = (1 - g["energy_j"] / g.loc[1980.0, "energy_j"]) * 100
        slowdown = (g["latency_s"] / g.loc[1980.0, "latency_s"] - 1) * 100
        # Pareto: no other clock saves at least as much with no more slowdown (one of them strictly)
        front = {f for f in g.index if not any(
            saving[o] >= saving[f] and slowdown[o] <= slowdown[f] and (saving[o] > saving[f] or slowdown[o] < slowdown[f])
            for o in g.index if o != f)}
        rows = edp_csv[edp_csv["task"] == task].set_index("clock_mhz")
        np.testing.assert_allclose(rows.loc[g.index, "saving_pct"], saving, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(rows.loc[g.index, "slowdown_pct"], slowdown, rtol=1e-9, atol=1e-9)
        assert set(rows.index[rows["pareto"]]) == front
        line = next(l for l in md.splitlines() if l.startswith(f"{model} · {task} · batch 1: Pareto front"))
        named = [float(x) for x in re.findall(r"(\d+) MHz \(", line)]
        assert set(named) == front - {1980.0} and named == sorted(named, key=lambda f: slowdown[f])


def test_power_timeline_per_cell_matches_power_parquet(sweep_report):
    from llm_dvfs.analysis.render import fmt_num

    _, out_dir, _ = sweep_report
    pw = pd.read_parquet(out_dir.parent / "power.parquet")
    cells = pd.read_csv(out_dir / "cell_power.csv")
    assert len(cells) == pw["cell_id"].nunique() == 12 and cells["preferred"].all()
    page = (out_dir / "report.html").read_text()
    assert 'id="fig-power_timeline"' in page and "It shows all 12 cell(s)." in page
    _png_ok((out_dir / "figures" / "power_timeline.png").read_bytes())
    for cid, g in pw.groupby("cell_id"):
        g = g.sort_values("t_s", kind="stable")
        t, p = g["t_s"].to_numpy(dtype=float), g["power_w"].to_numpy(dtype=float)
        energy = float(np.sum(p[:-1] * np.diff(t)))   # each sample held until the next
        row = cells[cells["cell_id"] == cid].iloc[0]
        assert row["energy_j"] == pytest.approx(energy, rel=1e-12)
        assert row["mean_power_w"] == pytest.approx(energy / (t[-1] - t[0]), rel=1e-12)
        assert row["n_samples"] == len(g) and row["peak_power_w"] == pytest.approx(p.max())
        assert f"<td class=\"t\">{cid}</td>" in page and f"<td class=\"\">{fmt_num(energy)}</td>" in page


def test_report_lists_what_cannot_be_concluded_for_a_sweep(sweep_report):
    _, out_dir, stdout = sweep_report
    text = stdout.split("What cannot be concluded:")[1]
    assert "SW power cap" in text               # planted throttle bit at 1980 MHz
    assert "no repeats" in text
    assert "collinear" in text and "feat_prompt_tokens" in text
    assert "Only one clock point" not in text   # a sweep is not observe mode
    assert "Synthetic H100" in text


def _throttle_sentences(reasons_by_clock: dict[float, int], tmp_path: Path) -> list[str]:
    """The "clock throttling" caveats when the first group's rows at each clock of
    ``reasons_by_clock`` carry those NVML clock-event reason bits (every other row: none)."""
    req = make_requests(n_samples=4, throttle_at_max=False).requests
    keys = default_group_keys(req)
    summary = summarize(req, group_keys=keys, n_boot=50)
    summary["clock_event_reasons"] = 0
    first = summary["task"] == summary["task"].iloc[0]
    for clock, bits in reasons_by_clock.items():
        summary.loc[first & (summary["sm_mhz_requested"] == clock), "clock_event_reasons"] = bits
    run = RunData(path=tmp_path, manifest={}, requests=req, tokens=None, power=None)
    ref = req[req["sm_mhz_requested"] == 1980.0]
    text = cannot_conclude(run, summary, optimal_clocks(summary, group_keys=keys),
                           phase_scaling(req, group_keys=keys),
                           feature_correlations(req, group_keys=keys, per_clock=True),
                           feature_regression(ref, group_keys=keys, per_clock=False), keys)
    return [t for t in text if "throttling" in t]


def test_throttle_bits_are_named_from_the_clock_event_table(tmp_path):
    # 0x40 is HW thermal slowdown (not "SW thermal"); 0x100 is the display clock, not throttling
    hot = _throttle_sentences({1980.0: 0x40, 600.0: 0x100}, tmp_path)
    assert len(hot) == 1 and "1980 MHz (HW thermal slowdown)" in hot[0]
    assert "600 MHz" not in hot[0] and "display" not in hot[0].lower()
    assert _throttle_sentences({1980.0: 0x100}, tmp_path) == []


def test_html_is_self_contained(sweep_report):
    _, out_dir, _ = sweep_report
    page = (out_dir / "report.html").read_text()
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page), "external resource in the page"
    imgs = re.findall(r'<img [^>]*src="data:image/png;base64,([^"]+)"', page)
    assert len(imgs) == len(list((out_dir / "figures").glob("*.png"))) == 11
    for b in imgs:
        _png_ok(base64.b64decode(b))
    assert 'id="cannot-conclude"' in page and "What cannot be concluded" in page
    assert page.count("<table>") >= 5


def test_html_renders_in_headless_chromium(sweep_report, tmp_path):
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (install the Debian package `chromium`)")
    _, out_dir, _ = sweep_report
    seen = check_html_in_chromium(out_dir / "report.html", tmp_path, exe=exe)
    assert seen["images"] == 11
    assert seen["broken"] == 0, "an embedded figure did not decode"
    assert seen["errors"] == 0
    assert seen["pixel_std"] > 0.05, "the screenshot is blank"
    shot = mpimg.imread(seen["screenshot"])
    assert shot.shape[:2] == (2400, 1280)


def test_observe_mode_report(tmp_path):
    make_run_dir(tmp_path / "obs", clocks_mhz=None, weights="random", n_samples=6, seed=3)
    rc, out, err = run_main([str(tmp_path / "obs"), "--n-boot", "200"])
    assert rc == 0, err
    rows = [l for l in out.splitlines() if l.startswith("toy/llama-tiny")]
    assert len(rows) == 2 and all("as found (~17" in l for l in rows)
    assert all(re.search(r"\s-\s+-\s*$", l) for l in rows)  # no Δ, no note: nothing to compare with
    cannot = out.split("What cannot be concluded:")[1]
    for phrase in ("Only one clock point", "nothing can be concluded about DVFS", "observe mode",
                   "Weights are random", "quality metric is meaningless", "Few requests per clock point"):
        assert phrase in cannot, phrase
    assert "No clock comparison is possible" in out
    rdir = tmp_path / "obs" / "report"
    assert not (rdir / "figures" / "phase_fits.png").exists()
    assert (rdir / "figures" / "power_trace.png").exists()
    key = pd.read_csv(rdir / "key_table.csv")
    assert key["quality"].isna().all() and key["observe"].all()
    assert (pd.read_csv(rdir / "optimal_clocks.csv")["status"] == "one clock point").all()


def test_no_energy_csv_only_run(tmp_path):
    # energy_method none, no parquet files (only requests.csv), no traces
    make_run_dir(tmp_path / "r", energy_method="none", n_samples=4, clocks_mhz=(900.0, 1980.0),
                 parquet=False, with_traces=False)
    rc, out, err = run_main([str(tmp_path / "r"), "--n-boot", "100"])
    assert rc == 0, err
    cannot = out.split("What cannot be concluded:")[1]
    assert "No energy was measured" in cannot
    assert "requests.parquet is missing" in cannot and "tokens.parquet is missing" in cannot
    figs = {p.name for p in (tmp_path / "r" / "report" / "figures").glob("*.png")}
    assert "power_trace.png" not in figs and "energy_vs_clock.png" in figs
    key = pd.read_csv(tmp_path / "r" / "report" / "key_table.csv")
    assert key["energy_j"].isna().all() and key["latency_s"].notna().all()
    assert key.loc[key["clock_mhz"] == 900.0, "latency_s_delta_pct"].gt(50).all()


def test_request_option_out_dir_and_no_html(sweep_report, tmp_path):
    run, _, _ = sweep_report
    rid = run.requests.loc[(run.requests["sm_mhz_requested"] == 600.0) & (run.requests["task"] == "qa"),
                           "request_id"].iloc[3]
    rep = build_report(run_dir := sweep_report[1].parent, tmp_path / "o", request_id=rid,
                       html_page=False, n_boot=100)
    assert rep.trace_request == rid
    assert not (tmp_path / "o" / "report.html").exists()
    assert (tmp_path / "o" / "report.md").exists() and (tmp_path / "o" / "figures" / "power_trace.png").exists()
    assert rid in rep.figures["power_trace"][1]
    rc, _, err = run_main([str(run_dir), "--out", str(tmp_path / "o2"), "--request", "no-such-request"])
    assert rc == 2 and "no-such-request" in err and not (tmp_path / "o2").exists()


def test_bad_arguments_and_missing_data(tmp_path):
    rc, _, err = run_main([str(tmp_path / "nope")])
    assert rc == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    rc, _, err = run_main([str(tmp_path / "empty")])
    assert rc == 2 and "requests.parquet" in err
    make_run_dir(tmp_path / "r", n_samples=2, clocks_mhz=(1980.0,), with_traces=False)
    rc, _, err = run_main([str(tmp_path / "r"), "--latency-limit", "-0.5"])
    assert rc == 2 and "latency-limit" in err


def test_cli_help_runs_as_a_module():
    env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "llm_dvfs.report", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    for s in ("RUN_DIR", "--out", "--latency-limit", "--request", "--no-html", "report.html", "key_table.csv"):
        assert s in res.stdout, s
