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

The run directory's layout is described in :mod:`llm_dvfs.sweep.rundir` and docs/sweep.md; the
end-of-run summary (summary.csv) is :mod:`llm_dvfs.analysis.console`'s, called by the CLI.

Safety: all clock changes go through :class:`~llm_dvfs.control.clocks.ClockController`, whose
watchdog restores the GPU when this process ends in any way; an observe-mode plan changes nothing.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import pandas as pd

from llm_dvfs import errors
from llm_dvfs.control.clocks import ClockController, ClockSettleWarning, read_state
from llm_dvfs.meter.monitor import PowerMonitor
from llm_dvfs.schema import read_parquet, to_frame
from llm_dvfs.sweep.plan import Cell, ClockPoint, Plan, TaskEntry, check_busy
from llm_dvfs.sweep.rundir import RunDir, now_iso
from llm_dvfs.sweep.session import open_run
from llm_dvfs.sweep.signals import acknowledge, raise_pending, signal_name
import llm_dvfs.sweep.served as served  # not `from llm_dvfs.sweep import`: that is the package, which imports this

log = logging.getLogger("llm_dvfs.sweep.execute")

#: tokens.parquet and power.parquet are rewritten at most this often during a run (s); the
#: requests table after every cell. Every cell's own files are written when it finishes.
CONSOLIDATE_LARGE_S = 30.0


@dataclass
class SweepResult:
    """What :func:`execute` returns."""

    out: Path
    status: str                      # complete | interrupted | failed | incomplete (a damaged part)
    cells_run: int
    cells_skipped: int
    requests: pd.DataFrame           # the run's requests table (requests.parquet)
    notes: list[str]


def _features(task_entry: TaskEntry, tokenizer: Any, ner: str) -> pd.DataFrame:
    """Input features of a task's prompts (once per model × task: the token features need the
    model's tokenizer; clock points share them)."""
    from llm_dvfs.workload.features import compute_features

    df = compute_features([s.prompt for s in task_entry.samples], tokenizer,
                          ner=None if ner == "off" else ner)
    return df.reset_index(drop=True)


class _Progress:
    """tqdm bars (sweep and cell), or nothing when quiet."""

    def __init__(self, total_requests: int, quiet: bool) -> None:
        self.quiet = quiet
        self.sweep = None
        if not quiet:
            from tqdm.auto import tqdm
            self._tqdm = tqdm
            # disable=None: no bars when stderr is not a terminal (logs get one line per cell)
            self.sweep = tqdm(total=total_requests, desc="sweep", unit="req", position=0,
                              dynamic_ncols=True, file=sys.stderr, disable=None)

    def cell(self, total: int, desc: str) -> Any:
        if self.quiet:
            return None
        return self._tqdm(total=total, desc=desc[:60], unit="req", position=1, leave=False,
                          dynamic_ncols=True, file=sys.stderr, disable=None)

    def advance(self, n: int) -> None:
        raise_pending()  # after each batch: an interrupt Python dropped (sweep/signals.py)
        if self.sweep is not None:
            self.sweep.update(n)

    def close(self) -> None:
        if self.sweep is not None:
            self.sweep.close()


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
    quarantined (``--resume`` runs it again).

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
            progress = _Progress(sum(len(plan.task_entry(c.task).samples) for c in pending), quiet)
            try:
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


@dataclass
class _CellContext:
    """What the cells of one model share while they run: the plan, the run directory and its
    manifest, the loaded model's runner, the power monitor, the clock controller and the bars."""

    plan: Plan
    rd: RunDir
    manifest: dict[str, Any]
    progress: _Progress
    mon: Any = None                          # PowerMonitor, or None without a GPU
    ctl: Optional[ClockController] = None    # only in sweep mode
    runner: Any = None                       # the current model's Runner
    loaded: Any = None                       # the current model (LoadedModel)


