"""The native PowerSampler (csrc/sampler.cpp) against the emulated H100: its scheduling, how it
holds NVML errors as lane state, and the driver's sample-array size protocol."""
from __future__ import annotations

import time

import numpy as np
import pytest

from fakes.fake_gpu import (
    NVML_ERROR_GPU_IS_LOST,
    NVML_FI_DEV_POWER_AVERAGE,
    NVML_FI_DEV_POWER_INSTANT,
)

_core = pytest.importorskip("llm_dvfs._core")
KINDS = dict(_core.RECORD_KINDS)

pytestmark = pytest.mark.native


def _records(sampler) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in sampler.drain().items()}


def _errors(rec, function: str) -> list[tuple[int, int, int]]:
    """(t_ns, nvmlReturn, field id) of the error-state records of one NVML function."""
    m = rec["kind"] == KINDS["error"]
    return [(int(t), int(c), int(v)) for t, c, v, a in
            zip(rec["t_ns"][m], rec["extra"][m], rec["value"][m], rec["aux"][m])
            if _core.nvml_symbol_name(int(a)) == function]


def test_a_deferred_counter_read_sleeps_until_the_next_poll(fake_gpu):
    # A poll every 20 ms and a counter due every 1 ms: whenever the next poll is less than the
    # counter's 15 ms slack away, the read waits for that poll. The thread must sleep meanwhile.
    s = _core.PowerSampler([0], buffer_period_s=0.25, poll_period_s=0.02, counter_period_s=0.001)
    s.start()
    try:
        time.sleep(0.1)
        a, t0 = s.stats(), time.monotonic()
        time.sleep(1.0)
        b, wall = s.stats(), time.monotonic() - t0
    finally:
        s.stop()
    d = {k: b[k] - a[k] for k in ("loops", "polls", "drains", "counter_reads", "thread_cpu_s")}
    assert 30 <= d["polls"] <= 55 and 2 <= d["drains"] <= 6
    # the counter is read right after each poll and while the next is >= 15 ms away (~6 per 20 ms)
    assert d["polls"] <= d["counter_reads"] <= 10 * d["polls"]
    # every wake-up does work, except at most one deferral per poll period
    assert d["loops"] <= d["polls"] + d["drains"] + d["counter_reads"] + d["polls"] + 5, d
    assert d["thread_cpu_s"] / wall < 0.1, d


@pytest.mark.parametrize("where", ["call", "field"])
def test_a_persisting_error_is_reported_once_and_the_lane_resumes(fake_gpu, where):
    # Polls and drains every 5 ms: a failure re-reported per retry would give hundreds of records.
    s = _core.PowerSampler([0], buffer_period_s=0.005, poll_period_s=0.005, counter_period_s=1.0)
    s.start()
    try:
        time.sleep(0.2)
        t_fail = _core.monotonic_ns()
        if where == "call":  # the whole nvmlDeviceGetFieldValues call fails
            fake_gpu.fail("nvmlDeviceGetFieldValues", NVML_ERROR_GPU_IS_LOST, -1)
        else:  # only the instant-power field's nvmlReturn
            fake_gpu.fail_field(NVML_FI_DEV_POWER_INSTANT, NVML_ERROR_GPU_IS_LOST, -1)
        errors0 = s.stats()["errors"]
        time.sleep(1.0)
        failed_calls = s.stats()["errors"] - errors0
        t_clear = _core.monotonic_ns()
        fake_gpu.clear_failures()
        time.sleep(0.3)
        assert s.flush(1.0)
    finally:
        s.stop()
    rec = _records(s)
    errs = _errors(rec, "nvmlDeviceGetFieldValues")
    field = NVML_FI_DEV_POWER_INSTANT if where == "field" else 0
    # one record when the error starts, one (code 0) when it clears; retries went on meanwhile
    assert [(c, v) for _, c, v in errs] == [(NVML_ERROR_GPU_IS_LOST, field), (0, field)], errs
    assert t_fail <= errs[0][0] <= t_fail + 100_000_000
    assert t_clear <= errs[1][0] <= t_clear + 100_000_000
    assert failed_calls >= 100
    assert not any(v == NVML_FI_DEV_POWER_AVERAGE for _, _, v in errs)
    # the lane resumes: the value after the error is recorded again (300 W, unchanged)
    m = (rec["kind"] == KINDS["instant"]) & (rec["t_ns"] >= t_clear)
    assert list(rec["value"][m][:1]) == [300.0]


def test_a_driver_asking_for_a_larger_sample_array_gets_one(fake_gpu):
    # The driver answers an array smaller than 2048 samples (the sampler starts with 1024) with
    # NVML_ERROR_INSUFFICIENT_SIZE; its size query names what to allocate.
    fake_gpu.set_samples_min_count(2048)
    fake_gpu.set_power_w(450.0)
    s = _core.PowerSampler([0], buffer_period_s=0.05, poll_period_s=0.05, counter_period_s=1.0)
    s.start()
    try:
        t0 = _core.monotonic_ns()
        time.sleep(0.6)
        assert s.flush(1.0)
        t1 = _core.monotonic_ns()
    finally:
        s.stop()
    rec = _records(s)
    m = rec["kind"] == KINDS["buffer"]
    t, w = rec["t_ns"][m], rec["value"][m]
    assert _errors(rec, "nvmlDeviceGetSamples") == []
    assert len(t) >= 0.8 * (t1 - t0) / 20e6 and set(w) == {450.0}
    assert np.all(np.diff(t) > 0) and np.allclose(np.diff(t), 20e6, atol=1e6)
