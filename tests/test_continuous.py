"""ContinuousEngine (transformers' continuous batching) on arch:tiny on the CPU: per-request
timestamps, overlap, greedy outputs equal to generate's, engine steps covering every token."""
from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from llm_dvfs.errors import ConfigError
from llm_dvfs.workload.runner import GenerationSettings
from llm_dvfs.workload.serving import EngineError, ServeRequest, run_closed_loop, submit_all

pytest.importorskip("transformers.generation.continuous_batching")

MAX_NEW = 10
N = 8


@pytest.fixture(scope="module")
def sharp():
    """arch:tiny with weights re-drawn at a larger scale: the shipped init (std 0.02) makes a
    2-layer model emit one token whatever the prompt, which would make the greedy comparison
    with generate vacuous; these weights give prompt-dependent outputs."""
    import torch

    from llm_dvfs.workload.models import load_model

    lm = load_model("arch:tiny", device="cpu", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p.shape[-1] ** 0.5))
    return lm


@pytest.fixture(scope="module")
def prompts():
    from llm_dvfs.workload.tasks import get_task

    return [s.prompt for s in get_task("synthetic:min_words=8,max_words=40").samples(N, 0)]


@pytest.fixture(scope="module")
def references(sharp, prompts):
    """What generate gives for each prompt alone (greedy)."""
    import torch

    st = GenerationSettings(max_new_tokens=MAX_NEW)
    out = []
    for p in prompts:
        enc = sharp.tokenizer(p, return_tensors="pt")
        with torch.inference_mode():
            ids = sharp.model.generate(**enc, **st.generate_kwargs(sharp.tokenizer))
        out.append(ids[0, enc["input_ids"].shape[1]:].tolist())
    assert len({tuple(r) for r in out}) > 1, "outputs do not depend on the prompt"
    return out


def _engine(lm, **kw):
    from llm_dvfs.workload.continuous import ContinuousEngine

    kw.setdefault("cache_tokens", 2048)
    kw.setdefault("max_batch_tokens", 256)
    return ContinuousEngine(lm, GenerationSettings(max_new_tokens=kw.pop("max_new", MAX_NEW)), **kw)


def _serve(lm, prompts, *, stagger_s=0.0, **kw):
    with _engine(lm, **kw) as eng:
        reqs = [ServeRequest(prompt=p, request_id=f"r{i}") for i, p in enumerate(prompts)]
        res = submit_all(eng.submit, reqs, stagger_s=stagger_s, timeout_s=120)
        return res, eng.steps(), eng.describe()


def _check_order(r):
    t = r.token_times_s
    assert r.t_arrival_s <= r.t_admit_s <= r.t_first_token_s <= r.t_end_s
    assert r.t_first_token_s == t[0]
    assert np.all(np.diff(t) >= 0) and t[-1] <= r.t_end_s
    assert len(t) == r.n_output_tokens == len(r.extra["output_ids"])


def _emissions(res, steps):
    """Per request, the indices of the steps that produced its tokens: the step completing its
    prefill (token 0), then each step decoding it. Also checks the prefill chunks add up."""
    out = {}
    for r in res:
        idx, prefilled = [], 0
        # distinct prompts: nothing served from the prefix cache, every prompt token computed
        assert r.extra["prefill_tokens_computed"] == r.n_prompt_tokens
        for k, s in enumerate(steps):
            if r.request_id in s.prefill_tokens:
                prefilled += s.prefill_tokens[r.request_id]
                if prefilled == r.n_prompt_tokens:
                    idx.append(k)
            elif r.request_id in s.decode_tokens:
                assert s.decode_tokens[r.request_id] == 1
                idx.append(k)
        assert prefilled == r.n_prompt_tokens
        out[r.request_id] = idx
    return out


def _check_steps_cover_tokens(res, steps):
    """Every token lies in exactly the step that produced it."""
    for a, b in zip(steps, steps[1:]):  # synchronous batching: steps in order, disjoint
        assert a.t_start_s < a.t_end_s <= b.t_start_s
    em = _emissions(res, steps)
    for r in res:
        assert len(em[r.request_id]) == r.n_output_tokens
        for t, k in zip(r.token_times_s, em[r.request_id]):
            assert steps[k].t_start_s <= t <= steps[k].t_end_s
            assert sum(1 for x in steps if x.t_start_s <= t <= x.t_end_s) == 1  # in no other
    assert sum(len(v) for v in em.values()) == sum(r.n_output_tokens for r in res)


