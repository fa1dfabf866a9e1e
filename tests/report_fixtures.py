"""Synthetic run directories with known answers, for the analysis and report tests.

The "GPU" here is a formula, not an emulator: per phase, time per token is ``a + b/f`` and
power is ``c + d·(f/1980)^k`` (f = SM clock in MHz), with small multiplicative log-normal
noise. With the default constants the energy per request is lowest at 1200 MHz (planted
optimum, ~5 % below its neighbours), and energy rises with ``feat_prompt_tokens`` (the
planted feature, through prefill); ``feat_noise`` is independent of everything,
``feat_constant`` is constant and ``feat_prompt_chars`` is exactly 4 × ``feat_prompt_tokens``
(collinear), so the regression has something to drop.

Also: helpers to find a headless Chromium and to check an HTML page in it (screenshot not
blank, every <img> decoded), reusable by any test that renders a report.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from llm_dvfs.schema import to_frame, write_parquet

F_MAX_MHZ = 1980.0
DEFAULT_CLOCKS_MHZ = (600.0, 900.0, 1200.0, 1500.0, 1800.0, 1980.0)
IDLE_POWER_W = 70.0


@dataclass(frozen=True)
class PhaseLaw:
    """time per token = a + b/f (s, s·MHz); power = c + d·(f/1980)^k (W)."""
    a: float
    b: float
    c: float
    d: float
    k: float

    def time_s(self, f_mhz: np.ndarray | float) -> np.ndarray | float:
        return self.a + self.b / f_mhz

    def power_w(self, f_mhz: np.ndarray | float) -> np.ndarray | float:
        return self.c + self.d * (np.asarray(f_mhz) / F_MAX_MHZ) ** self.k

    @property
    def d_raw(self) -> float:
        """d in W/MHz^k (the unit analysis.fit_power_model reports)."""
        return self.d / F_MAX_MHZ ** self.k


# Decode: per generated token. Prefill: per input token (ttft = tokens_in · time_s).
DECODE = PhaseLaw(a=0.002, b=24.0, c=250.0, d=450.0, k=3.5)
PREFILL = PhaseLaw(a=0.00002, b=0.24, c=260.0, d=440.0, k=3.5)


@dataclass
class SyntheticRun:
    """What :func:`make_requests` planted, for assertions."""
    requests: pd.DataFrame
    clocks_mhz: tuple[float, ...]
    tokens_out: int
    planted_optimum_mhz: float | None
    expected_energy_j: dict[float, float] = field(default_factory=dict)   # per clock, noise-free
    expected_latency_s: dict[float, float] = field(default_factory=dict)
    t_start_s: list[float] = field(default_factory=list)   # per request row, host time


def expected_request(f_mhz: float, tokens_in: float, tokens_out: int) -> tuple[float, float]:
    """Noise-free (energy_j, latency_s) of one request at clock ``f_mhz``."""
    ttft = tokens_in * PREFILL.time_s(f_mhz)
    dec_t = (tokens_out - 1) * DECODE.time_s(f_mhz)
    return (float(PREFILL.power_w(f_mhz) * ttft + DECODE.power_w(f_mhz) * dec_t), float(ttft + dec_t))


def _prompt_tokens(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(40, 400, size=n).astype(float)


def make_requests(*, models: Sequence[str] = ("toy/llama-tiny",), tasks: Sequence[str] = ("qa", "summarize"),
                  clocks_mhz: Sequence[float] | None = DEFAULT_CLOCKS_MHZ, n_samples: int = 12,
                  batch_sizes: Sequence[int] = (1,), tokens_out: int = 32, weights: str = "pretrained",
                  energy_method: str = "buffer", noise: float = 0.02, observe_mhz: float = 1755.0,
                  throttle_at_max: bool = True, seed: int = 0) -> SyntheticRun:
    """A ``requests`` table (schema of llm_dvfs.schema) from the planted physics.

    ``clocks_mhz=None`` makes an observe-mode run: one clock point with NaN requested clocks
    and observed clocks scattered around ``observe_mhz``. ``energy_method="none"`` leaves every
    energy column NaN, as a run without a power source would. ``throttle_at_max`` sets the
    SW-power-cap bit (0x4) on a third of the requests at the highest clock.
    """
    rng = np.random.default_rng(seed)
    observe = clocks_mhz is None
    points = [math.nan] if observe else [float(c) for c in clocks_mhz]
    tin_by_sample = _prompt_tokens(n_samples, rng)
    noise_feat = rng.normal(size=n_samples)
    rows: list[dict[str, Any]] = []
    t0 = 1000.0
    for model in models:
        for task in tasks:
            for f_req in points:
                for bs in batch_sizes:
                    cell = f"{model}|{task}|{'observe' if observe else int(f_req)}|{bs}|0"
                    for s in range(n_samples):
                        f = observe_mhz + rng.normal(0, 20) if observe else f_req
                        tin = tin_by_sample[s]
                        lat_mult = 1.0 + 0.15 * (bs - 1)  # batching: slower per request ...
                        pow_share = 1.0 / bs               # ... but power is shared
                        n1, n2, n3, n4 = np.exp(rng.normal(0, noise, size=4))
                        ttft = tin * PREFILL.time_s(f) * n1 * lat_mult
                        tpot = DECODE.time_s(f) * n2 * lat_mult
                        e_pre = PREFILL.power_w(f) * n3 * pow_share * ttft
                        e_dec = DECODE.power_w(f) * n4 * pow_share * tpot * (tokens_out - 1)
                        lat = ttft + tpot * (tokens_out - 1)
                        energy = e_pre + e_dec
                        if energy_method == "none":
                            e_pre = e_dec = energy = math.nan
                        reasons = 0x4 if (throttle_at_max and not observe and f_req == max(points)
                                          and s % 3 == 0) else 0
                        correct = float(rng.random() < 0.7)
                        rows.append({
                            "cell_id": cell, "request_id": f"{cell}|s{s}|0", "model": model,
                            "weights": weights, "dtype": "bfloat16", "task": task, "sample_id": f"s{s}",
                            "repeat": 0, "batch_size": bs, "batch_index": s % bs, "device": "cuda:0",
                            "gpu_name": "Synthetic H100", "sm_mhz_requested": f_req,
                            "mem_mhz_requested": math.nan, "power_limit_w_requested": math.nan,
                            "sm_mhz_observed": f if observe else f - abs(rng.normal(0, 3)),
                            "mem_mhz_observed": 2619.0, "clock_event_reasons": reasons,
                            "tokens_in": int(tin), "tokens_out": tokens_out, "ttft_s": ttft,
                            "tpot_s": tpot, "latency_s": lat, "energy_j": energy,
                            "prefill_energy_j": e_pre, "decode_energy_j": e_dec,
                            "j_per_token": energy / tokens_out, "avg_power_w": energy / lat,
                            "idle_power_w": IDLE_POWER_W, "active_energy_j": energy - IDLE_POWER_W * lat,
                            "energy_j_counter": energy * 1.003, "energy_method": energy_method,
                            "quality_metric": "accuracy", "quality": correct,
                            "quality_valid": weights == "pretrained",
                            "prompt": f"prompt {s}", "output_text": f"answer {s}",
                            "feat_prompt_tokens": tin, "feat_prompt_chars": 4.0 * tin,
                            "feat_noise": noise_feat[s], "feat_constant": 1.0,
                            "_t_start_s": t0,
                        })
                        t0 += lat + 0.05
    df = to_frame("requests", [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])
    tin_med = float(np.median(tin_by_sample))
    exp_e = {f: expected_request(f, tin_med, tokens_out)[0] for f in points if not observe}
    exp_l = {f: expected_request(f, tin_med, tokens_out)[1] for f in points if not observe}
    opt = min(exp_e, key=exp_e.get) if exp_e else None
    return SyntheticRun(df, tuple(points), tokens_out, opt, exp_e, exp_l, [r["_t_start_s"] for r in rows])


def tokens_and_power(requests: pd.DataFrame, t_start_s: Sequence[float] | None = None, *,
                     sample_period_s: float = 0.02) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Token marks and a 50 Hz power trace consistent with ``requests`` (run back to back from
    ``t_start_s``, default: 50 ms idle gaps at :data:`IDLE_POWER_W`)."""
    starts = t_start_s
    if starts is None:
        starts = list(1000.0 + np.cumsum(np.r_[0, requests["latency_s"].to_numpy()[:-1] + 0.05]))
    tok_rows, pow_rows = [], []
    for (_, r), t_start in zip(requests.iterrows(), starts):
        ttft, tpot, n = float(r["ttft_s"]), float(r["tpot_s"]), int(r["tokens_out"])
        e_pre, e_dec = float(r["prefill_energy_j"]), float(r["decode_energy_j"])
        p_pre = e_pre / ttft if math.isfinite(e_pre) else math.nan
        p_dec = e_dec / (tpot * (n - 1)) if math.isfinite(e_dec) and n > 1 else math.nan
        edges = [t_start, t_start + ttft] + [t_start + ttft + tpot * i for i in range(1, n)]
        for i in range(n):
            phase = "prefill" if i == 0 else "decode"
            p = p_pre if i == 0 else p_dec
            tok_rows.append({"cell_id": r["cell_id"], "request_id": r["request_id"], "token_index": i,
                             "phase": phase, "t_start_s": edges[i], "t_end_s": edges[i + 1],
                             "energy_j": p * (edges[i + 1] - edges[i])})
        t_end = edges[-1]
        # trace from 50 ms before to 50 ms after, zero-order-hold samples
        for t in np.arange(t_start - 0.05, t_end + 0.05, sample_period_s):
            if t < t_start or t >= t_end:
                p = IDLE_POWER_W
            elif t < edges[1]:
                p = p_pre
            else:
                p = p_dec
            pow_rows.append({"cell_id": r["cell_id"], "t_s": float(t), "device": 0,
                             "power_w": (p if math.isfinite(p) else math.nan), "source": "buffer"})
    return to_frame("tokens", tok_rows), to_frame("power", pow_rows)


