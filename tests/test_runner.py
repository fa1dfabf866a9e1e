"""Runner: rows of a tiny arch: model on the CPU, time-only and against the emulated GPU."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from llm_dvfs.errors import ConfigError
from llm_dvfs.schema import to_frame
from llm_dvfs.workload.runner import GenerationSettings, Runner, bare_generate

MAX_NEW = 6


def _f(col) -> np.ndarray:
    """A nullable (Float64) column as float64 with NaN: pandas 2.0 (the floor) gives object
    arrays from .to_numpy() of masked dtypes."""
    return col.to_numpy(dtype=float, na_value=np.nan)


@pytest.fixture(scope="module")
def tiny():
    from llm_dvfs.workload.models import load_model

    return load_model("arch:tiny", device="cpu", seed=0)


@pytest.fixture(scope="module")
def synthetic():
    from llm_dvfs.workload.tasks import get_task

    task = get_task("synthetic:max_words=24")
    return task, task.samples(3, 0)


def _run(tiny, task, samples, *, monitor=None, batch_size=2, settings=None, cell_id="c", **kw):
    runner = Runner(tiny, monitor, settings or GenerationSettings(max_new_tokens=MAX_NEW), **kw)
    return runner.run(task, samples, batch_size=batch_size, cell_id=cell_id,
                      context={"task": task.name, "sm_mhz_requested": math.nan}, warmup=1)


def test_rows_time_only_batched(tiny, synthetic):
    task, samples = synthetic
    res = _run(tiny, task, samples, batch_size=2)
    df = to_frame("requests", res.requests)
    # one row per request, warm-up excluded; batches [0, 1] and [2] with left padding
    assert len(df) == 3
    assert df["batch_index"].tolist() == [0, 1, 0]
    assert df["batch_size"].tolist() == [2, 2, 2]
    assert df["sample_id"].tolist() == [s.sample_id for s in samples]
    assert df["request_id"].is_unique
    # tokens_in is the unpadded prompt length of the model's tokenizer
    assert df["tokens_in"].tolist() == [len(tiny.tokenizer(s.prompt)["input_ids"]) for s in samples]
    assert ((df["tokens_out"] >= 1) & (df["tokens_out"] <= MAX_NEW)).all()
    # no GPU: time only
    assert (df["energy_method"] == "none").all() and df["energy_j"].isna().all()
    assert (df["ttft_s"] > 0).all() and (df["latency_s"] >= df["ttft_s"]).all()
    # the two requests of one batch share its latency
    assert df["latency_s"].iloc[0] == df["latency_s"].iloc[1]
    assert (df["weights"] == "random").all()
    # synthetic: no metric, so no score and nothing to judge valid or not: null, not "" or False
    assert df["quality"].isna().all() and df["quality_metric"].isna().all() and df["quality_valid"].isna().all()
    assert df["clock_event_reasons"].isna().all() and df["sm_mhz_observed"].isna().all()  # not read, not -1
    # one token row per generated token, prefill first, intervals tiling each request
    tok = to_frame("tokens", res.tokens)
    assert len(tok) == df["tokens_out"].sum()
    for rid, g in tok.groupby("request_id"):
        assert g["token_index"].tolist() == list(range(len(g)))
        assert g["phase"].tolist() == ["prefill"] + ["decode"] * (len(g) - 1)
        assert np.allclose(_f(g["t_end_s"])[:-1], _f(g["t_start_s"])[1:])


def test_fixed_output_length_and_greedy_determinism(tiny, synthetic):
    task, samples = synthetic
    st = GenerationSettings(max_new_tokens=MAX_NEW, fixed_output_length=True)
    a = to_frame("requests", _run(tiny, task, samples, settings=st).requests)
    b = to_frame("requests", _run(tiny, task, samples, settings=st, batch_size=1).requests)
    assert (a["tokens_out"] == MAX_NEW).all()
    # same prompts, greedy: batching (left padding) does not change the output
    assert a["output_text"].tolist() == b["output_text"].tolist()
    tpot = _f(a["tpot_s"])
    assert np.isfinite(tpot).all() and (tpot > 0).all()


def test_sampled_decoding_is_seeded_per_cell_and_batch(tiny, synthetic):
    task, samples = synthetic
    st = GenerationSettings(max_new_tokens=MAX_NEW, decoding="sampled", seed=7, fixed_output_length=True)
    a = [r["output_text"] for r in _run(tiny, task, samples, settings=st, cell_id="x").requests]
    b = [r["output_text"] for r in _run(tiny, task, samples, settings=st, cell_id="x").requests]
    c = [r["output_text"] for r in _run(tiny, task, samples, settings=dataclasses.replace(st, seed=8),
                                        cell_id="x").requests]
    assert a == b
    assert a != c


def test_features_and_context_columns(tiny, synthetic):
    from llm_dvfs.workload.features import compute_features

    task, samples = synthetic
    feats = compute_features([s.prompt for s in samples], tiny.tokenizer, ner="heuristic")
    runner = Runner(tiny, None, GenerationSettings(max_new_tokens=2))
    res = runner.run(task, samples, batch_size=3, cell_id="cell", features=feats, warmup=0,
                     context={"task": "synthetic", "sm_mhz_requested": 1500.0, "idle_power_w": 70.0})
    df = to_frame("requests", res.requests)
    assert df["feat_tokens"].tolist() == df["tokens_in"].astype(float).tolist()
    assert df["feat_words"].tolist() == feats["feat_words"].tolist()
    assert (df["sm_mhz_requested"] == 1500.0).all() and (df["idle_power_w"] == 70.0).all()
    with pytest.raises(ValueError, match="features has 2 rows"):
        runner.run(task, samples, batch_size=1, cell_id="c", context={}, features=feats.iloc[:2], warmup=0)


def test_bad_batch_size_and_settings(tiny, synthetic):
    task, samples = synthetic
    with pytest.raises(ConfigError, match="batch_size"):
        Runner(tiny).run(task, samples, batch_size=0, cell_id="c", context={})
    with pytest.raises(ConfigError, match="decoding"):
        GenerationSettings(decoding="beam")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        GenerationSettings(max_new_tokens=0)
    with pytest.raises(ConfigError, match="no room"):
        Runner(tiny, None, GenerationSettings(max_new_tokens=5000))


def test_quality_generate_and_loglik_tasks(tiny, tmp_path):
    from llm_dvfs.workload.tasks import get_task

    boolq = tmp_path / "boolq.jsonl"
    boolq.write_text("\n".join(json.dumps(r) for r in [
        {"question": "is the sky blue", "passage": "The sky is blue.", "answer": True},
        {"question": "is grass red", "passage": "Grass is green.", "answer": False}]) + "\n")
    hs = tmp_path / "hs.jsonl"
    hs.write_text(json.dumps({"ctx": "A man opens a door and", "endings": [" walks in.", " eats it.",
                              " flies.", " sings."], "label": 0}) + "\n")
    t_bq = get_task(f"boolq:file={boolq}")
    t_hs = get_task(f"hellaswag:file={hs}")
    # random weights: the metric is computed but flagged as meaningless
    rows = _run(tiny, t_bq, t_bq.samples(None, None)).requests
    assert [r["quality_metric"] for r in rows] == ["accuracy", "accuracy"]
    assert all(r["quality"] in (0.0, 1.0) and r["quality_valid"] is False for r in rows)
    # pretend pretrained: quality_valid follows the weights; HellaSwag is scored by log-likelihood
    fake_pre = dataclasses.replace(tiny, weights="pretrained")
    rows = _run(fake_pre, t_hs, t_hs.samples(None, None), batch_size=1).requests
    assert rows[0]["quality_metric"] == "acc_norm" and rows[0]["quality"] in (0.0, 1.0)
    assert rows[0]["quality_valid"] is True


def test_bare_generate_counts_tokens(tiny, synthetic):
    _, samples = synthetic
    st = GenerationSettings(max_new_tokens=4, fixed_output_length=True)
    n, secs = bare_generate(tiny, [s.prompt for s in samples], 2, st)
    assert n == 3 * 4 and secs > 0


@pytest.mark.native
def test_energy_attribution_with_emulated_gpu(tiny, synthetic, fake_gpu):
    from llm_dvfs.meter.monitor import PowerMonitor

    task, samples = synthetic
    fake_gpu.set_power_w(300.0)  # 300 W at the default 1980 MHz
    with PowerMonitor(devices=[0]) as mon:
        idle = mon.measure_idle(0.2)
        res = _run(tiny, task, samples, monitor=mon, batch_size=2, gpu_name="emulated")
    df = to_frame("requests", res.requests)
    assert idle == pytest.approx(300.0, rel=0.02)
    assert (df["energy_method"] == "buffer").all()
    assert (df["energy_j"] > 0).all() and (df["avg_power_w"].between(290, 310)).all()
    # energy of a request = its prefill + decode = the sum of its tokens
    assert np.allclose(_f(df["prefill_energy_j"] + df["decode_energy_j"]), _f(df["energy_j"]))
    tok = to_frame("tokens", res.tokens)
    per_req = tok.groupby("request_id")["energy_j"].sum()
    assert np.allclose(_f(per_req.loc[df["request_id"]]), _f(df["energy_j"]))
    assert np.allclose(_f(df["j_per_token"]), _f(df["energy_j"] / df["tokens_out"]))
    # the two requests of the first batch share its energy (equal split of shared steps)
    # and the batch's energy is ~ P x latency
    b0 = df.iloc[:2]
    assert b0["energy_j"].sum() == pytest.approx(300.0 * b0["latency_s"].iloc[0], rel=0.05)
    assert np.allclose(_f(df["idle_power_w"]), idle)
    assert (df["sm_mhz_observed"] == 1980.0).all() and (df["gpu_name"] == "emulated").all()
    assert res.attribution["energy_method"] == "buffer"


# -- CallMeter (llm_dvfs.meter.calls), what the runner and the lm_eval model measure through -----
class _StubWindow:
    def __init__(self, name, t_start_ns):
        self.name, self.t_start_ns, self.t_end_ns = name, t_start_ns, None

    def end(self):
        self.t_end_ns = self.t_start_ns + 2_000_000_000
        return self


class _StubMonitor:
    available = True
    idle_power_w = float("nan")

    def __init__(self):
        self.windows = []

    def begin_window(self, name, sync=True):
        assert sync is False  # the meter synchronises the model's devices itself
        self.windows.append(_StubWindow(name, 5_000_000_000))
        return self.windows[-1]


def test_call_meter_closes_the_window_when_the_call_raises():
    from llm_dvfs.meter.calls import CallMeter

    mon = _StubMonitor()
    meter = CallMeter(mon, "cpu", token_timing=False)
    assert meter.idle_power_w is None  # NaN baseline: none
    res, call = meter.call(lambda: 41 + 1, "fwd")
    assert res == 42 and call.window is mon.windows[0] and call.window.name == "fwd"
    assert (call.t_start_s, call.t_end_s, call.duration_s) == (5.0, 7.0, 2.0)

    def boom():
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        meter.call(boom, "fails")
    assert mon.windows[1].name == "fails" and mon.windows[1].t_end_ns == 7_000_000_000


def test_call_meter_time_only_measurement():
    from llm_dvfs.meter.calls import CallMeter

    meter = CallMeter(None, "cpu", token_timing=False)
    assert meter.monitor is None and meter.timer is None and meter.timing_error is None
    _, call = meter.call(lambda: None)
    m = call.measurement()
    assert call.window is None and call.t_end_s >= call.t_start_s > 0
    assert (m.t_start_s, m.t_end_s) == (call.t_start_s, call.t_end_s)
    assert math.isnan(m.energy_j) and m.energy_method == "none" and m.energy_j_counter is None
    assert m.active_energy_j is None and math.isnan(m.sm_mhz) and m.devices == {} and not m.ok
    assert call.errors() == []
    call.set_tokens([3, 1])  # no timing: nothing to correct
    assert call.timing is None
    assert meter.attribute([call], [["r0"]], "c") == ({}, [], {})
