"""The sweep: models × clock points × tasks × batch sizes × repeats → one run directory.

This module knows the grid and runs it; :mod:`llm_dvfs.sweep_config` reads the settings,
:mod:`llm_dvfs.rundir` knows the files, :mod:`llm_dvfs.runner` knows transformers and
:mod:`llm_dvfs.clocks` changes clocks. Three steps:

1. :func:`load_config` / :class:`SweepConfig` (in :mod:`llm_dvfs.sweep_config`, re-exported
   here) — the grid from a TOML/YAML/JSON file and/or flags; unknown keys are rejected with a
   did-you-mean.
2. :func:`prepare` → :class:`Plan` — *every* check that can fail on user input runs here, before
   any GPU work and before anything is written: model specs, tasks and their data (an empty
   dataset is an error), clock points against the GPU's supported table, power limits against
   its range, the output directory, other processes on the GPU. Raises
   :class:`~llm_dvfs.errors.ConfigError` (or :class:`~llm_dvfs.errors.DataNotFound`,
   :class:`GpuBusy`).
3. :func:`execute` — runs the plan: each model is loaded once; inside it the clock points; after
   each clock change a warm-up with a settle check of the observed clock, then an idle-power
   baseline; inside those the cells (task × batch size × repeat). Every finished cell is written
   at once (atomic renames, :class:`~llm_dvfs.rundir.RunDir`) and the run tables are rebuilt from
   the finished cells (requests after every cell, tokens and power at least every
   :data:`CONSOLIDATE_LARGE_S` and at the end), so an interrupted sweep loses at most the cell in
   progress and ``--resume`` continues where it stopped.

The run directory's layout is described in :mod:`llm_dvfs.rundir` and docs/sweep.md. The public
names of :mod:`llm_dvfs.sweep_config` and :mod:`llm_dvfs.rundir` are re-exported here, so
``from llm_dvfs.sweep import SweepConfig, RunDir, ...`` keeps working.

Safety: without ``allow_clock_changes`` the sweep never changes a clock. If clock points are
requested without it, the run is in *observe mode*: one clock point, the GPU as found, and the
notes say so. All changes go through :class:`~llm_dvfs.clocks.ClockController`, whose watchdog
restores the GPU when this process ends in any way.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from . import errors
from .errors import ConfigError, DataNotFound
from .results import to_frame
# moved out of this module; re-exported so that ``llm_dvfs.sweep.X`` keeps working
from .rundir import (FORMAT_VERSION, RunDir, _json_default, _now_iso, _versions,  # noqa: F401
                     atomic_write_bytes, atomic_write_with, git_revision, write_json)
from .sweep_config import (DEFAULT_CPU_MODEL, DEFAULT_GPU_MODEL, DTYPES, EMBEDDED_DEFAULT_CPU,  # noqa: F401
                           EMBEDDED_DEFAULT_GPU, FIELD_HELP, NER_MODES, ON_BUSY, RESUME_OVERRIDABLE,
                           SweepConfig, _resolve_device, config_from_mapping, did_you_mean,
                           embedded_default, load_config, load_config_file, parse_clock_spec,
                           resume_config)

log = logging.getLogger("llm_dvfs.sweep")

#: tokens.parquet and power.parquet are rewritten at most this often during a run (s); the
#: requests table after every cell. Every cell's own files are written when it finishes.
CONSOLIDATE_LARGE_S = 30.0


class GpuBusy(errors.LlmDvfsError, RuntimeError):
    """Other processes use the GPU (``on_busy_gpu = "refuse"``): their work would be counted
    as this run's energy."""


# ============================================================================================
# the plan
# ============================================================================================
@dataclass(frozen=True)
class ClockPoint:
    """One clock setting. None = as found (not changed). MHz and W."""

    sm_mhz: Optional[int] = None
    mem_mhz: Optional[int] = None
    power_limit_w: Optional[float] = None

    @property
    def as_found(self) -> bool:
        return self.sm_mhz is None and self.mem_mhz is None and self.power_limit_w is None

    @property
    def label(self) -> str:
        """``sm1500``, ``sm1500-mem1593``, ``pl500W``, ... or ``as-found``."""
        parts = []
        if self.sm_mhz is not None:
            parts.append(f"sm{self.sm_mhz}")
        if self.mem_mhz is not None:
            parts.append(f"mem{self.mem_mhz}")
        if self.power_limit_w is not None:
            parts.append(f"pl{self.power_limit_w:g}W")
        return "-".join(parts) or "as-found"

    def requested_row(self) -> dict[str, float]:
        """The ``*_requested`` columns (NaN = as found)."""
        f = lambda v: math.nan if v is None else float(v)  # noqa: E731
        return {"sm_mhz_requested": f(self.sm_mhz), "mem_mhz_requested": f(self.mem_mhz),
                "power_limit_w_requested": f(self.power_limit_w)}


