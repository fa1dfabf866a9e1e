"""Loader, error table, device queries and the info CLI, against the emulated H100."""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import re
import subprocess
import sys
import textwrap
import types
import warnings

import pytest

import llm_dvfs as ld
from llm_dvfs import errors

from gil_probe import python_thread_ticks, ticks_inside

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
    assert data["cuda_order"] == "single_gpu"
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


# -- CUDA order vs NVML order (issue 12, item 6) -------------------------------------------------
# The fake libcuda (tests/fakes/fake_cuda.c) enumerates the fake NVML GPUs in the order
# FAKE_CUDA_DEVICE_ORDER gives (the fake_gpu marker's cuda_order=), as CUDA's default
# FASTEST_FIRST order may differ from NVML's PCI order on a mixed host.
_UUID_RE = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_OTHER_MODEL = "NVIDIA A100-SXM4-80GB"


def _uuid(i: int) -> str:
    return f"GPU-fa4e0000-0000-0000-0000-{i:012x}"


def _fake_cuda_in_process() -> ctypes.CDLL:
    """The fake libcuda the fake_gpu fixture names, as the package's loader has it (or will)."""
    from llm_dvfs import _core
    path = os.environ["LLM_DVFS_CUDA_LIBRARY"]
    loaded = _core.cuda_library_path()
    if loaded and loaded != path:
        pytest.skip(f"another CUDA driver library is loaded in this process ({loaded})")
    lib = ctypes.CDLL(path)
    lib.fake_cuda_fail.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    lib.fake_cuda_calls.argtypes = [ctypes.c_char_p]
    lib.fake_cuda_calls.restype = ctypes.c_long
    return lib


def _order() -> list[int]:
    return [d.nvml_index for d in ld.devices()]


_ORDER_SCRIPT = textwrap.dedent("""
    import importlib, json, os, sys, warnings
    import llm_dvfs._core as core
    d = importlib.import_module("llm_dvfs.devices")  # the module (llm_dvfs.devices is the function)
    out = []
    for env in json.loads(sys.argv[1]):
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            devs = d.devices()
        out.append({"order": [x.nvml_index for x in devs], "source": d.order_source(),
                    "warnings": [str(x.message) for x in w if issubclass(x.category, d.DeviceOrderWarning)],
                    "libcuda": core.cuda_library_path()})
    print(json.dumps(out))
""")


