"""Device discovery: ``devices()`` and :class:`DeviceInfo`.

Indices follow CUDA: with ``CUDA_VISIBLE_DEVICES`` set (ordinals or UUIDs, as CUDA accepts),
``devices()[0]`` is the GPU that torch calls ``cuda:0``. NVML's own numbering is kept in
``DeviceInfo.nvml_index``. NVML is loaded on the first call, never at import.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from llm_dvfs import errors

_last_error: Optional[str] = None
_last_library: Optional[str] = None


@dataclass(frozen=True)
class DeviceInfo:
    """One GPU as NVML reports it (read-only snapshot).

    Power values are in W, clocks in MHz. ``None`` means the device does not report the value.
    ``supported_clocks_mhz`` maps each supported memory clock to its graphics clocks (NVML order,
    descending).
    """

    index: int                      # CUDA ordinal (honours CUDA_VISIBLE_DEVICES)
    nvml_index: int
    name: str
    uuid: str
    pci_bus_id: str
    driver_version: str
    nvml_version: str
    memory_total_bytes: Optional[int]
    power_limit_w: Optional[float]
    power_limit_default_w: Optional[float]
    power_limit_min_w: Optional[float]
    power_limit_max_w: Optional[float]
    supported_clocks_mhz: dict[int, list[int]] = field(default_factory=dict)
    sm_mhz: Optional[int] = None
    mem_mhz: Optional[int] = None
    app_sm_mhz: Optional[int] = None
    app_mem_mhz: Optional[int] = None
    temperature_c: Optional[int] = None
    has_energy_counter: bool = False
    has_power_samples: bool = False
    has_instant_power: bool = False
    has_average_power: bool = False
    has_power_usage: bool = False
    has_clock_events: bool = False

    @property
    def supported_mem_mhz(self) -> list[int]:
        return sorted(self.supported_clocks_mhz, reverse=True)

    @property
    def supported_sm_mhz(self) -> list[int]:
        """Graphics clocks supported at the highest memory clock, descending."""
        if not self.supported_clocks_mhz:
            return []
        return list(self.supported_clocks_mhz[max(self.supported_clocks_mhz)])

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["supported_clocks_mhz"] = {str(k): v for k, v in self.supported_clocks_mhz.items()}
        return d


def last_error() -> Optional[str]:
    """Why the last ``devices()`` call returned ``[]`` (None if it did not fail)."""
    return _last_error


def library_path() -> Optional[str]:
    """Path of the NVML library the last ``devices()`` call loaded (None if none loaded)."""
    return _last_library


def _core():
    from llm_dvfs import _core as core  # the extension loads no library at import

    return core


def _visible(all_uuids: list[str], all_pci: list[str]) -> list[int]:
    """NVML indices in CUDA order, from CUDA_VISIBLE_DEVICES (unset = all, in NVML order).

    CUDA enumerates fastest-first by default but PCI order under CUDA_DEVICE_ORDER=PCI_BUS_ID;
    NVML enumerates in PCI order. We assume PCI order (set CUDA_DEVICE_ORDER=PCI_BUS_ID for
    certainty on mixed-GPU hosts). Entries after an invalid one are ignored, as CUDA does.
    """
    n = len(all_uuids)
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(range(n))
    out: list[int] = []
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            break
        if tok.isdigit():
            i = int(tok)
            if i >= n:
                break
            out.append(i)
            continue
        # UUID or unique UUID prefix, with or without the GPU-/MIG- prefix
        t = tok if tok.startswith(("GPU-", "MIG-")) else "GPU-" + tok
        matches = [i for i, u in enumerate(all_uuids) if u.startswith(t)]
        if len(matches) != 1:
            break
        out.append(matches[0])
    # CUDA ignores duplicates by failing; keep first occurrences
    seen: set[int] = set()
    return [i for i in out if not (i in seen or seen.add(i))]


def devices() -> list[DeviceInfo]:
    """All visible NVIDIA GPUs, indexed as CUDA indexes them.

    Returns ``[]`` when no driver/NVML library is present; :func:`last_error` tells why.
    Raises :class:`~llm_dvfs.errors.NvmlError` for real failures of a present driver
    (e.g. GPU lost), and :class:`~llm_dvfs.errors.SymbolNotFound` for an unusable library.
    """
    global _last_error, _last_library
    core = _core()
    try:
        session = core.Session()
    except errors.LibraryNotFound as e:
        _last_error = str(e)
        return []
    except errors.DriverNotLoaded as e:
        _last_error = str(e)
        return []
    _last_library = core.nvml_library_path() or None
    try:
        n = session.device_count()
        raw = [session.device_info(i) for i in range(n)]
        drv, nv = session.driver_version(), session.nvml_version()
    finally:
        session.close()
    order = _visible([r["uuid"] for r in raw], [r["pci_bus_id"] for r in raw])
    out = []
    for cuda_idx, nvml_idx in enumerate(order):
        r = dict(raw[nvml_idx])
        r["supported_clocks_mhz"] = {int(k): list(v) for k, v in r["supported_clocks_mhz"].items()}
        out.append(DeviceInfo(index=cuda_idx, driver_version=drv, nvml_version=nv, **r))
    _last_error = None if out else "no NVIDIA GPU is visible (CUDA_VISIBLE_DEVICES?)"
    return out


def nvml_index(device: int | str | None) -> int:
    """NVML index of a CUDA ordinal (int, ``"cuda:N"``) or a UUID string.

    Raises:
        ConfigError: the device does not exist or is not visible.
    """
    devs = devices()
    if isinstance(device, str):
        if device.startswith("GPU-") or device.startswith("MIG-"):
            for d in devs:
                if d.uuid.startswith(device):
                    return d.nvml_index
            raise errors.ConfigError(f"no visible GPU has UUID {device}")
        device = int(device.split(":", 1)[1]) if device.startswith("cuda") else int(device)
    idx = 0 if device is None else int(device)
    if not 0 <= idx < len(devs):
        reason = f" ({last_error()})" if last_error() else ""
        raise errors.ConfigError(f"GPU {idx} is not visible: {len(devs)} GPU(s) found{reason}")
    return devs[idx].nvml_index


def compute_processes(nvml_index: int) -> list[tuple[int, int]]:
    """(pid, used GPU memory bytes) of every compute process on the GPU with this NVML index.

    Raises :class:`~llm_dvfs.errors.LlmDvfsError` (no library, driver failure) like ``devices()``.
    """
    with _core().Session() as s:
        procs = s.compute_processes(int(nvml_index))
    return [(int(p), int(m)) for p, m in procs]