def _run_cells(plan: Plan, rd: RunDir, manifest: dict[str, Any], pending: list[Cell], progress: _Progress) -> int:
    cfg = plan.config
    if not pending:
        return 0
    ctx = _CellContext(plan, rd, manifest, progress)
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
            ctx.loaded, ctx.runner = _load(ctx, model)
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
            _free_memory(plan.device)
    finally:
        if ctx.mon is not None:
            ctx.mon.stop()
        if ctx.ctl is not None:
            ctx.ctl.close()  # its NVML session (the clocks are restored by locked())
    return n_run


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch
        torch.cuda.empty_cache()


def _load(ctx: _CellContext, model: str) -> tuple[Any, Any]:
    from llm_dvfs.workload.models import load_model
    from llm_dvfs.workload.runner import GenerationSettings, Runner

    plan, manifest, rd = ctx.plan, ctx.manifest, ctx.rd
    cfg = plan.config
    if plan.engine == "endpoint":  # the server holds the model (its identity: manifest["endpoint"])
        return None, None
    t0 = time.monotonic()
    log.info("loading %s (%s) on %s", model, cfg.dtype, plan.device)
    loaded = load_model(model, dtype=cfg.dtype, device=plan.device, seed=cfg.seed,
                        model_args=cfg.model_args)
    log.info("loaded %s: %.3g M parameters, %s, in %.1f s%s", model, loaded.n_params / 1e6, loaded.dtype,
             time.monotonic() - t0, f", revision {loaded.revision}" if loaded.revision else "")
    manifest.setdefault("models", {})[model] = loaded.describe()
    rd.write_manifest(manifest)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, fixed_output_length=cfg.fixed_output_length,
                                  decoding=cfg.decoding, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=cfg.seed, stop_sequences=cfg.stop_sequences,
                                  apply_chat_template=cfg.apply_chat_template)
    runner = Runner(loaded, ctx.mon, settings, gpu_name=plan.gpu.name if plan.gpu is not None else None)
    return loaded, runner


def _clock_point(ctx: _CellContext, cp: ClockPoint, todo: list[Cell], feats: dict[str, pd.DataFrame],
                 lock: Any) -> int:
    plan, rd, manifest, mon = ctx.plan, ctx.rd, ctx.manifest, ctx.mon
    cfg = plan.config
    # other processes may have started since the plan was made
    notes: list[str] = []
    check_busy(plan.gpu, cfg.on_busy_gpu, notes)
    # warm-up + settle check: the first task's prompts at the first batch size
    first = plan.task_entry(todo[0].task)
    prompts = [s.prompt for s in first.samples]
    info: dict[str, Any] = {"model": todo[0].model, "clock": cp.label, **cp.requested_row(),
                            "started_at": now_iso(), "notes": notes}
    if lock is not None:
        info["lock"] = {"settled": bool(lock.settled), "waited_s": lock.waited_s,
                        "observed_sm_mhz": lock.observed_sm_mhz, "observed_mem_mhz": lock.observed_mem_mhz,
                        "reasons": list(lock.reasons), "mem_method": lock.mem_method}
    w = mon.begin_window("warmup") if mon is not None else None
    n_warm = max(cfg.warmup, 1 if lock is not None else 0)
    warm_s = (ctx.runner.warmup(prompts, todo[0].batch_size or 1, n_warm, ctx.runner.stop_strings(first.task))
              if ctx.runner is not None else served.warmup_endpoint(cfg, todo[0].model, first, n_warm))
    settle: dict[str, Any] = {"warmup_s": warm_s}
    if w is not None:
        w.end()
        m = w.measurement()
        settle["warmup_avg_power_w"] = m.avg_power_w
    if plan.gpu is not None:
        settle.update(_settle(ctx.ctl if lock is not None else None, plan.gpu.nvml_index, cp))
        # settled is None in observe mode (nothing requested, so nothing to settle to: a GPU
        # idling at 345 MHz and boosting under load is normal there); warn only on a real miss,
        # or when the clock state could not even be read.
        if settle.get("settled") is False:
            msg = (f"{cp.label}: the GPU did not settle after the warm-up: {settle.get('detail') or 'no detail'}; "
                   "the rows record the clocks observed during each request")
        elif settle.get("detail"):
            msg = f"{cp.label}: after the warm-up: {settle['detail']}"
        else:
            msg = ""
        if msg:
            log.warning("%s", msg)
            notes.append(msg)
    info["settle"] = settle
    # run-level notes too: llm_dvfs.report lists them among its caveats
    manifest["notes"] = list(dict.fromkeys(list(manifest.get("notes", [])) + notes))
    # idle baseline at this clock point
    idle_w = math.nan
    if mon is not None and cfg.idle_s > 0:
        time.sleep(min(0.25, cfg.idle_s / 4))  # the sensor reports ~25 ms late: let the warm-up fade
        idle_w = float(mon.measure_idle(cfg.idle_s))
        log.info("%s: idle baseline %.1f W over %.1f s", cp.label, idle_w, cfg.idle_s)
    info["idle_power_w"] = idle_w
    manifest.setdefault("clock_point_runs", []).append(info)
    rd.write_manifest(manifest)

    n = 0
    for cell in todo:
        entry = plan.task_entry(cell.task)
        if cell.task not in feats:
            t0 = time.monotonic()
            feats[cell.task] = _features(entry, ctx.loaded.tokenizer if ctx.loaded is not None else None, cfg.ner)
            manifest.setdefault("features", {})[f"{cell.model}|{cell.task}"] = {
                "ner_estimator": feats[cell.task].attrs.get("ner_estimator"),
                "tokenizer": str(feats[cell.task].attrs.get("tokenizer", "")),
                "columns": [c for c in feats[cell.task].columns if c.startswith("feat_")],
                "seconds": round(time.monotonic() - t0, 3)}
        _run_cell(ctx, cell, entry, feats[cell.task], idle_w)
        n += 1
    info["finished_at"] = now_iso()
    rd.write_manifest(manifest)
    return n