def _overlap_pairs(res):
    return sum(1 for i, a in enumerate(res) for b in res[i + 1:]
               if a.t_admit_s < b.t_end_s and b.t_admit_s < a.t_end_s)


def test_all_at_once(sharp, prompts, references):
    res, steps, info = _serve(sharp, prompts)
    assert info["step_source"] == "scheduler" and info["engine"] == "hf-continuous"
    assert [r.request_id for r in res] == [f"r{i}" for i in range(N)]
    for r, ref in zip(res, references):
        _check_order(r)
        # continuous batching (paged attention, mixed prefill/decode batches) must not change
        # greedy outputs: exactly equal on this float32 CPU model
        assert r.extra["output_ids"] == ref
        assert r.stop_reason == "length" and r.n_output_tokens == MAX_NEW
        assert r.extra["token_times_source"] == "hf_timestamps"
    assert [r.n_prompt_tokens for r in res] == [len(sharp.tokenizer(p)["input_ids"]) for p in prompts]
    _check_steps_cover_tokens(res, steps)
    assert _overlap_pairs(res) == N * (N - 1) // 2  # all in flight together
    assert max(len(s.decode_tokens) for s in steps) == N  # decoded as one batch


def test_staggered_arrivals_join_running_batch(sharp, prompts, references):
    # a long background request keeps the batch running whatever the machine's speed, so every
    # staggered arrival joins a batch in flight; it is cancelled at the end
    with _engine(sharp, cache_tokens=8192) as eng:
        bg = eng.submit(ServeRequest(prompt=prompts[0], request_id="bg", max_new_tokens=1900), stream=True)
        # wait for bg's first token: from then on bg decodes, so every newcomer's prefill step is
        # a mixed one whatever the machine's load
        next(iter(bg.stream(timeout=120)))
        reqs = [ServeRequest(prompt=p, request_id=f"r{i}") for i, p in enumerate(prompts)]
        res = submit_all(eng.submit, reqs, stagger_s=0.02, timeout_s=120)
        assert bg.cancel()
        bgr = bg.result(10)
        steps = eng.steps()
    assert bgr.stop_reason == "cancelled"
    for r, ref in zip(res, references):
        _check_order(r)
        assert r.extra["output_ids"] == ref
    _check_steps_cover_tokens(res, steps)
    arrivals = [r.t_arrival_s for r in res]
    assert arrivals == sorted(arrivals) and arrivals[-1] - arrivals[0] >= 0.13
    for r in res:  # each one decoded next to the background request
        assert any(r.request_id in s.decode_tokens and "bg" in s.decode_tokens for s in steps)
    # continuous: steps that prefill a newcomer while decoding the running requests
    mixed = [s for s in steps if s.prefill_tokens and s.decode_tokens]
    assert {rid for s in mixed for rid in s.prefill_tokens} == {r.request_id for r in res}
    assert all(0 <= r.t_admit_s - r.t_arrival_s < 5 for r in res)  # queueing delay


def test_chunked_prefill_and_derived_steps(sharp, prompts, references):
    from llm_dvfs.workload.continuous import steps_from_token_times

    long_prompt = max(prompts, key=len)
    other = next(p for p in prompts if p != long_prompt)
    res, steps, _ = _serve(sharp, [long_prompt, other], max_batch_tokens=16)
    assert res[0].n_prompt_tokens > 16
    chunks = [s.prefill_tokens["r0"] for s in steps if "r0" in s.prefill_tokens]
    assert len(chunks) >= 2 and sum(chunks) == res[0].n_prompt_tokens and max(chunks) <= 16
    _check_steps_cover_tokens(res, steps)
    assert res[0].extra["output_ids"] == references[prompts.index(long_prompt)]
    # steps rebuilt from token stamps alone agree with the scheduler's on every emitting step
    derived = steps_from_token_times(res)
    emitting = [steps[k] for k in sorted({k for v in _emissions(res, steps).values() for k in v})]
    assert len(derived) == len(emitting)
    for d, s in zip(derived, emitting):
        assert d.decode_tokens == s.decode_tokens
        assert d.t_end_s == pytest.approx(s.t_end_s, abs=0.05)