def make_run_dir(path: Path, *, parquet: bool = True, with_traces: bool = True, **kwargs: Any) -> SyntheticRun:
    """Write a run directory (manifest.json, requests.parquet/.csv, tokens.parquet,
    power.parquet, written through the schema as a run writes them) under ``path`` from
    :func:`make_requests` (``kwargs`` go there); ``parquet=False``: requests.csv only."""
    run = make_requests(**kwargs)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    req = run.requests
    observe = run.planted_optimum_mhz is None
    manifest = {
        "tool": "llm_dvfs.run", "package_version": "0.1.0", "git_revision": "0000000synthetic",
        "started_at": "2025-01-01T00:00:00Z", "finished_at": "2025-01-01T00:10:00Z",
        "driver_version": "580.159.04 (synthetic)",
        "gpus": [{"index": 0, "name": "Synthetic H100", "uuid": "GPU-synthetic"}],
        "config": {"mode": "observe" if observe else "sweep", "models": sorted(req["model"].unique()),
                   "tasks": sorted(req["task"].unique()),
                   "clocks_mhz": [] if observe else list(run.clocks_mhz)},
    }
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if with_traces:
        tok, pw = tokens_and_power(req, run.t_start_s)
        write_parquet("tokens", tok, path / "tokens.parquet")
        write_parquet("power", pw, path / "power.parquet")
    if parquet:
        write_parquet("requests", req, path / "requests.parquet")
    req.to_csv(path / "requests.csv", index=False)
    return run


