"""``python -m llm_dvfs.clocks``: show clock state, reset clocks to driver defaults, or hold a
clock lock while a command runs. The library lives in :mod:`llm_dvfs.control.clocks`; this module
is only the command line.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from typing import Any, Optional, Sequence

from llm_dvfs import errors
from llm_dvfs.control.clocks import (ALLOW_ENV, NO_PERMISSION_HELP, ClockController, capabilities,
                                     read_state, reset_to_defaults)

# ---- CLI ------------------------------------------------------------------------------------

_COMPONENT_NAMES = {
    "gpu_locked": "locked SM clocks",
    "mem_locked": "locked memory clocks",
    "app_clocks": "applications clocks",
    "power_limit": "power limit",
}


def _device_report(d: Any) -> dict[str, Any]:
    st = read_state(d.nvml_index)
    try:
        caps = capabilities(d.nvml_index)
    except errors.NvmlError:
        caps = {}
    return {
        "index": d.index, "nvml_index": d.nvml_index, "name": d.name, "uuid": d.uuid,
        "state": {k: v for k, v in st.to_dict().items() if k not in ("nvml_index", "t_s")},
        "capabilities": caps,
        "supported_mem_mhz": d.supported_mem_mhz,
        "supported_sm_mhz": sorted(d.supported_sm_mhz),
    }


def _print_report(r: dict[str, Any]) -> None:
    s = r["state"]

    def v(x: Any, unit: str) -> str:
        return "n/a" if x is None else f"{x:g} {unit}" if isinstance(x, float) else f"{x} {unit}"

    print(f"GPU {r['index']} (nvml {r['nvml_index']}): {r['name']}  {r['uuid']}")
    print(f"  clocks: SM {v(s['sm_mhz'], 'MHz')}, memory {v(s['mem_mhz'], 'MHz')}; applications "
          f"clocks SM {v(s['app_sm_mhz'], 'MHz')}, memory {v(s['app_mem_mhz'], 'MHz')}")
    rng = ("" if s["power_limit_min_w"] is None
           else f", range {s['power_limit_min_w']:g}-{s['power_limit_max_w']:g} W")
    print(f"  power limit {v(s['power_limit_w'], 'W')} (default {v(s['power_limit_default_w'], 'W')}"
          f"{rng}); power {v(s['power_w'], 'W')}; temperature {v(s['temperature_c'], 'C')}")
    print(f"  clock-event reasons: {', '.join(s['reasons']) or 'none'}")
    can = [_COMPONENT_NAMES[k] for k, k2 in (("gpu_locked", "gpu_locked_clocks"),
                                            ("mem_locked", "mem_locked_clocks"),
                                            ("app_clocks", "applications_clocks"),
                                            ("power_limit", "power_limit"))
           if r["capabilities"].get(k2)]
    print(f"  settable: {', '.join(can) or 'nothing'}")
    sm = r["supported_sm_mhz"]
    if sm:
        print(f"  supported: SM {sm[0]}-{sm[-1]} MHz ({len(sm)} values), memory "
              f"{', '.join(str(m) for m in r['supported_mem_mhz'])} MHz")


def _select(devs: list[Any], spec: str) -> list[Any]:
    if spec == "all":
        return devs
    try:
        i = int(spec)
    except ValueError:
        raise errors.ConfigError(f"--device must be a GPU index or 'all', got {spec!r}") from None
    if not 0 <= i < len(devs):
        raise errors.ConfigError(f"GPU {i} is not visible: {len(devs)} GPU(s) found")
    return [devs[i]]


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m llm_dvfs.clocks") -> int:
    """``python -m llm_dvfs.clocks``: show clock state, reset, or run a command under a lock.
    Returns the exit status; ``prog`` names the command in usage lines."""
    import argparse

    from llm_dvfs.devices import devices, last_error

    p = argparse.ArgumentParser(
        prog=prog,
        description="Show GPU clock state (default), reset clocks to driver defaults (manual "
                    "recovery after a crash), or hold a clock lock while a command runs.",
    )
    p.add_argument("--json", action=argparse.BooleanOptionalAction, default=False,
                   help="machine-readable output")
    sub = p.add_subparsers(dest="cmd")
    ps = sub.add_parser("state", help="show the clock state of GPUs (the default)")
    ps.add_argument("--device", default="all", help="GPU index (CUDA numbering) or 'all'")
    pr = sub.add_parser("reset", help="unlock clocks, reset applications clocks and the power "
                                      "limit to defaults (needs root; no opt-in)")
    pr.add_argument("--device", required=True, help="GPU index (CUDA numbering) or 'all'")
    pl = sub.add_parser("lock", help="lock clocks while COMMAND runs (or until Ctrl-C), then "
                                     "restore; needs --allow-clock-changes")
    pl.add_argument("--device", default="0", help="GPU index (CUDA numbering)")
    pl.add_argument("--sm-mhz", type=float, help="SM clock to lock, MHz")
    pl.add_argument("--mem-mhz", type=float, help="memory clock to lock, MHz")
    pl.add_argument("--power-limit-w", type=float, help="power limit, W")
    pl.add_argument("--timeout-s", type=float, default=2.0, help="settle timeout, s")
    pl.add_argument("--allow-clock-changes", action=argparse.BooleanOptionalAction, default=False,
                    help=f"opt in to changing clocks (or set {ALLOW_ENV}=1)")
    pl.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    for q in (ps, pr, pl):
        q.add_argument("--json", dest="json_sub", action=argparse.BooleanOptionalAction, default=False,
                       help="machine-readable output")
    args = p.parse_args(argv)
    as_json = args.json or getattr(args, "json_sub", False)
    cmd = args.cmd or "state"

    def fail(msg: str, rc: int) -> int:
        if as_json:
            print(json.dumps({"error": msg}))
        else:
            print(f"error: {msg}", file=sys.stderr)
        return rc

    try:
        devs = devices()
    except errors.LlmDvfsError as e:
        return fail(f"{type(e).__name__}: {e}", 1)
    if not devs:
        why = last_error() or "no NVIDIA GPU is visible"
        msg = f"no NVIDIA GPU found: {why}"
        if cmd == "state":
            if as_json:
                print(json.dumps({"devices": [], "error": msg}))
            else:
                print(msg)
            return 0
        return fail(msg, 1)

    try:
        if cmd == "state":
            reports = [_device_report(d) for d in _select(devs, getattr(args, "device", "all"))]
            if as_json:
                print(json.dumps({"devices": reports, "error": None}, indent=2))
            else:
                for r in reports:
                    _print_report(r)
            return 0

        if cmd == "reset":
            results = {d.index: reset_to_defaults(d.nvml_index) for d in _select(devs, args.device)}
            bad = {i: {c: r for c, r in res.items()
                       if r not in ("ok", "already default", "not supported")}
                   for i, res in results.items()}
            bad = {i: b for i, b in bad.items() if b}
            if as_json:
                print(json.dumps({"reset": {str(i): r for i, r in results.items()},
                                  "ok": not bad}, indent=2))
            else:
                for i, res in results.items():
                    print(f"GPU {i}: " + "; ".join(f"{_COMPONENT_NAMES[c]}: {r}"
                                                 for c, r in res.items()))
            if bad:
                if any("no permission" in r for b in bad.values() for r in b.values()):
                    print(NO_PERMISSION_HELP.replace(" Nothing was changed.", ""), file=sys.stderr)
                return 1
            return 0

        # lock
        command = list(args.command)
        if command and command[0] == "--":
            command = command[1:]
        ctl = ClockController(args.device, allow_clock_changes=args.allow_clock_changes)
        if args.sm_mhz is None and args.mem_mhz is None and args.power_limit_w is None:
            return fail("lock needs --sm-mhz, --mem-mhz and/or --power-limit-w", 2)
        with ctl.locked(args.sm_mhz, args.mem_mhz, power_limit_w=args.power_limit_w,
                        timeout_s=args.timeout_s) as res:
            info = {"device": res.device, "settled": res.settled,
                    "observed_sm_mhz": res.observed_sm_mhz,
                    "observed_mem_mhz": res.observed_mem_mhz, "reasons": list(res.reasons),
                    "mem_method": res.mem_method, **res.requested_row()}
            if as_json:
                print(json.dumps({"locked": info}), flush=True)
            else:
                print(f"GPU {res.device}: locked; observed SM {res.observed_sm_mhz} MHz, memory "
                      f"{res.observed_mem_mhz} MHz; reasons: {', '.join(res.reasons) or 'none'}",
                      file=sys.stderr, flush=True)
            if command:
                try:
                    rc = subprocess.call(command)
                except OSError as e:  # not found, not executable: the lock is restored on the way out
                    return fail(f"cannot run {command[0]!r}: {e.strerror}; the clocks were restored", 2)
            else:
                try:
                    print("holding the lock; Ctrl-C (or SIGTERM) restores", file=sys.stderr,
                          flush=True)
                    while True:
                        signal.pause()
                except KeyboardInterrupt:
                    pass
                rc = 0
        return rc
    except errors.ConfigError as e:
        return fail(str(e), 2)
    except errors.ClockChangeNotAllowed as e:
        return fail(str(e), 2)
    except errors.LlmDvfsError as e:
        return fail(f"{type(e).__name__}: {e}", 1)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # e.g. `python -m llm_dvfs.clocks | head`: not an error of the command
        sys.exit(0)