def _orders_in_fresh_process(*steps: dict, **env_extra: str) -> list[dict]:
    """devices() after each step's environment changes, in one new process (libcuda and the
    warn-once flag are per process): order, order_source, DeviceOrderWarnings, loaded libcuda."""
    env = dict(os.environ, **env_extra)
    r = subprocess.run([sys.executable, "-c", _ORDER_SCRIPT, json.dumps(list(steps))], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.fake_gpu(devices=3)
def test_fake_cuda_reports_the_nvml_uuids_in_nvml_format(fake_gpu):
    _fake_cuda_in_process()
    from llm_dvfs import _core
    uuids = _core.cuda_device_uuids()
    assert uuids == [_uuid(0), _uuid(1), _uuid(2)] == [d.uuid for d in ld.devices()]
    assert all(_UUID_RE.match(u) for u in uuids)  # valid hex, as NVML prints a CUuuid


@pytest.mark.fake_gpu(devices=2, cuda_order="1,0")
def test_cuda_order_differs_from_pci_order(fake_gpu):
    lib = _fake_cuda_in_process()
    from llm_dvfs.devices import nvml_index, order_source
    devs = ld.devices()
    assert order_source() == "libcuda" and lib.fake_cuda_calls(b"cuDeviceGetUuid_v2") >= 2
    assert [(d.index, d.nvml_index) for d in devs] == [(0, 1), (1, 0)]
    assert devs[0].uuid == _uuid(1) and devs[1].uuid == _uuid(0)
    assert devs[0].pci_bus_id.startswith("00000000:28:")  # NVML device 1's bus (0x18 + 0x10)
    assert nvml_index(0) == 1 and nvml_index("cuda:1") == 0 and nvml_index(_uuid(0)) == 0


@pytest.mark.fake_gpu(devices=3, cuda_order="2,0,1")
def test_cuda_visible_devices_under_a_permuted_order(fake_gpu, monkeypatch):
    _fake_cuda_in_process()
    from llm_dvfs.devices import order_source
    assert _order() == [2, 0, 1] and order_source() == "libcuda"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")  # ordinals index CUDA's order
    assert _order() == [2, 1] and order_source() == "libcuda"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{_uuid(1)},0")  # a UUID, then CUDA ordinal 0
    assert _order() == [1, 2] and order_source() == "libcuda"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{_uuid(2)},{_uuid(0)[4:]}")  # UUIDs only
    assert _order() == [2, 0] and order_source() == "cuda_visible_devices"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0,9,2")  # an invalid entry ends the list
    assert _order() == [0, 2] and order_source() == "libcuda"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert ld.devices() == [] and order_source() == "cuda_visible_devices"


@pytest.mark.fake_gpu(devices=2, cuda_order="1,0")
def test_pci_bus_id_order_is_exact_without_libcuda(fake_gpu, monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    from llm_dvfs.devices import order_source
    assert _order() == [0, 1] and order_source() == "pci_bus_id"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert _order() == [1] and order_source() == "pci_bus_id"
    _fake_cuda_in_process()
    from llm_dvfs import _core
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _core.cuda_device_uuids() == [_uuid(0), _uuid(1)]  # the driver agrees


class _TorchCuda:
    """Stands in for torch.cuda: CUDA initialised, devices in the given UUID order."""

    def __init__(self, uuids: list, initialized: bool = True) -> None:
        self.uuids, self.initialized, self.queried = uuids, initialized, []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return self.initialized

    def device_count(self) -> int:
        self.queried.append("device_count")
        return len(self.uuids)

    def get_device_properties(self, i: int):
        self.queried.append(i)
        return types.SimpleNamespace(uuid=self.uuids[i])


@pytest.mark.fake_gpu(devices=3)
def test_torch_order_is_preferred_when_cuda_is_initialised(fake_gpu, monkeypatch):
    from llm_dvfs.devices import order_source
    as_str = [_uuid(2)[4:], _uuid(0)[4:].upper()]  # str(_CUuuid): no "GPU-" prefix
    cuda = _TorchCuda(as_str)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert _order() == [2, 0] and order_source() == "torch"  # torch's view wins over libcuda's
    as_bytes = [types.SimpleNamespace(bytes=bytes.fromhex(_uuid(i)[4:].replace("-", ""))) for i in (1, 2)]
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=_TorchCuda(as_bytes)))
    assert _order() == [1, 2] and order_source() == "torch"
    # unknown UUIDs (e.g. MIG instances): the next source decides
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=_TorchCuda(["MIG-abc"])))
    _fake_cuda_in_process()
    assert _order() == [0, 1, 2] and order_source() == "libcuda"


@pytest.mark.fake_gpu(devices=2, cuda_order="1,0")
def test_torch_without_initialised_cuda_is_not_asked(fake_gpu, monkeypatch):
    _fake_cuda_in_process()
    from llm_dvfs.devices import order_source
    cuda = _TorchCuda([_uuid(0), _uuid(1)], initialized=False)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert _order() == [1, 0] and order_source() == "libcuda"
    assert cuda.queried == []  # never initialises CUDA on the caller's behalf


@pytest.mark.fake_gpu(devices=2, cuda_order="1,0", device_names=["NVIDIA H100 80GB HBM3", _OTHER_MODEL])
def test_failing_libcuda_falls_back_to_assumed_pci_order_with_one_warning(fake_gpu, monkeypatch):
    lib = _fake_cuda_in_process()
    devmod = importlib.import_module("llm_dvfs.devices")
    monkeypatch.setattr(devmod, "_warned_assumed_order", False)
    assert {d.name for d in ld.devices()} == {"NVIDIA H100 80GB HBM3", _OTHER_MODEL}
    lib.fake_cuda_fail(b"cuDeviceGetCount", 999, -1)
    try:
        with pytest.warns(devmod.DeviceOrderWarning, match="CUDA_DEVICE_ORDER=PCI_BUS_ID"):
            assert _order() == [0, 1]
        assert devmod.order_source() == "assumed_pci"
        with warnings.catch_warnings():
            warnings.simplefilter("error", devmod.DeviceOrderWarning)
            assert _order() == [0, 1]  # once per process
    finally:
        lib.fake_cuda_fail(b"cuDeviceGetCount", 0, 0)
    assert _order() == [1, 0] and devmod.order_source() == "libcuda"


