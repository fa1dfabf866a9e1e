"""GPU clock and power-limit control that can never leave a GPU throttled.

:class:`ClockController` is the only code in llm_dvfs that changes GPU state. Three rules:

* **Explicit opt-in.** Every setter raises :class:`~llm_dvfs.errors.ClockChangeNotAllowed` unless
  the controller was made with ``allow_clock_changes=True``, or ``LLM_DVFS_ALLOW_CLOCK_CHANGES=1``
  is set, or the CLI got ``--allow-clock-changes``. Reading is always allowed.
* **Validated requests.** Clocks must be in the device's supported table; an invalid value raises
  :class:`~llm_dvfs.errors.ConfigError` naming the nearest valid values. After a change the
  controller waits until the observed clocks settle and reports them with the clock-event
  (throttle) reasons, because a locked clock can still be pulled down by power or temperature.
* **Crash-safe restore.** Before the first change of a process, a watchdog process
  (:mod:`llm_dvfs.control._watchdog`) is started that holds the settings found and restores them when the
  owner ends in any way, SIGKILL included (the bookkeeping lives in :mod:`llm_dvfs.control.guard`). The owner also restores on normal exit (atexit) and on
  SIGINT/SIGTERM, and :meth:`ClockController.locked` restores on leaving its block.

What "restore" means: locked SM/memory clocks are reset (NVML cannot read a previous lock back,
so a lock somebody else set before us is not re-applied); applications clocks and the power
limit go back to the values found.

Manual recovery: ``python -m llm_dvfs.clocks reset --device all`` (needs root like any change).
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

from llm_dvfs import errors
from llm_dvfs.control.clock_events import LIMITING_REASONS, decode_clock_event_reasons
from llm_dvfs.control import guard
from llm_dvfs.control.guard import nvml_core

ALLOW_ENV = "LLM_DVFS_ALLOW_CLOCK_CHANGES"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}

NO_PERMISSION_HELP = (
    "Changing locked clocks, applications clocks or the power limit needs root privileges "
    "(CAP_SYS_ADMIN): run the process as root (e.g. `sudo -E env PATH=$PATH python ...`); inside "
    "a container the container also needs CAP_SYS_ADMIN (`docker run --cap-add SYS_ADMIN`) or "
    "--privileged. Applications clocks alone can be opened to every user by an administrator "
    "with `nvidia-smi -acp UNRESTRICTED`. Nothing was changed."
)


def clock_changes_allowed(allow_clock_changes: bool = False) -> bool:
    """Whether clock changes are opted in: the argument, or ``LLM_DVFS_ALLOW_CLOCK_CHANGES``.

    Raises:
        ConfigError: the environment variable has a value that is neither true nor false.
    """
    if allow_clock_changes:
        return True
    raw = os.environ.get(ALLOW_ENV, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise errors.ConfigError(
        f"{ALLOW_ENV}={os.environ[ALLOW_ENV]!r} is not understood; use 1 to allow clock changes "
        "or 0 (or unset) to forbid them"
    )


class ClockNotSettled(errors.LlmDvfsError, TimeoutError):
    """The observed clocks did not reach the requested ones within the timeout. ``result`` is
    the :class:`LockResult` with the last observation and its clock-event reasons."""

    def __init__(self, message: str, result: "LockResult") -> None:
        super().__init__(message)
        self.result = result


class ClockSettleWarning(UserWarning):
    """Warned (instead of raising :class:`ClockNotSettled`) when ``require_settled`` is off."""


@dataclass(frozen=True)
class ClockState:
    """One read of a device's clock-related state. MHz, W, °C; None = not reported.

    ``t_s`` is host ``time.monotonic()`` at the read.
    """

    nvml_index: int
    sm_mhz: Optional[int]
    mem_mhz: Optional[int]
    graphics_mhz: Optional[int]
    app_sm_mhz: Optional[int]
    app_mem_mhz: Optional[int]
    power_limit_w: Optional[float]
    power_limit_default_w: Optional[float]
    power_limit_min_w: Optional[float]
    power_limit_max_w: Optional[float]
    power_w: Optional[float]
    temperature_c: Optional[int]
    clock_event_reasons: Optional[int]
    t_s: float

    @property
    def reasons(self) -> tuple[str, ...]:
        """Decoded clock-event reasons, e.g. ``("applications_clocks_setting", "sw_power_cap")``."""
        return decode_clock_event_reasons(self.clock_event_reasons)

    @property
    def limiting_reasons(self) -> tuple[str, ...]:
        """The reasons that mean power or temperature (not the setting) limits the clock."""
        return tuple(r for r in self.reasons if r in LIMITING_REASONS)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def read_state(nvml_index: int) -> ClockState:
    """Read the clock state of the device with this NVML index (no opt-in needed).

    Raises:
        LibraryNotFound: no NVML library; NvmlError: the driver failed (e.g. GPU lost).
    """
    raw = nvml_core().clock_state(int(nvml_index))
    return ClockState(nvml_index=int(nvml_index), t_s=time.monotonic(), **raw)


@dataclass(frozen=True)
class LockResult:
    """What :meth:`ClockController.lock` asked for and what the GPU then showed.

    ``settled`` is False when the observed clocks were not within the tolerance at the timeout;
    ``observed.reasons`` tells why (e.g. ``sw_power_cap``). ``mem_method`` is ``"locked"``
    (locked memory clocks), ``"applications"`` (applications clocks, where locking memory is not
    supported) or None (memory untouched).
    """

    device: int
    nvml_index: int
    requested_sm_mhz: Optional[int]
    requested_mem_mhz: Optional[int]
    requested_power_limit_w: Optional[float]
    mem_method: Optional[str]
    settled: bool
    waited_s: float
    observed: ClockState

    @property
    def observed_sm_mhz(self) -> Optional[int]:
        return self.observed.sm_mhz

    @property
    def observed_mem_mhz(self) -> Optional[int]:
        return self.observed.mem_mhz

    @property
    def clock_event_reasons(self) -> Optional[int]:
        return self.observed.clock_event_reasons

    @property
    def reasons(self) -> tuple[str, ...]:
        return self.observed.reasons

    def requested_row(self) -> dict[str, float]:
        """The request as :func:`requested_columns` writes it (NaN = as found)."""
        return requested_columns(self.requested_sm_mhz, self.requested_mem_mhz,
                                 self.requested_power_limit_w)


def requested_columns(sm_mhz: Optional[float], mem_mhz: Optional[float],
                      power_limit_w: Optional[float]) -> dict[str, float]:
    """``sm_mhz_requested``, ``mem_mhz_requested``, ``power_limit_w_requested`` as floats, NaN for
    None (= left as found): the request columns of a results row, in MHz and W. The one place
    that spells them; :meth:`LockResult.requested_row` and the sweep's points use it."""

    def f(v: Optional[float]) -> float:
        return math.nan if v is None else float(v)

    return {
        "sm_mhz_requested": f(sm_mhz),
        "mem_mhz_requested": f(mem_mhz),
        "power_limit_w_requested": f(power_limit_w),
    }