def _settle(ctl: Optional[ClockController], nvml_index: int, cp: ClockPoint) -> dict[str, Any]:
    """After the warm-up: the settle check of ``cp``. With the controller that holds ``cp``, its
    :meth:`~llm_dvfs.control.clocks.ClockController.wait_settled` (clocks and power limit);
    without one (observe mode, nothing requested) one read of the state,
    ``settled`` None.

    Returns ``settled``, ``waited_s``, the last ``observed_sm_mhz``/``observed_mem_mhz``/
    ``power_limit_w``, ``reasons`` (decoded clock-event reasons) and a ``detail`` text when not
    settled. Never raises.
    """
    try:
        if ctl is None or cp.as_found:
            t0 = time.monotonic()
            st, settled = read_state(nvml_index), None
            waited_s = time.monotonic() - t0
        else:
            with warnings.catch_warnings():  # not settling is reported below, as a note
                warnings.simplefilter("ignore", ClockSettleWarning)
                res = ctl.wait_settled(cp.sm_mhz, cp.mem_mhz, power_limit_w=cp.power_limit_w)
            st, waited_s, settled = res.observed, res.waited_s, res.settled
    except errors.LlmDvfsError as e:
        return {"settled": None if ctl is None or cp.as_found else False,
                "detail": f"clock state unreadable: {e}"}
    out: dict[str, Any] = {
        "settled": settled, "waited_s": round(waited_s, 4),
        "observed_sm_mhz": st.sm_mhz, "observed_mem_mhz": st.mem_mhz, "power_limit_w": st.power_limit_w,
        "reasons": list(st.reasons)}
    if settled is False:
        out["detail"] = (f"requested {cp.label}, observed SM {st.sm_mhz} MHz, memory {st.mem_mhz} MHz, "
                         f"power limit {st.power_limit_w} W (clock-event reasons: {', '.join(st.reasons) or 'none'})")
    return out