@pytest.mark.fake_gpu(devices=2, cuda_order="1,0", cuda=False)
def test_without_libcuda_the_pci_order_is_assumed_and_warned_for_mixed_models(fake_gpu):
    homogeneous, mixed, mixed_again, pci = _orders_in_fresh_process(
        {}, {"FAKE_NVML_DEVICE_NAMES": f"NVIDIA H100 80GB HBM3,{_OTHER_MODEL}"}, {},
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert homogeneous == {"order": [0, 1], "source": "assumed_pci", "warnings": [], "libcuda": ""}
    assert mixed["order"] == [0, 1] and mixed["source"] == "assumed_pci"
    (msg,) = mixed["warnings"]
    assert "NVIDIA A100-SXM4-80GB" in msg and "PCI order" in msg
    assert mixed_again["warnings"] == []  # once per process
    assert pci == {"order": [0, 1], "source": "pci_bus_id", "warnings": [], "libcuda": ""}


@pytest.mark.fake_gpu(devices=2, cuda_order="1,0", device_names=["NVIDIA H100 80GB HBM3", _OTHER_MODEL])
def test_cuinit_only_when_the_mapping_needs_it(fake_gpu):
    """No libcuda for one GPU, UUID-only CUDA_VISIBLE_DEVICES, PCI_BUS_ID, the opt-out, or one
    ordinal on a one-model host; libcuda (and cuInit) otherwise."""
    steps = [
        {"FAKE_NVML_DEVICES": "1"},
        {"FAKE_NVML_DEVICES": "2", "CUDA_VISIBLE_DEVICES": _uuid(1)},
        {"CUDA_VISIBLE_DEVICES": None, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        {"CUDA_DEVICE_ORDER": None, "LLM_DVFS_NO_CUDA_INIT": "1"},
        {"FAKE_NVML_DEVICE_NAMES": None, "CUDA_VISIBLE_DEVICES": "1"},
        {"FAKE_NVML_DEVICE_NAMES": f"NVIDIA H100 80GB HBM3,{_OTHER_MODEL}", "LLM_DVFS_NO_CUDA_INIT": None},
        {"CUDA_VISIBLE_DEVICES": None},
    ]
    got = [(s["order"], s["source"], bool(s["libcuda"])) for s in _orders_in_fresh_process(*steps)]
    assert got == [
        ([0], "single_gpu", False),
        ([1], "cuda_visible_devices", False),
        ([0, 1], "pci_bus_id", False),
        ([0, 1], "assumed_pci", False),     # opted out (and warned: two models)
        ([1], "assumed_pci", False),        # one ordinal, one model: no cuInit
        ([0], "libcuda", True),             # one ordinal, two models: CUDA ordinal 1 is NVML 0
        ([1, 0], "libcuda", True),
    ]


@pytest.mark.fake_gpu(devices=2, cuda_order="1,0")
def test_old_and_enumeration_less_drivers(fake_gpu, fake_cuda_variant):
    (old,) = _orders_in_fresh_process({}, LLM_DVFS_CUDA_LIBRARY=str(fake_cuda_variant("old")))
    assert old["order"] == [1, 0] and old["source"] == "libcuda"  # through cuDeviceGetUuid
    (bare,) = _orders_in_fresh_process({}, LLM_DVFS_CUDA_LIBRARY=str(fake_cuda_variant("no_devices")))
    assert bare["order"] == [0, 1] and bare["source"] == "assumed_pci" and bare["libcuda"]


def test_order_source_is_none_without_a_driver(no_nvml_driver):
    from llm_dvfs.devices import order_source
    assert ld.devices() == [] and order_source() is None


@pytest.mark.parametrize("call", ["driver_version", "nvml_version"])
def test_version_queries_let_other_python_threads_run(fake_gpu, call):
    import time
    from llm_dvfs import _core
    fn = {"driver_version": "nvmlSystemGetDriverVersion", "nvml_version": "nvmlSystemGetNVMLVersion"}
    fake_gpu.set_latency_ms(fn[call], 300)  # a slow driver call
    with _core.Session() as s, python_thread_ticks() as ran:
        t0 = time.monotonic()
        v = getattr(s, call)()
        t1 = time.monotonic()
    assert v == {"driver_version": "580.159.04", "nvml_version": "12.580.159.04"}[call]
    assert t1 - t0 >= 0.3
    # the other thread ran all through the call: the GIL was released
    assert len(ticks_inside(ran, t0, t1)) >= 10, (t0, t1, ran)