@dataclass(frozen=True)
class Cell:
    """One model × task × clock point × batch size × repeat: a unit of work and of writing."""

    index: int
    model: str
    task: str
    clock: ClockPoint
    batch_size: int
    repeat: int

    @property
    def cell_id(self) -> str:
        return f"{self.model}|{self.task}|{self.clock.label}|bs{self.batch_size}|r{self.repeat}"

    @property
    def key(self) -> str:
        """File-name-safe, stable key of the cell (hash of ``cell_id``)."""
        return hashlib.sha1(self.cell_id.encode()).hexdigest()[:16]


@dataclass
class TaskEntry:
    """A task of the plan with its samples (loaded once, shared by every model and clock)."""

    name: str          # unique label in this run (the task's name, suffixed if repeated)
    spec: Any
    task: Any
    samples: list[Any]


@dataclass
class Plan:
    """A validated sweep, ready for :func:`execute`."""

    config: SweepConfig
    out: Path
    mode: str                          # "sweep" (clocks changed) | "observe"
    device: str                        # torch device of the models
    gpu: Any                           # DeviceInfo of the measured/controlled GPU, or None
    gpus: list[Any]                    # all visible DeviceInfo
    models: list[str]
    tasks: list[TaskEntry]
    clock_points: list[ClockPoint]
    cells: list[Cell]
    notes: list[str] = field(default_factory=list)
    resume: bool = False

    @property
    def energy_available(self) -> bool:
        return self.gpu is not None

    def describe(self) -> str:
        """A few lines for the terminal: what will run."""
        n_req = sum(len(self.task_entry(c.task).samples) for c in self.cells)
        lines = [
            f"run directory: {self.out}",
            f"mode: {self.mode}" + (" (clocks as found; nothing is changed)" if self.mode == "observe" else ""),
            f"models: {', '.join(self.models)} on {self.device}",
            f"tasks: {', '.join(f'{t.name} ({len(t.samples)} samples)' for t in self.tasks)}",
            f"clock points: {', '.join(c.label for c in self.clock_points)}",
            f"batch sizes: {', '.join(map(str, self.config.batch_sizes))}; repeats: {self.config.repeats}",
            f"cells: {len(self.cells)} ({n_req} measured requests)",
            "energy: " + (f"measured on GPU {self.gpu.index} ({self.gpu.name})" if self.gpu is not None
                          else "unavailable (no NVIDIA driver/GPU: time only)"),
        ]
        return "\n".join(lines)

    def task_entry(self, name: str) -> TaskEntry:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


def _gpus() -> tuple[list[Any], Optional[str]]:
    from .devices import devices, last_error

    try:
        devs = devices()
    except errors.LlmDvfsError as e:
        return [], f"{type(e).__name__}: {e}"
    return devs, (None if devs else (last_error() or "no NVIDIA GPU visible"))