def _clock_not_held(cp: ClockPoint, requests: pd.DataFrame, tolerance_mhz: float) -> Optional[str]:
    """A message when the clocks observed during a cell's requests differ from the requested
    ones (throttling, or a lock released by someone else), else None. The rows keep both."""
    msgs = []
    for col, want in (("sm_mhz_observed", cp.sm_mhz), ("mem_mhz_observed", cp.mem_mhz)):
        if want is None or col not in requests or not len(requests):
            continue
        obs = pd.to_numeric(requests[col], errors="coerce").dropna()
        off = obs[(obs - want).abs() > tolerance_mhz]
        if len(off):
            msgs.append(f"{len(off)} of {len(obs)} requests ran at {col.split('_')[0].upper()} clocks other than "
                        f"the requested {want} MHz (observed {', '.join(f'{v:.0f}' for v in sorted(set(off))[:4])} MHz)")
    return "; ".join(msgs) + "; see clock_event_reasons" if msgs else None


def _run_cell(ctx: _CellContext, cell: Cell, entry: TaskEntry, feats: pd.DataFrame, idle_w: float) -> None:
    raise_pending()
    if cell.engine != "generate":  # served traffic: sweep/served.py
        served.run_cell(ctx, cell, entry, feats, idle_w)
        return
    plan, rd, manifest, mon, progress = ctx.plan, ctx.rd, ctx.manifest, ctx.mon, ctx.progress
    cfg = plan.config
    t0 = time.monotonic()
    bar = progress.cell(len(entry.samples), f"{cell.model} {cell.task} {cell.clock.label} bs{cell.batch_size}")
    context = {"task": cell.task, **cell.clock.requested_row(), "idle_power_w": idle_w, "engine": "generate"}
    try:
        rows = ctx.runner.run(entry.task, entry.samples, batch_size=cell.batch_size, cell_id=cell.cell_id,
                          context=context, features=feats, warmup=cfg.warmup, repeat=cell.repeat,
                          progress=bar, on_batch=progress.advance)
    finally:
        if bar is not None:
            bar.close()
    requests = to_frame("requests", rows.requests)
    tokens = to_frame("tokens", rows.tokens)
    if mon is not None and math.isfinite(rows.t_start_s):
        tr = mon.trace(rows.t_start_s, rows.t_end_s)
        power = to_frame("power", [{"cell_id": cell.cell_id, "t_s": t, "device": d, "power_w": p, "source": s}
                                   for t, d, p, s in tr[["t_s", "device", "power_w", "source"]].itertuples(index=False)])
    else:
        power = to_frame("power", [])
    held = _clock_not_held(cell.clock, requests, cfg.settle_tolerance_mhz)
    if held:
        rows.warnings.append(held)
        manifest["notes"] = list(dict.fromkeys(list(manifest.get("notes", [])) + [f"{cell.cell_id}: {held}"]))
    for wmsg in rows.warnings:
        log.warning("%s: %s", cell.cell_id, wmsg)
    rd.write_cell(cell, {"requests": requests, "tokens": tokens, "power": power},
                  {"finished_at": now_iso(), "wall_s": time.monotonic() - t0, "n_requests": len(requests),
                   "warnings": rows.warnings, "attribution": rows.attribution})
    # requests after every cell; the large tables at most every CONSOLIDATE_LARGE_S (and at the
    # end): until then they are complete in cells/, which is what a resume reads
    big = time.monotonic() - rd.last_full_consolidation >= CONSOLIDATE_LARGE_S
    rd.consolidate(plan.cells, RunDir.TABLES if big else ("requests",))
    if big:
        rd.last_full_consolidation = time.monotonic()
    manifest["cells_done"] = manifest.get("cells_done", 0) + 1
    rd.write_manifest(manifest)
    e = requests["energy_j"].dropna()  # null = not measured (no GPU)
    log.info("cell %d/%d done: %s (%d requests, %s, %.1f s)", cell.index + 1, len(plan.cells), cell.cell_id,
             len(requests), f"median energy {float(e.median()):.3g} J" if len(e) else "no energy",
             time.monotonic() - t0)


__all__ = ["SweepResult", "execute", "CONSOLIDATE_LARGE_S"]