def test_streaming_cancel_and_closed_loop(sharp, prompts):
    with _engine(sharp, max_new=40) as eng:
        h = eng.submit(ServeRequest(prompt=prompts[0], request_id="s"), stream=True)
        events = list(h.stream(timeout=60))
        rec = h.result(1)
        assert [e.index for e in events] == list(range(rec.n_output_tokens))
        assert [e.token_id for e in events] == rec.extra["output_ids"]
        assert np.allclose([e.t_s for e in events], rec.token_times_s)
        assert "".join(e.text for e in events) == rec.extra["output_text"]

        long = eng.submit(ServeRequest(prompt=prompts[1], request_id="long", max_new_tokens=1000),
                          stream=True)
        first = next(iter(long.stream(timeout=60)))
        assert long.cancel()
        rec = long.result(10)
        assert rec.stop_reason == "cancelled" and first.index == 0 and rec.n_output_tokens >= 1
        # the engine goes on serving after a cancel: a closed loop of 2 users over 6 requests
        res = run_closed_loop(eng.submit, [ServeRequest(prompt=p) for p in prompts[:6]], 2,
                              timeout_s=60)
    assert all(r.stop_reason == "length" for r in res)
    for r in res:  # never more than 2 in flight
        inflight = sum(1 for q in res if q.t_arrival_s <= r.t_arrival_s < q.t_end_s)
        assert inflight <= 2