def _check_model(spec: str) -> None:
    """Cheap validity check of a model spec (no weights are loaded)."""
    from .models import ModelSpec

    ms = ModelSpec.parse(spec)
    if ms.kind == "hub":
        try:
            from transformers import AutoConfig
            AutoConfig.from_pretrained(ms.target)
        except (OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataNotFound(
                f"model {spec!r} is not an arch: name, not a local directory, and not available "
                f"from the Hugging Face hub or its cache ({msg}). Use arch:NAME for random weights "
                "(python -c 'import llm_dvfs.models as m; print(m.list_arch())'), a local directory, "
                f"or download it first (`hf download {ms.target}`)") from None


def _tasks(cfg: SweepConfig) -> list[TaskEntry]:
    from .tasks import get_task

    entries: list[TaskEntry] = []
    seen: dict[str, int] = {}
    for spec in cfg.tasks:
        task = get_task(spec)
        samples = task.samples(cfg.samples, cfg.seed)
        if not samples:
            raise ConfigError(f"task {spec!r} has no samples (empty dataset)")
        name = task.name
        if name in seen:  # e.g. two local files of the same task: keep cell ids unique
            seen[name] += 1
            name = f"{name}#{seen[name]}"
        else:
            seen[name] = 1
        entries.append(TaskEntry(name, spec, task, samples))
    return entries


def resolve_clocks(spec: Any, supported: Sequence[int], what: str) -> Optional[list[int]]:
    """Clock values (MHz, descending) of ``spec`` (see :func:`parse_clock_spec`) on a GPU
    supporting ``supported``; None for as found.

    Raises:
        ConfigError: a value (or a whole range) is not supported; names the nearest ones.
    """
    from .clocks import nearest_supported

    if spec is None:
        return None
    sup = sorted(set(int(v) for v in supported), reverse=True)
    if not sup:
        raise ConfigError(f"{what}: the GPU reports no supported clocks, so clock points cannot be set")
    if spec == "all":
        return sup
    if isinstance(spec, dict):
        lo, hi, step = spec["min"], spec["max"], spec["step"]
        if step is None:
            vals = [v for v in sup if lo <= v <= hi]
        else:
            vals = list(range(lo, hi + 1, step))
            bad = [v for v in vals if v not in sup]
            if bad:
                raise ConfigError(f"{what}: {lo}:{hi}:{step} includes unsupported clock(s) "
                                  f"{', '.join(map(str, bad[:5]))}{'...' if len(bad) > 5 else ''} MHz; nearest "
                                  f"supported to {bad[0]}: {', '.join(map(str, nearest_supported(bad[0], sup)))} MHz "
                                  f"(supported {sup[-1]}-{sup[0]} MHz)")
        if not vals:
            raise ConfigError(f"{what}: no supported clock in {lo}-{hi} MHz (supported {sup[-1]}-{sup[0]} MHz)")
        return sorted(vals, reverse=True)
    for v in spec:
        if v not in sup:
            near = ", ".join(map(str, nearest_supported(v, sup)))
            raise ConfigError(f"{what}: {v} MHz is not supported by the GPU; nearest supported: {near} MHz "
                              f"(supported {sup[-1]}-{sup[0]} MHz, {len(sup)} values)")
    return list(spec)


def _clock_points(cfg: SweepConfig, gpu: Any, notes: list[str]) -> tuple[str, list[ClockPoint]]:
    requested = any(v is not None for v in (cfg.clocks, cfg.mem_clocks, cfg.power_limits))
    if not requested:
        return "observe", [ClockPoint()]
    if gpu is None:
        if cfg.allow_clock_changes:
            raise ConfigError("clock points were requested with --allow-clock-changes, but there is no "
                              "NVIDIA GPU to change clocks on (no driver, or --gpu none)")
        notes.append("clock points were requested but there is no GPU to change them on: running in "
                     "observe mode (one point, as found)")
        return "observe", [ClockPoint()]
    table = {int(k): list(v) for k, v in (gpu.supported_clocks_mhz or {}).items()}
    mems = resolve_clocks(cfg.mem_clocks, list(table), "mem_clocks") if cfg.mem_clocks is not None else [None]
    points: list[ClockPoint] = []
    for mem in mems:
        at = table.get(mem if mem is not None else (max(table) if table else -1), [])
        sms = resolve_clocks(cfg.clocks, at, f"clocks (at memory clock {mem or (max(table) if table else '?')} MHz)") \
            if cfg.clocks is not None else [None]
        for sm in sms:
            for pl in (cfg.power_limits or [None]):
                points.append(ClockPoint(sm, mem, pl))
    if cfg.power_limits:
        lo, hi = gpu.power_limit_min_w, gpu.power_limit_max_w
        if lo is None or hi is None:
            raise ConfigError(f"power_limits: GPU {gpu.index} ({gpu.name}) reports no power-limit range")
        for pl in cfg.power_limits:
            if not lo <= pl <= hi:
                raise ConfigError(f"power_limits: {pl:g} W is outside the range {lo:g}-{hi:g} W of GPU "
                                  f"{gpu.index} ({gpu.name})")
    if not cfg.allow_clock_changes:
        from .clocks import clock_changes_allowed
        if not clock_changes_allowed(False):
            notes.append(
                f"{len(points)} clock point(s) were requested ({', '.join(p.label for p in points[:6])}"
                f"{', ...' if len(points) > 6 else ''}) but clock changes are not allowed: running in "
                "OBSERVE MODE (one point, the GPU as found, nothing changed). Add --allow-clock-changes "
                "(needs root) to sweep them.")
            return "observe", [ClockPoint()]
    return "sweep", points


def busy_processes(nvml_index: int) -> list[tuple[int, int]]:
    """Other processes' (pid, used GPU memory bytes) on the GPU with this NVML index."""
    from . import _core

    with _core.Session() as s:
        procs = s.compute_processes(int(nvml_index))
    me = os.getpid()
    return [(int(p), int(m)) for p, m in procs if int(p) != me]


def check_busy(gpu: Any, policy: str, notes: Optional[list[str]] = None) -> list[tuple[int, int]]:
    """Warn (log + note) or raise :class:`GpuBusy` when other processes use ``gpu``."""
    if gpu is None:
        return []
    try:
        procs = busy_processes(gpu.nvml_index)
    except errors.LlmDvfsError as e:
        log.debug("could not list GPU processes: %s", e)
        return []
    if procs:
        desc = ", ".join(f"pid {p} ({m / 2**20:.0f} MiB)" for p, m in procs[:8])
        msg = (f"{len(procs)} other process(es) use GPU {gpu.index} ({desc}); their work is counted in "
               "the measured energy")
        if policy == "refuse":
            raise GpuBusy(msg + ". Stop them, pick another GPU (--gpu), or pass --on-busy-gpu warn.")
        log.warning("%s", msg)
        if notes is not None:
            notes.append(msg)
    return procs


def _check_out_dir(out: Path, resume: bool) -> None:
    if resume:
        if not (out / "manifest.json").is_file():
            raise ConfigError(f"--resume {str(out)!r}: no manifest.json there; not a run directory")
        probe_dir = out
    else:
        if out.exists():
            if not out.is_dir():
                raise ConfigError(f"output {str(out)!r} exists and is not a directory")
            if any(out.iterdir()):
                hint = " (it is a run directory: use --resume to continue it)" if (out / "manifest.json").exists() else ""
                raise ConfigError(f"output directory {str(out)!r} is not empty{hint}; choose a new one")
        probe_dir = out
        while not probe_dir.exists():
            if probe_dir.parent == probe_dir:
                break
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise ConfigError(f"output {str(out)!r} cannot be created: {str(probe_dir)!r} is not a directory")
    try:  # a real write test (os.access lies for root and on some network filesystems)
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".llm_dvfs-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ConfigError(f"output {str(out)!r} is not writable ({e.strerror}: {str(probe_dir)!r})") from None


def default_out_dir() -> Path:
    return Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def prepare(cfg: SweepConfig, *, resume: Optional[str | os.PathLike[str]] = None) -> Plan:
    """Validate ``cfg`` completely and build the :class:`Plan`. Touches no GPU state and writes
    nothing (it reads the GPU inventory and the task data).

    Raises:
        ConfigError: bad setting, unknown model or task, unsupported clock, power limit out of
            range, output not writable or not empty, empty dataset.
        DataNotFound: a model, tokenizer or dataset that is not available (says how to get it).
        GpuBusy: other processes use the GPU and ``on_busy_gpu == "refuse"``.
    """
    notes: list[str] = []
    # 1. output (cheap, and nothing is created here)
    out = Path(resume if resume is not None else (cfg.out or default_out_dir())).expanduser()
    _check_out_dir(out, resume is not None)
    from .clocks import clock_changes_allowed
    clock_changes_allowed(cfg.allow_clock_changes)  # a bad LLM_DVFS_ALLOW_CLOCK_CHANGES fails here
    # 2. device and GPU
    device = _resolve_device(cfg.device)
    gpus, why = _gpus()
    gpu = None
    if cfg.gpu == "none":
        pass
    elif cfg.gpu == "auto":
        idx = int(device.split(":")[1]) if device.startswith("cuda") else 0
        gpu = next((g for g in gpus if g.index == idx), None)
        if device.startswith("cuda") and gpu is None:
            notes.append(f"NVML does not see GPU {idx} ({why}); energy is unavailable")
    else:
        gpu = next((g for g in gpus if g.index == cfg.gpu), None)
        if gpu is None:
            raise ConfigError(f"gpu: GPU {cfg.gpu} is not visible ({len(gpus)} GPU(s) found"
                              + (f"; {why}" if why else "") + ")")
    if gpu is None and cfg.gpu != "none" and not device.startswith("cuda"):
        notes.append("no NVIDIA driver/GPU found" + (f" ({why})" if why else "") + ": running on the CPU, "
                     "energy is unavailable (energy_method 'none'); latency, tokens and features are measured. "
                     "Energy needs an NVIDIA GPU with its driver.")
    elif gpu is not None and not device.startswith("cuda"):
        notes.append(f"the model runs on the CPU but GPU {gpu.index} ({gpu.name}) is measured: its energy "
                     "does not include the CPU's work (use --gpu none to measure time only)")
    # 3. models
    models = cfg.models
    if models is None:
        models = [DEFAULT_GPU_MODEL if device.startswith("cuda") else DEFAULT_CPU_MODEL]
        notes.append(f"no models given: using the embedded default {models[0]} (random weights)")
    for m in models:
        _check_model(m)
    # 4. clock points (needs the GPU's table) and mode; a resumed run keeps its mode and device
    stored = RunDir(out).read_manifest() if resume is not None else {}
    stored_mode = stored.get("mode")
    if resume is not None:
        if stored.get("device") not in (None, device):
            raise ConfigError(f"the run in {str(out)!r} ran on {stored['device']}, but this resume would run on "
                              f"{device}: rows of both would be mixed in one table (check --device / "
                              "CUDA_VISIBLE_DEVICES)")
        was = stored.get("measured_gpu")
        was_name = next((g.get("name") for g in stored.get("gpus", []) if g.get("index") == was), None)
        if was_name and gpu is not None and gpu.name != was_name:
            notes.append(f"resumed on {gpu.name}; the run started on {was_name}")
    if stored_mode == "observe":
        mode, points = "observe", [ClockPoint()]
    else:
        mode, points = _clock_points(cfg, gpu, notes)
    # 5. tasks and their samples (an empty dataset is an error here, before any GPU work)
    tasks = _tasks(cfg)
    if cfg.ner == "nltk":
        _require_nltk()
    # 6. other processes on the GPU
    check_busy(gpu, cfg.on_busy_gpu, notes)
    # 7. the cells, in execution order
    cells: list[Cell] = []
    for m in models:
        for cp in points:
            for t in tasks:
                for bs in cfg.batch_sizes:
                    for r in range(cfg.repeats):
                        cells.append(Cell(len(cells), m, t.name, cp, bs, r))
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):  # pragma: no cover - models/batch sizes are de-duplicated
        raise ConfigError("duplicate cells in the grid")
    return Plan(config=cfg, out=out, mode=mode, device=device, gpu=gpu, gpus=gpus, models=list(models),
                tasks=tasks, clock_points=points, cells=cells, notes=notes, resume=resume is not None)


