"""Attribution under concurrency (meter/concurrency.py): known answers on synthetic traces."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from llm_dvfs import schema as results
from llm_dvfs.errors import ConfigError
from llm_dvfs.meter.attribution import PowerTrace
from llm_dvfs.meter.concurrency import (ENGINE_STEPS, TOKEN_TIMESTAMPS, EngineStep, PhaseWeights,
                                        ServedRequest)
from llm_dvfs.meter.concurrency import attribute_served as _attribute_served

# The hand-computed cases below use equal weights; the default (0.31 : 1, measured) is tested
# on its own.
EQUAL = PhaseWeights(1.0, 1.0, source="test: equal weights")


def attribute_served(*args, **kwargs):
    kwargs.setdefault("weights", EQUAL)
    return _attribute_served(*args, **kwargs)

IDLE_W = 100.0


def piecewise(segments, *, lag_s=0.0):
    """An exact zero-order-hold trace: (t_from, power) segments, samples delayed by lag_s."""
    t = np.array([a for a, _ in segments], dtype=float) + lag_s
    return PowerTrace(t, [p for _, p in segments])


def req(rid, arrival, tokens, end=None, *, admit=None, prompt=8):
    tokens = np.asarray(tokens, dtype=float)
    return ServedRequest(rid, arrival, admit, None, tokens, end if end is not None else tokens[-1],
                         prompt, tokens.size)


def check_invariants(att):
    s = att.summary()
    assert s["sum_check_rel"] < 1e-9
    total = sum(r["energy_j"] for r in att.requests)
    assert total + att.idle_energy_j + att.unattributed_energy_j == pytest.approx(att.window_energy_j, rel=1e-9)
    assert total == pytest.approx(att.attributed_energy_j, rel=1e-12)
    for r in att.requests:
        for k in ("energy_j", "prefill_energy_j", "decode_energy_j", "latency_s", "t_arrival_s", "t_end_s"):
            assert math.isfinite(r[k]), (r["request_id"], k)
        assert (r["tokens_out"] == 0) == math.isnan(r["j_per_token"])
        tok = att.tokens[att.tokens["request_id"] == r["request_id"]]
        assert len(tok) == r["tokens_out"]
        if len(tok):
            assert tok["energy_j"].sum() == pytest.approx(r["energy_j"], rel=1e-9, abs=1e-9)
            assert tok["energy_j"].iloc[0] == pytest.approx(r["prefill_energy_j"], rel=1e-12)
    assert not att.tokens["energy_j"].isna().any()
    assert list(att.tokens.columns) == list(results.TOKEN_COLUMNS)
    att.request_frame()  # every key is a schema column
    return {r["request_id"]: r for r in att.requests}


# --- single and identical requests ----------------------------------------------------------


def alone_case():
    # idle 100 W, then 400 W while the request is served; it waits 20 ms before admission.
    trace = piecewise([(0.0, IDLE_W), (1.0, 400.0), (1.5, IDLE_W)])
    steps = [EngineStep(1.0, 1.1, {"a": 32}, {})]
    steps += [EngineStep(1.1 + 0.1 * k, 1.2 + 0.1 * k, {}, {"a": 1}) for k in range(4)]
    r = req("a", 0.98, [1.1, 1.2, 1.3, 1.4, 1.5], admit=1.0, prompt=32)
    return trace, r, steps


@pytest.mark.parametrize("mode", [ENGINE_STEPS, TOKEN_TIMESTAMPS])
def test_request_alone_gets_its_window_energy_minus_idle(mode):
    trace, r, steps = alone_case()
    att = attribute_served(trace, [r], steps if mode == ENGINE_STEPS else None, window_s=(0.5, 2.0),
                           lag_s=0.0, idle_power_w=IDLE_W)
    assert att.energy_method == mode
    (row,) = check_invariants(att).values()
    assert att.window_energy_j == pytest.approx(0.5 * 100 + 0.5 * 400 + 0.5 * 100)
    assert row["energy_j"] == pytest.approx(0.02 * 100 + 0.5 * 400)    # arrival to end
    assert att.idle_energy_j == pytest.approx(0.48 * 100 + 0.5 * 100)  # before arrival, after end
    assert att.unattributed_energy_j == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(att.tokens["energy_j"], [42, 40, 40, 40, 40], rtol=1e-12)
    assert list(att.tokens["phase"]) == ["prefill"] + ["decode"] * 4
    np.testing.assert_allclose(att.tokens["t_start_s"], [1.0, 1.1, 1.2, 1.3, 1.4])
    assert row["prefill_energy_j"] == pytest.approx(42.0)
    assert row["decode_energy_j"] == pytest.approx(160.0)
    assert row["queue_s"] == pytest.approx(0.02)
    assert row["ttft_s"] == pytest.approx(0.12)
    assert row["tpot_s"] == pytest.approx(0.1)
    assert row["latency_s"] == pytest.approx(0.52)
    assert row["t_start_s"] == 1.0 and row["t_arrival_s"] == 0.98
    assert row["avg_power_w"] == pytest.approx(202.0 / 0.52)
    assert row["active_energy_j"] == pytest.approx(202.0 - IDLE_W * 0.52)
    assert row["j_per_token"] == pytest.approx(202.0 / 5)
    assert row["tokens_in"] == 32 and row["energy_method"] == mode


@pytest.mark.parametrize("mode", [ENGINE_STEPS, TOKEN_TIMESTAMPS])
def test_two_identical_requests_sharing_every_step_get_equal_energy(mode):
    trace = piecewise([(0.0, IDLE_W), (1.0, 700.0), (1.1, 350.0), (1.2, 360.0), (1.3, 370.0), (1.4, IDLE_W)])
    steps = [EngineStep(1.0, 1.1, {"a": 16, "b": 16}, {})]
    steps += [EngineStep(1.1 + 0.1 * k, 1.2 + 0.1 * k, {}, {"a": 1, "b": 1}) for k in range(3)]
    reqs = [req(x, 1.0, [1.1, 1.2, 1.3, 1.4], prompt=16) for x in "ab"]
    att = attribute_served(trace, reqs, steps if mode == ENGINE_STEPS else None, lag_s=0.0)
    e = check_invariants(att)
    assert e["a"]["energy_j"] == pytest.approx(e["b"]["energy_j"], rel=1e-12)
    assert e["a"]["energy_j"] == pytest.approx((70 + 35 + 36 + 37) / 2)
    assert e["a"]["prefill_energy_j"] == pytest.approx(35.0)
    ta = att.tokens[att.tokens["request_id"] == "a"]["energy_j"].to_numpy()
    tb = att.tokens[att.tokens["request_id"] == "b"]["energy_j"].to_numpy()
    np.testing.assert_allclose(ta, tb, rtol=1e-12)
    np.testing.assert_allclose(ta, [35, 17.5, 18, 18.5])


# --- planted energies -------------------------------------------------------------------------


def simulate(seed, *, alpha, beta, n=10):
    """A small continuous-batching engine: requests arrive at random, are admitted at the next
    step (whole prompt prefilled in one step, which emits the first token), then decode one token
    per step. Each step's energy is planted as alpha * prefill tokens + beta * decode tokens, so
    each request's true energy is alpha * prompt + beta * (decode tokens); the GPU idles at
    IDLE_W when nothing is in flight."""
    rng = np.random.default_rng(seed)
    arrivals = np.sort(rng.uniform(0.1, 0.8, n))
    prompts = rng.integers(4, 64, n)
    outs = rng.integers(1, 16, n)
    t, segs, steps = 0.0, [(0.0, IDLE_W)], []
    waiting, running, done = list(range(n)), {}, {}
    emitted = {i: [] for i in range(n)}
    admit = {}
    while len(done) < n:
        ready = [i for i in waiting if arrivals[i] <= t]
        if not ready and not running:  # idle until the next arrival
            segs.append((t, IDLE_W))
            t = float(arrivals[waiting[0]])
            continue
        pre = {i: int(prompts[i]) for i in ready}
        dec = {i: 1 for i in running}
        dur = float(rng.uniform(0.01, 0.03))
        energy = alpha * sum(pre.values()) + beta * sum(dec.values())
        segs.append((t, energy / dur))
        steps.append(EngineStep(t, t + dur, {f"r{i}": p for i, p in pre.items()}, {f"r{i}": 1 for i in dec}))
        for i in ready:
            waiting.remove(i)
            admit[i] = t
            running[i] = 0
        t += dur
        for i in list(running):
            emitted[i].append(t)
            if len(emitted[i]) == outs[i]:
                done[i] = t
                del running[i]
    segs.append((t, IDLE_W))
    truth = {f"r{i}": alpha * prompts[i] + beta * (outs[i] - 1) for i in range(n)}
    reqs = [ServedRequest(f"r{i}", float(arrivals[i]), admit[i], None, np.array(emitted[i]), done[i],
                          int(prompts[i]), int(outs[i])) for i in range(n)]
    return piecewise(segs), reqs, steps, truth, t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_per_token_energy_is_recovered_exactly(seed):
    trace, reqs, steps, truth, t_end = simulate(seed, alpha=0.5, beta=2.0)
    att = attribute_served(trace, reqs, steps, window_s=(0.0, t_end + 0.5), lag_s=0.0,
                           weights=PhaseWeights(0.5, 2.0, source="planted"))
    e = check_invariants(att)
    assert max(len(s.prefill_tokens) + len(s.decode_tokens) for s in steps) >= 3  # requests overlap
    for rid, want in truth.items():
        assert e[rid]["energy_j"] == pytest.approx(want, rel=1e-9), rid
        assert e[rid]["prefill_energy_j"] == pytest.approx(0.5 * reqs[int(rid[1:])].n_prompt_tokens, rel=1e-9)
    assert att.unattributed_energy_j == pytest.approx(0.0, abs=1e-9)
    assert att.not_in_steps == [] and att.failed == []
    # every decode token cost beta
    dec = att.tokens[att.tokens["phase"] == "decode"]["energy_j"]
    np.testing.assert_allclose(dec, 2.0, rtol=1e-9)
    # the wrong weights give the wrong answer: the weighting matters
    wrong = attribute_served(trace, reqs, steps, window_s=(0.0, t_end + 0.5), lag_s=0.0)
    errs = [abs(r["energy_j"] - truth[r["request_id"]]) / truth[r["request_id"]] for r in wrong.requests]
    assert max(errs) > 0.05
    assert wrong.summary()["sum_check_rel"] < 1e-9


def test_prefill_decode_weights_3_to_1_by_hand():
    # step 1 [0.9, 1.0]: b and c prefill 2 tokens each, 400 W -> 40 J
    # step 2 [1.0, 1.1]: a prefills 4 tokens, b and c decode 1 each, 1400 W -> 140 J
    trace = piecewise([(0.0, IDLE_W), (0.9, 400.0), (1.0, 1400.0), (1.1, IDLE_W)])
    steps = [EngineStep(0.9, 1.0, {"b": 2, "c": 2}, {}), EngineStep(1.0, 1.1, {"a": 4}, {"b": 1, "c": 1})]
    reqs = [req("a", 1.0, [1.1], prompt=4), req("b", 0.9, [1.0, 1.1], prompt=2), req("c", 0.9, [1.0, 1.1], prompt=2)]
    att = attribute_served(trace, reqs, steps, lag_s=0.0, weights=PhaseWeights(3.0, 1.0, source="test"))
    e = check_invariants(att)
    # step 2 weights: a 3*4 = 12, b 1, c 1 -> 120, 10, 10 J; step 1 split 6:6 -> 20, 20 J
    assert e["a"]["energy_j"] == pytest.approx(120.0)
    assert e["b"]["energy_j"] == pytest.approx(30.0) and e["c"]["energy_j"] == pytest.approx(30.0)
    assert e["b"]["prefill_energy_j"] == pytest.approx(20.0) and e["b"]["decode_energy_j"] == pytest.approx(10.0)
    np.testing.assert_allclose(att.step_energy_j, [40.0, 140.0])
    assert att.summary()["weights"]["prefill_per_token"] == 3.0
    # default 1:1: step 2 splits 4:1:1
    e1 = check_invariants(attribute_served(trace, reqs, steps, lag_s=0.0))
    assert e1["a"]["energy_j"] == pytest.approx(140.0 * 4 / 6)
    assert e1["b"]["energy_j"] == pytest.approx(20.0 + 140.0 / 6)


def test_phase_weights_validation_and_ratio():
    assert PhaseWeights().ratio == pytest.approx(0.31) and "measured" in PhaseWeights().source
    assert "bench/phase_weights.py" in PhaseWeights().source
    assert PhaseWeights(3.0, 1.5).ratio == 2.0 and PhaseWeights(3.0, 1.5).work(2, 4) == 12.0
    for bad in ((-1.0, 1.0), (0.0, 0.0), (math.nan, 1.0), (1.0, math.inf)):
        with pytest.raises(ConfigError):
            PhaseWeights(*bad)
    with pytest.raises(ConfigError):
        attribute_served(([0.0], [1.0]), [req("a", 0.0, [1.0])], weights=(3, 1))


# --- lag ----------------------------------------------------------------------------------------


def test_lag_compensation_shifts_energy_back_onto_the_requests():
    trace, reqs, steps, truth, t_end = simulate(4, alpha=0.5, beta=2.0)
    late = piecewise(list(zip(trace.raw_t_s, trace.power_w)), lag_s=0.025)  # sensor reports 25 ms late
    w = PhaseWeights(0.5, 2.0, source="planted")
    kw = dict(window_s=(0.0, t_end + 0.5), weights=w)
    given = attribute_served(late, reqs, steps, lag_s=0.025, **kw)
    for rid, want in truth.items():
        assert check_invariants(given)[rid]["energy_j"] == pytest.approx(want, rel=1e-9)
    est = attribute_served(late, reqs, steps, **kw)
    assert est.lags[0].method == "trace"
    assert est.lags[0].lag_s == pytest.approx(0.025, abs=0.001)
    for r in est.requests:
        assert r["energy_j"] == pytest.approx(truth[r["request_id"]], rel=0.05)
    raw = attribute_served(late, reqs, steps, lag_s=0.0, **kw)
    assert raw.lags[0].method == "given"
    err = [abs(r["energy_j"] - truth[r["request_id"]]) / truth[r["request_id"]] for r in raw.requests]
    assert max(err) > 0.05
    check_invariants(raw)


def test_flat_trace_falls_back_to_default_lag_and_dataframe_sums_devices():
    _, r, steps = alone_case()
    t = np.arange(0.0, 2.5, 0.02)
    df = pd.concat([pd.DataFrame({"t_s": t, "device": d, "power_w": w, "source": "buffer"})
                    for d, w in ((0, 300.0), (1, 200.0))], ignore_index=True)
    att = attribute_served(df, [r], steps, default_lag_s=0.03)
    assert {d: l.method for d, l in att.lags.items()} == {0: "default", 1: "default"}
    assert att.lags[0].lag_s == 0.03 and att.trace_source == "buffer"
    (row,) = check_invariants(att).values()
    assert row["energy_j"] == pytest.approx(500.0 * 0.52)


# --- endpoint mode --------------------------------------------------------------------------


def test_endpoint_mode_overlapping_requests_sum_to_the_window():
    trace = piecewise([(0.0, IDLE_W), (1.0, 300.0), (1.6, IDLE_W)])
    a = req("a", 1.0, [1.1, 1.2, 1.3, 1.4], end=1.45, prompt=1)
    b = req("b", 1.15, [1.25, 1.35, 1.45, 1.55], end=1.6, prompt=1)
    att = attribute_served(trace, [a, b], window_s=(0.5, 2.0), lag_s=0.0)
    assert att.energy_method == TOKEN_TIMESTAMPS
    e = check_invariants(att)
    # every interval carries one token in 0.1 s: equal rates. a alone on [1.0, 1.15]; both on
    # [1.15, 1.4]; on [1.4, 1.45] a is returning (no interval) and b decoding: b's; b alone after.
    assert e["a"]["energy_j"] == pytest.approx(300 * (0.15 + 0.25 / 2))
    assert e["b"]["energy_j"] == pytest.approx(300 * (0.25 / 2 + 0.05 + 0.15))
    assert att.idle_energy_j == pytest.approx(100 * 0.9)
    assert att.window_energy_j == pytest.approx(300 * 0.6 + 100 * 0.9)
    assert att.unattributed_energy_j == 0.0
    # a longer prompt makes b's prefill interval weigh more
    b10 = req("b", 1.15, [1.25, 1.35, 1.45, 1.55], end=1.6, prompt=10)
    e10 = check_invariants(attribute_served(trace, [a, b10], window_s=(0.5, 2.0), lag_s=0.0))
    assert e10["b"]["prefill_energy_j"] == pytest.approx(300 * 0.1 * 100 / 110)
    assert e10["b"]["energy_j"] > e["b"]["energy_j"]


def test_endpoint_mode_chunks_queue_and_random_overlap():
    trace = piecewise([(0.0, IDLE_W), (1.0, 500.0), (2.0, IDLE_W)])
    # three tokens in one streamed chunk at 1.4: they share [1.2, 1.4]
    a = req("a", 1.0, [1.2, 1.4, 1.4, 1.4, 1.6], end=1.7, prompt=1)
    att = attribute_served(trace, [a], lag_s=0.0)
    check_invariants(att)
    np.testing.assert_allclose(att.tokens["energy_j"], [100, 100 / 3, 100 / 3, 100 / 3, 150])
    np.testing.assert_allclose(att.tokens["t_start_s"], [1.0, 1.2, 1.4, 1.4, 1.4])
    rng = np.random.default_rng(7)
    reqs = []
    for i in range(12):
        t0 = float(rng.uniform(1.0, 1.8))
        times = np.sort(t0 + rng.uniform(0.0, 0.3, int(rng.integers(1, 9))))
        reqs.append(req(f"q{i}", t0, times, end=float(times[-1] + rng.uniform(0, 0.02)),
                        prompt=int(rng.integers(1, 50))))
    reqs.append(ServedRequest("lost", 1.1, None, None, [], 1.3, 20, 0, stop_reason="error"))
    att = attribute_served(trace, reqs, lag_s=0.0, weights=PhaseWeights(0.3, 1.0, source="t"))
    e = check_invariants(att)
    assert e["lost"]["energy_j"] == 0.0 and att.failed == ["lost"]
    assert all(r["energy_j"] > 0 for k, r in e.items() if k != "lost")


# --- failed, unknown and gaps -----------------------------------------------------------------


def test_failed_and_unknown_requests_get_zero_energy_and_are_reported():
    trace = piecewise([(0.0, IDLE_W), (1.0, 600.0), (1.3, IDLE_W), (1.5, 300.0), (1.6, IDLE_W)])
    steps = [EngineStep(1.0, 1.1, {"a": 2, "dead": 4, "warm": 2}, {}),   # 2:4:2
             EngineStep(1.1, 1.2, {}, {"a": 1, "warm": 1}),
             EngineStep(1.2, 1.3, {}, {}),                               # a step with no tokens
             EngineStep(1.5, 1.6, {}, {"ghost": 1})]                     # nobody we know
    a = req("a", 1.0, [1.1, 1.2], prompt=2)
    dead = ServedRequest("dead", 1.0, None, None, np.array([]), 1.25, 4, 0, stop_reason="error")
    att = attribute_served(trace, [a, dead], steps, window_s=(0.5, 2.0), lag_s=0.0)
    e = check_invariants(att)
    assert e["dead"]["energy_j"] == 0.0 and e["dead"]["tokens_out"] == 0
    assert math.isnan(e["dead"]["ttft_s"]) and math.isnan(e["dead"]["j_per_token"])
    assert att.failed == ["dead"]
    assert e["a"]["energy_j"] == pytest.approx(60 * 2 / 8 + 60 / 2)
    by = att.unattributed_by_reason
    assert by["failed_requests"] == pytest.approx(60 * 4 / 8)
    assert by["unknown_requests"] == pytest.approx(60 * 2 / 8 + 30 + 30)   # warm-up's shares, ghost's step
    assert by["empty_steps"] == pytest.approx(60.0)
    # [1.3, 1.5] and after 1.6: nothing in flight (a ended at 1.2, dead is never in flight)
    assert att.idle_energy_j == pytest.approx(100 * (0.5 + 0.2 + 0.4))
    assert att.not_in_steps == []


def test_energy_between_steps_follows_the_stated_rule():
    trace = piecewise([(0.0, IDLE_W), (0.95, 200.0), (2.0, IDLE_W)])
    steps = [EngineStep(1.0, 1.1, {"a": 1, "b": 3}, {}),       # a:b = 1:3
             EngineStep(1.2, 1.3, {"c": 1}, {"b": 1}),         # b:c = 1:1
             EngineStep(1.8, 1.9, {}, {"x": 1})]               # unknown id
    a = req("a", 0.95, [1.1], end=1.15, prompt=1)
    b = req("b", 1.0, [1.1, 1.3], end=1.35, prompt=3)
    c = req("c", 1.12, [1.3], end=1.4, prompt=1)
    d = req("d", 1.5, [1.6], end=1.7, prompt=1)                # in no step
    att = attribute_served(trace, [a, b, c, d], steps, window_s=(0.5, 2.5), lag_s=0.0)
    e = check_invariants(att)
    # [0.95, 1.0]: a is in flight, no step before -> the next step's weights over those in
    # flight (a only); [1.0, 1.1] step 1/4:3/4; [1.1, 1.15] gap, step 1's a and b 1:3;
    # [1.15, 1.2] only b of step 1 still in flight (c, arrived, waits); [1.2, 1.3] step 2
    # b:c 1:1; [1.3, 1.35] b and c by step 2's weights; [1.35, 1.4] c.
    assert e["a"]["energy_j"] == pytest.approx(200 * (0.05 + 0.1 / 4 + 0.05 / 4))
    assert e["b"]["energy_j"] == pytest.approx(200 * (0.1 * 3 / 4 + 0.05 * 3 / 4 + 0.05 + 0.05 + 0.025))
    assert e["c"]["energy_j"] == pytest.approx(200 * (0.05 + 0.025 + 0.05))
    # d: no step names it; before and after its interval nobody else is in flight (step 3 is x's,
    # unattributed); it is covered by the equal rule over the requests in flight: itself
    assert e["d"]["energy_j"] == pytest.approx(200 * 0.2)
    assert att.not_in_steps == ["d"]
    assert att.unattributed_by_reason["unknown_requests"] == pytest.approx(200 * 0.1)
    assert att.idle_energy_j == pytest.approx(100 * 0.45 + 200 * (0.1 + 0.1 + 0.1) + 100 * 0.5)


# --- windows and validation -------------------------------------------------------------------


def test_window_is_widened_to_cover_requests_and_steps_are_clipped():
    trace = piecewise([(0.0, 100.0)])
    steps = [EngineStep(0.0, 1.0, {"a": 1}, {}), EngineStep(1.0, 2.0, {}, {"a": 1})]
    a = req("a", 0.5, [1.0, 2.0], prompt=1)
    att = attribute_served(trace, [a], steps, window_s=(1.0, 1.5), lag_s=0.0)
    assert att.window_s == (0.5, 2.0)
    check_invariants(att)
    np.testing.assert_allclose(att.step_energy_j, [50.0, 100.0])
    assert att.requests[0]["energy_j"] == pytest.approx(150.0)
    only_steps = attribute_served(trace, [], steps, lag_s=0.0)
    assert only_steps.window_s == (0.0, 2.0)
    assert only_steps.unattributed_energy_j == pytest.approx(200.0)
    with pytest.raises(ValueError, match="needs requests"):
        attribute_served(trace, [], None)


def test_invalid_inputs_are_rejected_with_the_request_named():
    tr = ([0.0], [1.0])
    with pytest.raises(ValueError, match="'a'.*backwards"):
        attribute_served(tr, [req("a", 0.0, [1.0, 0.5], end=2.0)])
    with pytest.raises(ValueError, match="'a'.*3 token times for n_output_tokens=2"):
        attribute_served(tr, [ServedRequest("a", 0.0, None, None, [1, 2, 3], 4.0, 1, 2)])
    with pytest.raises(ValueError, match="'a'.*outside"):
        attribute_served(tr, [req("a", 1.0, [0.5, 1.5], end=2.0)])
    with pytest.raises(ValueError, match="'a'.*before it arrives"):
        attribute_served(tr, [ServedRequest("a", 2.0, None, None, [], 1.0, 1, 0)])
    with pytest.raises(ValueError, match="t_admit_s"):
        attribute_served(tr, [req("a", 1.0, [2.0], admit=0.5)])
    with pytest.raises(ValueError, match="duplicate request id 'a'"):
        attribute_served(tr, [req("a", 0.0, [1.0]), req("a", 0.0, [1.0])])
    with pytest.raises(ValueError, match="sequential"):
        attribute_served(tr, [req("a", 0.0, [1.0])], [EngineStep(0.0, 1.0, {"a": 1}), EngineStep(0.5, 1.0)])
    with pytest.raises(ValueError, match="non-negative integers"):
        attribute_served(tr, [req("a", 0.0, [1.0])], [EngineStep(0.0, 1.0, {"a": -1})])
    with pytest.raises(ConfigError, match="ServedRequest"):
        attribute_served(tr, [{"request_id": "a"}])
    with pytest.raises(ConfigError, match="EngineStep"):
        attribute_served(tr, [req("a", 0.0, [1.0])], [(0.0, 1.0)])


# --- with the monitor and the load driver -----------------------------------------------------


def test_monitor_window_and_load_driver_on_the_emulated_gpu(fake_gpu):
    import time

    import llm_dvfs as ld
    from llm_dvfs.workload.load import ClosedLoop, drive

    def submit(i):  # a fake engine: 4 tokens 30 ms apart, stamped on the monitor's clock
        t_arrival, times = time.monotonic(), []
        for _ in range(4):
            time.sleep(0.03)
            times.append(time.monotonic())
        return ServedRequest(f"q{i}", t_arrival, None, None, np.array(times), time.monotonic(), 16, 4)

    fake_gpu.set_trace([0.0, 0.2, 0.6, 1.0], [120.0, 450.0, 600.0, 120.0])
    with ld.PowerMonitor(devices=[0]) as mon:
        with mon.window("load") as w:
            time.sleep(0.2)
            load = drive(ClosedLoop(3, 15), submit)
            time.sleep(0.2)
        m = w.measurement()
    att = attribute_served(w.trace(margin_s=0.5), load.results, window_s=(m.t_start_s, m.t_end_s),
                           lag_s=m.devices[0].lag_s)
    e = check_invariants(att)
    assert att.window_s == (m.t_start_s, m.t_end_s)  # the driver's clock is the monitor's
    assert att.window_energy_j == pytest.approx(m.energy_j, rel=1e-6)
    assert att.idle_energy_j > 0 and att.attributed_energy_j > 0
    assert load.mean_concurrency == pytest.approx(3.0, rel=0.1)
    spans = sorted((r["t_arrival_s"], r["t_end_s"]) for r in e.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))  # requests overlap
