"""The scheduler of a parallel sweep: the plan's cells over many GPUs, one worker each.

:func:`run_parallel` is called by :func:`llm_dvfs.sweep.execute.execute` in place of its
single-GPU loop (``--gpus 0,1,2,3|all``, ``--ray``), inside the same run directory, manifest,
consolidation and resume. One abstraction, two backends that start the workers
(:mod:`llm_dvfs.sweep.worker`) and carry cells to them and results back:

* :class:`LocalBackend`: one process per GPU (stdlib ``multiprocessing``, spawn context, a pipe
  each); * :class:`llm_dvfs.sweep.ray_backend.RayBackend`: one Ray actor per GPU on every node.

The scheduler

* hands a cell to a free worker, preferring a cell of the model and clock point the worker
  holds, then of its model (a model is loaded once per worker and kept while it has cells of it),
  and only cells of the worker's GPU model (a sweep over several GPU models);
* records each cell once: the driver alone writes a cell's part files, from the tables a worker
  returns (:func:`~llm_dvfs.sweep.cells.record_cell`); a result for a cell already recorded is
  dropped with a warning;
* re-queues the cell of a worker that died (SIGKILL, a lost node) for the others; the dead
  worker's clocks are restored by its own watchdog. With no worker left the run fails
  (resumable);
* shows one progress bar over all workers (requests, with tqdm's ETA), logs each cell with the
  run's ETA, and logs a utilisation line per GPU (cells, busy seconds, share of the wall time)
  every :data:`UTILISATION_LOG_S` and at the end.

Ctrl-C (KeyboardInterrupt) or any error stops every worker (their controllers and watchdogs
restore every GPU) and is re-raised; finished cells are on disk and ``--resume`` runs the rest.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

from llm_dvfs import errors
from llm_dvfs.sweep.cells import Progress, record_cell
from llm_dvfs.sweep.plan import Cell, Plan
from llm_dvfs.sweep.rundir import RunDir, now_iso

log = logging.getLogger("llm_dvfs.sweep.parallel")

#: How often (s) the per-GPU utilisation line is logged during a run (and once at the end).
UTILISATION_LOG_S = 60.0
#: How long (s) stopping waits for a worker to end by itself before it is terminated.
STOP_GRACE_S = 20.0


class Backend(Protocol):
    """What the scheduler needs of a backend. Events are tuples: ``("ready", wid, describe)``,
    ``("error", wid, text)`` (could not start), ``("done", wid, result)``, ``("failed", wid,
    index, text)`` (the cell raised), ``("dead", wid, why)`` (the worker is gone)."""

    def start(self) -> list[int]: ...
    def submit(self, wid: int, index: int) -> None: ...
    def events(self, timeout_s: float) -> list[tuple[Any, ...]]: ...
    def stop(self, graceful: bool) -> None: ...


@dataclass
class _WorkerState:
    """The driver's view of one worker."""

    wid: int
    ready: bool = False
    alive: bool = True
    describe: dict[str, Any] = field(default_factory=dict)
    model: Optional[str] = None
    clock: Any = None
    cell: Optional[int] = None          # the cell it is measuring
    cells_done: int = 0
    busy_s: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def gpu_model(self) -> Optional[str]:
        names = self.describe.get("gpu_names") or []
        return names[0] if names else None

    @property
    def label(self) -> str:
        d = self.describe
        idx = "+".join(str(i) for i in d.get("gpu_indices", [])) or "?"
        return f"worker {self.wid} (GPU {idx} on {d.get('host', '?')})"


