"""The one table of NVML clock-event reason bits (llm_dvfs.control.clock_events), bit by bit
against nvml.h ``nvmlClocksEventReason*``."""
from __future__ import annotations

import pytest

from llm_dvfs.control.clock_events import (CLOCK_EVENT_LABELS, CLOCK_EVENT_REASONS, LIMITING_REASONS,
                                           THROTTLE_MASK, decode_clock_event_reasons,
                                           throttle_labels)

# bit, name, label, throttling? -- per nvml.h
BITS = [
    (0x1, "gpu_idle", "GPU idle", False),
    (0x2, "applications_clocks_setting", "applications/locked clocks setting", False),
    (0x4, "sw_power_cap", "SW power cap", True),
    (0x8, "hw_slowdown", "HW slowdown", True),
    (0x10, "sync_boost", "sync boost", False),
    (0x20, "sw_thermal_slowdown", "SW thermal slowdown", True),
    (0x40, "hw_thermal_slowdown", "HW thermal slowdown", True),
    (0x80, "hw_power_brake_slowdown", "HW power brake slowdown", True),
    (0x100, "display_clock_setting", "display clock setting", False),
]


@pytest.mark.parametrize("bit,name,label,throttling", BITS, ids=[b[1] for b in BITS])
def test_bit(bit, name, label, throttling):
    assert CLOCK_EVENT_REASONS[bit] == name
    assert decode_clock_event_reasons(bit) == (name,)
    assert CLOCK_EVENT_LABELS[name] == label
    assert (name in LIMITING_REASONS) is throttling
    assert bool(THROTTLE_MASK & bit) is throttling
    assert throttle_labels(bit) == ([label] if throttling else [])


def test_table_is_complete_and_nothing_else():
    assert CLOCK_EVENT_REASONS == {b: n for b, n, _, _ in BITS}
    assert set(CLOCK_EVENT_LABELS) == set(CLOCK_EVENT_REASONS.values())
    assert LIMITING_REASONS == {n for _, n, _, t in BITS if t}
    assert THROTTLE_MASK == 0x4 | 0x8 | 0x20 | 0x40 | 0x80 == 0xEC


def test_unknown_bits_are_kept():
    assert decode_clock_event_reasons(0x200) == ("unknown_0x200",)
    assert decode_clock_event_reasons(0x4 | 0x1000 | 0x8000) == ("sw_power_cap", "unknown_0x9000")
    assert throttle_labels(0x4 | 0x1000) == ["SW power cap"]  # unknown bits are not throttling


def test_combined_masks_and_empty():
    everything = sum(CLOCK_EVENT_REASONS)
    assert decode_clock_event_reasons(everything) == tuple(n for _, n, _, _ in BITS)
    assert throttle_labels(everything) == [lab for _, _, lab, t in BITS if t]
    assert throttle_labels(0x40 | 0x4) == ["SW power cap", "HW thermal slowdown"]  # bit order
    assert throttle_labels(0x1 | 0x2 | 0x10 | 0x100) == []
    for empty in (0, None):
        assert decode_clock_event_reasons(empty) == ()
        assert throttle_labels(empty) == []
