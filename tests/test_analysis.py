"""Statistics of llm_dvfs.analysis (summary, stats, dvfs_fit, feature_stats) on synthetic tables with known answers."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from llm_dvfs.analysis.dvfs_fit import fit_power_model, fit_time_model, phase_scaling
from llm_dvfs.analysis.feature_stats import feature_correlations, feature_regression
from llm_dvfs.analysis.stats import bh_qvalues, bootstrap_medians, median_ci
from llm_dvfs.analysis.summary import default_group_keys, optimal_clocks, pareto_frontier, summarize
from llm_dvfs.schema import to_frame

from report_fixtures import DECODE, PREFILL, make_requests


# --------------------------------------------------------------------------------------------
# bootstrap
# --------------------------------------------------------------------------------------------
def test_median_ci_degenerate_inputs():
    assert median_ci([4.0] * 7) == (4.0, 4.0, 4.0)
    med, lo, hi = median_ci([2.5])
    assert med == 2.5 and math.isnan(lo) and math.isnan(hi)
    assert all(math.isnan(x) for x in median_ci([]))
    assert median_ci([1.0, np.nan, 3.0, 2.0])[0] == 2.0  # NaNs ignored


def test_median_ci_width_matches_asymptotic_theory():
    # For a normal sample the median's standard error is sqrt(pi/2)*sigma/sqrt(n).
    rng = np.random.default_rng(1)
    x = rng.normal(100.0, 10.0, size=400)
    med, lo, hi = median_ci(x, n_boot=4000, seed=3)
    expected_half = 1.96 * math.sqrt(math.pi / 2) * 10.0 / math.sqrt(400)
    assert lo < med < hi
    assert (hi - lo) / 2 == pytest.approx(expected_half, rel=0.3)
    assert abs(med - 100.0) < 2.5


def test_bootstrap_is_vectorised_over_chunks_and_seeded():
    v = np.arange(5000, dtype=float)
    a = bootstrap_medians(v, 1000, np.random.default_rng(7))  # > one chunk of 4e6 elements
    b = bootstrap_medians(v, 1000, np.random.default_rng(7))
    assert a.shape == (1000,) and np.array_equal(a, b)
    assert 2300 < a.mean() < 2700
    m = bootstrap_medians(np.array([0.0, 1.0]), 2000, np.random.default_rng(0), stat="mean")
    assert set(np.unique(m)) <= {0.0, 0.5, 1.0}


def test_summarize_is_deterministic_per_seed():
    df = make_requests(n_samples=8, tasks=("qa",)).requests
    a = summarize(df, n_boot=300, seed=5)
    b = summarize(df, n_boot=300, seed=5)
    c = summarize(df, n_boot=300, seed=6)
    pd.testing.assert_frame_equal(a, b)
    assert np.array_equal(a["energy_j_median"], c["energy_j_median"])
    assert not np.array_equal(a["energy_j_ci_low"], c["energy_j_ci_low"])
    # shuffling the rows changes nothing: one random stream per group × clock point × metric
    d = summarize(df.sample(frac=1.0, random_state=0), n_boot=300, seed=5)
    pd.testing.assert_frame_equal(a, d)


# --------------------------------------------------------------------------------------------
# clock points, reference, optimum, Pareto
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep():
    return make_requests(n_samples=15, noise=0.01, seed=2)


@pytest.fixture(scope="module")
def sweep_summary(sweep):
    return summarize(sweep.requests, n_boot=500)


def test_summary_medians_and_deltas_match_direct_computation(sweep, sweep_summary):
    s = sweep_summary
    df = sweep.requests
    direct = df.groupby(["task", "sm_mhz_requested"])["energy_j"].median()
    for _, r in s.iterrows():
        assert r["energy_j_median"] == pytest.approx(direct[(r["task"], r["sm_mhz_requested"])], rel=1e-12)
        assert r["n"] == 15
        assert r["energy_j_ci_low"] <= r["energy_j_median"] <= r["energy_j_ci_high"]
    # reference = highest clock, one per task; Δ = median / reference median - 1
    refs = s[s["is_reference"]]
    assert sorted(refs["task"]) == ["qa", "summarize"] and set(refs["clock_mhz"]) == {1980.0}
    for task in ("qa", "summarize"):
        ref_e = direct[(task, 1980.0)]
        for f in (600.0, 1200.0):
            row = s[(s["task"] == task) & (s["clock_mhz"] == f)].iloc[0]
            assert row["energy_j_delta_pct"] == pytest.approx((direct[(task, f)] / ref_e - 1) * 100, rel=1e-9)
            assert row["energy_j_delta_pct_ci_low"] <= row["energy_j_delta_pct"] <= row["energy_j_delta_pct_ci_high"]
    # sorted by descending clock within a group; the throttle bit planted at 1980 MHz is kept
    qa = s[s["task"] == "qa"]
    assert list(qa["clock_mhz"]) == sorted(qa["clock_mhz"], reverse=True)
    assert (qa[qa["clock_mhz"] == 1980.0]["clock_event_reasons"] == 0x4).all()
    assert (qa[qa["clock_mhz"] < 1980.0]["clock_event_reasons"] == 0).all()


def test_planted_energy_optimum_is_found(sweep, sweep_summary):
    assert sweep.planted_optimum_mhz == 1200.0
    opt = optimal_clocks(sweep_summary, latency_limit=0.05)
    assert len(opt) == 2 and (opt["status"] == "ok").all()
    exp = sweep.expected_energy_j
    expected_saving = (1 - exp[1200.0] / exp[1980.0]) * 100  # ~27 %
    for _, o in opt.iterrows():
        assert o["best_clock_mhz"] == 1200.0
        assert o["best_saving_pct"] == pytest.approx(expected_saving, abs=3.0)
        assert o["best_significant"]
        assert o["best_saving_pct_ci_low"] < o["best_saving_pct"] < o["best_saving_pct_ci_high"]
        assert o["best_latency_delta_pct"] > 40  # slower, as planted
        # +5 %: no lower clock qualifies -> the reference itself
        assert o["limited_clock_mhz"] == 1980.0 and o["limited_saving_pct"] == 0.0


def test_optimum_under_latency_limit(sweep, sweep_summary):
    exp_e, exp_l = sweep.expected_energy_j, sweep.expected_latency_s
    for limit in (0.10, 0.30, 0.60):
        allowed = [f for f in exp_l if exp_l[f] <= exp_l[1980.0] * (1 + limit)]
        expected = min(allowed, key=exp_e.get)
        opt = optimal_clocks(sweep_summary, latency_limit=limit)
        assert set(opt["limited_clock_mhz"]) == {expected}, limit
        assert (opt["limited_latency_delta_pct"] <= limit * 100).all()
    assert expected == 1200.0  # at +60 % the global optimum is allowed
    with pytest.raises(ValueError):
        optimal_clocks(sweep_summary, latency_limit=-0.1)


def test_pareto_frontier_of_planted_sweep(sweep_summary):
    for _, g in sweep_summary.groupby("task"):
        # below the optimum, lower clocks are both slower and costlier: dominated
        assert set(g[g["pareto"]]["clock_mhz"]) == {1200.0, 1500.0, 1800.0, 1980.0}


def test_pareto_frontier_hand_table():
    s = pd.DataFrame({
        "model": ["m"] * 6 + ["n"],
        "task": ["t"] * 7,
        "latency_s_median": [1.0, 2.0, 2.0, 3.0, 1.5, np.nan, 9.0],
        "energy_j_median": [10.0, 5.0, 6.0, 5.0, 10.0, 1.0, 9.0],
    })
    # (1,10) front; (2,5) front; (2,6) dominated by (2,5); (3,5) dominated by (2,5);
    # (1.5,10) dominated by (1,10); NaN never; other group alone -> front
    assert pareto_frontier(s).tolist() == [True, True, False, False, False, False, True]


def test_observe_mode_is_one_clock_point_at_the_observed_clock():
    run = make_requests(clocks_mhz=None, n_samples=9, observe_mhz=1755.0, seed=4)
    df = run.requests
    s = summarize(df, n_boot=200)
    assert len(s) == 2 and s["observe"].all() and s["is_reference"].all()
    for _, r in s.iterrows():
        obs = df[df["task"] == r["task"]]["sm_mhz_observed"]
        assert r["clock_mhz"] == pytest.approx(obs.median())
        assert r["clock_label"].startswith("as found (~")
        assert r["energy_j_delta_pct"] == 0.0
    opt = optimal_clocks(s)
    assert (opt["status"] == "one clock point").all()
    fits = phase_scaling(df)
    assert (fits["n_points"] == 1).all()
    assert fits["status"].str.contains("not enough data").all()
    assert fits["f_opt_fit_mhz"].isna().all()


def test_quality_is_a_mean_and_only_counts_valid_rows():
    run = make_requests(n_samples=10, tasks=("qa",), clocks_mhz=(1000.0, 1980.0))
    s = summarize(run.requests, n_boot=200)
    direct = run.requests.groupby("sm_mhz_requested")["quality"].mean()
    assert "quality_mean" in s.columns and "quality_median" not in s.columns
    for _, r in s.iterrows():
        assert r["quality_mean"] == pytest.approx(direct[r["sm_mhz_requested"]])
    rnd = summarize(make_requests(n_samples=10, tasks=("qa",), weights="random").requests, n_boot=200)
    assert rnd["quality_mean"].isna().all() and (rnd["quality_n"] == 0).all()


def test_no_energy_gives_nan_not_errors():
    run = make_requests(n_samples=5, energy_method="none", clocks_mhz=(900.0, 1980.0))
    s = summarize(run.requests, n_boot=100)
    assert s["energy_j_median"].isna().all() and s["latency_s_median"].notna().all()
    assert s["latency_s_delta_pct"].notna().all()
    opt = optimal_clocks(s)
    assert (opt["status"] == "no energy_j data").all()
    fits = phase_scaling(run.requests)
    assert fits["power_c_w"].isna().all() and fits["time_a_s"].isna().all()  # 2 clocks: no fits either


def test_empty_table():
    s = summarize(to_frame("requests", []))
    assert s.empty and "energy_j_median" in s.columns
    assert optimal_clocks(s).empty


def test_optional_group_keys_split_weights():
    a = make_requests(n_samples=4, tasks=("qa",), clocks_mhz=(1980.0,)).requests
    b = make_requests(n_samples=4, tasks=("qa",), clocks_mhz=(1980.0,), weights="random").requests
    both = pd.concat([a, b], ignore_index=True)
    assert default_group_keys(a) == ["model", "task", "batch_size"]
    assert default_group_keys(both) == ["model", "weights", "task", "batch_size"]
    assert len(summarize(both, n_boot=50)) == 2


# --------------------------------------------------------------------------------------------
# fits
# --------------------------------------------------------------------------------------------
F = np.array([345.0, 600.0, 900.0, 1200.0, 1410.0, 1600.0, 1800.0, 1980.0])


def test_time_fit_recovers_exact_parameters():
    res = fit_time_model(F, 0.0031 + 17.5 / F)
    assert res["status"] == "ok" and res["n"] == 8
    assert res["a"] == pytest.approx(0.0031, rel=1e-8)
    assert res["b"] == pytest.approx(17.5, rel=1e-8)
    assert res["r2"] == pytest.approx(1.0, abs=1e-12) and res["rmse"] < 1e-12


def test_time_fit_is_linear_least_squares_without_curve_fit(monkeypatch):
    import scipy.optimize

    def no_curve_fit(*a, **kw):
        raise AssertionError("time ≈ a + b/f is linear in (a, b): no iterative fit")

    monkeypatch.setattr(scipy.optimize, "curve_fit", no_curve_fit)
    rng = np.random.default_rng(5)
    f = np.repeat(F, 5)
    a, b = 0.0042, 21.0
    t = a + b / f + rng.normal(0, 2e-5, size=f.size)
    res = fit_time_model(f, t)
    # the normal equations of the same problem, solved independently
    X = np.column_stack([np.ones_like(f), 1.0 / f])
    a_ls, b_ls = np.linalg.solve(X.T @ X, X.T @ t)
    assert res["a"] == pytest.approx(a_ls, rel=1e-9) and res["b"] == pytest.approx(b_ls, rel=1e-9)
    # and the known parameters, within the noise
    assert res["a"] == pytest.approx(a, abs=3e-5) and res["b"] == pytest.approx(b, rel=2e-3)
    resid = t - (a_ls + b_ls / f)
    assert res["rmse"] == pytest.approx(math.sqrt(np.mean(resid ** 2)), rel=1e-9)
    assert res["r2"] == pytest.approx(1 - np.sum(resid ** 2) / np.sum((t - t.mean()) ** 2), rel=1e-12)


@pytest.mark.parametrize("c,d_scaled,k", [(80.0, 520.0, 3.0), (250.0, 450.0, 3.5), (120.0, 300.0, 1.0),
                                           (60.0, 640.0, 2.2)])
def test_power_fit_recovers_exact_parameters(c, d_scaled, k):
    d = d_scaled / 1980.0 ** k
    res = fit_power_model(F, c + d * F ** k)
    assert res["status"] == "ok"
    assert res["c"] == pytest.approx(c, rel=1e-5)
    assert res["d"] == pytest.approx(d, rel=1e-4)
    assert res["k"] == pytest.approx(k, rel=1e-5)
    assert res["r2"] == pytest.approx(1.0, abs=1e-9)
    assert res["rmse"] < 1e-4


def test_fits_need_enough_distinct_clocks():
    t = fit_time_model([1000.0, 1000.0, 2000.0], [1.0, 1.1, 0.6])
    assert t["status"].startswith("not enough data") and math.isnan(t["a"])
    p = fit_power_model([1000.0, 1500.0, 2000.0], [100.0, 200.0, 300.0])
    assert p["status"].startswith("not enough data") and math.isnan(p["k"])
    # NaN and non-positive clocks are dropped, not fitted
    t = fit_time_model([np.nan, 0.0, 500.0, 1000.0, 2000.0], [9.0, 9.0, 1 + 1000 / 500, 2.0, 1.5])
    assert t["n"] == 3 and t["a"] == pytest.approx(1.0) and t["b"] == pytest.approx(1000.0)


def test_phase_scaling_recovers_planted_laws():
    run = make_requests(noise=0.0, n_samples=6, tasks=("qa",))
    fits = phase_scaling(run.requests).set_index("phase")
    assert (fits["status"] == "ok").all() and (fits["n_points"] == 6).all()
    dec, pre = fits.loc["decode"], fits.loc["prefill"]
    assert dec["time_a_s"] == pytest.approx(DECODE.a, rel=1e-6)
    assert dec["time_b_s_mhz"] == pytest.approx(DECODE.b, rel=1e-6)
    assert dec["power_c_w"] == pytest.approx(DECODE.c, rel=1e-4)
    assert dec["power_d_w_per_mhz_k"] == pytest.approx(DECODE.d_raw, rel=1e-3)
    assert dec["power_k"] == pytest.approx(DECODE.k, rel=1e-4)
    assert dec["power_dyn_at_f_max_w"] == pytest.approx(DECODE.d, rel=1e-3)
    # prefill time is per request: median(tokens_in) x per-token law
    tin = float(np.median(run.requests["tokens_in"]))
    assert pre["time_a_s"] == pytest.approx(tin * PREFILL.a, rel=1e-6)
    assert pre["time_b_s_mhz"] == pytest.approx(tin * PREFILL.b, rel=1e-6)
    assert pre["power_k"] == pytest.approx(PREFILL.k, rel=1e-4)
    # the energy-per-token optimum: data among the points, fit on the continuous range
    grid = np.linspace(600.0, 1980.0, 2001)
    for phase, law in (("decode", DECODE), ("prefill", PREFILL)):
        row = fits.loc[phase]
        assert row["f_opt_data_mhz"] == 1200.0
        cont = grid[np.argmin(law.power_w(grid) * law.time_s(grid))]
        assert row["f_opt_fit_mhz"] == pytest.approx(cont, abs=1.0)
        exp_saving = (1 - law.power_w(1200.0) * law.time_s(1200.0) / (law.power_w(1980.0) * law.time_s(1980.0))) * 100
        assert row["saving_at_opt_data_pct"] == pytest.approx(exp_saving, rel=1e-6)
    # decode J/token from the data equals P·T exactly without noise
    assert dec["j_per_token_at_f_max"] == pytest.approx(DECODE.power_w(1980.0) * DECODE.time_s(1980.0), rel=1e-9)


# --------------------------------------------------------------------------------------------
# features
# --------------------------------------------------------------------------------------------
def _feature_table(n: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, n)
    noise = rng.normal(size=n)
    rows = [{"model": "m", "task": "t", "batch_size": 1, "sm_mhz_requested": 1980.0, "sm_mhz_observed": 1975.0,
             "weights": "pretrained", "energy_j": 5.0 + 3.0 * x[i] + rng.normal(0, 0.5),
             "latency_s": math.exp(x[i] / 3.0),   # monotone in x, not linear
             "feat_driver": x[i], "feat_noise": noise[i], "feat_constant": 2.0} for i in range(n)]
    return to_frame("requests", rows)


def test_planted_correlations():
    c = feature_correlations(_feature_table()).set_index(["feature", "target"])
    drv = c.loc[("feat_driver", "energy_j")]
    assert drv["n"] == 60 and drv["pearson_r"] > 0.98 and drv["pearson_p"] < 1e-30
    assert drv["spearman_rho"] > 0.97 and drv["spearman_q"] < 1e-20
    # monotone but curved: Spearman exactly 1, Pearson below it
    mono = c.loc[("feat_driver", "latency_s")]
    assert mono["spearman_rho"] == pytest.approx(1.0)
    assert mono["pearson_r"] < 0.97
    noise = c.loc[("feat_noise", "energy_j")]
    assert abs(noise["pearson_r"]) < 0.3 and noise["pearson_p"] > 0.05 and noise["spearman_p"] > 0.05
    const = c.loc[("feat_constant", "energy_j")]
    assert const["note"] == "constant feature" and math.isnan(const["pearson_r"])
    assert (c["pearson_q"].dropna() >= c["pearson_p"].dropna() - 1e-15).all()
    assert c["clock_mhz"].eq(1980.0).all()


def test_small_samples_get_exact_permutation_p_values():
    # 4 perfectly rank-ordered pairs: the t approximation says p = 0; the exact two-sided
    # permutation p is 2/4! (only the identity and the reversed order reach |rho| = 1).
    df = _feature_table(n=4)
    df["energy_j"] = -df["feat_driver"] ** 3
    c = feature_correlations(df, targets=("energy_j",)).set_index("feature")
    r = c.loc["feat_driver"]
    assert r["spearman_rho"] == pytest.approx(-1.0) and r["p_method"] == "exact permutation"
    assert r["spearman_p"] == pytest.approx(2 / 24)
    assert r["pearson_p"] >= 2 / 24 - 1e-12
    big = feature_correlations(_feature_table(n=30)).set_index(["feature", "target"])
    assert big.loc[("feat_driver", "energy_j"), "p_method"] == "t approximation"
    # never below 2/n!, even for a perfect correlation
    assert big.loc[("feat_driver", "latency_s"), "spearman_p"] == pytest.approx(2 / math.factorial(30), rel=1e-9)


def test_correlations_need_rows_and_variation():
    df = _feature_table(n=2)
    c = feature_correlations(df)
    assert (c["note"] == "n < 3").all() and c["pearson_r"].isna().all()
    df = _feature_table(n=10)
    df["energy_j"] = 1.0
    c = feature_correlations(df, targets=("energy_j",))
    assert set(c["note"]) == {"constant target", "constant feature"}
    assert feature_correlations(df.drop(columns=["feat_driver", "feat_noise", "feat_constant"])).empty


def test_bh_qvalues_known_answer():
    q = bh_qvalues([0.01, 0.04, 0.03, 0.2, np.nan])
    np.testing.assert_allclose(q[:4], [0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.2])
    assert math.isnan(q[4])


def _bh_by_hand(p: np.ndarray) -> np.ndarray:
    """The Benjamini-Hochberg step-up procedure as llm_dvfs implemented it before scipy's."""
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok]
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    res = np.empty(m)
    res[order] = np.clip(ranked, 0, 1)
    q[ok] = res
    return q