def _require_nltk() -> None:
    from .features import check_nltk_data

    try:
        check_nltk_data()
    except DataNotFound as e:
        raise DataNotFound(f"{e} (on the command line: --ner heuristic or --ner off)") from None


# ============================================================================================
# manifest
# ============================================================================================
def _serialisable_config(cfg: SweepConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict(), default=_json_default))


def new_manifest(plan: Plan, argv: Optional[Sequence[str]]) -> dict[str, Any]:
    gpu = plan.gpu
    return {
        "tool": "llm_dvfs.run",
        "format_version": FORMAT_VERSION,
        "package_version": _versions()["llm_dvfs"],
        "git_revision": git_revision(),
        "started_at": _now_iso(),
        "finished_at": None,
        "status": "running",
        "command": list(argv) if argv is not None else sys.argv,
        "host": socket.gethostname(),
        "versions": _versions(),
        "driver_version": gpu.driver_version if gpu is not None else None,
        "nvml_version": gpu.nvml_version if gpu is not None else None,
        "gpus": [g.to_dict() for g in plan.gpus],
        "measured_gpu": gpu.index if gpu is not None else None,
        "device": plan.device,
        "energy_available": plan.energy_available,
        "mode": plan.mode,
        "notes": list(plan.notes),
        "config": {
            **_serialisable_config(plan.config),
            # the resolved grid (also what llm_dvfs.report reads)
            "mode": plan.mode,
            "resolved_models": plan.models,
            "resolved_tasks": [t.name for t in plan.tasks],
            "clock_points": [dataclasses.asdict(c) | {"label": c.label} for c in plan.clock_points],
            "clocks_mhz": sorted({c.sm_mhz for c in plan.clock_points if c.sm_mhz is not None}, reverse=True),
        },
        "tasks": {t.name: {**_task_describe(t.task), "n_samples": len(t.samples)} for t in plan.tasks},
        "models": {},
        "cells_total": len(plan.cells),
        "cells_done": 0,
        "clock_point_runs": [],
        "resumes": [],
    }