def capabilities(nvml_index: int) -> dict[str, bool]:
    """Which setters the device with this NVML index offers: ``gpu_locked_clocks``,
    ``mem_locked_clocks``, ``applications_clocks``, ``power_limit`` (no opt-in needed;
    permission is only known by trying).

    Raises:
        LibraryNotFound: no NVML library; NvmlError: the driver failed.
    """
    return dict(nvml_core().control_capabilities(int(nvml_index)))


def nearest_supported(value: float, supported: Sequence[int]) -> list[int]:
    """The supported values closest to ``value``: the neighbours below and above (one at the ends,
    or the value itself when it is supported)."""
    s = sorted(set(int(v) for v in supported))
    if not s:
        return []
    if value in s:
        return [int(value)]
    below = [v for v in s if v < value]
    above = [v for v in s if v > value]
    return ([below[-1]] if below else []) + ([above[0]] if above else [])


def _as_mhz(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise errors.ConfigError(f"{name} must be a number of MHz, got {value!r}")
    if float(value) != int(value):
        raise errors.ConfigError(f"{name}={value!r} MHz: clocks are whole MHz")
    return int(value)


def _fmt_list(v: Sequence[int], unit: str = "MHz") -> str:
    return " and ".join(f"{x}" for x in v) + f" {unit}"



# ---- the controller -------------------------------------------------------------------------


class ClockController:
    """Lock clocks / set the power limit of one GPU, validated, settled and always restored.

    Args:
        device: CUDA ordinal (honours ``CUDA_VISIBLE_DEVICES``), ``"cuda:N"`` or a UUID.
        allow_clock_changes: the explicit opt-in; also given by ``LLM_DVFS_ALLOW_CLOCK_CHANGES=1``.
        settle_tolerance_mhz: observed clocks within this many MHz of the request count as settled.
        settle_timeout_s: how long :meth:`lock` waits for the clocks to settle.
        require_settled: raise :class:`ClockNotSettled` on timeout (else warn
            :class:`ClockSettleWarning` and return ``settled=False``).

    Raises:
        ConfigError: the device is not visible (or no driver: the message says why).

    Example::

        ctl = ClockController(0, allow_clock_changes=True)
        with ctl.locked(sm_mhz=1200) as lk:
            print(lk.observed_sm_mhz, lk.reasons)
            ...   # GPU work at 1200 MHz
        # clocks are back as found, also after an exception
    """

    def __init__(
        self,
        device: int | str | None = 0,
        allow_clock_changes: bool = False,
        *,
        settle_tolerance_mhz: float = 15.0,
        settle_timeout_s: float = 2.0,
        require_settled: bool = False,
    ) -> None:
        from llm_dvfs.devices import devices, nvml_index

        try:
            self.nvml_index = nvml_index(device)
        except ValueError as e:
            if isinstance(e, errors.ConfigError):
                raise
            raise errors.ConfigError(f"device must be a GPU index, 'cuda:N' or a UUID, got {device!r}") from None
        self.info = next(d for d in devices() if d.nvml_index == self.nvml_index)
        self.device = self.info.index
        self.allow_clock_changes = bool(allow_clock_changes)
        clock_changes_allowed(self.allow_clock_changes)  # a bad env value fails here, early
        self.settle_tolerance_mhz = float(settle_tolerance_mhz)
        self.settle_timeout_s = float(settle_timeout_s)
        self.require_settled = bool(require_settled)
        # What this controller currently holds: sm (min, max), mem (method, mem, app_sm), power.
        self._active: dict[str, Any] = {"sm": None, "mem": None, "power_limit_w": None}
        self._mem_method: Optional[str] = None
        # One NVML session for this controller's life (opened on first use, ended by close()):
        # a settle loop reads the state every ~20 ms, and a session per read would nvmlInit and
        # nvmlShutdown each time.
        self._nvml: Any = None

    def __repr__(self) -> str:
        return (f"ClockController(device={self.device}, nvml_index={self.nvml_index}, "
                f"name={self.info.name!r}, allow_clock_changes={self.changes_allowed})")

    # -- reading (always allowed) --
    @property
    def changes_allowed(self) -> bool:
        """Whether setters may run (the argument or the environment variable)."""
        return clock_changes_allowed(self.allow_clock_changes)

    def _control(self) -> Any:
        """The native per-device control (``_core.ClockControl``), holding the session."""
        if self._nvml is None:
            self._nvml = nvml_core().ClockControl(self.nvml_index)
        return self._nvml

    def close(self) -> None:
        """End this controller's NVML session (reopened on next use). Restores nothing: see
        :meth:`reset`."""
        nv, self._nvml = self._nvml, None
        if nv is not None:
            nv.close()

    def state(self) -> ClockState:
        """Current clocks, power limit and clock-event reasons (no opt-in needed)."""
        raw = self._control().clock_state()
        return ClockState(nvml_index=self.nvml_index, t_s=time.monotonic(), **raw)

    def capabilities(self) -> dict[str, bool]:
        """Which setters this device offers: ``gpu_locked_clocks``, ``mem_locked_clocks``,
        ``applications_clocks``, ``power_limit``. Permission is only known by trying."""
        return dict(self._control().control_capabilities())

    @property
    def active(self) -> dict[str, Any]:
        """What this controller holds now: ``sm_mhz`` (min, max) or None, ``mem_mhz`` or None,
        ``mem_method``, ``power_limit_w`` or None."""
        mem = self._active["mem"]
        return {
            "sm_mhz": self._active["sm"],
            "mem_mhz": mem[1] if mem else None,
            "mem_method": mem[0] if mem else None,
            "power_limit_w": self._active["power_limit_w"],
        }

    # -- validation --
    def _table(self) -> dict[int, list[int]]:
        t = self.info.supported_clocks_mhz
        if not t:
            raise errors.ConfigError(
                f"GPU {self.device} ({self.info.name}) reports no supported clock table, so a "
                "clock request cannot be validated; clock control is not available on it"
            )
        return t

    def validate(self, sm_mhz: Optional[float] = None,
                 mem_mhz: Optional[float] = None) -> tuple[Optional[int], Optional[int]]:
        """Check a request against the supported clock table; returns ``(sm_mhz, mem_mhz)``.

        The SM clock is checked against the graphics clocks supported at ``mem_mhz`` (at the
        highest memory clock when ``mem_mhz`` is None). No opt-in is needed to validate.

        Raises:
            ConfigError: a value is not supported; the message names the nearest valid values.
        """
        sm = None if sm_mhz is None else _as_mhz("sm_mhz", sm_mhz)
        mem = None if mem_mhz is None else _as_mhz("mem_mhz", mem_mhz)
        table = self._table()
        where = f"GPU {self.device} ({self.info.name})"
        if mem is not None and mem not in table:
            raise errors.ConfigError(
                f"mem_mhz={mem} is not a supported memory clock of {where}; nearest supported: "
                f"{_fmt_list(nearest_supported(mem, list(table)))} "
                f"(supported: {', '.join(str(m) for m in sorted(table, reverse=True))} MHz)"
            )
        if sm is not None:
            at_mem = mem if mem is not None else max(table)
            gr = sorted(table[at_mem])
            if sm not in gr:
                steps = sorted({b - a for a, b in zip(gr, gr[1:])})
                step = f" in {steps[0]} MHz steps" if len(steps) == 1 else ""
                raise errors.ConfigError(
                    f"sm_mhz={sm} is not a supported SM clock of {where} at memory clock "
                    f"{at_mem} MHz; nearest supported: {_fmt_list(nearest_supported(sm, gr))} "
                    f"(supported: {gr[0]}-{gr[-1]} MHz{step}, {len(gr)} values)"
                )
        return sm, mem

    def validate_power_limit(self, power_limit_w: float) -> float:
        """Check a power limit (W) against the device's allowed range; returns it as float.

        Raises:
            ConfigError: out of range (the message names the nearest valid limit) or the device
                does not report a power-limit range.
        """
        if isinstance(power_limit_w, bool) or not isinstance(power_limit_w, (int, float)) \
                or not math.isfinite(power_limit_w):
            raise errors.ConfigError(f"power_limit_w must be a number of W, got {power_limit_w!r}")
        st = self.state()
        lo, hi = st.power_limit_min_w, st.power_limit_max_w
        if lo is None or hi is None:
            raise errors.ConfigError(
                f"GPU {self.device} ({self.info.name}) reports no power-limit range; its power "
                "limit cannot be set"
            )
        w = float(power_limit_w)
        if not lo <= w <= hi:
            near = lo if w < lo else hi
            raise errors.ConfigError(
                f"power_limit_w={w:g} is outside the range {lo:g}-{hi:g} W of GPU {self.device} "
                f"({self.info.name}); nearest valid: {near:g} W"
            )
        return w

    # -- the gate --
    def _require_allowed(self, what: str) -> None:
        if not self.changes_allowed:
            raise errors.ClockChangeNotAllowed(
                f"refusing to {what} on GPU {self.device} ({self.info.name}): clocks and power "
                "limits are shared hardware state that outlives this process, so changing them "
                "is off by default. Opt in with ClockController(..., allow_clock_changes=True), "
                f"the CLI flag --allow-clock-changes, or the environment variable {ALLOW_ENV}=1. "
                "Reading clocks (state()) needs no opt-in."
            )

    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        try:
            fn(*args)
        except errors.NoPermission as e:
            raise errors.NoPermission(
                e.code, e.function,
                f"not permitted to {what} on GPU {self.device} ({self.info.name}). "
                + NO_PERMISSION_HELP,
            ) from None

    def _change(self, component: str, what: str, fn: Callable[..., Any], *args: Any) -> None:
        g = guard._guard()
        newly = g.mark(self.nvml_index, component)  # the watchdog knows before the GPU changes
        try:
            self._call(what, fn, *args)
        except BaseException:
            if newly:
                g.unmark(self.nvml_index, component)
            raise

    # -- setters --
    def _set_sm(self, lo: int, hi: int) -> None:
        self._change("gpu_locked", f"lock the SM clock at {lo}-{hi} MHz",
                     self._control().set_gpu_locked_clocks, lo, hi)
        self._active["sm"] = (lo, hi)

    def _set_mem(self, mem: int, sm: Optional[int]) -> str:
        nv = self._control()
        if self._mem_method in (None, "locked"):
            try:
                self._change("mem_locked", f"lock the memory clock at {mem} MHz",
                             nv.set_mem_locked_clocks, mem, mem)
                self._mem_method = "locked"
                self._active["mem"] = ("locked", mem, None)
                return "locked"
            except (errors.NotSupported, errors.FunctionNotFound):
                if self._mem_method == "locked":
                    raise
                self._mem_method = "applications"  # e.g. GPUs that only take -ac for memory
        table = self._table()
        app_sm = sm if sm is not None and sm in table[mem] else max(table[mem])
        self._change("app_clocks", f"set applications clocks {mem}/{app_sm} MHz (mem/SM)",
                     nv.set_applications_clocks, mem, app_sm)
        self._active["mem"] = ("applications", mem, app_sm)
        return "applications"

    def lock(
        self,
        sm_mhz: Optional[float] = None,
        mem_mhz: Optional[float] = None,
        *,
        tolerance_mhz: Optional[float] = None,
        timeout_s: Optional[float] = None,
        require_settled: Optional[bool] = None,
    ) -> LockResult:
        """Lock the SM clock (min = max = ``sm_mhz``) and/or the memory clock, then wait to settle.

        The memory clock is locked with locked memory clocks where the device supports them, else
        with applications clocks. The lock stays until :meth:`reset`, the end of a
        :meth:`locked` block, or the end of the process (watchdog).

        Returns:
            LockResult with the observed clocks and clock-event reasons after settling.

        Raises:
            ClockChangeNotAllowed: no opt-in. ConfigError: unsupported value (nearest named).
            NoPermission: not root (the message says how to get the privilege).
            NotSupported / FunctionNotFound: the device or driver cannot lock clocks.
            ClockNotSettled: timeout with ``require_settled``.
        """
        self._require_allowed("lock clocks")
        sm, mem = self.validate(sm_mhz, mem_mhz)
        if sm is None and mem is None:
            raise errors.ConfigError("lock() needs sm_mhz and/or mem_mhz")
        method = None
        if mem is not None:
            method = self._set_mem(mem, sm)
        if sm is not None:
            self._set_sm(sm, sm)
        return self.wait_settled(sm, mem, tolerance_mhz=tolerance_mhz, timeout_s=timeout_s,
                                 require_settled=require_settled, mem_method=method)

    def set_power_limit(self, power_limit_w: float) -> ClockState:
        """Set the power-management limit in W (validated against the device's range).

        Returns the state read back after the change. Raises as :meth:`lock` does.
        """
        self._require_allowed("change the power limit")
        w = self.validate_power_limit(power_limit_w)
        self._change("power_limit", f"set the power limit to {w:g} W",
                     self._control().set_power_limit_w, w)
        self._active["power_limit_w"] = w
        return self.state()

    def wait_settled(
        self,
        sm_mhz: Optional[int],
        mem_mhz: Optional[int] = None,
        *,
        tolerance_mhz: Optional[float] = None,
        timeout_s: Optional[float] = None,
        require_settled: Optional[bool] = None,
        mem_method: Optional[str] = None,
        poll_s: float = 0.02,
        power_limit_w: Optional[float] = None,
    ) -> LockResult:
        """Poll until the observed SM (and memory) clock is within the tolerance of the request
        and the power limit within 1 W of the requested one (``power_limit_w``, default: the
        limit this controller set, if any) on two consecutive reads, or the timeout passes.

        Not settling is a :class:`ClockSettleWarning` (or :class:`ClockNotSettled` with
        ``require_settled``); either way the result carries the last observation and reasons.
        """
        tol = self.settle_tolerance_mhz if tolerance_mhz is None else float(tolerance_mhz)
        timeout = self.settle_timeout_s if timeout_s is None else float(timeout_s)
        strict = self.require_settled if require_settled is None else bool(require_settled)
        want_pl = self._active["power_limit_w"] if power_limit_w is None else float(power_limit_w)
        t0 = time.monotonic()
        good = 0
        while True:
            st = self.state()
            ok_sm = sm_mhz is None or (st.sm_mhz is not None and abs(st.sm_mhz - sm_mhz) <= tol)
            ok_mem = mem_mhz is None or (st.mem_mhz is not None and abs(st.mem_mhz - mem_mhz) <= tol)
            ok_pl = want_pl is None or (st.power_limit_w is not None and abs(st.power_limit_w - want_pl) < 1.0)
            good = good + 1 if ok_sm and ok_mem and ok_pl else 0
            unreadable = (sm_mhz is not None and st.sm_mhz is None) or (
                mem_mhz is not None and st.mem_mhz is None) or (want_pl is not None and st.power_limit_w is None)
            if good >= 2 or unreadable or time.monotonic() - t0 >= timeout:
                break
            time.sleep(poll_s)
        result = LockResult(
            device=self.device, nvml_index=self.nvml_index, requested_sm_mhz=sm_mhz,
            requested_mem_mhz=mem_mhz, requested_power_limit_w=self._active["power_limit_w"],
            mem_method=mem_method if mem_method is not None else self.active["mem_method"],
            settled=good >= 2, waited_s=time.monotonic() - t0, observed=st,
        )
        if not result.settled:
            req = ", ".join(
                f"{k} {v} MHz" for k, v in (("SM", sm_mhz), ("memory", mem_mhz)) if v is not None)
            if want_pl is not None:
                req += (", " if req else "") + f"power limit {want_pl:g} W"
            msg = (
                f"GPU {self.device} did not settle at {req} (±{tol:g} MHz) within {timeout:g} s: "
                f"observed SM {st.sm_mhz} MHz, memory {st.mem_mhz} MHz; clock-event reasons: "
                f"{', '.join(st.reasons) or 'none'}"
            )
            if st.power_limit_w is not None:
                msg += f" (power limit {st.power_limit_w:g} W)"
            if strict:
                raise ClockNotSettled(msg, result)
            warnings.warn(msg, ClockSettleWarning, stacklevel=3)
        return result

    # -- restoring --
    def reset(self) -> dict[str, str]:
        """Put back what was found before the first change (of any controller of this process
        on this device). Needs no opt-in; a no-op when nothing was changed.

        Returns:
            component -> ``"ok"`` for each component restored.

        Raises:
            LlmDvfsError (NoPermission, ...): a component could not be restored; it stays
                recorded, so the watchdog retries when the process ends.
        """
        out = guard._guard().restore(self.nvml_index)
        self._active = {"sm": None, "mem": None, "power_limit_w": None}
        self._raise_failed(out)
        return out

    def _raise_failed(self, out: dict[str, str]) -> None:
        failed = {c: r for c, r in out.items() if r != "ok"}
        if failed:
            raise errors.LlmDvfsError(
                f"could not restore GPU {self.device}: {failed}. Recover with "
                f"`python -m llm_dvfs.clocks reset --device {self.device}` (as root)"
            )

    def _restore_to(self, saved: dict[str, Any]) -> None:
        g = guard._guard()
        cur = self._active
        out: dict[str, str] = {}
        if cur["sm"] != saved["sm"]:
            if saved["sm"] is None:
                out.update(g.restore(self.nvml_index, ["gpu_locked"]))
                self._active["sm"] = None
            else:
                self._set_sm(*saved["sm"])
        if cur["mem"] != saved["mem"]:
            if cur["mem"] is not None and (saved["mem"] is None or saved["mem"][0] != cur["mem"][0]):
                comp = "mem_locked" if cur["mem"][0] == "locked" else "app_clocks"
                out.update(g.restore(self.nvml_index, [comp]))
                self._active["mem"] = None
            if saved["mem"] is not None:
                method, mem, app_sm = saved["mem"]
                if method == "locked":
                    self._change("mem_locked", f"lock the memory clock at {mem} MHz",
                                 self._control().set_mem_locked_clocks, mem, mem)
                else:
                    self._change("app_clocks", f"set applications clocks {mem}/{app_sm} MHz",
                                 self._control().set_applications_clocks, mem, app_sm)
                self._active["mem"] = saved["mem"]
        if cur["power_limit_w"] != saved["power_limit_w"]:
            if saved["power_limit_w"] is None:
                out.update(g.restore(self.nvml_index, ["power_limit"]))
                self._active["power_limit_w"] = None
            else:
                self._change("power_limit", f"set the power limit to {saved['power_limit_w']:g} W",
                             self._control().set_power_limit_w, saved["power_limit_w"])
                self._active["power_limit_w"] = saved["power_limit_w"]
        self._raise_failed(out)

    @contextlib.contextmanager
    def locked(
        self,
        sm_mhz: Optional[float] = None,
        mem_mhz: Optional[float] = None,
        *,
        power_limit_w: Optional[float] = None,
        tolerance_mhz: Optional[float] = None,
        timeout_s: Optional[float] = None,
        require_settled: Optional[bool] = None,
    ) -> Iterator[LockResult]:
        """Context manager: apply the settings, yield the :class:`LockResult`, and on leaving
        (normally or by any exception) restore exactly what this controller held on entry.

        Everything is validated before anything is changed.
        """
        self._require_allowed("lock clocks")
        self.validate(sm_mhz, mem_mhz)
        if power_limit_w is not None:
            self.validate_power_limit(power_limit_w)
        saved = dict(self._active)
        try:
            if power_limit_w is not None:
                self.set_power_limit(power_limit_w)
            if sm_mhz is not None or mem_mhz is not None:
                result = self.lock(sm_mhz, mem_mhz, tolerance_mhz=tolerance_mhz,
                                   timeout_s=timeout_s, require_settled=require_settled)
            else:
                result = LockResult(
                    device=self.device, nvml_index=self.nvml_index, requested_sm_mhz=None,
                    requested_mem_mhz=None, requested_power_limit_w=self._active["power_limit_w"],
                    mem_method=None, settled=True, waited_s=0.0, observed=self.state())
            yield result
        finally:
            self._restore_to(saved)

    def __enter__(self) -> "ClockController":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.reset()
        finally:
            self.close()


def reset_to_defaults(nvml_index: int) -> dict[str, str]:
    """Return a device to driver defaults: unlock SM and memory clocks, reset applications
    clocks, set the default power limit. For manual recovery; needs root, not the opt-in
    (it only ever moves toward the defaults).

    Returns:
        component -> ``"ok"``, ``"already default"``, ``"not supported"`` or the error text.
    """
    core = nvml_core()
    out: dict[str, str] = {}

    def attempt(comp: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
            out[comp] = "ok"
        except (errors.NotSupported, errors.FunctionNotFound):
            out[comp] = "not supported"
        except errors.NoPermission as e:
            out[comp] = f"no permission ({e.function})"
        except errors.NvmlError as e:
            out[comp] = str(e)

    attempt("gpu_locked", lambda: core.reset_gpu_locked_clocks(nvml_index))
    attempt("mem_locked", lambda: core.reset_mem_locked_clocks(nvml_index))
    attempt("app_clocks", lambda: core.reset_applications_clocks(nvml_index))
    st = core.clock_state(nvml_index)
    default_w, now_w = st["power_limit_default_w"], st["power_limit_w"]
    if default_w is None:
        out["power_limit"] = "not supported"
    elif now_w is not None and abs(now_w - default_w) < 1e-3:
        out["power_limit"] = "already default"
    else:
        attempt("power_limit", lambda: core.set_power_limit_w(nvml_index, default_w))
    return out
