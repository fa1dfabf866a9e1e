"""Loader, error table, device queries and the info CLI, against the emulated H100."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import llm_dvfs as ld
from llm_dvfs import errors

pytestmark = pytest.mark.native


def _run_info(env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_extra)
    return subprocess.run([sys.executable, "-m", "llm_dvfs.info", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_import_does_not_load_nvml(fake_gpu):
    code = ("import llm_dvfs, llm_dvfs._core as c; import llm_dvfs.meter.monitor, llm_dvfs.devices; "
            "print(repr(c.nvml_library_path()), c.nvml_refcount())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["''", "0"]


def test_missing_library_is_library_not_found(monkeypatch, tmp_path):
    monkeypatch.setenv("LLM_DVFS_NVML_LIBRARY", str(tmp_path / "libnvidia-ml.so.1"))
    from llm_dvfs import _core
    with pytest.raises(errors.LibraryNotFound, match="LLM_DVFS_NVML_LIBRARY"):
        _core.Session()
    assert ld.devices() == []
    from llm_dvfs.devices import last_error
    assert "could not load the NVIDIA management library" in last_error()


def test_missing_required_symbol(monkeypatch, fake_gpu, fake_nvml_variant):
    monkeypatch.setenv("LLM_DVFS_NVML_LIBRARY", str(fake_nvml_variant("no_required")))
    from llm_dvfs import _core
    with pytest.raises(errors.SymbolNotFound, match="nvmlDeviceGetName"):
        _core.Session()


def test_minimal_library_uses_fallbacks_and_turns_capabilities_off(monkeypatch, fake_gpu, fake_nvml_variant):
    monkeypatch.setenv("LLM_DVFS_NVML_LIBRARY", str(fake_nvml_variant("minimal")))
    from llm_dvfs import _core
    with _core.Session():
        syms = _core.nvml_symbols()
    assert syms["nvmlInit"] is True            # resolved through the fallback name
    assert syms["nvmlDeviceGetCount"] is True
    assert syms["nvmlDeviceGetSamples"] is False
    (d,) = ld.devices()
    assert not d.has_power_samples and not d.has_energy_counter and not d.has_instant_power
    assert d.has_power_usage
    assert d.name == "NVIDIA H100 80GB HBM3"


@pytest.mark.parametrize("code", sorted(errors.NVML_CODES))
def test_every_nvml_code_maps_to_its_class(code):
    name, cls = errors.NVML_CODES[code]
    e = errors.from_nvml(code, "nvmlDeviceGetThing")
    assert type(e) is cls and isinstance(e, errors.NvmlError) and isinstance(e, errors.LlmDvfsError)
    assert e.code == code and e.code_name == name and e.function == "nvmlDeviceGetThing"
    assert name in str(e) and "nvmlDeviceGetThing" in str(e)


def test_unknown_code_and_permission_hint():
    e = errors.from_nvml(12345, "nvmlFoo")
    assert isinstance(e, errors.Unknown) and e.code == 12345
    assert "root" in str(errors.from_nvml(4, "nvmlDeviceSetGpuLockedClocks"))


def test_native_error_carries_code_and_function(fake_gpu):
    fake_gpu.fail("nvmlDeviceGetName", 15, 1)  # GPU lost
    with pytest.raises(errors.GpuLost) as ei:
        ld.devices()
    assert ei.value.function == "nvmlDeviceGetName" and ei.value.code == 15


def test_emulated_h100_queries(fake_gpu):
    (d,) = ld.devices()
    assert d.index == 0 and d.nvml_index == 0
    assert d.name == "NVIDIA H100 80GB HBM3"
    assert d.uuid.startswith("GPU-") and d.pci_bus_id
    assert d.driver_version == "580.159.04"
    assert d.memory_total_bytes == 85520809984
    assert (d.power_limit_w, d.power_limit_default_w, d.power_limit_min_w, d.power_limit_max_w) == (700, 700, 200, 700)
    assert sorted(d.supported_clocks_mhz) == [1593, 2619]
    g = d.supported_clocks_mhz[2619]
    assert len(g) == 110 and g[0] == 1980 and g[-1] == 345 and all(a - b == 15 for a, b in zip(g, g[1:]))
    assert d.supported_sm_mhz == g
    assert d.sm_mhz == 1980 and d.mem_mhz == 2619
    assert d.has_power_samples and d.has_energy_counter and d.has_instant_power and d.has_clock_events


def test_cuda_visible_devices_by_index_and_uuid(fake_gpu, monkeypatch):
    monkeypatch.setenv("FAKE_NVML_DEVICES", "3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    all_devs = ld.devices()
    assert [d.nvml_index for d in all_devs] == [0, 1, 2]
    assert len({d.uuid for d in all_devs}) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,0")
    assert [(d.index, d.nvml_index) for d in ld.devices()] == [(0, 2), (1, 0)]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{all_devs[1].uuid},7,0")  # invalid entry ends the list
    assert [d.nvml_index for d in ld.devices()] == [1]
    from llm_dvfs.devices import nvml_index
    assert nvml_index("cuda:0") == 1
    with pytest.raises(errors.ConfigError, match="not visible"):
        nvml_index(3)


def test_info_cli_with_emulated_gpu(fake_gpu):
    r = _run_info({}, "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    (d,) = data["devices"]
    assert d["name"] == "NVIDIA H100 80GB HBM3"
    assert len(d["supported_clocks_mhz"]["2619"]) == 110
    assert data["nvml_library"] == os.environ["LLM_DVFS_NVML_LIBRARY"]
    text = _run_info({})
    assert text.returncode == 0
    assert "1980..345 step 15 (110)" in text.stdout and "energy method   buffer" in text.stdout


def test_info_cli_without_driver(tmp_path):
    r = _run_info({"LLM_DVFS_NVML_LIBRARY": str(tmp_path / "nope.so")})
    assert r.returncode == 0
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("No NVIDIA GPU available")
    j = json.loads(_run_info({"LLM_DVFS_NVML_LIBRARY": str(tmp_path / "nope.so")}, "--json").stdout)
    assert j["devices"] == [] and "could not load" in j["error"]


@pytest.mark.parametrize("call", ["driver_version", "nvml_version"])
def test_version_queries_let_other_python_threads_run(fake_gpu, call):
    import threading
    import time
    from llm_dvfs import _core
    fn = {"driver_version": "nvmlSystemGetDriverVersion", "nvml_version": "nvmlSystemGetNVMLVersion"}
    fake_gpu.set_latency_ms(fn[call], 300)  # a slow driver call
    ran, stop = [], threading.Event()

    def spin():  # notes the time every ~10 ms that it gets to run
        last = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if now - last >= 0.01:
                ran.append(now)
                last = now

    with _core.Session() as s:
        th = threading.Thread(target=spin)
        th.start()
        try:
            time.sleep(0.05)
            t0 = time.monotonic()
            v = getattr(s, call)()
            t1 = time.monotonic()
        finally:
            stop.set()
            th.join()
    assert v == {"driver_version": "580.159.04", "nvml_version": "12.580.159.04"}[call]
    assert t1 - t0 >= 0.3
    # the other thread ran all through the call: the GIL was released
    during = [t for t in ran if t0 + 0.02 <= t <= t1 - 0.02]
    assert len(during) >= 10, (t0, t1, ran)