def _task_describe(task: Any) -> dict[str, Any]:
    fn = getattr(task, "describe", None)
    try:
        return dict(fn()) if callable(fn) else {"task": getattr(task, "name", str(task))}
    except Exception:  # noqa: BLE001 - the manifest must not fail on a description
        return {"task": getattr(task, "name", str(task))}


# ============================================================================================
# execution
# ============================================================================================
@dataclass
class SweepResult:
    """What :func:`execute` returns."""

    out: Path
    status: str                      # complete | interrupted | failed
    cells_run: int
    cells_skipped: int
    requests: pd.DataFrame
    summary: Optional[pd.DataFrame]
    summary_text: str
    notes: list[str]


def _features(task_entry: TaskEntry, tokenizer: Any, ner: str) -> pd.DataFrame:
    """Input features of a task's prompts (once per model × task: the token features need the
    model's tokenizer; clock points share them)."""
    from .features import compute_features

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
        if self.sweep is not None:
            self.sweep.update(n)

    def close(self) -> None:
        if self.sweep is not None:
            self.sweep.close()


def execute(plan: Plan, *, argv: Optional[Sequence[str]] = None, quiet: bool = False) -> SweepResult:
    """Run ``plan`` (from :func:`prepare`), writing the run directory as it goes.

    Returns a :class:`SweepResult` (status ``complete``). A KeyboardInterrupt marks the manifest
    ``interrupted`` and is re-raised after the clocks are restored; other exceptions mark it
    ``failed`` and are re-raised. Finished cells are on disk either way; ``--resume`` continues.
    """
    cfg = plan.config
    rd = RunDir(plan.out)
    if plan.resume:
        manifest = rd.read_manifest()
        manifest["resumes"] = list(manifest.get("resumes", [])) + [
            {"at": _now_iso(), "command": list(argv) if argv is not None else sys.argv,
             "git_revision": git_revision()}]
        manifest["status"] = "running"
        manifest["finished_at"] = None
        manifest["notes"] = list(dict.fromkeys(list(manifest.get("notes", [])) + plan.notes))
        rd.create()
        removed = rd.remove_partial(plan.cells)
        if removed:
            log.info("removed %d part file(s) of the cell that was interrupted", removed)
    else:
        rd.create()
        manifest = new_manifest(plan, argv)
    file_log = _attach_file_log(rd.path / "run.log")
    rd.write_manifest(manifest)
    for n in plan.notes:
        log.warning("%s", n)

    pending = [c for c in plan.cells if not rd.is_done(c)]
    skipped = len(plan.cells) - len(pending)
    if skipped:
        log.info("resuming: %d of %d cells are already done", skipped, len(plan.cells))
    progress = _Progress(sum(len(plan.task_entry(c.task).samples) for c in pending), quiet)
    status = "failed"
    cells_run = 0
    try:
        cells_run = _run_cells(plan, rd, manifest, pending, progress)
        status = "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        progress.close()
        manifest["status"] = status
        manifest["finished_at"] = _now_iso() if status == "complete" else None
        manifest["cells_done"] = sum(1 for c in plan.cells if rd.is_done(c))
        if status != "complete":
            manifest.setdefault("interruptions", []).append({"at": _now_iso(), "status": status})
        try:
            rd.consolidate(plan.cells)
            rd.write_manifest(manifest)
        finally:
            if file_log is not None:
                logging.getLogger("llm_dvfs").removeHandler(file_log)
                file_log.close()
    requests = pd.read_parquet(rd.path / "requests.parquet")
    summary, text = summarize_run(requests)
    if summary is not None:
        atomic_write_with(rd.path / "summary.csv", lambda tmp: summary.to_csv(tmp, index=False))
    return SweepResult(rd.path, status, cells_run, skipped, requests, summary, text, plan.notes)


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


