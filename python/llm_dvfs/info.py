"""``python -m llm_dvfs.info``: the visible GPUs, their clocks, limits and power sources.

Read-only: nothing here changes a GPU setting. Without an NVIDIA driver it prints one line
saying so and exits 0 (so scripts can call it anywhere).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from llm_dvfs import errors


def _compress(clocks: list[int]) -> str:
    """'1980..345 step 15 (110)' for an arithmetic list, else the values."""
    if len(clocks) > 2:
        steps = {clocks[i] - clocks[i + 1] for i in range(len(clocks) - 1)}
        if len(steps) == 1:
            return f"{clocks[0]}..{clocks[-1]} step {steps.pop()} ({len(clocks)})"
    return ",".join(map(str, clocks)) + f" ({len(clocks)})"


def _fmt(v: object, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:g}{unit}"
    return f"{v}{unit}"


def render(devs: list) -> str:
    lines = []
    for d in devs:
        caps = {
            "power sample buffer (~20 ms)": d.has_power_samples,
            "instant power field": d.has_instant_power,
            "average power field": d.has_average_power or d.has_power_usage,
            "energy counter": d.has_energy_counter,
            "clock-event reasons": d.has_clock_events,
        }
        best = ("buffer" if d.has_power_samples else "instant" if d.has_instant_power
                else "counter" if d.has_energy_counter else "average"
                if (d.has_average_power or d.has_power_usage) else "none")
        mem = f"{d.memory_total_bytes / 2**30:.1f} GiB" if d.memory_total_bytes else "n/a"
        lines += [
            f"GPU {d.index}: {d.name}  (NVML index {d.nvml_index})",
            f"  uuid            {d.uuid}",
            f"  pci bus id      {d.pci_bus_id or 'n/a'}",
            f"  driver / NVML   {d.driver_version or 'n/a'} / {d.nvml_version or 'n/a'}",
            f"  memory          {mem}",
            f"  power limit     {_fmt(d.power_limit_w, ' W')} (default {_fmt(d.power_limit_default_w, ' W')}, "
            f"range {_fmt(d.power_limit_min_w)}-{_fmt(d.power_limit_max_w, ' W')})",
            f"  clocks now      SM {_fmt(d.sm_mhz, ' MHz')}, memory {_fmt(d.mem_mhz, ' MHz')}, "
            f"applications SM {_fmt(d.app_sm_mhz, ' MHz')} / mem {_fmt(d.app_mem_mhz, ' MHz')}",
            f"  temperature     {_fmt(d.temperature_c, ' C')}",
        ]
        if d.supported_clocks_mhz:
            lines.append("  supported clocks (memory MHz: graphics MHz)")
            for mem_mhz in d.supported_mem_mhz:
                lines.append(f"    {mem_mhz:>5}: {_compress(d.supported_clocks_mhz[mem_mhz])}")
        else:
            lines.append("  supported clocks  n/a")
        lines.append("  power sources   " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in caps.items()))
        lines.append(f"  energy method   {best}")
        lines.append("")
    return "\n".join(lines).rstrip()


def render_sensors(models: list) -> str:
    def ms(v: Optional[float]) -> str:
        return "n/a" if v is None else f"{v * 1000:.1f} ms"

    lines = []
    for idx, m in models:
        lines += [
            f"GPU {idx}: {m.name}  ({m.uuid})",
            f"  buffer sample spacing   {ms(m.buffer_spacing_s)} (median)",
            f"  buffer value changes    every {ms(m.buffer_change_s)}",
            f"  instant field updates   every {ms(m.field_update_s)}",
            f"  energy counter updates  every {ms(m.counter_update_s)}; one read takes {ms(m.counter_read_s)}",
            f"  buffer lag              {ms(m.lag_s)} ({m.lag_method}"
            + (f", {m.n_bursts} bursts)" if m.lag_method == "measured" else ": run with torch+CUDA to measure)"),
            "",
        ]
    return "\n".join(lines).rstrip()


def _sensors(args: argparse.Namespace, devs: list) -> int:
    from llm_dvfs.meter import sensor_probe, sensors

    models = []
    for d in devs:
        print(f"measuring GPU {d.index} for ~{args.seconds + 2.5:.0f} s (read-only) ...", file=sys.stderr)
        m = sensor_probe.measure(d.index, seconds=args.seconds, bursts=None if args.bursts else False)
        models.append((d.index, m))
        if args.save:
            path = sensors.save(m)
            print(f"saved to {path}", file=sys.stderr)
    if args.json:
        print(json.dumps({str(i): m.to_dict() for i, m in models}, indent=2))
    else:
        print(render_sensors(models))
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m llm_dvfs.info") -> int:
    """Entry point of ``python -m llm_dvfs.info``; returns the exit status (0, or 1 when NVML
    fails in a way other than being absent). ``prog`` names the command in usage lines."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="List the visible NVIDIA GPUs with their clocks, power limits and the power "
                    "sources llm_dvfs can use. Read-only. Example: python -m llm_dvfs.info --json",
    )
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                   help="machine-readable output (a JSON object)")
    p.add_argument("--sensors", action=argparse.BooleanOptionalAction, default=False,
                   help="measure each GPU's sensor model (buffer spacing, how often each power source "
                        "really changes, counter update period, buffer lag; a few seconds per GPU, "
                        "read-only) and cache it per GPU UUID for later PowerMonitors")
    p.add_argument("--seconds", type=float, default=2.0, help="dense-sampling time per GPU for --sensors (s)")
    p.add_argument("--bursts", action=argparse.BooleanOptionalAction, default=True,
                   help="with --sensors: run short matmul bursts (needs torch with CUDA) to measure "
                        "the buffer lag (default: on when available)")
    p.add_argument("--save", action=argparse.BooleanOptionalAction, default=True,
                   help="with --sensors: cache the models (default: on; see llm_dvfs.meter.sensors.cache_path)")
    args = p.parse_args(argv)
    from llm_dvfs.devices import devices, last_error, library_path, order_source

    try:
        devs = devices()
    except errors.LlmDvfsError as e:
        print(f"llm_dvfs: cannot query GPUs: {e}", file=sys.stderr)
        return 1
    if args.sensors:
        if not devs:
            print(f"No NVIDIA GPU available: {last_error()}")
            return 0
        return _sensors(args, devs)
    if args.json:
        print(json.dumps({
            "devices": [d.to_dict() for d in devs],
            "error": None if devs else last_error(),
            "nvml_library": library_path(),
            "cuda_order": order_source(),  # how GPU indices were matched to CUDA's ordinals
        }, indent=2))
        return 0
    if not devs:
        print(f"No NVIDIA GPU available: {last_error()}")
        return 0
    print(render(devs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
