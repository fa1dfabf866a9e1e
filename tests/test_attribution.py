"""Attribution of a power trace to steps, tokens and requests (pure Python, synthetic traces)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llm_dvfs import schema as results
from llm_dvfs.meter.attribution import (
    DEFAULT_LAG_S,
    PowerTrace,
    attribute,
    estimate_lag,
    integrate_zoh,
    split_steps,
    step_energies,
    traces_from_frame,
)


class Timing:
    """Minimal stand-in for TokenTiming: attribution only needs bounds and token counts."""

    def __init__(self, bounds_s, tokens):
        self.bounds_s = np.asarray(bounds_s, dtype=float)
        self.tokens_per_sequence = np.asarray(tokens)


def step_trace(segments, *, dt=0.001, lag_s=0.0, t_end=None):
    """Trace sampled every dt from piecewise-constant (t_from, power) segments, delayed by lag_s."""
    t_end = t_end if t_end is not None else segments[-1][0] + 1.0
    t = np.arange(0.0, t_end, dt)
    p = np.zeros_like(t)
    for t0, w in segments:
        p[t - lag_s >= t0 - 1e-12] = w
    return t, p


# --- zero-order hold ----------------------------------------------------------------------


def test_zoh_exact_on_piecewise_constant_trace():
    t = [0.0, 1.0, 3.0, 4.0]
    p = [100.0, 200.0, 50.0, 0.0]
    tr = PowerTrace(t, p)
    assert tr.energy_j(0.5, 3.5) == pytest.approx(100 * 0.5 + 200 * 2 + 50 * 0.5)
    assert tr.energy_j(1.0, 3.0) == pytest.approx(400.0)
    # Outside the samples the first value holds backwards and the last forwards.
    assert tr.energy_j(-1.0, 0.0) == pytest.approx(100.0)
    assert tr.energy_j(4.0, 9.0) == pytest.approx(0.0)
    np.testing.assert_allclose(tr.energies_j([0.0, 1.0, 2.0, 3.0, 4.0]), [100, 200, 200, 50])
    assert integrate_zoh(t, p, 0.0, 4.0) == pytest.approx(550.0)
    # Unsorted input is sorted; a lag shifts the samples earlier.
    assert PowerTrace(t[::-1], p[::-1]).energy_j(0, 4) == pytest.approx(550.0)
    assert integrate_zoh(t, p, 0.0, 1.0, lag_s=0.5) == pytest.approx(100 * 0.5 + 200 * 0.5)


def test_coverage_reports_missing_samples():
    tr = PowerTrace([0.0, 0.1, 0.2, 0.3], [1, 1, 1, 1])
    assert tr.coverage(0.0, 0.4) == pytest.approx(1.0)
    assert tr.coverage(0.0, 0.8) == pytest.approx(0.5)


def test_trace_validation():
    with pytest.raises(ValueError, match="empty"):
        PowerTrace([], [])
    with pytest.raises(ValueError, match="length"):
        PowerTrace([0, 1], [1])
    with pytest.raises(ValueError, match="non-finite"):
        PowerTrace([0, 1], [1, np.nan])


# --- single request -------------------------------------------------------------------------


def test_single_request_exact_energies_and_latencies():
    # Idle 100 W, prefill 0.2 s at 600 W, then 4 decode steps of 0.05 s at 300/320/340/360 W.
    bounds = [1.0, 1.2, 1.25, 1.30, 1.35, 1.40]
    segs = [(0.0, 100.0), (1.0, 600.0), (1.2, 300.0), (1.25, 320.0), (1.30, 340.0), (1.35, 360.0), (1.40, 100.0)]
    t, p = step_trace(segs, t_end=2.0)
    a = attribute((t, p), Timing(bounds, [5]), lag_s=0.0, request_ids=["r0"], cell_id="c")
    (r,) = a.requests
    expect_tokens = [600 * 0.2, 300 * 0.05, 320 * 0.05, 340 * 0.05, 360 * 0.05]
    np.testing.assert_allclose(a.tokens["energy_j"], expect_tokens, rtol=1e-9)
    assert list(a.tokens["phase"]) == ["prefill"] + ["decode"] * 4
    assert list(a.tokens["token_index"]) == [0, 1, 2, 3, 4]
    assert r["request_id"] == "r0" and r["tokens_out"] == 5 and r["batch_size"] == 1
    assert r["energy_j"] == pytest.approx(sum(expect_tokens))
    assert r["prefill_energy_j"] == pytest.approx(120.0)
    assert r["decode_energy_j"] == pytest.approx(sum(expect_tokens[1:]))
    assert r["j_per_token"] == pytest.approx(sum(expect_tokens) / 5)
    assert r["ttft_s"] == pytest.approx(0.2)
    assert r["tpot_s"] == pytest.approx(0.05)
    assert r["latency_s"] == pytest.approx(0.4)
    assert r["avg_power_w"] == pytest.approx(sum(expect_tokens) / 0.4)
    assert r["energy_method"] == "buffer"
    assert a.lags[0].method == "given"
    # The rows are valid schema rows.
    frame = a.request_frame()
    assert frame.loc[0, "energy_j"] == pytest.approx(r["energy_j"])
    assert list(a.tokens.columns) == list(results.TOKEN_COLUMNS)
    assert (a.tokens["cell_id"] == "c").all()


# --- lag --------------------------------------------------------------------------------------


def _three_requests():
    """Three requests with idle gaps; a distinct power per step so misalignment shows."""
    reqs = [
        [0.50, 0.70, 0.75, 0.80, 0.85],
        [1.30, 1.40, 1.46, 1.52],
        [2.00, 2.30, 2.34, 2.38, 2.42, 2.46],
    ]
    segs = [(0.0, 90.0)]
    truth = []
    rng = np.random.default_rng(3)
    for b in reqs:
        powers = rng.uniform(250, 700, size=len(b) - 1)
        segs += list(zip(b[:-1], powers))
        segs.append((b[-1], 90.0))
        truth.append(powers * np.diff(b))
    return reqs, segs, truth


def test_lag_estimate_recovers_known_shift_and_fixes_attribution():
    reqs, segs, truth = _three_requests()
    t, p = step_trace(segs, lag_s=0.023, t_end=3.0)
    windows = [[b[0], b[-1]] for b in reqs]
    est = estimate_lag(t, p, windows)
    assert est.method == "trace"
    assert est.lag_s == pytest.approx(0.023, abs=0.0006)

    timings = [Timing(b, [len(b) - 1]) for b in reqs]
    good = attribute((t, p), timings)
    assert good.lags[0].method == "trace"
    for k, tr in enumerate(truth):
        got = good.tokens[good.tokens["request_id"] == f"{k}:0"]["energy_j"].to_numpy()
        np.testing.assert_allclose(got, tr, rtol=0.02)
    # Without compensation the prefill of every request is badly wrong.
    bad = attribute((t, p), timings, lag_s=0.0)
    pre_err = [abs(r["prefill_energy_j"] - truth[k][0]) / truth[k][0] for k, r in enumerate(bad.requests)]
    assert min(pre_err) > 0.05


def test_lag_on_coarse_20ms_trace_includes_hold_delay_and_beats_no_compensation():
    reqs, segs, truth = _three_requests()
    t_fine, p_fine = step_trace(segs, dt=0.0005, lag_s=0.022, t_end=3.0)
    # The driver buffer: one sample every ~20 ms at a random phase.
    t = np.arange(0.0073, 3.0, 0.02)
    p = np.interp(t, t_fine, p_fine)
    timings = [Timing(b, [len(b) - 1]) for b in reqs]
    a = attribute((t, p), timings)
    assert a.lags[0].method == "trace"
    assert 0.022 <= a.lags[0].lag_s <= 0.022 + 0.02  # true lag + up to one sample of hold
    err_comp = [abs(r["energy_j"] - tr.sum()) / tr.sum() for r, tr in zip(a.requests, truth)]
    b = attribute((t, p), timings, lag_s=0.0)
    err_raw = [abs(r["energy_j"] - tr.sum()) / tr.sum() for r, tr in zip(b.requests, truth)]
    assert np.mean(err_comp) < np.mean(err_raw)
    assert max(err_comp) < 0.08


def test_flat_trace_falls_back_to_default_lag():
    t = np.arange(0, 2, 0.02)
    p = np.full_like(t, 300.0)
    est = estimate_lag(t, p, [[0.5, 1.0]], default_lag_s=0.031)
    assert est.method == "default" and est.lag_s == 0.031
    a = attribute((t, p), Timing([0.5, 0.6, 1.0], [2]))
    assert a.lags[0].method == "default" and a.lags[0].lag_s == DEFAULT_LAG_S["buffer"]
    assert a.requests[0]["energy_j"] == pytest.approx(150.0)
    a2 = attribute((t, p), Timing([0.5, 0.6, 1.0], [2]), default_lag_s=0.04)
    assert a2.lags[0].lag_s == 0.04


# --- batches and reconciliation -------------------------------------------------------------


def test_split_steps_over_sequences_still_generating():
    share = split_steps([30.0, 20.0, 20.0, 7.0, 7.0], [1, 3, 5])
    np.testing.assert_allclose(share, [
        [10, 0, 0, 0, 0],
        [10, 10, 10, 0, 0],
        [10, 10, 10, 7, 7],
    ])
    np.testing.assert_allclose(share.sum(axis=0), [30, 20, 20, 7, 7])


def test_batch_attribution_splits_steps_and_reconciles():
    # Steps of 0.1 s at 100, 200, 300, 400, 500 W after an idle 50 W gap.
    bounds = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5]
    segs = [(0.0, 50.0)] + [(b, 100.0 * (i + 1)) for i, b in enumerate(bounds[:-1])] + [(1.5, 50.0)]
    t, p = step_trace(segs, t_end=2.0)
    counter = 123.0
    a = attribute((t, p), Timing(bounds, [1, 3, 5]), lag_s=0.0, window_s=(0.8, 1.7),
                  request_ids=[["a", "b", "c"]], counter_energy_j=counter,
                  batch_counter_energy_j=[150.0], idle_power_w=50.0)
    e = {r["request_id"]: r for r in a.requests}
    assert e["a"]["energy_j"] == pytest.approx(10 / 3)
    assert e["b"]["energy_j"] == pytest.approx(10 / 3 + 10 + 15)
    assert e["c"]["energy_j"] == pytest.approx(10 / 3 + 10 + 15 + 40 + 50)
    assert e["b"]["prefill_energy_j"] == pytest.approx(10 / 3)
    assert e["a"]["tpot_s"] != e["a"]["tpot_s"]  # NaN: one token
    assert e["c"]["tpot_s"] == pytest.approx(0.1)
    assert e["c"]["energy_j_counter"] == pytest.approx(50.0)
    assert e["c"]["active_energy_j"] == pytest.approx(e["c"]["energy_j"] - 50.0 * 0.5 / 3)
    assert [r["batch_index"] for r in a.requests] == [0, 1, 2]
    # tokens -> requests -> batch -> window, and the counter residual
    for rid, r in e.items():
        assert a.tokens[a.tokens["request_id"] == rid]["energy_j"].sum() == pytest.approx(r["energy_j"])
    assert len(a.tokens) == 1 + 3 + 5
    assert sum(r["energy_j"] for r in a.requests) == pytest.approx(a.attributed_energy_j)
    assert a.attributed_energy_j == pytest.approx(150.0)
    assert a.window_energy_j == pytest.approx(150.0 + 50.0 * 0.4)
    assert a.attributed_energy_j + a.unattributed_energy_j == pytest.approx(a.window_energy_j)
    assert a.residual_j == pytest.approx(a.window_energy_j - counter)
    assert a.residual_pct == pytest.approx(100 * (a.window_energy_j - counter) / counter)
    assert a.summary()["tokens"] == 9


def test_steps_beyond_every_sequence_are_kept():
    # Token counts say 2 but 4 steps were marked: the extra steps are shared, nothing is lost.
    a = attribute(([0.0], [100.0]), Timing([0, 1, 2, 3, 4], [2, 2]), lag_s=0.0)
    assert sum(r["energy_j"] for r in a.requests) == pytest.approx(400.0)
    assert a.tokens["energy_j"].sum() == pytest.approx(400.0)
    assert a.requests[0]["energy_j"] == pytest.approx(200.0)


def test_several_batches_and_gaps_reconcile():
    t, p = step_trace([(0.0, 80.0), (0.5, 400.0), (1.0, 80.0), (1.5, 500.0), (2.0, 80.0)], t_end=3.0)
    b1 = Timing([0.5, 0.7, 1.0], [2, 1])
    b2 = Timing([1.5, 1.6, 1.7, 2.0], [3])
    a = attribute((t, p), [b1, b2], lag_s=0.0, window_s=(0.0, 3.0))
    assert a.attributed_energy_j == pytest.approx(200.0 + 250.0)
    assert a.unattributed_energy_j == pytest.approx(80.0 * 2.0)
    assert a.window_energy_j == pytest.approx(450.0 + 160.0)
    assert [r["request_id"] for r in a.requests] == ["0:0", "0:1", "1:0"]
    assert a.requests[1]["energy_j"] == pytest.approx(40.0)  # half of the 80 J prefill


def test_dataframe_input_prefers_buffer_and_sums_devices():
    t = np.arange(0, 2, 0.01)
    frames = []
    for dev, w in ((0, 300.0), (1, 200.0)):
        frames.append(pd.DataFrame({"t_s": t, "device": dev, "power_w": w, "source": "buffer"}))
        frames.append(pd.DataFrame({"t_s": t, "device": dev, "power_w": 9999.0, "source": "instant"}))
    df = pd.concat(frames, ignore_index=True)
    traces = traces_from_frame(df)
    assert [(tr.device, tr.source) for tr in traces] == [(0, "buffer"), (1, "buffer")]
    a = attribute(df, Timing([0.5, 0.6, 1.0], [2]), lag_s={0: 0.0, 1: 0.0})
    assert a.requests[0]["energy_j"] == pytest.approx(500.0 * 0.5)
    assert a.energy_method == "buffer"
    inst = attribute(df, Timing([0.5, 1.0], [1]), lag_s=0.0, source="instant")
    assert inst.energy_method == "instant"
    assert inst.requests[0]["energy_j"] == pytest.approx(2 * 9999.0 * 0.5)
    assert step_energies(traces, [0.5, 1.0])[0] == pytest.approx(250.0)


def test_invalid_timings_are_rejected():
    tr = ([0.0], [1.0])
    with pytest.raises(ValueError, match="overlap"):
        attribute(tr, [Timing([0, 1, 2], [2]), Timing([1.5, 3], [1])], lag_s=0.0)
    with pytest.raises(ValueError, match="backwards"):
        attribute(tr, Timing([0, 2, 1], [2]), lag_s=0.0)
    with pytest.raises(ValueError, match="steps were marked"):
        attribute(tr, Timing([0, 1], [3]), lag_s=0.0)
    with pytest.raises(ValueError, match="request ids"):
        attribute(tr, Timing([0, 1], [1, 1]), lag_s=0.0, request_ids=[["only-one"]])
    with pytest.raises(ValueError, match="one list of ids per batch"):
        attribute(tr, [Timing([0, 1], [1]), Timing([1, 2], [1])], lag_s=0.0, request_ids=["a", "b"])
    # A flat id list is fine for a single batch, given as an object or in a list.
    a = attribute(tr, [Timing([0, 1], [1, 1])], lag_s=0.0, request_ids=["req-a", "req-b"])
    assert [r["request_id"] for r in a.requests] == ["req-a", "req-b"]
