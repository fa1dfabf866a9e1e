"""Restore watchdog: a tiny process that puts GPU clocks back when its owner dies.

:mod:`llm_dvfs.control.guard` starts one (``python -m llm_dvfs.control._watchdog --owner-pid PID``) before
the first clock or power-limit change of a process. Protocol, all on pipes:

* stdin: newline-delimited JSON snapshots ``{"devices": {"<nvml index>": ENTRY}}`` where ENTRY is
  ``{"dirty": [...components...], "orig_app_mem_mhz": int|None, "orig_app_sm_mhz": int|None,
  "orig_power_limit_w": float|None}``. The owner sends a snapshot *before* each change and after
  each restore, so the watchdog always holds a superset of what is changed.
* stdout: one line, ``ready`` once NVML is loaded (or ``error: ...`` and exit 1).

The owner is gone when stdin reaches EOF (the kernel closes the owner's write end however it
ends, SIGKILL included) or when this process is re-parented (covers a forked child that still
holds the write end). Then the last snapshot is restored and the process exits. SIGTERM and
SIGHUP also restore and exit (fail safe: the watchdog never outlives its duty silently); SIGINT
is ignored and the process runs in its own session, so a Ctrl-C aimed at the owner's terminal
does not kill it before the owner has restored.

This module is also the one implementation of "restore a device", used by the owner
(:mod:`llm_dvfs.control.guard`) so both sides behave identically.
"""
from __future__ import annotations

import json
import os
import select
import signal
import sys
from typing import Any, Mapping

# Components a snapshot may mark dirty, in the order they are restored.
COMPONENTS = ("gpu_locked", "mem_locked", "app_clocks", "power_limit")

_POLL_S = 0.2  # re-parenting check interval; EOF itself wakes select immediately


def restore_device(core: Any, nvml_index: int, entry: Mapping[str, Any]) -> dict[str, str]:
    """Put back every dirty component of one device; never raises.

    Args:
        core: the ``llm_dvfs._core`` module.
        nvml_index: NVML index of the device.
        entry: a snapshot entry (see the module docstring).

    Returns:
        component -> ``"ok"`` or the error text, for each dirty component. Locked clocks are
        reset (NVML cannot read a previous lock back); applications clocks are reset and, if
        that does not give back the values found, set to them; the power limit is set to the
        value found (the default limit when it was unknown).
    """
    dirty = set(entry.get("dirty", ()))
    out: dict[str, str] = {}
    for comp in COMPONENTS:
        if comp not in dirty:
            continue
        try:
            if comp == "gpu_locked":
                core.reset_gpu_locked_clocks(nvml_index)
            elif comp == "mem_locked":
                core.reset_mem_locked_clocks(nvml_index)
            elif comp == "app_clocks":
                core.reset_applications_clocks(nvml_index)
                mem, sm = entry.get("orig_app_mem_mhz"), entry.get("orig_app_sm_mhz")
                if mem is not None and sm is not None:
                    st = core.clock_state(nvml_index)
                    if (st["app_mem_mhz"], st["app_sm_mhz"]) != (mem, sm):
                        core.set_applications_clocks(nvml_index, int(mem), int(sm))
            elif comp == "power_limit":
                w = entry.get("orig_power_limit_w")
                if w is None:
                    w = core.clock_state(nvml_index)["power_limit_default_w"]
                if w is not None:
                    core.set_power_limit_w(nvml_index, float(w))
            out[comp] = "ok"
        except Exception as e:  # keep going: one failed component must not block the others
            out[comp] = f"{type(e).__name__}: {e}"
    return out


def restore_snapshot(core: Any, snapshot: Mapping[str, Any]) -> dict[int, dict[str, str]]:
    """Restore every device of a snapshot; device -> component -> outcome."""
    return {
        int(idx): restore_device(core, int(idx), entry)
        for idx, entry in snapshot.get("devices", {}).items()
        if entry.get("dirty")
    }


def _log(msg: str) -> None:
    try:  # the owner's stderr may be gone (closed terminal); losing the log is acceptable
        sys.stderr.write(f"llm_dvfs watchdog[{os.getpid()}]: {msg}\n")
        sys.stderr.flush()
    except Exception:
        pass


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m llm_dvfs.control._watchdog")
    p.add_argument("--owner-pid", type=int, required=True)
    args = p.parse_args(argv)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    snapshot: dict[str, Any] = {"devices": {}}
    stop_reason: list[str] = []

    def on_term(signum: int, _frame: Any) -> None:
        stop_reason.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_term)

    try:
        from llm_dvfs import _core as core

        session = core.Session()  # keep NVML loaded: restore must not wait for a driver init
    except Exception as e:
        try:
            os.write(1, f"error: {type(e).__name__}: {e}\n".encode())
        except OSError:
            pass
        return 1
    os.write(1, b"ready\n")
    os.close(1)

    buf = b""
    reason = "owner ended"
    while True:
        if stop_reason:
            reason = f"received {stop_reason[0]}"
            break
        if os.getppid() != args.owner_pid:
            reason = f"owner pid {args.owner_pid} is gone (re-parented)"
            break
        try:
            ready, _, _ = select.select([0], [], [], _POLL_S)
        except InterruptedError:
            continue
        if not ready:
            continue
        try:
            chunk = os.read(0, 65536)
        except InterruptedError:
            continue
        if not chunk:
            reason = f"owner pid {args.owner_pid} ended (pipe closed)"
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                try:
                    snapshot = json.loads(line)
                except ValueError:
                    _log(f"ignored a malformed snapshot: {line[:200]!r}")

    outcome = restore_snapshot(core, snapshot)
    for idx, comps in outcome.items():
        failed = {c: r for c, r in comps.items() if r != "ok"}
        done = [c for c, r in comps.items() if r == "ok"]
        msg = f"{reason}; GPU nvml:{idx} restored {', '.join(done) or 'nothing'}"
        if failed:
            msg += f"; FAILED {failed} - run `python -m llm_dvfs.clocks reset --device all`"
        _log(msg)
    session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
