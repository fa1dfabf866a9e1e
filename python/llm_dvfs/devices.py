"""Device discovery: ``devices()`` and :class:`DeviceInfo`.

Indices follow CUDA: ``devices()[0]`` is the GPU that torch calls ``cuda:0``, with
``CUDA_VISIBLE_DEVICES`` (ordinals or UUIDs, as CUDA accepts) and CUDA's device order applied.
NVML's own numbering is kept in ``DeviceInfo.nvml_index``. NVML is loaded on the first call,
never at import.

CUDA's default order (``CUDA_DEVICE_ORDER=FASTEST_FIRST``) may differ from NVML's PCI order on a
host with mixed GPU models, so CUDA ordinals are matched to NVML devices by UUID. The CUDA side
comes from, in this order (:func:`order_source` says which one the last call used):

``"single_gpu"``            NVML sees one GPU: nothing to order.
``"torch"``                 torch is imported and has initialised CUDA in this process:
                            ``torch.cuda.get_device_properties(i).uuid`` (torch is never imported).
``"cuda_visible_devices"``  ``CUDA_VISIBLE_DEVICES`` names the devices by UUID only (or is empty):
                            its order is CUDA's order.
``"pci_bus_id"``            ``CUDA_DEVICE_ORDER=PCI_BUS_ID``: CUDA's order is NVML's PCI order.
``"libcuda"``               the CUDA driver API (``cuDeviceGet``/``cuDeviceGetUuid``) through the
                            package's libcuda (``LLM_DVFS_CUDA_LIBRARY`` overrides the path).
``"assumed_pci"``           none of the above worked (no libcuda, ``LLM_DVFS_NO_CUDA_INIT=1``, or
                            UUIDs that NVML does not know, e.g. MIG): PCI order is assumed, and a
                            :class:`DeviceOrderWarning` is issued once per process when the host
                            has more than one GPU model (where fastest-first may differ). Also
                            used without a warning for a single ``CUDA_VISIBLE_DEVICES`` ordinal
                            on a host of one GPU model, which needs no ``cuInit``.

The ``libcuda`` path calls ``cuInit(0)`` once per process. CUDA cannot be used in a child forked
after that (``fork`` without ``exec``: multiprocessing's fork start method, some data loaders),
exactly as after ``torch.cuda.init()``. Call ``devices()`` in the children rather than before
forking, use the spawn start method, set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` or name the GPUs by UUID in
``CUDA_VISIBLE_DEVICES`` (both exact without libcuda), or set ``LLM_DVFS_NO_CUDA_INIT=1`` to
never initialise CUDA here (the order is then assumed).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from llm_dvfs import errors

_last_error: Optional[str] = None
_last_library: Optional[str] = None
_last_order_source: Optional[str] = None
_warned_assumed_order = False

#: Opt-out: with this set to 1, devices() never loads libcuda / calls cuInit.
NO_CUDA_INIT_ENV = "LLM_DVFS_NO_CUDA_INIT"

#: The values :func:`order_source` returns.
ORDER_SOURCES = ("single_gpu", "torch", "cuda_visible_devices", "pci_bus_id", "libcuda",
                 "assumed_pci")


class DeviceOrderWarning(RuntimeWarning):
    """CUDA ordinals were mapped to NVML devices by assuming PCI order on a mixed-model host."""


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


def order_source() -> Optional[str]:
    """How the last ``devices()`` call matched CUDA ordinals to NVML devices: one of
    :data:`ORDER_SOURCES` (see the module docstring); None before a successful call."""
    return _last_order_source


def _core():
    from llm_dvfs import _core as core  # the extension loads no library at import

    return core


def _visible(all_uuids: list[str]) -> tuple[list[int], int]:
    """NVML indices in CUDA order from CUDA_VISIBLE_DEVICES (unset = all), assuming CUDA's
    underlying order is NVML's PCI order; and how many ordinal entries the result used.

    Entries after an invalid one are ignored, as CUDA does. Exact when no ordinal was used
    (UUID entries name devices whatever the order) or under CUDA_DEVICE_ORDER=PCI_BUS_ID.
    """
    n = len(all_uuids)
    spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        return list(range(n)), n
    out: list[int] = []
    ordinals = 0
    for tok in (t.strip() for t in spec.split(",")):
        if not tok:
            break
        if tok.isdigit():
            i = int(tok)
            if i >= n:
                break
            out.append(i)
            ordinals += 1
            continue
        # UUID or unique UUID prefix, with or without the GPU-/MIG- prefix
        t = tok if tok.startswith(("GPU-", "MIG-")) else "GPU-" + tok
        matches = [i for i, u in enumerate(all_uuids) if u.startswith(t)]
        if len(matches) != 1:
            break
        out.append(matches[0])
    # CUDA ignores duplicates by failing; keep first occurrences
    seen: set[int] = set()
    return [i for i in out if not (i in seen or seen.add(i))], ordinals


def _uuid_text(uuid: Any) -> str:
    """A CUDA UUID (torch's ``_CUuuid``: 16 ``bytes`` or str without prefix) in NVML's form."""
    raw = getattr(uuid, "bytes", None)
    if isinstance(raw, (bytes, bytearray, list, tuple)) and len(raw) == 16:
        h = bytes(raw).hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    text = str(uuid).strip()
    if text[:4].upper() in ("GPU-", "MIG-"):
        return text[:4].upper() + text[4:].lower()
    return "GPU-" + text.lower()


def _match(cuda_uuids: Sequence[str], nvml_uuids: Sequence[str]) -> Optional[list[int]]:
    """NVML index of each CUDA UUID, or None when one is unknown to NVML (MIG, another driver)."""
    pos = {u.lower(): i for i, u in enumerate(nvml_uuids)}
    out = [pos.get(str(u).lower()) for u in cuda_uuids]
    if any(i is None for i in out) or len(set(out)) != len(out):
        return None
    return out  # type: ignore[return-value]


def _torch_uuids() -> Optional[list[str]]:
    """CUDA UUIDs by ordinal from torch, only if torch is imported and has initialised CUDA."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None) if torch is not None else None
    if cuda is None:
        return None
    try:
        if not cuda.is_initialized():  # never initialise CUDA on the caller's behalf
            return None
        return [_uuid_text(cuda.get_device_properties(i).uuid) for i in range(cuda.device_count())]
    except Exception:  # noqa: BLE001 - a stand-in or broken torch: use the next source
        return None


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _libcuda_uuids() -> Optional[list[str]]:
    """CUDA UUIDs by ordinal from the driver API (loads libcuda, cuInit), or None."""
    if _env_flag(NO_CUDA_INIT_ENV):
        return None
    fn = getattr(_core(), "cuda_device_uuids", None)
    if fn is None:
        return None
    try:
        return list(fn())
    except (errors.LlmDvfsError, RuntimeError, OSError):
        return None


def _cuda_order(nvml_uuids: list[str], names: list[str]) -> tuple[list[int], str]:
    """NVML indices of CUDA ordinals 0, 1, ... and the source of that order (module docstring)."""
    assumed, ordinals = _visible(nvml_uuids)
    if len(nvml_uuids) <= 1:
        return assumed, "single_gpu"
    uuids = _torch_uuids()
    order = _match(uuids, nvml_uuids) if uuids is not None else None
    if order is not None:
        return order, "torch"
    if ordinals == 0:
        return assumed, "cuda_visible_devices"
    if os.environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID":
        return assumed, "pci_bus_id"
    mixed = len(set(names)) > 1
    if not (ordinals == 1 and len(assumed) == 1 and not mixed):  # else no cuInit for one ordinal
        uuids = _libcuda_uuids()
        order = _match(uuids, nvml_uuids) if uuids is not None else None
        if order is not None:
            return order, "libcuda"
    if mixed:
        _warn_assumed_order(names)
    return assumed, "assumed_pci"


def _warn_assumed_order(names: list[str]) -> None:
    global _warned_assumed_order
    if _warned_assumed_order:
        return
    _warned_assumed_order = True
    models = ", ".join(sorted(set(names)))
    warnings.warn(
        f"llm_dvfs: CUDA device order assumed to be PCI order on a host with several GPU models "
        f"({models}); CUDA's default FASTEST_FIRST order may differ, so GPU indices may not be "
        f"torch's cuda:N. Set CUDA_DEVICE_ORDER=PCI_BUS_ID, name GPUs by UUID in "
        f"CUDA_VISIBLE_DEVICES, or make libcuda available (and {NO_CUDA_INIT_ENV} unset).",
        DeviceOrderWarning, stacklevel=4)


def devices() -> list[DeviceInfo]:
    """All visible NVIDIA GPUs, indexed as CUDA indexes them (``devices()[i]`` is ``cuda:i``).

    Returns ``[]`` when no driver/NVML library is present; :func:`last_error` tells why.
    Raises :class:`~llm_dvfs.errors.NvmlError` for real failures of a present driver
    (e.g. GPU lost), and :class:`~llm_dvfs.errors.SymbolNotFound` for an unusable library.

    On a host with several GPUs this may load libcuda and call ``cuInit(0)`` (see the module
    docstring: CUDA is unusable in children forked afterwards; ``LLM_DVFS_NO_CUDA_INIT=1``
    prevents it). :func:`order_source` tells how CUDA ordinals were matched to NVML devices.
    """
    global _last_error, _last_library, _last_order_source
    core = _core()
    try:
        session = core.Session()
    except (errors.LibraryNotFound, errors.DriverNotLoaded) as e:
        _last_error, _last_order_source = str(e), None
        return []
    _last_library = core.nvml_library_path() or None
    try:
        n = session.device_count()
        raw = [session.device_info(i) for i in range(n)]
        drv, nv = session.driver_version(), session.nvml_version()
    finally:
        session.close()
    order, _last_order_source = _cuda_order([r["uuid"] for r in raw], [r["name"] for r in raw])
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
