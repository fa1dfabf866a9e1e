"""The report of a real (small) sweep on the emulated GPU shows a planted energy optimum.

The emulated GPU's power follows the locked SM clock (``fakes.fake_gpu.model_power_w``), but
the CPU-run model's speed does not. To plant an interior optimum, the test makes every forward
pass of the tiny model take ``B_MS_MHZ / f`` ms at the locked clock ``f`` (it sleeps the rest
of that time after the real forward), so the energy per request is ``P(f) · n · B/f`` plus a
small clock-independent overhead ``P(f) · a``. ``P(f)/f`` is smallest between the clocks, and
the clocks and power below keep the same argmin with a >= 8 % margin to both neighbours for
any overhead up to 20 % of the fastest forward (the overhead moves the optimum to lower clocks).
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import time

import numpy as np
import pandas as pd
import pytest

from conftest import assert_emulated_nvml
from fakes.fake_gpu import model_power_w
from llm_dvfs import report
from llm_dvfs.run import main as run_main
from report_fixtures import check_html_in_chromium, find_chromium

CLOCKS_MHZ = (1980, 1650, 1020, 540)
BASE_W = 500.0             # emulated power at 1980 MHz (W); idle part stays at the default 70 W
B_MS_MHZ = 16000.0         # one forward takes B/f ms: 8.1 ms at 1980 MHz, 29.6 ms at 540 MHz
MAX_NEW_TOKENS = 6
ARGS = ["--models", "arch:tiny", "--tasks", "synthetic:max_words=16", "--samples", "3",
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--fixed-output-length", "--ner", "heuristic",
        "--idle-s", "0.2", "--warmup", "1", "--batch-sizes", "1"]


def planted_energy(f_mhz: float, overhead_frac: float = 0.0) -> float:
    """Energy (relative units) of one forward at ``f_mhz``: P(f) · (B/f + overhead), the
    overhead given as a fraction of the fastest forward B/1980."""
    return model_power_w(BASE_W, f_mhz) * (B_MS_MHZ / f_mhz + overhead_frac * B_MS_MHZ / max(CLOCKS_MHZ))


def planted_optimum_mhz(overhead_frac: float = 0.0) -> int:
    return min(CLOCKS_MHZ, key=lambda f: planted_energy(f, overhead_frac))


def test_the_planted_optimum_is_interior_and_well_separated():
    """The design of the plant (no GPU): same argmin for overheads 0-20 %, neighbours >= 8 % above it."""
    best = planted_optimum_mhz()
    assert best not in (max(CLOCKS_MHZ), min(CLOCKS_MHZ))
    for frac in np.linspace(0.0, 0.2, 5):
        assert planted_optimum_mhz(frac) == best, frac
        e = {f: planted_energy(f, frac) for f in CLOCKS_MHZ}
        i = CLOCKS_MHZ.index(best)
        for j in (i - 1, i + 1):
            assert e[CLOCKS_MHZ[j]] / e[best] > 1.08, (frac, CLOCKS_MHZ[j])


@pytest.fixture
def clock_bound_forward(fake_gpu, monkeypatch):
    """Every forward of the (Llama-shaped) tiny model lasts B/f at the emulator's locked clock f.

    Patched on the class, from the test: the runner and the model code are unchanged. The k-th
    forward of a ``generate`` call ends at ``start + k·B/f`` (sleeping to that deadline), so CPU
    time and short stalls anywhere inside the call (another process on a 2-core CI machine) are
    absorbed instead of added. Returns the locked clocks (MHz) seen per forward call.
    """
    import torch
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    seen: list[int] = []
    call: dict[str, float] = {}
    original_forward, original_generate = LlamaForCausalLM.forward, LlamaForCausalLM.generate

    def locked_mhz() -> int:
        return fake_gpu.locked_clocks()[1] or max(CLOCKS_MHZ)  # unlocked: the default max clock

    @functools.wraps(original_generate)
    def generate(self, *args, **kwargs):
        call.update(t0_s=time.perf_counter(), k=0, step_s=B_MS_MHZ / locked_mhz() / 1000.0)
        try:
            return original_generate(self, *args, **kwargs)
        finally:
            call.clear()

    @functools.wraps(original_forward)
    def forward(self, *args, **kwargs):
        t_s = time.perf_counter()
        out = original_forward(self, *args, **kwargs)
        seen.append(locked_mhz())
        if call:
            call["k"] += 1
            deadline_s = call["t0_s"] + call["k"] * call["step_s"]
        else:  # a forward outside generate (none expected): on its own
            deadline_s = t_s + B_MS_MHZ / seen[-1] / 1000.0
        while (left_s := deadline_s - time.perf_counter()) > 0:
            time.sleep(left_s)
        return out

    monkeypatch.setattr(LlamaForCausalLM, "generate", generate)
    monkeypatch.setattr(LlamaForCausalLM, "forward", forward)
    # one intra-op thread: the tiny model gains nothing from two, and spinning OpenMP workers
    # would compete with the power sampler on a 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield seen
    torch.set_num_threads(threads)


@pytest.mark.changes_clocks
def test_report_of_an_emulated_sweep_shows_the_planted_optimum(fake_gpu, clock_bound_forward, tmp_path,
                                                               capsys):
    assert_emulated_nvml()
    fake_gpu.set_power_w(BASE_W)
    run_dir = tmp_path / "run"
    rc = run_main([*ARGS, "--clocks", ",".join(map(str, CLOCKS_MHZ)), "--allow-clock-changes",
                   "--out", str(run_dir), "-q"])
    capsys.readouterr()
    assert rc == 0
    assert fake_gpu.is_pristine()  # the sweep restored the clocks
    assert set(clock_bound_forward) >= set(CLOCKS_MHZ)  # the forward patch ran at every clock
    man = json.loads((run_dir / "manifest.json").read_text())
    assert man["status"] == "complete" and man["cells_done"] == len(CLOCKS_MHZ)
    req = pd.read_parquet(run_dir / "requests.parquet")
    assert (req["sm_mhz_observed"] == req["sm_mhz_requested"]).all()
    assert (req["tokens_out"] == MAX_NEW_TOKENS).all()
    # the plant took effect: latency grows as the clock falls
    lat = req.groupby("sm_mhz_requested")["latency_s"].median()
    assert lat[540.0] > lat[1020.0] > lat[1650.0] > lat[1980.0]

    best = planted_optimum_mhz()
    assert best == 1020
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = report.main([str(run_dir), "--n-boot", "200"])
    assert rc == 0
    printed = out.getvalue()
    rep_dir = run_dir / "report"

    # the optimum table: exactly the planted clock, a clear saving vs the highest clock
    opt = pd.read_csv(rep_dir / "optimal_clocks.csv")
    assert len(opt) == 1 and opt["status"].tolist() == ["ok"]
    assert opt["ref_clock_mhz"].tolist() == [1980.0]
    assert opt["best_clock_mhz"].tolist() == [float(best)]
    expected_saving_pct = 100.0 * (1.0 - planted_energy(best) / planted_energy(1980))
    assert opt["best_saving_pct"].iloc[0] > 0.5 * expected_saving_pct > 5.0
    # the measured energies rank the clocks as the plant does around the optimum
    summary = pd.read_csv(rep_dir / "summary.csv").set_index("clock_mhz")
    e_med = summary["energy_j_median"]
    for f in CLOCKS_MHZ:
        if f != best:
            assert e_med[float(f)] > e_med[float(best)] * 1.03, f

    # the key table marks that clock, and only that one, as the energy minimum ("E-min", not
    # "E-min<=limit", in the printed note column; "lowest energy" in key_table.csv)
    rows = [line.split() for line in printed.splitlines() if line.startswith("arch:tiny")]
    assert len(rows) == len(CLOCKS_MHZ), printed
    marked = [r for r in rows if "E-min" in r[-1].split(",")]
    assert len(marked) == 1 and marked[0][3:5] == [str(best), "MHz"], printed
    key = pd.read_csv(rep_dir / "key_table.csv")
    is_min = key["note"].fillna("").map(lambda n: "lowest energy" in [x.strip() for x in n.split(",")])
    assert key.loc[is_min, "clock_mhz"].tolist() == [float(best)]

    # every figure was drawn, and the HTML page shows them all in headless Chromium
    figures = sorted(p.name for p in (rep_dir / "figures").glob("*.png"))
    assert figures == sorted(["energy_vs_clock.png", "latency_vs_clock.png", "j_per_token_vs_clock.png",
                              "pareto.png", "phase_fits.png", "power_trace.png", "feature_scatter.png",
                              "correlation_heatmap.png", "edp_vs_clock.png", "saving_vs_slowdown.png",
                              "power_timeline.png"])
    n_figures = len(figures)
    # the power timeline's numbers are the emulated trace of each cell, held sample to sample
    pw = pd.read_parquet(run_dir / "power.parquet")
    cells = pd.read_csv(rep_dir / "cell_power.csv")
    shown = cells[cells["preferred"]]
    assert set(shown["cell_id"]) == set(req["cell_id"]) and (shown["source"] == "buffer").all()
    for _, c in shown.iterrows():
        g = pw[(pw["cell_id"] == c["cell_id"]) & (pw["source"] == "buffer")].sort_values("t_s", kind="stable")
        t, p = g["t_s"].to_numpy(dtype=float), g["power_w"].to_numpy(dtype=float)
        assert c["energy_j"] == pytest.approx(float(np.sum(p[:-1] * np.diff(t))), rel=1e-9)
        assert c["n_samples"] == len(g)
    # EDP: the clock of the lowest median energy × median latency (the summary's medians)
    edp = pd.read_csv(rep_dir / "edp_optima.csv")
    products = summary["energy_j_median"] * summary["latency_s_median"]
    assert edp["status"].tolist() == ["ok"] and edp["edp_clock_mhz"].tolist() == [float(products.idxmin())]
    assert edp["edp_rel"].iloc[0] == pytest.approx(products.min() / products[1980.0])
    exe = find_chromium()
    if exe is None:
        pytest.skip("no chromium on PATH (install the Debian package `chromium`)")
    seen = check_html_in_chromium(rep_dir / "report.html", tmp_path / "chromium", exe=exe)
    assert seen["images"] == n_figures
    assert seen["broken"] == 0, "an embedded figure did not decode"
    assert seen["errors"] == 0
    assert seen["pixel_std"] > 0.05, "the screenshot is blank"