# ============================================================================================
# the local backend: one process per GPU
# ============================================================================================
class LocalBackend:
    """Worker processes on this host (``multiprocessing`` spawn context: a fresh interpreter,
    so nothing CUDA or NVML of the driver is inherited, and the pinning is set before torch is
    imported), a duplex pipe each. A worker's death is seen on its process sentinel."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, Any] = {}
        self.conns: dict[int, Any] = {}

    def start(self) -> list[int]:
        from llm_dvfs.sweep.worker import pin_env, process_main

        # the CPU shared fairly: N workers each with torch's default of one thread per core
        # oversubscribe it (spinning threads; a CPU-run cell was 10x slower); as Ray does for
        # its actors, each worker gets its share unless the user chose OMP_NUM_THREADS
        threads = {} if "OMP_NUM_THREADS" in os.environ else {
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // max(1, len(self.plan.workers))))}
        for wid, spec in enumerate(self.plan.workers):
            parent, child = self.ctx.Pipe(duplex=True)
            env = {**pin_env([g.uuid for g in spec.gpus]), **threads}
            p = self.ctx.Process(target=process_main, name=f"llm_dvfs-worker-{wid}",
                                 args=(child, self.plan, wid, env, [g.index for g in spec.gpus]), daemon=True)
            p.start()
            child.close()
            self.procs[wid], self.conns[wid] = p, parent
        return list(self.procs)

    def submit(self, wid: int, index: int) -> None:
        self.conns[wid].send(index)

    def events(self, timeout_s: float) -> list[tuple[Any, ...]]:
        from multiprocessing.connection import wait

        waitables = {c: ("conn", w) for w, c in self.conns.items()}
        waitables.update({self.procs[w].sentinel: ("proc", w) for w in self.conns})
        out: list[tuple[Any, ...]] = []
        dead: set[int] = set()
        for obj in wait(list(waitables), timeout_s):
            kind, w = waitables[obj]
            if kind == "conn":
                try:
                    while self.conns[w].poll():  # everything it sent before dying counts
                        out.append(self.conns[w].recv())
                except (EOFError, OSError):
                    dead.add(w)
            else:
                dead.add(w)
        for w in sorted(dead):
            p = self.procs[w]
            p.join(1.0)
            out.append(("dead", w, f"exit code {p.exitcode}" + (" (killed by signal "
                                                                  f"{-p.exitcode})" if (p.exitcode or 0) < 0 else "")))
            self.conns.pop(w).close()
        return out

    def stop(self, graceful: bool) -> None:
        for w, c in list(self.conns.items()):
            try:
                if graceful:
                    c.send(None)
                else:  # Ctrl-C: don't wait for the cell; SIGTERM, the controller restores
                    self.procs[w].terminate()
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        for w, p in self.procs.items():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                log.warning("worker %d did not stop; terminating it (its watchdog restores its GPU)", w)
                p.terminate()
                p.join(5.0)
                if p.is_alive():
                    p.kill()
                    p.join(5.0)
        for c in self.conns.values():
            c.close()
        self.conns.clear()


def make_backend(plan: Plan) -> Backend:
    if plan.backend == "ray":
        from llm_dvfs.sweep.ray_backend import RayBackend
        return RayBackend(plan)
    return LocalBackend(plan)


# ============================================================================================
# the scheduler
# ============================================================================================
def _choose(w: _WorkerState, queue: list[Cell], taken_models: set[str]) -> Optional[Cell]:
    """The next cell for worker ``w``: its model and clock point, else its model, else a model
    no other worker holds, else the first; only cells of its GPU model."""
    fits = [c for c in queue if c.gpu_model is None or c.gpu_model == w.gpu_model]
    if not fits:
        return None
    for pick in ((c for c in fits if c.model == w.model and c.clock == w.clock),
                 (c for c in fits if c.model == w.model),
                 (c for c in fits if c.model not in taken_models)):
        c = next(pick, None)
        if c is not None:
            return c
    return fits[0]


def _merge_manifest(manifest: dict[str, Any], add: dict[str, Any]) -> None:
    """What a worker added to its scratch manifest, into the run's."""
    for key in ("models", "features"):
        if add.get(key):
            manifest.setdefault(key, {}).update(add[key])
    if add.get("notes"):
        manifest["notes"] = list(dict.fromkeys(list(manifest.get("notes", [])) + list(add["notes"])))
    if add.get("clock_point_runs"):
        manifest.setdefault("clock_point_runs", []).extend(add["clock_point_runs"])


def _utilisation(workers: dict[int, _WorkerState], t0: float) -> None:
    wall = max(time.monotonic() - t0, 1e-9)
    for w in workers.values():
        if not w.describe:
            continue
        busy = w.busy_s + (time.monotonic() - w.started if w.cell is not None else 0.0)
        log.info("%s %s: %d cells, busy %.1f s of %.1f s (%.0f %%)%s", w.label,
                 ",".join(w.describe.get("gpu_uuids", [])), w.cells_done, busy, wall, 100 * busy / wall,
                 "" if w.alive else ", lost")


