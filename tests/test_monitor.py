"""PowerMonitor against the emulated H100: integration rules, fallbacks, overflow, errors."""
from __future__ import annotations

import os
import time
import warnings

import numpy as np
import pytest

import llm_dvfs as ld
from llm_dvfs import errors
from llm_dvfs.meter.monitor import _hold_integral

pytestmark = pytest.mark.native


def _offset_s() -> float:
    from llm_dvfs import _core
    return (_core.realtime_ns() - _core.monotonic_ns()) * 1e-9


# -- the integration rule, on exact numbers ------------------------------------------------
def test_hold_integral_partial_first_and_last_intervals():
    t = np.array([0.0, 1.0, 2.0, 3.0])
    p = np.array([10.0, 20.0, 30.0, 40.0])
    # [0.5, 2.5]: 0.5 s of 10 W (held from t=0), 1 s of 20 W, 0.5 s of 30 W
    assert _hold_integral(t, p, 0.5, 2.5) == (pytest.approx(5 + 20 + 15), 0.0)
    # past the last sample the last value is held
    assert _hold_integral(t, p, 2.5, 5.0)[0] == pytest.approx(15 + 80)
    # inside one interval
    assert _hold_integral(t, p, 1.25, 1.75)[0] == pytest.approx(10)
    # window opening before the first sample: first sample held backwards, and reported
    e, extrap = _hold_integral(t + 1.0, p, 0.0, 2.0)
    assert e == pytest.approx(10 * 2) and extrap == pytest.approx(1.0)
    assert np.isnan(_hold_integral(np.array([]), np.array([]), 0, 1)[0])


# -- against the emulator ------------------------------------------------------------------
def test_scripted_trace_energy_matches_exact_integral(fake_gpu):
    # transitions on the emulator's 20 ms sample grid: then the hold rule is exact up to the edges
    fake_gpu.set_trace([0.0, 0.3, 0.76, 1.2, 1.6], [150.0, 620.0, 90.0, 480.0, 260.0])
    with ld.PowerMonitor(devices=[0]) as mon:
        with mon.window("scripted") as w:
            time.sleep(2.0)
        m = w.measurement()
    off = _offset_s()
    exact = fake_gpu.energy_between(0, m.t_start_s + off, m.t_end_s + off)
    assert m.energy_method == "buffer"
    assert m.energy_j == pytest.approx(exact, rel=0.005)
    assert m.duration_s == pytest.approx(2.0, abs=0.05)
    assert m.peak_power_w == pytest.approx(620.0, rel=0.01)
    assert m.energy_j_counter == pytest.approx(exact, rel=0.03)
    assert m.ok and m.errors == [] and m.dropped_records == 0
    d = m.devices[0]
    assert d.n_samples >= 95 and d.max_sample_gap_s < 0.05
    assert set(d.energy_j_by_source) >= {"buffer", "instant", "average", "counter"}
    tr = m.trace()
    assert set(tr["source"]) >= {"buffer"} and tr["t_s"].is_monotonic_increasing
    buf = tr[tr["source"] == "buffer"]
    assert np.all(np.diff(buf["t_s"].to_numpy()) > 0)
    assert buf["power_w"].max() == pytest.approx(620.0, rel=0.01)


def test_nested_and_overlapping_windows_add_up(fake_gpu):
    fake_gpu.set_power_w(400.0)
    # The buffer integral is additive; a window of >= 1 s stitched to the counter's change
    # instants (meter/stitch.py; outer may reach 1 s) agrees with it only within the counter's
    # error, so this checks the integration rule with stitching off.
    with ld.PowerMonitor(devices=[0], bracket_edges=False) as mon:
        outer = mon.begin_window("outer")
        a = mon.begin_window("a")
        time.sleep(0.4)
        mon.end_window(a)
        b = mon.begin_window("b")
        over = mon.begin_window("overlap")
        time.sleep(0.4)
        mon.end_window(b)
        time.sleep(0.2)
        mon.end_window(over)
        mon.end_window(outer)
        assert outer.energy_j == pytest.approx(400.0 * outer.duration_s, rel=0.01)
        gap = b.t_start_s - a.t_end_s
        head = a.t_start_s - outer.t_start_s
        tail = outer.t_end_s - b.t_end_s
        # constant power: the parts of a partition add up exactly
        assert a.energy_j + b.energy_j + 400.0 * (head + gap + tail) == pytest.approx(outer.energy_j, rel=1e-6)
        assert over.avg_power_w == pytest.approx(400.0, rel=0.01)


