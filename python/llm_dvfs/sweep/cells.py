"""One cell of a sweep: measuring it (:func:`measure_cell`, writes nothing) and recording it
(:func:`record_cell`, the run directory's owner only), and what a cell needs around it: the
model (:func:`load_for_cells`), the clock point's warm-up, settle check and idle baseline
(:func:`enter_clock_point`), the task's input features (:func:`task_features`).

The single-GPU loop (:mod:`llm_dvfs.sweep.execute`) and a parallel sweep's workers
(:mod:`llm_dvfs.sweep.worker`) run cells through these same functions; a worker has no run
directory (``CellContext.rd`` None) and returns the :class:`CellOutput` that the driver
(:mod:`llm_dvfs.sweep.parallel`) records, once.
"""
from __future__ import annotations

import logging
import math
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd

from llm_dvfs import errors
from llm_dvfs.control.clocks import ClockController, ClockSettleWarning, read_state
from llm_dvfs.schema import to_frame
from llm_dvfs.sweep.plan import Cell, ClockPoint, Plan, TaskEntry, check_busy
from llm_dvfs.sweep.rundir import RunDir, now_iso
from llm_dvfs.sweep.signals import raise_pending
import llm_dvfs.sweep.served as served  # not `from llm_dvfs.sweep import`: that is the package

# the executor's logger: these messages were always its (run.log and -v filters keep working)
log = logging.getLogger("llm_dvfs.sweep.execute")

#: tokens.parquet and power.parquet are rewritten at most this often during a run (s); the
#: requests table after every cell. Every cell's own files are written when it finishes.
CONSOLIDATE_LARGE_S = 30.0


def _features(task_entry: TaskEntry, tokenizer: Any, ner: str) -> pd.DataFrame:
    """Input features of a task's prompts (once per model × task: the token features need the
    model's tokenizer; clock points share them)."""
    from llm_dvfs.workload.features import compute_features

    df = compute_features([s.prompt for s in task_entry.samples], tokenizer,
                          ner=None if ner == "off" else ner)
    return df.reset_index(drop=True)


class Progress:
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


@dataclass
class CellContext:
    """What the cells of one model share while they run: the plan, the run directory and its
    manifest, the loaded model's runner, the power monitor, the clock controller and the bars.

    A worker of a parallel sweep (sweep/worker.py) has no run directory (``rd`` None): it only
    measures, into its own ``manifest`` scratch dict, and the driver records what it returns."""

    plan: Plan
    rd: Optional[RunDir]
    manifest: dict[str, Any]
    progress: Progress
    mon: Any = None                          # PowerMonitor, or None without a GPU
    ctl: Optional[ClockController] = None    # only in sweep mode
    runner: Any = None                       # the current model's Runner
    loaded: Any = None                       # the current model (LoadedModel)

    def save_manifest(self) -> None:
        if self.rd is not None:
            self.rd.write_manifest(self.manifest)


@dataclass
class CellOutput:
    """What measuring one cell gives (:func:`measure_cell`), before anything is written: its
    tables, its marker info and the notes for the manifest. A worker returns it to the driver,
    which alone records it (:func:`record_cell`), once."""

    tables: dict[str, pd.DataFrame]
    info: dict[str, Any]
    notes: list[str]


def free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch
        torch.cuda.empty_cache()


def load_for_cells(ctx: CellContext, model: str) -> tuple[Any, Any]:
    from llm_dvfs.workload.models import load_model
    from llm_dvfs.workload.runner import GenerationSettings, Runner

    plan, manifest = ctx.plan, ctx.manifest
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
    ctx.save_manifest()
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, fixed_output_length=cfg.fixed_output_length,
                                  decoding=cfg.decoding, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=cfg.seed, stop_sequences=cfg.stop_sequences,
                                  apply_chat_template=cfg.apply_chat_template)
    runner = Runner(loaded, ctx.mon, settings, gpu_name=plan.gpu.name if plan.gpu is not None else None)
    return loaded, runner


def enter_clock_point(ctx: CellContext, cp: ClockPoint, first_cell: Cell, lock: Any) -> tuple[dict[str, Any], float]:
    """After ``cp`` was set (``lock``: the controller's LockResult, None when nothing was
    changed): the warm-up on ``first_cell``'s task, the settle check and the idle baseline.
    Appends the clock point's record to ``manifest["clock_point_runs"]`` and returns it with the
    idle power (W, NaN when not measured)."""
    plan, manifest, mon = ctx.plan, ctx.manifest, ctx.mon
    cfg = plan.config
    # other processes may have started since the plan was made
    notes: list[str] = []
    check_busy(plan.gpu, cfg.on_busy_gpu, notes)
    # warm-up + settle check: the first task's prompts at the first batch size
    first = plan.task_entry(first_cell.task)
    prompts = [s.prompt for s in first.samples]
    info: dict[str, Any] = {"model": first_cell.model, "clock": cp.label, **cp.requested_row(),
                            "started_at": now_iso(), "notes": notes}
    if lock is not None:
        info["lock"] = {"settled": bool(lock.settled), "waited_s": lock.waited_s,
                        "observed_sm_mhz": lock.observed_sm_mhz, "observed_mem_mhz": lock.observed_mem_mhz,
                        "reasons": list(lock.reasons), "mem_method": lock.mem_method}
    w = mon.begin_window("warmup") if mon is not None else None
    n_warm = max(cfg.warmup, 1 if lock is not None else 0)
    warm_s = (ctx.runner.warmup(prompts, first_cell.batch_size or 1, n_warm, ctx.runner.stop_strings(first.task))
              if ctx.runner is not None else served.warmup_endpoint(cfg, first_cell.model, first, n_warm))
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
    ctx.save_manifest()
    return info, idle_w