# --------------------------------------------------------------------------------------------
# headless Chromium
# --------------------------------------------------------------------------------------------
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

_PROBE = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).length;
  var m = document.createElement('div');
  m.id = 'llm-dvfs-probe';
  m.setAttribute('data-images', String(imgs.length));
  m.setAttribute('data-broken', String(bad));
  m.setAttribute('data-errors', String(window.__llmDvfsErrors || 0));
  document.body.appendChild(m);
});
</script>"""
_ERROR_HOOK = "<script>window.__llmDvfsErrors=0;window.addEventListener('error',function(){window.__llmDvfsErrors++;},true);</script>"


def find_chromium() -> str | None:
    """Path of a Chromium/Chrome executable on PATH, or None."""
    for name in CHROMIUM_NAMES:
        p = shutil.which(name)
        if p:
            return p
    return None


def _chromium(exe: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    # --no-sandbox: CI containers run as root; --disable-gpu: no display.
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--allow-file-access-from-files", *args],
                          capture_output=True, text=True, timeout=timeout)


def check_html_in_chromium(html: Path, workdir: Path, *, exe: str | None = None,
                           window: tuple[int, int] = (1280, 2400)) -> dict[str, Any]:
    """Open ``html`` in headless Chromium; return what was seen.

    Returns a dict: ``images`` (count of <img>), ``broken`` (not decoded: naturalWidth 0),
    ``errors`` (error events: scripts or resources failing), ``screenshot`` (Path of the PNG),
    ``pixel_std`` (standard deviation of the screenshot's pixel values; ~0 means blank).
    The page is probed through a copy with a small script added; the original is untouched.
    """
    exe = exe or find_chromium()
    if exe is None:
        raise FileNotFoundError("no chromium on PATH")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    text = Path(html).read_text(encoding="utf-8")
    probed = re.sub(r"<head>", "<head>" + _ERROR_HOOK, text, count=1)
    probed = re.sub(r"</body>", _PROBE + "</body>", probed, count=1)
    probe_path = workdir / "probe.html"
    probe_path.write_text(probed, encoding="utf-8")
    dom = _chromium(exe, "--virtual-time-budget=5000", "--dump-dom", probe_path.resolve().as_uri()).stdout
    m = re.search(r'id="llm-dvfs-probe" data-images="(\d+)" data-broken="(\d+)" data-errors="(\d+)"', dom)
    if m is None:
        raise AssertionError(f"the probe did not run; DOM tail: {dom[-500:]!r}")
    shot = workdir / "screenshot.png"
    _chromium(exe, f"--screenshot={shot}", f"--window-size={window[0]},{window[1]}",
              Path(html).resolve().as_uri())
    import matplotlib.image as mpimg

    pix = mpimg.imread(shot)
    return {"images": int(m.group(1)), "broken": int(m.group(2)), "errors": int(m.group(3)),
            "screenshot": shot, "pixel_std": float(np.std(pix[..., :3]))}
