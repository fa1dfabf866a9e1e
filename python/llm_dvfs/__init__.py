"""llm_dvfs: measure and reduce the energy of LLM inference on NVIDIA GPUs.

Importing the package loads neither NVML nor CUDA nor torch: the native library is opened on
first use (``devices()``, ``PowerMonitor.start()``, ...). Public names are re-exported lazily.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> defining module (relative). Lazy so that `import llm_dvfs` stays cheap.
_EXPORTS = {
    "devices": "devices",
    "DeviceInfo": "devices",
    "PowerMonitor": "meter.monitor",
    "Window": "meter.monitor",
    "Measurement": "meter.monitor",
    "measure": "meter.measure",
    "default_monitor": "meter.measure",
    "ZeusMonitor": "meter.measure",
    "ClockController": "control.clocks",
    "ClockState": "control.clocks",
    "LockResult": "control.clocks",
    "ClockNotSettled": "control.clocks",
    "ClockSettleWarning": "control.clocks",
    "TokenTimer": "meter.timeline",
    "attribute": "meter.attribution",
    "Attribution": "meter.attribution",
    "attribute_served": "meter.concurrency",
    "ServedAttribution": "meter.concurrency",
    "ServedRequest": "meter.concurrency",
    "EngineStep": "meter.concurrency",
    "PhaseWeights": "meter.concurrency",
    "LlmDvfsError": "errors",
    "NvmlError": "errors",
    "CudaError": "errors",
    "NotSupported": "errors",
    "NoPermission": "errors",
    "LibraryNotFound": "errors",
    "ClockChangeNotAllowed": "errors",
    "ConfigError": "errors",
    "DataNotFound": "errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

# `devices` is both a submodule and the public function: bind the function eagerly (devices.py
# is light and loads no library), so a later `import llm_dvfs.devices` cannot shadow it.
from llm_dvfs.devices import DeviceInfo, devices  # noqa: E402


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'llm_dvfs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
