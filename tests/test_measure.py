"""The simplest API: @ld.measure, with ld.measure(...), and the Zeus-compatible monitor."""
from __future__ import annotations

import csv
import time

import pytest

import llm_dvfs as ld
from llm_dvfs.meter.measure import close_default_monitor

pytestmark = pytest.mark.native


def test_decorator_measures_every_call_and_keeps_results(fake_gpu):
    fake_gpu.set_power_w(400.0)
    mon = ld.PowerMonitor(devices=[0]).start()
    seen = []

    @ld.measure("work", monitor=mon, keep=2, callback=seen.append)
    def work(x):
        time.sleep(0.2)
        return x * 2

    assert work(21) == 42 and work(1) == 2 and work(2) == 4
    assert work.__name__ == "work"
    assert len(work.measurements) == 2 and seen[-1] is work.last_measurement
    w = work.last_measurement
    assert w.name == "work" and w.energy_j == pytest.approx(400.0 * w.duration_s, rel=0.02)
    assert w.duration_s == pytest.approx(0.2, abs=0.03) and w.ok
    mon.stop()


def test_decorator_bare_and_exceptions_still_close_the_window(fake_gpu):
    fake_gpu.set_power_w(250.0)
    mon = ld.PowerMonitor(devices=[0]).start()

    @ld.measure
    def plain():
        time.sleep(0.05)
        return "ok"

    try:
        assert plain() == "ok" and plain.last_measurement.name.endswith("plain")
        assert plain.last_measurement.monitor is ld.default_monitor()
        assert plain.last_measurement.energy_j == pytest.approx(250.0 * plain.last_measurement.duration_s, rel=0.05)
    finally:
        close_default_monitor()

    @ld.measure(monitor=mon)
    def boom():
        time.sleep(0.1)
        raise KeyError("x")

    with pytest.raises(KeyError):
        boom()
    w = boom.last_measurement
    assert w.closed and w.energy_j == pytest.approx(250.0 * w.duration_s, rel=0.03)
    mon.stop()


def test_context_manager_form(fake_gpu):
    fake_gpu.set_power_w(300.0)
    with ld.measure("block", monitor=ld.PowerMonitor(devices=[0]).start()) as w:
        time.sleep(0.15)
    assert w.energy_j == pytest.approx(300.0 * w.duration_s, rel=0.03)
    z = w.zeus()
    assert z.time == pytest.approx(w.duration_s) and z.gpu_energy == {0: pytest.approx(w.energy_j)}
    assert z.total_energy == pytest.approx(w.energy_j)


@pytest.mark.fake_gpu(devices=2)
def test_zeus_compatible_monitor(fake_gpu, tmp_path):
    fake_gpu.set_power_w(200.0, device=0)
    fake_gpu.set_power_w(500.0, device=1)
    log = tmp_path / "zeus.csv"
    zm = ld.ZeusMonitor(gpu_indices=[0, 1], log_file=log)
    zm.begin_window("step")
    with pytest.raises(ValueError, match="already exists"):
        zm.begin_window("step")
    time.sleep(0.3)
    m = zm.end_window("step")
    assert m.time == pytest.approx(0.3, abs=0.04)
    assert m.gpu_energy[0] == pytest.approx(200.0 * m.time, rel=0.03)
    assert m.gpu_energy[1] == pytest.approx(500.0 * m.time, rel=0.03)
    assert m.total_energy == pytest.approx(700.0 * m.time, rel=0.03)
    assert m.cpu_energy is None and m.measurement.energy_method == "buffer"
    with pytest.raises(ValueError, match="does not exist"):
        zm.end_window("step")
    zm.begin_window("cancelled")
    assert zm.end_window("cancelled", cancel=True).total_energy == 0.0
    rows = list(csv.reader(log.open()))
    assert rows[0] == ["start_time", "window_name", "elapsed_time", "gpu0_energy", "gpu1_energy"]
    assert len(rows) == 2 and rows[1][1] == "step" and float(rows[1][4]) == pytest.approx(m.gpu_energy[1])
    with pytest.raises(ValueError, match="GPUs only"):
        ld.ZeusMonitor(cpu_indices=[0])
    zm.close()
