"""Running a sweep: :func:`execute` runs a :class:`~llm_dvfs.sweep.plan.Plan` into its run directory.

Each model is loaded once; inside it the clock points; after each clock change a warm-up with a
settle check of the observed clock (:meth:`llm_dvfs.control.clocks.ClockController.wait_settled`),
then an idle-power baseline; inside those the cells (task × batch size × repeat). Every finished
cell is written at once (atomic renames, :class:`~llm_dvfs.sweep.rundir.RunDir`) and the run
tables are rebuilt from the finished cells (requests after every cell, tokens and power at least
every :data:`CONSOLIDATE_LARGE_S` and at the end), so an interrupted sweep loses at most the cell
in progress and ``--resume`` continues where it stopped.

Served-traffic cells (``--engine continuous`` / ``--endpoint``: a load level instead of a batch
size) run through :func:`llm_dvfs.sweep.served.run_cell`; an endpoint loads no model here.
A lock-step cell is measured and recorded by :mod:`llm_dvfs.sweep.cells`. A parallel plan
(``--gpus 0,1,…``, ``--ray``) hands its cells to the scheduler of :mod:`llm_dvfs.sweep.parallel`
instead of the loop here; the run directory, manifest, consolidation and resume are this module's
either way.

The run directory's layout is described in :mod:`llm_dvfs.sweep.rundir` and docs/sweep.md; the
end-of-run summary (summary.csv) is :mod:`llm_dvfs.analysis.console`'s, called by the CLI.

Safety: all clock changes go through :class:`~llm_dvfs.control.clocks.ClockController`, whose
watchdog restores the GPU when this process ends in any way; an observe-mode plan changes nothing.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pandas as pd

from llm_dvfs.control.clocks import ClockController
from llm_dvfs.meter.monitor import PowerMonitor
from llm_dvfs.schema import read_parquet
from llm_dvfs.sweep.cells import (CONSOLIDATE_LARGE_S, CellContext, Progress, enter_clock_point, free_memory,
                                  load_for_cells, measure_cell, record_cell, task_features)
from llm_dvfs.sweep.plan import Cell, ClockPoint, Plan, TaskEntry
from llm_dvfs.sweep.rundir import RunDir, now_iso
from llm_dvfs.sweep.session import open_run
from llm_dvfs.sweep.signals import acknowledge, raise_pending, signal_name
import llm_dvfs.sweep.served as served  # not `from llm_dvfs.sweep import`: that is the package, which imports this

log = logging.getLogger("llm_dvfs.sweep.execute")


@dataclass
class SweepResult:
    """What :func:`execute` returns."""

    out: Path
    status: str                      # complete | interrupted | failed | incomplete (a damaged part)
    cells_run: int
    cells_skipped: int
    requests: pd.DataFrame           # the run's requests table (requests.parquet)
    notes: list[str]


@contextlib.contextmanager
def _logs_through_tqdm() -> Iterator[None]:
    """While the bars are up, the console handlers of the ``llm_dvfs`` and ``py.warnings``
    loggers write through ``tqdm.write`` (``tqdm.contrib.logging.logging_redirect_tqdm``), so a
    log line is printed above the bars instead of through them.

    Only loggers that have a console handler (a ``StreamHandler`` on stdout/stderr, as the CLI
    sets up) are redirected: for a library caller without one, logging_redirect_tqdm would add a
    console handler of its own. Each replacement keeps the level and filters of the handler it
    replaces (logging_redirect_tqdm copies only the formatter and stream, so ``--quiet`` would
    otherwise print INFO lines, and the DEBUG lines that the run.log handler wants too).
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    def console(h: logging.Handler) -> bool:
        return isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) in (sys.stdout, sys.stderr)

    loggers = [lg for lg in (logging.getLogger("llm_dvfs"), logging.getLogger("py.warnings"))
               if any(console(h) for h in lg.handlers)]
    if not loggers:
        yield
        return
    replaced = {lg.name: next(h for h in lg.handlers if console(h)) for lg in loggers}
    before = {lg.name: list(lg.handlers) for lg in loggers}
    with logging_redirect_tqdm(loggers=loggers):
        for lg in loggers:
            orig = replaced[lg.name]
            for h in lg.handlers:
                if h not in before[lg.name]:
                    h.setLevel(orig.level)
                    for f in orig.filters:
                        h.addFilter(f)
        yield