@pytest.mark.fake_gpu(devices=2, cuda_order="1,0")
def test_cuda_ordinal_samples_the_gpu_cuda_calls_by_that_ordinal(fake_gpu):
    """CUDA's order is not NVML's (fastest-first vs PCI): cuda:0 is NVML device 1 here."""
    from llm_dvfs import _core
    loaded = _core.cuda_library_path()
    if loaded and loaded != os.environ["LLM_DVFS_CUDA_LIBRARY"]:
        pytest.skip(f"another CUDA driver library is loaded in this process ({loaded})")
    fake_gpu.set_power_w(150.0, device=0)
    fake_gpu.set_power_w(450.0, device=1)
    with ld.PowerMonitor(devices=[0]) as mon:
        assert mon.nvml_indices == [1] and mon.device_indices == [0]
        with mon.window("cuda:0") as w:
            time.sleep(0.4)
    assert w.avg_power_w == pytest.approx(450.0, rel=0.02)
    assert list(w.measurement().devices) == [0]
    with ld.PowerMonitor() as both:
        assert both.nvml_indices == [1, 0]
        with both.window("all") as w2:
            time.sleep(0.3)
    m = w2.measurement()
    assert m.devices[0].avg_power_w == pytest.approx(450.0, rel=0.02)
    assert m.devices[1].avg_power_w == pytest.approx(150.0, rel=0.02)


def test_start_stop_idempotent_and_measurements_survive_stop(fake_gpu):
    fake_gpu.set_power_w(200.0)
    mon = ld.PowerMonitor(devices=[0])
    mon.start()
    mon.start()
    w = mon.begin_window("x")
    time.sleep(0.3)
    w.end()
    mon.stop()
    mon.stop()
    assert not mon.running
    assert w.avg_power_w == pytest.approx(200.0, rel=0.02)


def test_many_start_stop_cycles(fake_gpu):
    for _ in range(1000):
        mon = ld.PowerMonitor(devices=[0], poll_period_s=0.001)
        mon.start()
        mon.stop()
    from llm_dvfs import _core
    assert _core.nvml_refcount() == 0  # every cycle released the library


@pytest.mark.slow
def test_sixty_seconds_lose_no_buffer_sample(fake_gpu):
    fake_gpu.set_power_w(300.0)
    with ld.PowerMonitor(devices=[0]) as mon:
        with mon.window("long") as w:
            time.sleep(60.0)
        m = w.measurement()
        t = mon.trace(sources=["buffer"])["t_s"].to_numpy()
    d = m.devices[0]
    assert d.lost_samples_s == 0.0 and m.dropped_records == 0
    inside = t[(t >= m.t_start_s) & (t <= m.t_end_s)]
    assert len(inside) == pytest.approx(m.duration_s / 0.02, abs=2)
    assert np.max(np.diff(inside)) < 0.03
    assert m.energy_j == pytest.approx(300.0 * m.duration_s, rel=0.001)


def test_ring_overflow_is_counted_not_fatal(fake_gpu):
    fake_gpu.set_power_w(300.0)
    with ld.PowerMonitor(devices=[0], capacity=16, poll_period_s=0.001, counter_period_s=0.01) as mon:
        with mon.window("w") as w:
            time.sleep(0.6)
        m = w.measurement()
    assert m.dropped_records > 0 and not m.ok
    assert mon.stats()["dropped"] >= m.dropped_records


def test_injected_error_surfaces_on_the_window_and_falls_back(fake_gpu):
    fake_gpu.set_power_w(250.0)
    with ld.PowerMonitor(devices=[0]) as mon:
        fake_gpu.fail("nvmlDeviceGetSamples", 15, -1)  # GPU lost, from now on
        with mon.window("w") as w:
            time.sleep(0.5)
        m = w.measurement()
        fake_gpu.fail("nvmlDeviceGetSamples", 0, 0)
    assert not m.ok
    assert any(isinstance(e, errors.GpuLost) and e.function == "nvmlDeviceGetSamples" for e in m.errors)
    assert m.energy_method == "instant"  # next source in the chain, named
    assert m.energy_j == pytest.approx(250.0 * m.duration_s, rel=0.05)


def test_an_error_in_force_is_on_every_window_once_and_clears(fake_gpu):
    # The sampler records a lane's error when it starts and when it clears: a window opened
    # while it persists still carries it (once), a window after it clears is clean.
    fake_gpu.set_power_w(250.0)
    with ld.PowerMonitor(devices=[0], buffer_period_s=0.01, poll_period_s=0.01) as mon:
        fake_gpu.fail("nvmlDeviceGetFieldValues", 15, -1)
        time.sleep(0.5)  # the error starts long before the window
        with mon.window("during") as w1:
            time.sleep(0.3)
        m1 = w1.measurement()
        fake_gpu.clear_failures()
        time.sleep(0.2)
        with mon.window("after") as w2:
            time.sleep(0.2)
        m2 = w2.measurement()
        failed_calls = mon.stats()["errors"]
    lost = [e for e in m1.errors if e.function == "nvmlDeviceGetFieldValues"]
    assert len(lost) == 1 and isinstance(lost[0], errors.GpuLost) and not m1.ok
    assert failed_calls >= 50  # retried all along
    assert m2.errors == [] and m2.ok
    assert m2.energy_j == pytest.approx(250.0 * m2.duration_s, rel=0.02)


def test_fallback_to_average_without_buffer_fields_counter(monkeypatch, fake_gpu, fake_nvml_variant):
    monkeypatch.setenv("LLM_DVFS_NVML_LIBRARY", str(fake_nvml_variant("minimal")))
    fake_gpu.set_power_w(300.0)
    time.sleep(1.1)  # let the emulator's 1 s moving average settle on 300 W
    with ld.PowerMonitor(devices=[0]) as mon:
        with mon.window("w") as w:
            time.sleep(0.5)
    assert w.energy_method == "average"
    assert w.energy_j_counter is None
    assert w.energy_j == pytest.approx(300.0 * w.duration_s, rel=0.05)