def _run_cells(plan: Plan, rd: RunDir, manifest: dict[str, Any], pending: list[Cell], progress: _Progress) -> int:
    from .monitor import PowerMonitor

    cfg = plan.config
    if not pending:
        return 0
    mon = None
    if plan.gpu is not None:
        mon = PowerMonitor(devices=[plan.gpu.index]).start()
    ctl = None
    if plan.mode == "sweep":
        from .clocks import ClockController
        ctl = ClockController(plan.gpu.index, allow_clock_changes=True,
                              settle_tolerance_mhz=cfg.settle_tolerance_mhz)
    n_run = 0
    try:
        for model in plan.models:
            todo_m = [c for c in pending if c.model == model]
            if not todo_m:
                continue
            loaded, runner = _load(plan, model, mon, manifest, rd)
            feats: dict[str, pd.DataFrame] = {}
            for cp in plan.clock_points:
                todo = [c for c in todo_m if c.clock == cp]
                if not todo:
                    continue
                if ctl is not None and not cp.as_found:
                    with ctl.locked(cp.sm_mhz, cp.mem_mhz, power_limit_w=cp.power_limit_w) as lock:
                        n_run += _clock_point(plan, rd, manifest, runner, mon, cp, todo, feats, loaded,
                                              progress, lock)
                else:
                    n_run += _clock_point(plan, rd, manifest, runner, mon, cp, todo, feats, loaded,
                                          progress, None)
            del runner, loaded
            _free_memory(plan.device)
    finally:
        if mon is not None:
            mon.stop()
    return n_run


def _free_memory(device: str) -> None:
    import gc

    gc.collect()
    if device.startswith("cuda"):
        import torch
        torch.cuda.empty_cache()


