"""Shared pytest machinery: the emulated GPU (tests/fakes), markers, and the clock-change guard.

Fixtures
    fake_nvml_lib          session: path of the built full emulator (libfake_nvml.so)
    fake_nvml_variant      session: ``fake_nvml_variant("minimal"|"no_required"|"full") -> Path``
    fake_nvml_minimal_lib, fake_nvml_no_required_lib   session: paths of those variants
    fake_cuda_variant      session: ``fake_cuda_variant("full"|"old"|"no_devices") -> Path`` of the
                           fake libcuda (tests/fakes/fake_cuda.c); one path per variant, shared by
                           every test (the package loads libcuda once per process)
    fake_gpu               function: a fresh emulated GPU for this test, as a FakeGpu
                           (tests/fakes/fake_gpu.py); the environment points the package at it
    no_nvml_driver         function: LLM_DVFS_NVML_LIBRARY names a missing file ("no driver")
    faults                 function: the test module's ``stub`` fixture (an OpenAI stub server,
                           tests/servers/openai_stub.py) with its faults reset before and after
                           this test, so a test can set ``faults.faults = Faults(...)``

Markers
    @pytest.mark.fake_gpu(devices=1, variant="full", lag_ms=0, jitter_ms=0, buffer_gain=1.0,
                          counter_period_ms=0, cuda_visible_devices=None, cuda_order=None,
                          device_names=None, cuda=True)   options of the fake_gpu fixture
    @pytest.mark.changes_clocks   the test changes clocks / power limits: it gets fake_gpu and
                                  is skipped unless NVML is provably the emulator
    @pytest.mark.gpu              needs a real NVIDIA driver (skipped without one)

Helper
    assert_emulated_nvml()        call before any clock change in a test: skips the test
                                  unless the package's NVML is the emulator (fail closed)
"""
from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import pytest

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `from fakes.fake_gpu import ...` in tests and here
    sys.path.insert(0, str(TESTS_DIR))

from fakes.fake_gpu import FakeGpu, _build_module, assert_emulated_nvml  # noqa: E402

__all__ = ["FakeGpu", "assert_emulated_nvml"]

_FAKE_GPU_OPTIONS = {"devices", "variant", "lag_ms", "jitter_ms", "buffer_gain", "counter_period_ms",
                     "cuda_visible_devices", "cuda_order", "device_names", "cuda"}


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "gpu: needs a real NVIDIA GPU and driver (skipped where there is none)",
        "native: exercises the C++ core (run again under sanitizers in CI)",
        "slow: takes more than a few seconds",
        "fake_gpu(devices=1, variant='full', lag_ms=0, jitter_ms=0, buffer_gain=1.0, "
        "counter_period_ms=0, cuda_visible_devices=None, cuda_order=None, device_names=None, "
        "cuda=True): options of the fake_gpu fixture",
        "changes_clocks: changes GPU clocks or power limits; runs only against the emulated GPU",
    ):
        config.addinivalue_line("markers", line)