def test_bh_qvalues_are_scipys_and_equal_the_hand_written_procedure(monkeypatch):
    rng = np.random.default_rng(11)
    worst = 0.0
    for _ in range(500):
        n = int(rng.integers(1, 400))
        p = rng.random(n) ** rng.uniform(0.2, 5.0)    # from mostly small to mostly large p
        p[rng.random(n) < 0.1] = np.nan                # tests that could not be made
        if rng.random() < 0.3:
            p[: n // 3] = np.round(p[: n // 3], 2)     # ties
        mine, ref = bh_qvalues(p), _bh_by_hand(p)
        assert np.array_equal(np.isnan(mine), np.isnan(ref))
        if np.isfinite(ref).any():
            worst = max(worst, float(np.nanmax(np.abs(mine - ref))))
    # identical up to the rounding of p·m/i vs p·(m/i): at most one ulp of 1.0 (measured 2.2e-16)
    assert worst <= np.finfo(float).eps
    # and it is scipy's function that computes them
    import scipy.stats

    seen = []
    monkeypatch.setattr(scipy.stats, "false_discovery_control", lambda ps, method: seen.append(method) or ps)
    bh_qvalues([0.5, 0.1])
    assert seen == ["bh"]


def test_regression_recovers_standardised_coefficients_and_drops_bad_features():
    rng = np.random.default_rng(3)
    n = 40
    x1, x2, x3 = rng.normal(5, 2, n), rng.uniform(0, 1, n), rng.normal(0, 1, n)
    y = 10 + 3 * x1 - 2 * x2 + 0 * x3
    df = pd.DataFrame({"model": "m", "task": "t", "batch_size": 1, "sm_mhz_requested": 1410.0,
                       "mem_mhz_requested": np.nan, "power_limit_w_requested": np.nan,
                       "sm_mhz_observed": 1400.0, "energy_j": y, "feat_x1": x1, "feat_x2": x2, "feat_x3": x3,
                       "feat_const": 7.0, "feat_x1_twice": 2 * x1 + 1})
    feats = ["feat_x1", "feat_x2", "feat_x3", "feat_const", "feat_x1_twice"]
    r = feature_regression(df, features=feats).set_index("feature")
    assert (r["status"] == "ok").all() and (r["n"] == n).all() and (r["p"] == 3).all()
    assert r.loc["feat_x1", "r2"] == pytest.approx(1.0, abs=1e-12)
    sy = y.std()
    assert r.loc["feat_x1", "beta"] == pytest.approx(3 * x1.std() / sy, rel=1e-9)
    assert r.loc["feat_x2", "beta"] == pytest.approx(-2 * x2.std() / sy, rel=1e-9)
    assert r.loc["feat_x3", "beta"] == pytest.approx(0.0, abs=1e-9)
    assert r.loc["feat_x1", "coef"] == pytest.approx(3.0, rel=1e-9)
    assert r.loc["feat_x2", "coef"] == pytest.approx(-2.0, rel=1e-9)
    assert r.loc["feat_const", "note"] == "constant" and math.isnan(r.loc["feat_const", "beta"])
    assert r.loc["feat_x1_twice", "note"] == "collinear with feat_x1"
    # with noise: the real effects are significant, the null one is not
    df["energy_j"] = y + rng.normal(0, 1.0, n)
    r = feature_regression(df, features=feats).set_index("feature")
    assert r.loc["feat_x1", "p_value"] < 1e-10 and r.loc["feat_x3", "p_value"] > 0.01
    assert 0.8 < r.loc["feat_x1", "r2"] < 1.0 and r.loc["feat_x1", "adj_r2"] < r.loc["feat_x1", "r2"]


def test_regression_with_too_few_rows_says_so():
    df = _feature_table(n=3)
    r = feature_regression(df)
    assert len(r) == 3
    assert r["status"].str.startswith("not enough data: n=3 rows for p=2 features").all()
    assert r["beta"].isna().all() and (r["n"] == 3).all()
    # few rows are not reported as collinearity
    assert set(r["note"]) == {"", "constant"}
    # all targets missing: n = 0, still no exception
    df["energy_j"] = np.nan
    r = feature_regression(df)
    assert (r["n"] == 0).all() and r["beta"].isna().all()


def test_regression_drops_nan_rows_and_mostly_missing_features():
    df = _feature_table(n=30)
    df.loc[:4, "feat_noise"] = np.nan
    df["feat_sparse"] = np.nan
    df.loc[:5, "feat_sparse"] = 1.0 + np.arange(6)
    r = feature_regression(df).set_index("feature")
    assert r.loc["feat_driver", "n"] == 25
    assert r.loc["feat_sparse", "note"].startswith("mostly missing")
    assert r.loc["feat_driver", "beta"] > 0.95


# --------------------------------------------------------------------------------------------
# trade-offs: EDP, ED²P, saving vs slowdown
# --------------------------------------------------------------------------------------------
def test_edp_table_on_a_hand_table():
    from llm_dvfs.analysis.tradeoffs import edp_optima, edp_table

    # energy falls and latency rises with the clock going down: E·t is lowest in the middle
    clocks = [1980.0, 1500.0, 1200.0, 900.0]
    e = {1980.0: 10.0, 1500.0: 7.0, 1200.0: 6.5, 900.0: 6.4}
    t = {1980.0: 1.0, 1500.0: 1.2, 1200.0: 1.5, 900.0: 2.0}
    rows = []
    for f in clocks:
        for i in range(3):
            rows.append({"cell_id": f"m|q|{f}", "request_id": f"{f}|{i}", "model": "m", "task": "q", "batch_size": 1,
                         "sm_mhz_requested": f, "energy_j": e[f], "latency_s": t[f], "tokens_out": 4})
    rows.append({"cell_id": "m|single", "request_id": "s|0", "model": "m", "task": "single", "batch_size": 1,
                 "sm_mhz_requested": 1980.0, "energy_j": 1.0, "latency_s": 1.0, "tokens_out": 4})
    summ = summarize(to_frame("requests", rows), n_boot=20)
    keys = ["model", "task", "batch_size"]
    tab = edp_table(summ, keys).set_index(["task", "clock_mhz"])
    q = tab.loc["q"]
    for f in clocks:
        assert q.loc[f, "edp_j_s"] == pytest.approx(e[f] * t[f])
        assert q.loc[f, "ed2p_j_s2"] == pytest.approx(e[f] * t[f] ** 2)
        assert q.loc[f, "edp_rel"] == pytest.approx(e[f] * t[f] / 10.0)
        assert q.loc[f, "ed2p_rel"] == pytest.approx(e[f] * t[f] ** 2 / 10.0)
        assert q.loc[f, "saving_pct"] == pytest.approx((1 - e[f] / 10.0) * 100)
        assert q.loc[f, "slowdown_pct"] == pytest.approx((t[f] - 1.0) * 100)
    # E·t: 10, 8.4, 9.75, 12.8 -> 1500; E·t²: 10, 10.08, 14.6, 25.6 -> 1980
    assert q.index[q["edp_min"]].tolist() == [1500.0] and q.index[q["ed2p_min"]].tolist() == [1980.0]
    assert q["pareto"].all()  # every point saves more energy for more slowdown
    opt = edp_optima(edp_table(summ, keys), keys).set_index("task")
    assert opt.loc["q", "edp_label"] == "1500 MHz" and opt.loc["q", "edp_rel"] == pytest.approx(0.84)
    assert opt.loc["q", "ed2p_label"] == "1980 MHz" and opt.loc["q", "ed2p_rel"] == pytest.approx(1.0)
    assert opt.loc["q", "status"] == "ok" and opt.loc["single", "status"] == "one clock point"
    assert not tab.loc["single"]["edp_min"].any()  # one point is nobody's minimum


def test_cell_power_integrates_each_sample_until_the_next():
    from llm_dvfs.analysis.tradeoffs import cell_power

    pw = to_frame("power", [
        {"cell_id": "a", "t_s": 0.0, "device": 0, "power_w": 100.0, "source": "buffer"},
        {"cell_id": "a", "t_s": 1.0, "device": 0, "power_w": 300.0, "source": "buffer"},
        {"cell_id": "a", "t_s": 3.0, "device": 0, "power_w": 50.0, "source": "buffer"},
        {"cell_id": "a", "t_s": 0.5, "device": 0, "power_w": 200.0, "source": "average"},
        {"cell_id": "a", "t_s": 2.5, "device": 0, "power_w": 200.0, "source": "average"},
        {"cell_id": "a", "t_s": 4.0, "device": 0, "power_w": None, "source": "average"},  # null: skipped
    ])
    c = cell_power(pw).set_index("source")
    assert c.loc["buffer", "energy_j"] == pytest.approx(100.0 * 1 + 300.0 * 2)
    assert c.loc["buffer", "duration_s"] == 3.0 and c.loc["buffer", "n_samples"] == 3
    assert c.loc["buffer", "mean_power_w"] == pytest.approx(700.0 / 3)
    assert c.loc["buffer", "peak_power_w"] == 300.0
    assert c.loc["average", "n_samples"] == 2 and c.loc["average", "energy_j"] == pytest.approx(400.0)
    assert c.loc["buffer", "preferred"] and not c.loc["average", "preferred"]
    assert cell_power(None).empty and cell_power(pw.iloc[0:0]).empty