def task_features(ctx: CellContext, cell: Cell, entry: TaskEntry, feats: dict[str, pd.DataFrame]) -> None:
    """``feats[cell.task]``: the input features of the cell's task, computed once per model ×
    task (``feats`` is the current model's cache); recorded in ``manifest["features"]``."""
    if cell.task in feats:
        return
    t0 = time.monotonic()
    feats[cell.task] = _features(entry, ctx.loaded.tokenizer if ctx.loaded is not None else None, ctx.plan.config.ner)
    ctx.manifest.setdefault("features", {})[f"{cell.model}|{cell.task}"] = {
        "ner_estimator": feats[cell.task].attrs.get("ner_estimator"),
        "tokenizer": str(feats[cell.task].attrs.get("tokenizer", "")),
        "columns": [c for c in feats[cell.task].columns if c.startswith("feat_")],
        "seconds": round(time.monotonic() - t0, 3)}


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


def measure_cell(ctx: CellContext, cell: Cell, entry: TaskEntry, feats: pd.DataFrame, idle_w: float) -> CellOutput:
    """Measure one lock-step cell (``generate`` engine) on the context's model, monitor and
    clocks; writes nothing. Raises what the runner raises (KeyboardInterrupt included)."""
    plan, mon, progress = ctx.plan, ctx.mon, ctx.progress
    cfg = plan.config
    t0 = time.monotonic()
    bar = progress.cell(len(entry.samples), f"{cell.model} {cell.task} {cell.clock.label} bs{cell.batch_size}")
    context = {"task": cell.task, **cell.clock.requested_row(), "idle_power_w": idle_w, "engine": "generate"}
    gpus = plan.measured_gpus
    # a model over several GPUs: the rows' energy is the sum over them; this window keeps each one's
    cw = mon.begin_window("cell", sync=False) if mon is not None and len(gpus) > 1 else None
    try:
        rows = ctx.runner.run(entry.task, entry.samples, batch_size=cell.batch_size, cell_id=cell.cell_id,
                              context=context, features=feats, warmup=cfg.warmup, repeat=cell.repeat,
                              progress=bar, on_batch=progress.advance)
    finally:
        if bar is not None:
            bar.close()
        if cw is not None:
            cw.end()
    requests = to_frame("requests", rows.requests)
    # where it ran: this host, the measured GPU(s) (a parallel sweep's rows come from many)
    requests["host"] = socket.gethostname()
    requests["gpu_uuid"] = ",".join(g.uuid for g in gpus) if gpus else None
    tokens = to_frame("tokens", rows.tokens)
    if mon is not None and math.isfinite(rows.t_start_s):
        tr = mon.trace(rows.t_start_s, rows.t_end_s)
        power = to_frame("power", [{"cell_id": cell.cell_id, "t_s": t, "device": d, "power_w": p, "source": s}
                                   for t, d, p, s in tr[["t_s", "device", "power_w", "source"]].itertuples(index=False)])
    else:
        power = to_frame("power", [])
    notes: list[str] = []
    held = _clock_not_held(cell.clock, requests, cfg.settle_tolerance_mhz)
    if held:
        rows.warnings.append(held)
        notes.append(f"{cell.cell_id}: {held}")
    info = {"finished_at": now_iso(), "wall_s": time.monotonic() - t0, "n_requests": len(requests),
            "warnings": rows.warnings, "attribution": rows.attribution}
    if cw is not None:
        m = cw.measurement()
        by = {g.uuid: m.devices.get(g.index) for g in gpus}  # the monitor's devices: these GPUs' indices
        info["energy_j_by_gpu"] = {u: d.energy_j if d is not None else None for u, d in by.items()}
        info["energy_j_counter_by_gpu"] = {u: d.energy_j_counter if d is not None else None for u, d in by.items()}
        info["energy_j"] = m.energy_j
    return CellOutput({"requests": requests, "tokens": tokens, "power": power}, info, notes)


def record_cell(plan: Plan, rd: RunDir, manifest: dict[str, Any], cell: Cell, out: CellOutput,
                where: str = "") -> None:
    """Write a measured cell into the run directory (its part files, then its marker), rebuild
    the run tables and count it in the manifest. Only the process that owns the run directory
    calls this (the single-GPU loop, or the parallel driver): a cell is recorded once."""
    manifest["notes"] = list(dict.fromkeys(list(manifest.get("notes", [])) + out.notes))
    for wmsg in out.info.get("warnings", []):
        log.warning("%s: %s", cell.cell_id, wmsg)
    rd.write_cell(cell, out.tables, out.info)
    # requests after every cell; the large tables at most every CONSOLIDATE_LARGE_S (and at the
    # end): until then they are complete in cells/, which is what a resume reads
    big = time.monotonic() - rd.last_full_consolidation >= CONSOLIDATE_LARGE_S
    rd.consolidate(plan.cells, RunDir.TABLES if big else ("requests",))
    if big:
        rd.last_full_consolidation = time.monotonic()
    manifest["cells_done"] = manifest.get("cells_done", 0) + 1
    rd.write_manifest(manifest)
    requests = out.tables["requests"]
    e = requests["energy_j"].dropna()  # null = not measured (no GPU)
    log.info("cell %d/%d done%s: %s (%d requests, %s, %.1f s)", cell.index + 1, len(plan.cells), where,
             cell.cell_id, len(requests), f"median energy {float(e.median()):.3g} J" if len(e) else "no energy",
             out.info.get("wall_s", math.nan))


__all__ = ["CONSOLIDATE_LARGE_S", "CellContext", "CellOutput", "Progress", "load_for_cells", "free_memory",
           "enter_clock_point", "task_features", "measure_cell", "record_cell"]
