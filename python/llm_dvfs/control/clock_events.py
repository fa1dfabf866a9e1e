"""The one table of NVML clock-event reason bits (``nvmlClocksEventReason*`` in nvml.h, formerly
"throttle reasons") and their labels. Every module that reads, decodes or reports these bits uses
this table; nothing else may copy it.
"""
from __future__ import annotations

from typing import Optional

# NVML clocks-event (formerly "throttle") reason bits, nvml.h nvmlClocksEventReason*.
CLOCK_EVENT_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",  # also set by locked ("user defined") clocks
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Human labels of the reason names, for reports and messages.
CLOCK_EVENT_LABELS: dict[str, str] = {
    "gpu_idle": "GPU idle",
    "applications_clocks_setting": "applications/locked clocks setting",
    "sw_power_cap": "SW power cap",
    "hw_slowdown": "HW slowdown",
    "sync_boost": "sync boost",
    "sw_thermal_slowdown": "SW thermal slowdown",
    "hw_thermal_slowdown": "HW thermal slowdown",
    "hw_power_brake_slowdown": "HW power brake slowdown",
    "display_clock_setting": "display clock setting",
}
# Reasons that mean something other than the requested setting holds the clock down (throttling).
# Idle, the clock setting itself, sync boost and the display clock are not.
LIMITING_REASONS = frozenset(
    {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
     "hw_power_brake_slowdown"}
)
# The throttling bits: the OR of the bits of LIMITING_REASONS (0x4|0x8|0x20|0x40|0x80 = 0xec).
THROTTLE_MASK: int = 0
for _bit, _name in CLOCK_EVENT_REASONS.items():
    if _name in LIMITING_REASONS:
        THROTTLE_MASK |= _bit
del _bit, _name


def decode_clock_event_reasons(mask: Optional[int]) -> tuple[str, ...]:
    """Names of the NVML clock-event reason bits set in ``mask`` (``()`` for 0 or None).

    Unknown bits are kept as ``"unknown_0x..."`` so nothing is silently dropped.
    """
    if not mask:
        return ()
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    rest = int(mask) & ~sum(CLOCK_EVENT_REASONS)
    if rest:
        names.append(f"unknown_{rest:#x}")
    return tuple(names)


def throttle_labels(mask: Optional[int]) -> list[str]:
    """Human labels of the throttling bits (:data:`THROTTLE_MASK`) set in ``mask``, in bit order,
    e.g. ``["SW power cap", "HW thermal slowdown"]``; ``[]`` for 0 or None. Bits that do not mean
    throttling (idle, clock setting, sync boost, display clock) and unknown bits are left out."""
    if not mask:
        return []
    return [CLOCK_EVENT_LABELS[name] for bit, name in CLOCK_EVENT_REASONS.items()
            if int(mask) & bit & THROTTLE_MASK]