def test_fixed_length_threads_and_describe(sharp, prompts):
    from llm_dvfs.workload.continuous import ContinuousEngine

    st = GenerationSettings(max_new_tokens=5, fixed_output_length=True)
    eng = ContinuousEngine(sharp, st, cache_tokens=2048, max_batch_tokens=256, page_size=32)
    with pytest.raises(EngineError, match="before start"):
        eng.submit("hello")
    with eng:
        handles: list = []
        lock = threading.Lock()

        def user(k):
            h = eng.submit(ServeRequest(input_ids=sharp.tokenizer(prompts[k])["input_ids"]))
            with lock:
                handles.append(h)

        threads = [threading.Thread(target=user, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        res = [h.result(60) for h in handles]
        info = eng.describe()
    assert all(r.n_output_tokens == 5 and r.stop_reason == "length" for r in res)
    assert info["cb_config"]["num_blocks"] == 64 and info["cb_config"]["max_batch_tokens"] == 256
    assert info["cb_config"]["use_async_batching"] is False
    assert not eng.running
    # the model is the model again: generate works after stop
    import torch
    enc = sharp.tokenizer(prompts[0], return_tensors="pt")
    with torch.inference_mode():
        sharp.model.generate(**enc, max_new_tokens=2, do_sample=False,
                             pad_token_id=sharp.tokenizer.pad_token_id)


def test_bad_options(sharp):
    from llm_dvfs.workload.continuous import ContinuousEngine

    with pytest.raises(ConfigError, match="no_such_field"):
        ContinuousEngine(sharp, cb_options={"no_such_field": 1})
    with pytest.raises(ConfigError, match="scheduler"):
        ContinuousEngine(sharp, scheduler="lifo")
    with pytest.raises(ConfigError, match="cache_tokens"):
        ContinuousEngine(sharp, cache_tokens=0)
    with pytest.raises(ConfigError, match="prompt, input_ids or messages"):
        ServeRequest()
    with _engine(sharp) as eng:
        with pytest.raises(ConfigError, match="chat template"):
            eng.submit(ServeRequest(messages=[{"role": "user", "content": "hi"}]))


@pytest.mark.native
def test_times_on_the_monitor_timeline(sharp, prompts, fake_gpu):
    """Engine records and monitor windows share one clock: the run lies inside its window."""
    from llm_dvfs.meter.monitor import PowerMonitor

    fake_gpu.set_power_w(250.0)
    with PowerMonitor(devices=[0]) as mon:
        with _engine(sharp) as eng:
            w = mon.begin_window("served", sync=False)
            res = submit_all(eng.submit, prompts[:3], timeout_s=60)
            time.sleep(0.05)
            w.end()
            steps = eng.steps()
        m = w.measurement()
    a, b = w.t_start_ns * 1e-9, w.t_end_ns * 1e-9
    assert all(a <= r.t_arrival_s and r.t_end_s <= b for r in res)
    assert all(a <= s.t_start_s and s.t_end_s <= b for s in steps)
    assert m.energy_j == pytest.approx(250.0 * (b - a), rel=0.05)
    assert math.isfinite(m.energy_j)


@pytest.mark.parametrize("sharing", [True, False])
def test_prefix_sharing_recorded(sharp, prompts, references, sharing):
    """A prompt whose prefix is already cached is prefilled only in part: the steps say so and
    extra["prefill_tokens_computed"] counts what was computed; greedy outputs are unchanged."""
    k = max(range(N), key=lambda i: len(sharp.tokenizer(prompts[i])["input_ids"]))
    assert len(sharp.tokenizer(prompts[k])["input_ids"]) > 32  # at least one full 32-token page
    with _engine(sharp, prefix_sharing=sharing) as eng:
        first = eng.submit(ServeRequest(prompt=prompts[k], request_id="a")).result(60)
        again = eng.submit(ServeRequest(prompt=prompts[k], request_id="b")).result(60)
        steps = eng.steps()
    assert first.extra["output_ids"] == again.extra["output_ids"] == references[k]
    computed = sum(s.prefill_tokens.get("b", 0) for s in steps)
    assert computed == again.extra["prefill_tokens_computed"]
    assert first.extra["prefill_tokens_computed"] == first.n_prompt_tokens
    if sharing:
        assert computed < again.n_prompt_tokens
    else:
        assert computed == again.n_prompt_tokens


def test_generation_thread_crash_fails_open_requests_keeps_finished(sharp, prompts):
    """transformers' generation thread dying mid-run: the request in flight is a failed record
    with its error and partial tokens, the finished one is kept, later ones are refused."""
    with _engine(sharp) as eng:
        ok = eng.submit(ServeRequest(prompt=prompts[0], request_id="ok")).result(60)
        real, calls = sharp.model.forward, [0]

        def flaky(*a, **k):
            calls[0] += 1
            if calls[0] > 3:
                raise RuntimeError("injected forward failure")
            return real(*a, **k)

        sharp.model.forward = flaky
        try:
            bad = eng.submit(ServeRequest(prompt=prompts[1], request_id="bad")).result(60)
            late = eng.submit(ServeRequest(prompt=prompts[2], request_id="late")).result(10)
        finally:
            del sharp.model.forward  # the class's forward again
    assert ok.stop_reason == "length" and ok.n_output_tokens == MAX_NEW
    assert bad.stop_reason == "error" and "injected forward failure" in bad.extra["error"]
    assert bad.n_output_tokens == 3 and len(bad.token_times_s) == 3
    assert late.stop_reason == "error" and "refused" in late.extra["error"]


def test_generation_thread_outside_inference_mode(sharp, prompts, monkeypatch):
    """transformers before ~5.2x starts its generation thread outside inference mode whatever the
    caller's mode (H200 run, transformers 5.17: "Inplace update to inference tensor outside
    InferenceMode"); the warm-up's buffers, made in start(), must then be ordinary tensors."""
    import torch
    from transformers.generation.continuous_batching import continuous_api

    class _OldTorch:  # what the old manager saw: no inference mode to hand to its thread
        def __getattr__(self, name):
            return (lambda: False) if name == "is_inference_mode_enabled" else getattr(torch, name)

    monkeypatch.setattr(continuous_api, "torch", _OldTorch())
    res, _, _ = _serve(sharp, prompts[:2], warmup=True)
    assert [r.n_output_tokens for r in res] == [MAX_NEW, MAX_NEW]