def run_parallel(plan: Plan, rd: RunDir, manifest: dict[str, Any], pending: list[Cell], progress: Progress) -> int:
    """Run ``pending`` on the plan's workers (module docstring); returns the cells run here.

    Raises:
        KeyboardInterrupt: after every worker is stopped (GPUs restored).
        LlmDvfsError: a cell failed on a worker (the run is marked failed; resumable), or no
            worker is left (every one failed to start or died).
    """
    if not pending:
        return 0
    queue = list(pending)
    n_req = {c.index: len(plan.task_entry(c.task).samples) for c in pending}
    total_req, done_req = sum(n_req.values()), 0
    recorded: set[int] = set()
    backend = make_backend(plan)
    t0 = time.monotonic()
    last_util = t0
    workers: dict[int, _WorkerState] = {}
    manifest.setdefault("workers", [])  # every invocation's (resumes add theirs)
    graceful = False
    try:
        for wid in backend.start():
            workers[wid] = _WorkerState(wid)
        log.info("parallel sweep: %d cells on %d workers (%s backend)", len(queue), len(workers), plan.backend)
        while queue or any(w.cell is not None for w in workers.values()):
            for ev in backend.events(0.5):
                done_req += _handle(ev, plan, rd, manifest, workers, queue, recorded, n_req, progress)
                if ev[0] == "done" and done_req:
                    el = time.monotonic() - t0
                    log.info("progress: %d of %d requests, %.0f s elapsed, ETA %.0f s", done_req, total_req, el,
                             el / done_req * (total_req - done_req))
            free = [w for w in workers.values() if w.alive and w.ready and w.cell is None]
            for w in free:
                taken = {o.model for o in workers.values() if o.alive and o is not w and o.model}
                c = _choose(w, queue, taken)
                if c is None:
                    continue
                queue.remove(c)
                w.cell, w.started = c.index, time.monotonic()
                w.model, w.clock = c.model, c.clock
                log.debug("cell %d started on %s: %s", c.index + 1, w.label, c.cell_id)
                backend.submit(w.wid, c.index)
            alive = [w for w in workers.values() if w.alive]
            if not alive:
                raise errors.LlmDvfsError(f"every worker of the parallel sweep failed or died; {len(queue)} "
                                          "cell(s) not run (see run.log); --resume runs them")
            if queue and all(w.ready and w.cell is None for w in alive) and \
                    not any(_choose(w, queue, set()) for w in alive):
                raise errors.LlmDvfsError(f"{len(queue)} cell(s) need a GPU model no worker has left: "
                                          f"{', '.join(sorted({str(c.gpu_model) for c in queue}))}")
            if time.monotonic() - last_util >= UTILISATION_LOG_S:
                _utilisation(workers, t0)
                last_util = time.monotonic()
        graceful = True
    finally:
        backend.stop(graceful)
        _utilisation(workers, t0)
        rd.write_manifest(manifest)
    return len(recorded)


def _handle(ev: tuple[Any, ...], plan: Plan, rd: RunDir, manifest: dict[str, Any], workers: dict[int, _WorkerState],
            queue: list[Cell], recorded: set[int], n_req: dict[int, int], progress: Progress) -> int:
    """Apply one backend event; returns the requests it finished (for the ETA)."""
    kind, wid = ev[0], ev[1]
    w = workers[wid]
    if kind == "ready":
        w.ready, w.describe = True, dict(ev[2])
        manifest["workers"].append({**w.describe, "started_at": now_iso()})
        rd.write_manifest(manifest)
        log.info("%s ready: %s, pid %s", w.label, ", ".join(w.describe.get("gpu_uuids", [])), w.describe.get("pid"))
        return 0
    if kind == "error":
        w.alive = False
        log.warning("worker %d could not start; going on without it: %s", wid, ev[2])
        return 0
    if kind == "dead":
        was = w.cell
        w.alive, w.cell = False, None
        if was is not None:
            queue.insert(0, plan.cells[was])  # another worker runs it
            log.warning("%s died during cell %s (%s); the cell is re-queued; its GPU is restored by its "
                        "watchdog", w.label, plan.cells[was].cell_id, ev[2])
        elif w.ready or w.describe:
            log.warning("%s ended (%s)", w.label, ev[2])
        for x in manifest.get("workers", []):
            if x.get("worker") == wid:
                x["lost_at"], x["lost"] = now_iso(), ev[2]
        return 0
    if kind == "failed":
        index, text = (ev[2] if ev[2] >= 0 else w.cell), ev[3]
        w.cell = None
        raise errors.LlmDvfsError(f"cell {plan.cells[index].cell_id} failed on {w.label}: {text}")
    # done
    res = ev[2]
    index = int(res["index"])
    cell = plan.cells[index]
    w.cell = None
    w.cells_done += 1
    w.busy_s += float(res.get("busy_s", 0.0))
    for level, msg in res.get("logs", []):
        log.log(level, "[%s] %s", w.label, msg)
    if index in recorded or rd.is_done(cell):  # never record twice
        log.warning("cell %s came back twice (from %s); the second result is dropped", cell.cell_id, w.label)
        return 0
    _merge_manifest(manifest, res.get("manifest", {}))
    out = res["output"]
    out.info["worker"] = dict(w.describe)
    record_cell(plan, rd, manifest, cell, out, where=f" on {w.label}")
    recorded.add(index)
    progress.advance(n_req.get(index, 0))
    return n_req.get(index, 0)


__all__ = ["Backend", "LocalBackend", "make_backend", "run_parallel", "UTILISATION_LOG_S", "STOP_GRACE_S"]