def _real_driver_present() -> bool:
    """A loaded NVIDIA kernel driver (checked without loading NVML into the test process)."""
    if os.environ.get("LLM_DVFS_TEST_GPU") == "0":
        return False
    return Path("/proc/driver/nvidia/version").exists()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _real_driver_present():
        return
    skip = pytest.mark.skip(reason="needs a real NVIDIA GPU and driver (none here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


# -- building the emulator ----------------------------------------------------------------------
def _variant_builder(library: str) -> Callable[[str], Path]:
    """``get(variant) -> Path`` of one fake library (``"nvml"``: tests/fakes/fake_nvml.c,
    ``"cuda"``: fake_cuda.c), each variant compiled once (and cached on disk by source mtime in
    $FAKE_NVML_BUILD_DIR or tests/fakes/build). Skips the test without a C compiler; any other
    build failure raises FakeBuildError."""
    build = _build_module()
    compile_variant = {"nvml": build.build_fake, "cuda": build.build_fake_cuda}[library]
    built: dict[str, Path] = {}

    def get(variant: str = "full") -> Path:
        if variant not in built:
            try:
                built[variant] = compile_variant(variant)
            except build.FakeBuildError as e:
                if "not found" in str(e):
                    pytest.skip(str(e))
                raise
        return built[variant]

    return get


@pytest.fixture(scope="session")
def fake_nvml_variant() -> Callable[[str], Path]:
    """``fake_nvml_variant(variant) -> Path`` of the compiled emulator ("full", "minimal",
    "no_required"). Skips without a C compiler."""
    return _variant_builder("nvml")


@pytest.fixture(scope="session")
def fake_cuda_variant() -> Callable[[str], Path]:
    """``fake_cuda_variant(variant) -> Path`` of the fake libcuda ("full", "old": unversioned names
    only, "no_devices": no device enumeration), built once into the emulator's build directory.
    Skips without a C compiler."""
    return _variant_builder("cuda")


@pytest.fixture(scope="session")
def fake_nvml_lib(fake_nvml_variant) -> Path:
    """Path of the full emulated NVML library."""
    return fake_nvml_variant("full")


@pytest.fixture(scope="session")
def fake_nvml_minimal_lib(fake_nvml_variant) -> Path:
    """Variant with only fallback names and no buffer / energy counter / field values."""
    return fake_nvml_variant("minimal")


@pytest.fixture(scope="session")
def fake_nvml_no_required_lib(fake_nvml_variant) -> Path:
    """Variant lacking nvmlDeviceGetName (a required symbol)."""
    return fake_nvml_variant("no_required")


# -- the emulated GPU of one test ---------------------------------------------------------------
@pytest.fixture
def fake_gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
             fake_nvml_variant, fake_cuda_variant) -> Iterator[FakeGpu]:
    """A fresh emulated H100 (or several) for this test.

    Sets, for this test only: LLM_DVFS_NVML_LIBRARY (the emulator), FAKE_NVML_STATE (a file in
    tmp_path, so child processes see the same GPU), FAKE_NVML_DEVICES, FAKE_NVML_LAG_MS /
    FAKE_NVML_JITTER_MS / FAKE_NVML_BUFFER_GAIN / FAKE_NVML_COUNTER_PERIOD_MS (unset unless the
    marker gives them), and CUDA_VISIBLE_DEVICES (removed unless the marker gives one, so the
    host's setting cannot hide the fake devices). The CUDA side: LLM_DVFS_CUDA_LIBRARY = the fake
    libcuda, whose devices are these GPUs (``cuda=False``: a missing file instead, which only
    takes effect in a process that has not loaded libcuda yet, e.g. a subprocess),
    FAKE_CUDA_DEVICE_ORDER (``cuda_order="1,0"``: CUDA's order as NVML indices), and
    FAKE_NVML_DEVICE_NAMES (``device_names=[...]``: per-device model names); CUDA_DEVICE_ORDER and
    LLM_DVFS_NO_CUDA_INIT are removed. Resets the state and checks the guard.
    Options: ``@pytest.mark.fake_gpu(devices=2, variant="minimal", lag_ms=25, jitter_ms=3)``.
    """
    marker = request.node.get_closest_marker("fake_gpu")
    opts = dict(marker.kwargs) if marker else {}
    unknown = set(opts) - _FAKE_GPU_OPTIONS
    if unknown:
        raise pytest.UsageError(f"unknown fake_gpu marker option(s) {sorted(unknown)}; "
                                f"known: {sorted(_FAKE_GPU_OPTIONS)}")
    variant = opts.get("variant", "full")
    lib = fake_nvml_variant(variant)
    state = tmp_path / "fake_nvml.state"
    monkeypatch.setenv("LLM_DVFS_NVML_LIBRARY", str(lib))
    monkeypatch.setenv("FAKE_NVML_STATE", str(state))
    monkeypatch.setenv("FAKE_NVML_DEVICES", str(int(opts.get("devices", 1))))
    for var, key in (("FAKE_NVML_LAG_MS", "lag_ms"), ("FAKE_NVML_JITTER_MS", "jitter_ms"),
                     ("FAKE_NVML_BUFFER_GAIN", "buffer_gain"),
                     ("FAKE_NVML_COUNTER_PERIOD_MS", "counter_period_ms")):
        if opts.get(key):
            monkeypatch.setenv(var, str(float(opts[key])))
        else:
            monkeypatch.delenv(var, raising=False)
    names = opts.get("device_names")
    for var, val in (("CUDA_VISIBLE_DEVICES", opts.get("cuda_visible_devices")),
                     ("FAKE_CUDA_DEVICE_ORDER", opts.get("cuda_order")),
                     ("FAKE_NVML_DEVICE_NAMES", names if names is None or isinstance(names, str)
                      else ",".join(names))):
        if val is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, str(val))
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("LLM_DVFS_NO_CUDA_INIT", raising=False)
    monkeypatch.setenv("LLM_DVFS_CUDA_LIBRARY", str(fake_cuda_variant("full") if opts.get("cuda", True)
                                                   else tmp_path / "no-driver" / "libcuda.so.1"))
    gpu = FakeGpu(lib, state, variant)
    gpu.reset()
    assert_emulated_nvml()
    yield gpu
    _end_stray_nvml_sessions()


def _end_stray_nvml_sessions() -> None:
    """Collect garbage when NVML is still loaded: objects of an ended test that hold a session
    (a ClockController kept alive by a traceback cycle, ...) would keep the library loaded, and
    the next test's LLM_DVFS_NVML_LIBRARY would not take effect."""
    core = sys.modules.get("llm_dvfs._core")
    if core is not None and core.nvml_refcount() > 0:
        gc.collect()


@pytest.fixture
def no_nvml_driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Make NVML unloadable for this test (as on a machine without the NVIDIA driver)."""
    _end_stray_nvml_sessions()
    missing = tmp_path / "no-driver" / "libnvidia-ml.so.1"
    monkeypatch.setenv("LLM_DVFS_NVML_LIBRARY", str(missing))
    return missing


@pytest.fixture(autouse=True)
def _private_sensor_cache(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every test gets an empty sensor-model cache: a real GPU's cached lag (~/.cache) must not
    leak into emulator tests, and tests must not write the user's cache."""
    monkeypatch.setenv("LLM_DVFS_CACHE_DIR", str(tmp_path_factory.mktemp("llm_dvfs_cache")))


@pytest.fixture(autouse=True)
def _changes_clocks_guard(request: pytest.FixtureRequest) -> None:
    """Tests marked changes_clocks always run on the emulator, or not at all."""
    if request.node.get_closest_marker("changes_clocks") is None:
        return
    request.getfixturevalue("fake_gpu")
    assert_emulated_nvml()


# -- the OpenAI stub server of a test module ------------------------------------------------------
@pytest.fixture
def faults(stub):
    """The module's OpenAI stub (its ``stub`` fixture) with no faults at the start and the end of
    this test: a test sets ``faults.faults = Faults(...)`` and leaves the next one a clean server."""
    from servers.openai_stub import Faults

    stub.faults = Faults()
    yield stub
    stub.faults = Faults()