def test_idle_baseline_and_active_energy(fake_gpu):
    fake_gpu.set_power_w(80.0)
    with ld.PowerMonitor(devices=[0]) as mon:
        idle = mon.measure_idle(0.5)
        assert idle == pytest.approx(80.0, rel=0.02)
        fake_gpu.set_power_w(330.0)
        time.sleep(0.05)
        with mon.window("busy") as w:
            time.sleep(0.5)
    assert w.idle_power_w == pytest.approx(80.0, rel=0.02)
    assert w.active_energy_j == pytest.approx(250.0 * w.duration_s, rel=0.03)


def test_clocks_observed_on_the_window(fake_gpu):
    with ld.PowerMonitor(devices=[0]) as mon:
        with mon.window("w") as w:
            time.sleep(0.2)
    assert w.sm_mhz == 1980 and w.mem_mhz == 2619 and w.clock_event_reasons == 0


def test_without_driver_time_only_or_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_DVFS_NVML_LIBRARY", str(tmp_path / "missing.so"))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        with ld.PowerMonitor() as mon:
            with mon.window("cpu") as w:
                time.sleep(0.05)
    assert not mon.available and "could not load" in mon.unavailable_reason
    assert any("energy unavailable" in str(r.message) for r in rec)
    assert w.energy_method == "none" and np.isnan(w.energy_j) and w.duration_s >= 0.05
    with pytest.raises(errors.LibraryNotFound):
        ld.PowerMonitor(devices=[0]).start()


class _FakeCuda:
    """Stands in for torch.cuda: records when each device was synchronised (host monotonic ns)."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def synchronize(self, idx: int) -> None:
        from llm_dvfs.meter.monitor import now_ns
        time.sleep(0.01)  # the queued work the edge must wait for
        self.calls.append((idx, now_ns()))


def test_window_synchronises_cuda_at_both_edges_by_default(monkeypatch, fake_gpu):
    import sys
    import types
    cuda = _FakeCuda()
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    with ld.PowerMonitor() as mon:
        with mon.window("default") as w:
            assert len(cuda.calls) == 1 and cuda.calls[0][0] == 0
            assert w.t_start_ns > cuda.calls[0][1]  # start edge after the queued work finished
        assert len(cuda.calls) == 2 and w.t_end_ns > cuda.calls[1][1] and w.sync
        with mon.window("caller syncs", sync=False) as w2:
            pass
        assert len(cuda.calls) == 2 and not w2.sync
        t = mon.begin_window("explicit")
        mon.end_window(t)
        assert len(cuda.calls) == 4


def test_window_sync_never_imports_torch(monkeypatch, fake_gpu):
    import sys
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    with ld.PowerMonitor() as mon:
        with mon.window("w"):
            pass
    assert "torch" not in sys.modules


@pytest.mark.parametrize("lag_ms", [0.0, 60.0])
def test_window_is_shifted_by_the_sensor_lag(fake_gpu, lag_ms):
    # A 300 ms burst of 700 W over 100 W idle, and a window around exactly the burst. The emulator
    # reports power lag_ms late; a monitor told that lag integrates the burst, one told no lag
    # misses its first lag_ms and counts lag_ms of idle instead.
    fake_gpu.set_lag_ms(lag_ms)
    off = _offset_s()
    results = {}
    for told_s in (lag_ms / 1000.0, 0.0):
        with ld.PowerMonitor(devices=[0], lag_s=told_s) as mon:
            time.sleep(0.3)
            start = fake_gpu.set_trace([0.0, 0.2, 0.5], [100.0, 700.0, 100.0])
            a_mono = start - off
            time.sleep(0.2 + 0.3 + 0.3)
            t0 = mon.begin_window("burst", sync=False)
            # re-time the window onto the burst's true edges (host monotonic ns)
            t0.t_start_ns = int((a_mono + 0.2) * 1e9)
            t0.t_end_ns = int((a_mono + 0.5) * 1e9)
            m = t0.measurement()
        results[told_s] = (m.energy_j, m.devices[0].lag_s)
    exact = 700.0 * 0.3
    e_told, lag_used = results[lag_ms / 1000.0]
    assert lag_used == pytest.approx(lag_ms / 1000.0)
    assert e_told == pytest.approx(exact, rel=0.03)
    if lag_ms:
        e_blind, _ = results[0.0]
        # 60 ms of the burst replaced by 60 ms of idle: 0.06 * (700 - 100) = 36 J short
        assert e_blind == pytest.approx(exact - 0.06 * 600.0, rel=0.04)


def test_lag_s_is_validated():
    with pytest.raises(ld.ConfigError):
        ld.PowerMonitor(lag_s=-0.1)
    with pytest.raises(ld.ConfigError):
        ld.PowerMonitor(lag_s={"buffer": float("nan")})