def execute(plan: Plan, *, argv: Optional[Sequence[str]] = None, quiet: bool = False) -> SweepResult:
    """Run ``plan`` (from :func:`prepare`), writing the run directory as it goes.

    Returns a :class:`SweepResult` (status ``complete``); the end-of-run summary (summary.csv) is
    :func:`llm_dvfs.analysis.console.write_summary`'s, which the CLI calls afterwards. A KeyboardInterrupt marks the manifest
    ``interrupted`` and is re-raised after the clocks are restored; other exceptions mark it
    ``failed`` and are re-raised. Finished cells are on disk either way; ``--resume`` continues.
    SIGTERM and SIGHUP end it as SIGINT does where :func:`llm_dvfs.sweep.signals.handled` is in
    force (the CLI); status ``incomplete``: a finished cell was found damaged at the end and
    quarantined (``--resume`` runs it again). With ``plan.workers`` (``--gpus``/``--ray``) the
    cells run on the scheduler of :mod:`llm_dvfs.sweep.parallel`; this process alone writes the
    run directory either way.

    Raises:
        llm_dvfs.sweep.lock.RunDirInUse: another process owns the run directory (nothing changed).
        ConfigError: the run directory cannot be created, or its manifest (and backup) is unreadable.
    """
    raise_pending()  # an interrupt deferred while modules were imported: before anything is written
    # one owner, atomic creation, damaged cells quarantined before planning: sweep/session.py
    with open_run(plan, argv) as (rd, manifest):
        return _execute(plan, rd, manifest, quiet)


def _execute(plan: Plan, rd: RunDir, manifest: dict[str, Any], quiet: bool) -> SweepResult:
    file_log = _attach_file_log(rd.path / "run.log")
    rd.write_manifest(manifest)
    for n in plan.notes:
        log.warning("%s", n)

    # an aborted served cell (server gone mid-cell) kept its rows but is measured again
    pending = [c for c in plan.cells if not rd.is_done(c) or served.aborted(rd, c)]
    skipped = len(plan.cells) - len(pending)
    if skipped:
        log.info("resuming: %d of %d cells are already done", skipped, len(plan.cells))
    status = "failed"
    why: Optional[str] = None
    cells_run = 0
    try:
        with _logs_through_tqdm():
            progress = Progress(sum(len(plan.task_entry(c.task).samples) for c in pending), quiet)
            try:
                if plan.workers:  # --gpus N,M,... / --ray: the scheduler of sweep/parallel.py
                    from llm_dvfs.sweep.parallel import run_parallel
                    cells_run = run_parallel(plan, rd, manifest, pending, progress)
                else:
                    cells_run = _run_cells(plan, rd, manifest, pending, progress)
            finally:
                progress.close()
        status = "complete"
    except KeyboardInterrupt as e:  # SIGINT, SIGTERM, SIGHUP alike (sweep/signals.py)
        acknowledge()  # later signals are swallowed while the run directory is saved
        status = "interrupted"
        why = signal_name(e)
        raise
    finally:
        try:
            rd.consolidate(plan.cells)  # never raises on a damaged part: quarantines it (rd.damaged)
            if rd.damaged:
                status = "incomplete" if status == "complete" else status
                manifest.setdefault("repairs", []).extend(
                    dict(d.as_dict(), at=now_iso(), action="quarantined to damaged/; --resume runs it again")
                    for d in rd.damaged)
            manifest["status"] = status
            manifest["finished_at"] = now_iso() if status == "complete" else None
            manifest["cells_done"] = sum(1 for c in plan.cells if rd.is_done(c))
            if status != "complete":
                manifest.setdefault("interruptions", []).append(
                    {"at": now_iso(), "status": status, **({"signal": why} if why else {})})
            rd.write_manifest(manifest)
        finally:
            if file_log is not None:
                logging.getLogger("llm_dvfs").removeHandler(file_log)
                file_log.close()
    requests = read_parquet("requests", rd.path / "requests.parquet")
    return SweepResult(rd.path, status, cells_run, skipped, requests, plan.notes)