def _load(plan: Plan, model: str, mon: Any, manifest: dict[str, Any], rd: RunDir) -> tuple[Any, Any]:
    from .models import load_model
    from .runner import GenerationSettings, Runner

    cfg = plan.config
    t0 = time.monotonic()
    log.info("loading %s (%s) on %s", model, cfg.dtype, plan.device)
    loaded = load_model(model, dtype=cfg.dtype, device=plan.device, seed=cfg.seed)
    log.info("loaded %s: %.3g M parameters, %s, in %.1f s", model, loaded.n_params / 1e6, loaded.dtype,
             time.monotonic() - t0)
    manifest.setdefault("models", {})[model] = loaded.describe()
    rd.write_manifest(manifest)
    settings = GenerationSettings(max_new_tokens=cfg.max_new_tokens, fixed_output_length=cfg.fixed_output_length,
                                  decoding=cfg.decoding, temperature=cfg.temperature, top_p=cfg.top_p,
                                  seed=cfg.seed)
    runner = Runner(loaded, mon, settings, gpu_name=plan.gpu.name if plan.gpu is not None else "")
    return loaded, runner


def _clock_point(plan: Plan, rd: RunDir, manifest: dict[str, Any], runner: Any, mon: Any, cp: ClockPoint,
                 todo: list[Cell], feats: dict[str, pd.DataFrame], loaded: Any,
                 progress: _Progress, lock: Any) -> int:
    cfg = plan.config
    # other processes may have started since the plan was made
    notes: list[str] = []
    check_busy(plan.gpu, cfg.on_busy_gpu, notes)
    # warm-up + settle check: the first task's prompts at the first batch size
    first = plan.task_entry(todo[0].task)
    prompts = [s.prompt for s in first.samples]
    info: dict[str, Any] = {"model": todo[0].model, "clock": cp.label, **cp.requested_row(),
                            "started_at": _now_iso(), "notes": notes}
    if lock is not None:
        info["lock"] = {"settled": bool(lock.settled), "waited_s": lock.waited_s,
                        "observed_sm_mhz": lock.observed_sm_mhz, "observed_mem_mhz": lock.observed_mem_mhz,
                        "reasons": list(lock.reasons), "mem_method": lock.mem_method}
    w = mon.begin_window("warmup") if mon is not None else None
    warm_s = runner.warmup(prompts, todo[0].batch_size, max(cfg.warmup, 1 if lock is not None else 0))
    settle: dict[str, Any] = {"warmup_s": warm_s}
    if w is not None:
        w.end()
        m = w.measurement()
        settle["warmup_avg_power_w"] = m.avg_power_w
    if plan.gpu is not None:
        settle.update(settle_check(plan.gpu.nvml_index, cp, cfg.settle_tolerance_mhz))
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
            feats[cell.task] = _features(entry, loaded.tokenizer, cfg.ner)
            manifest.setdefault("features", {})[f"{cell.model}|{cell.task}"] = {
                "ner_estimator": feats[cell.task].attrs.get("ner_estimator"),
                "tokenizer": str(feats[cell.task].attrs.get("tokenizer", "")),
                "columns": [c for c in feats[cell.task].columns if c.startswith("feat_")],
                "seconds": round(time.monotonic() - t0, 3)}
        _run_cell(plan, rd, manifest, runner, mon, cell, entry, feats[cell.task], idle_w, progress)
        n += 1
    info["finished_at"] = _now_iso()
    rd.write_manifest(manifest)
    return n


def settle_check(nvml_index: int, cp: ClockPoint, tolerance_mhz: float, timeout_s: float = 2.0,
                 poll_s: float = 0.02) -> dict[str, Any]:
    """After a clock change and the warm-up: poll the GPU until the observed clocks (and power
    limit) match ``cp`` on two consecutive reads, or ``timeout_s`` passes.

    Returns ``settled`` (None in observe mode: nothing to match), ``waited_s``, the last
    ``observed_sm_mhz``/``observed_mem_mhz``/``power_limit_w``, ``reasons`` (decoded
    clock-event reasons) and a ``detail`` text when not settled. Never raises.
    """
    from .clocks import read_state

    t0 = time.monotonic()
    good = 0
    st = None
    try:
        while True:
            st = read_state(nvml_index)
            ok = ((cp.sm_mhz is None or (st.sm_mhz is not None and abs(st.sm_mhz - cp.sm_mhz) <= tolerance_mhz))
                  and (cp.mem_mhz is None or (st.mem_mhz is not None and abs(st.mem_mhz - cp.mem_mhz) <= tolerance_mhz))
                  and (cp.power_limit_w is None or (st.power_limit_w is not None
                                                    and abs(st.power_limit_w - cp.power_limit_w) < 1.0)))
            good = good + 1 if ok else 0
            if cp.as_found or good >= 2 or time.monotonic() - t0 >= timeout_s:
                break
            time.sleep(poll_s)
    except errors.LlmDvfsError as e:
        return {"settled": None if cp.as_found else False, "detail": f"clock state unreadable: {e}"}
    out: dict[str, Any] = {
        "settled": None if cp.as_found else good >= 2, "waited_s": round(time.monotonic() - t0, 4),
        "observed_sm_mhz": st.sm_mhz, "observed_mem_mhz": st.mem_mhz, "power_limit_w": st.power_limit_w,
        "reasons": list(st.reasons)}
    if out["settled"] is False:
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


