"""A worker of a parallel sweep: one process (or Ray actor) per GPU, the only owner of that GPU.

The scheduler (:mod:`llm_dvfs.sweep.parallel`) starts one worker per GPU (per group of
``gpus_per_model`` GPUs) and hands it cells one at a time. A worker

* is pinned to its GPU(s) before torch is imported: ``CUDA_VISIBLE_DEVICES`` names them by UUID
  (:func:`pin_env`), so inside the worker they are ``cuda:0``…, ``devices()[0]`` is its GPU and
  its NVML device is found by UUID (:mod:`llm_dvfs.devices`), whatever CUDA's order;
* owns that GPU's :class:`~llm_dvfs.meter.monitor.PowerMonitor` and, in sweep mode, its
  :class:`~llm_dvfs.control.clocks.ClockController`, whose watchdog restores the GPU when the
  worker ends in any way (SIGKILL included): a lost worker never leaves its GPU locked;
* loads a model once and keeps it while it gets cells of that model, and holds a clock point's
  lock (warm-up, settle check and idle baseline done once) while it gets cells of that point;
* measures a cell with :func:`llm_dvfs.sweep.cells.measure_cell`, the code of the single-GPU
  path, and returns the :class:`~llm_dvfs.sweep.cells.CellOutput` with what it adds to the
  manifest and its log records. It writes nothing into the run directory: the driver records
  each cell once, from what a worker returns.

This module imports only the standard library at import time: :func:`process_main` sets the
environment before anything that may import torch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import sys
import time
import traceback
from typing import Any, Optional, Sequence

log = logging.getLogger("llm_dvfs.sweep.worker")


def pin_env(uuids: Sequence[str]) -> dict[str, str]:
    """The environment that pins a worker to these GPUs (by UUID: exact whatever CUDA's order)."""
    return {"CUDA_VISIBLE_DEVICES": ",".join(uuids)}


class _Collect(logging.Handler):
    """Keeps the worker's log records (INFO and up) for the driver, which logs them again under
    the worker's name (into run.log and the console): a worker has no console of its own."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.records.append((record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 - a bad format string must not break a cell
            pass

    def take(self) -> list[tuple[int, str]]:
        out, self.records = self.records, []
        return out


class CellWorker:
    """The per-GPU state machine (module docstring). Made inside the worker process, after it
    is pinned; ``driver_indices`` are its GPUs' CUDA indices as the driver numbers them (rows and
    power traces use those, so a parallel run's numbering is the user's ``--gpus``).

    Raises:
        ConfigError: the pinned GPU(s) are not visible here, or the plan's clock points are not
            supported by this GPU (a cluster node of another model).
    """

    def __init__(self, plan: Any, worker_id: int, driver_indices: Sequence[int]) -> None:
        from llm_dvfs import errors
        from llm_dvfs.control.clocks import ClockController
        from llm_dvfs.devices import devices
        from llm_dvfs.meter.monitor import PowerMonitor
        import llm_dvfs.sweep.cells as ex

        self._ex = ex
        self.worker_id = worker_id
        self.logs = _Collect()
        logging.getLogger("llm_dvfs").addHandler(self.logs)
        logging.getLogger("llm_dvfs").setLevel(logging.DEBUG)
        k = plan.config.gpus_per_model
        devs = devices() if plan.gpu is not None else []
        if plan.gpu is not None and len(devs) < k:
            raise errors.ConfigError(f"worker {worker_id}: {len(devs)} GPU(s) visible, {k} needed "
                                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
        mine = devs[:k]
        self.driver_indices = list(driver_indices) or [d.index for d in mine]
        cfg = plan.config
        device = "cuda:0" if plan.device.startswith("cuda") else plan.device
        if k > 1 and device.startswith("cuda") and "device_map" not in cfg.model_args:
            # one model over this worker's GPUs (pretrained checkpoints; arch: models refuse)
            cfg = dataclasses.replace(cfg, model_args={**cfg.model_args, "device_map": "balanced"})
        self.plan = dataclasses.replace(plan, config=cfg, device=device, gpu=mine[0] if mine else None,
                                        gpus=list(devs), gpu_group=list(mine) if k > 1 else [], workers=[])
        self.ctx = ex.CellContext(self.plan, None, {}, ex.Progress(0, quiet=True))
        self._stack = contextlib.ExitStack()   # the current clock point's lock(s)
        self.ctls: list[Any] = []
        if mine:
            self.ctx.mon = PowerMonitor(devices=[d.index for d in mine]).start()
        if self.plan.mode == "sweep" and mine:
            self.ctls = [ClockController(d.index, allow_clock_changes=True,
                                         settle_tolerance_mhz=cfg.settle_tolerance_mhz) for d in mine]
            self.ctx.ctl = self.ctls[0]
        self.model: Optional[str] = None
        self.clock: Any = None
        self.idle_w = float("nan")
        self.feats: dict[str, Any] = {}

    def describe(self) -> dict[str, Any]:
        """Who this worker is: the manifest's ``workers`` entry."""
        gpus = self.plan.measured_gpus
        return {"worker": self.worker_id, "host": socket.gethostname(), "pid": os.getpid(),
                "gpu_uuids": [g.uuid for g in gpus], "gpu_names": [g.name for g in gpus],
                "gpu_indices": self.driver_indices[:len(gpus)], "nvml_indices": [g.nvml_index for g in gpus],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def _leave_clock_point(self) -> None:
        self._stack.close()  # restores the clocks of the point it held
        self._stack = contextlib.ExitStack()
        self.clock = None

    def run(self, index: int) -> dict[str, Any]:
        """Measure cell ``index`` of the plan; returns ``index``, ``output`` (CellOutput),
        ``manifest`` (what this call adds: models, features, notes, clock_point_runs), ``logs``
        and ``busy_s``. Raises what measuring raises."""
        ex, ctx, plan = self._ex, self.ctx, self.plan
        t0 = time.monotonic()
        cell = plan.cells[index]
        ctx.manifest = {}
        if cell.model != self.model:
            self._leave_clock_point()
            ctx.loaded = ctx.runner = None
            ex.free_memory(plan.device)
            self.model, self.feats = None, {}
            ctx.loaded, ctx.runner = ex.load_for_cells(ctx, cell.model)
            self.model = cell.model
        if cell.clock != self.clock:
            self._leave_clock_point()
            lock = None
            if self.ctls and not cell.clock.as_found:
                cp = cell.clock
                lock = self._stack.enter_context(self.ctls[0].locked(cp.sm_mhz, cp.mem_mhz, power_limit_w=cp.power_limit_w))
                for c in self.ctls[1:]:  # a model over several GPUs: every one at the point
                    self._stack.enter_context(c.locked(cp.sm_mhz, cp.mem_mhz, power_limit_w=cp.power_limit_w))
            info, self.idle_w = ex.enter_clock_point(ctx, cell.clock, cell, lock)
            info["worker"] = self.worker_id
            info["gpu_uuid"] = ",".join(g.uuid for g in plan.measured_gpus)
            info["host"] = socket.gethostname()
            self.clock = cell.clock
        entry = plan.task_entry(cell.task)
        ex.task_features(ctx, cell, entry, self.feats)
        out = ex.measure_cell(ctx, cell, entry, self.feats[cell.task], self.idle_w)
        self._renumber(out)
        return {"index": index, "output": out, "manifest": ctx.manifest, "logs": self.logs.take(),
                "busy_s": time.monotonic() - t0}

    def _renumber(self, out: Any) -> None:
        """Device numbers of the rows in the driver's numbering (inside, the GPUs are 0..k-1)."""
        pw = out.tables["power"]
        if len(pw):
            pw["device"] = [self.driver_indices[int(d)] if 0 <= int(d) < len(self.driver_indices) else int(d)
                            for d in pw["device"]]
        req = out.tables["requests"]
        if self.plan.device.startswith("cuda") and len(req) and "device" in req:
            req["device"] = f"cuda:{self.driver_indices[0]}"

    def close(self) -> None:
        """Release the clock point (clocks restored), stop the monitor, end the NVML sessions."""
        try:
            self._leave_clock_point()
        finally:
            for c in self.ctls:
                c.close()
            if self.ctx.mon is not None:
                self.ctx.mon.stop()
            logging.getLogger("llm_dvfs").removeHandler(self.logs)


def describe_error(e: BaseException) -> str:
    """One line naming the exception, then its traceback (for the driver's log)."""
    return f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _die_with_parent() -> None:
    """Linux: SIGTERM this process when the driver dies (SIGKILL included), so that no worker
    outlives its driver; the clock watchdog then restores the GPU. Best effort elsewhere (the
    worker ends when it finds its pipe closed)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the driver was already gone before prctl took effect
        os._exit(1)


def process_main(conn: Any, plan: Any, worker_id: int, env: dict[str, str], driver_indices: list[int]) -> None:
    """Entry point of a local worker process (multiprocessing, spawn): pin, make the
    :class:`CellWorker`, then answer the driver's messages on ``conn`` (a cell index → its
    result; None → stop) until told to stop or the driver is gone.

    Messages sent: ``("ready", id, describe)``, ``("error", id, text)`` (could not start),
    ``("done", id, result)``, ``("failed", id, index, text)`` (the cell raised).
    """
    os.environ.update(env)  # before anything imports torch: the GPU pinning
    # Ctrl-C reaches the whole process group; it is the driver's to handle (it stops the
    # workers, whose controllers restore the clocks). The guard keeps an ignored SIGINT ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    if "torch" in sys.modules:  # pragma: no cover - the spawn context starts a fresh interpreter
        print(f"llm_dvfs worker {worker_id}: torch was imported before pinning", file=sys.stderr)
    try:
        w = CellWorker(plan, worker_id, driver_indices)
    except BaseException as e:  # noqa: BLE001 - reported to the driver, which carries on without it
        conn.send(("error", worker_id, describe_error(e)))
        return
    try:
        conn.send(("ready", worker_id, w.describe()))
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the driver is gone
                break
            if msg is None:
                break
            try:
                res = w.run(int(msg))
            except Exception as e:  # noqa: BLE001 - the driver decides (the run fails)
                conn.send(("failed", worker_id, int(msg), describe_error(e)))
                continue
            conn.send(("done", worker_id, res))
    except (BrokenPipeError, EOFError, OSError):
        pass
    finally:
        w.close()


__all__ = ["CellWorker", "pin_env", "process_main", "describe_error"]