def _attach_file_log(path: Path) -> Optional[logging.Handler]:
    try:
        h = logging.FileHandler(path, encoding="utf-8")
    except OSError:
        return None
    h.setLevel(logging.DEBUG)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    lg = logging.getLogger("llm_dvfs")
    lg.addHandler(h)
    if lg.level == logging.NOTSET or lg.level > logging.DEBUG:
        lg.setLevel(logging.DEBUG)  # handlers filter; the file gets everything
    return h


def _run_cells(plan: Plan, rd: RunDir, manifest: dict[str, Any], pending: list[Cell], progress: Progress) -> int:
    cfg = plan.config
    if not pending:
        return 0
    ctx = CellContext(plan, rd, manifest, progress)
    if plan.gpu is not None:
        ctx.mon = PowerMonitor(devices=[plan.gpu.index]).start()
    if plan.mode == "sweep":
        ctx.ctl = ClockController(plan.gpu.index, allow_clock_changes=True,
                                  settle_tolerance_mhz=cfg.settle_tolerance_mhz)
    n_run = 0
    try:
        for model in plan.models:
            todo_m = [c for c in pending if c.model == model]
            if not todo_m:
                continue
            ctx.loaded, ctx.runner = load_for_cells(ctx, model)
            feats: dict[str, pd.DataFrame] = {}
            for cp in plan.clock_points:
                todo = [c for c in todo_m if c.clock == cp]
                if not todo:
                    continue
                if ctx.ctl is not None and not cp.as_found:
                    with ctx.ctl.locked(cp.sm_mhz, cp.mem_mhz, power_limit_w=cp.power_limit_w) as lock:
                        n_run += _clock_point(ctx, cp, todo, feats, lock)
                else:
                    n_run += _clock_point(ctx, cp, todo, feats, None)
            ctx.runner = ctx.loaded = None
            free_memory(plan.device)
    finally:
        if ctx.mon is not None:
            ctx.mon.stop()
        if ctx.ctl is not None:
            ctx.ctl.close()  # its NVML session (the clocks are restored by locked())
    return n_run


def _clock_point(ctx: CellContext, cp: ClockPoint, todo: list[Cell], feats: dict[str, pd.DataFrame],
                 lock: Any) -> int:
    info, idle_w = enter_clock_point(ctx, cp, todo[0], lock)
    n = 0
    for cell in todo:
        entry = ctx.plan.task_entry(cell.task)
        task_features(ctx, cell, entry, feats)
        _run_cell(ctx, cell, entry, feats[cell.task], idle_w)
        n += 1
    info["finished_at"] = now_iso()
    ctx.save_manifest()
    return n


def _run_cell(ctx: CellContext, cell: Cell, entry: TaskEntry, feats: pd.DataFrame, idle_w: float) -> None:
    raise_pending()
    if cell.engine != "generate":  # served traffic: sweep/served.py
        served.run_cell(ctx, cell, entry, feats, idle_w)
        return
    assert ctx.rd is not None
    record_cell(ctx.plan, ctx.rd, ctx.manifest, cell, measure_cell(ctx, cell, entry, feats, idle_w))


__all__ = ["SweepResult", "execute", "CONSOLIDATE_LARGE_S"]