def _run_cell(plan: Plan, rd: RunDir, manifest: dict[str, Any], runner: Any, mon: Any, cell: Cell,
              entry: TaskEntry, feats: pd.DataFrame, idle_w: float, progress: _Progress) -> None:
    cfg = plan.config
    t0 = time.monotonic()
    bar = progress.cell(len(entry.samples), f"{cell.model} {cell.task} {cell.clock.label} bs{cell.batch_size}")
    context = {"task": cell.task, **cell.clock.requested_row(), "idle_power_w": idle_w}
    try:
        rows = runner.run(entry.task, entry.samples, batch_size=cell.batch_size, cell_id=cell.cell_id,
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
                  {"finished_at": _now_iso(), "wall_s": time.monotonic() - t0, "n_requests": len(requests),
                   "warnings": rows.warnings, "attribution": rows.attribution})
    # requests after every cell; the large tables at most every CONSOLIDATE_LARGE_S (and at the
    # end): until then they are complete in cells/, which is what a resume reads
    big = time.monotonic() - rd.last_full_consolidation >= CONSOLIDATE_LARGE_S
    rd.consolidate(plan.cells, RunDir.TABLES if big else ("requests",))
    if big:
        rd.last_full_consolidation = time.monotonic()
    manifest["cells_done"] = manifest.get("cells_done", 0) + 1
    rd.write_manifest(manifest)
    e = requests["energy_j"].median() if len(requests) else math.nan
    log.info("cell %d/%d done: %s (%d requests, %s, %.1f s)", cell.index + 1, len(plan.cells), cell.cell_id,
             len(requests), "no energy" if not math.isfinite(e) else f"median energy {e:.3g} J",
             time.monotonic() - t0)


# ============================================================================================
# summary
# ============================================================================================
def summarize_run(requests: pd.DataFrame, n_boot: int = 200) -> tuple[Optional[pd.DataFrame], str]:
    """Per model × task × batch size × clock point: medians (energy/request, J/token, latency,
    TTFT, TPOT, average power), mean quality, and the change vs the highest clock. Returns the
    table (analysis.summarize's columns) and its text rendering."""
    if requests is None or requests.empty:
        return None, "(no requests were measured)"
    from . import analysis

    keys = analysis.default_group_keys(requests)
    summary = analysis.summarize(requests, group_keys=keys, n_boot=n_boot)
    try:
        from . import report
        optimal = analysis.optimal_clocks(summary, group_keys=keys) if hasattr(analysis, "optimal_clocks") else None
        key = report.key_table(summary, optimal if optimal is not None else pd.DataFrame(), keys)
        text = report.format_key_table(key, keys)
    except Exception as e:  # noqa: BLE001 - the plain table below is always possible
        log.debug("report key table unavailable (%s); plain summary", e)
        text = _plain_summary(summary, keys)
    return summary, text


def _plain_summary(summary: pd.DataFrame, keys: Sequence[str]) -> str:
    cols = list(keys) + ["clock_label", "n", "energy_j_median", "j_per_token_median", "latency_s_median",
                         "ttft_s_median", "tpot_s_median", "avg_power_w_median", "quality_mean",
                         "energy_j_delta_pct", "latency_s_delta_pct"]
    cols = [c for c in cols if c in summary.columns]
    return summary[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


__all__ = ["SweepConfig", "FIELD_HELP", "load_config", "load_config_file", "config_from_mapping",
           "parse_clock_spec", "resolve_clocks", "ClockPoint", "Cell", "Plan", "prepare", "execute",
           "SweepResult", "RunDir", "GpuBusy", "summarize_run", "busy_processes", "check_busy",
           "DEFAULT_GPU_MODEL", "DEFAULT_CPU_MODEL", "embedded_default", "resume_config"]
