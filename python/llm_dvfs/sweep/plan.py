"""The plan of a sweep: the grid, validated before anything runs or is written.

:func:`prepare` turns a :class:`~llm_dvfs.sweep.config.SweepConfig` into a :class:`Plan` —
models × clock points × tasks × batch sizes × repeats, as :class:`Cell` s in execution order.
*Every* check that can fail on user input runs here, before any GPU work and before anything is
written: model specs, tasks and their data (an empty dataset is an error), clock points against
the GPU's supported table (:func:`resolve_clocks`), power limits against its range, the output
directory, other processes on the GPU (:func:`check_busy`). :func:`new_manifest` is the
manifest a new run starts with. :mod:`llm_dvfs.sweep.execute` runs the plan.

Raises :class:`~llm_dvfs.errors.ConfigError` (or :class:`~llm_dvfs.errors.DataNotFound`,
:class:`GpuBusy`).

Safety: without ``allow_clock_changes`` the plan never contains a clock change. If clock points
are requested without it, the plan is in *observe mode*: one clock point, the GPU as found, and
the notes say so.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import importlib
import json
import logging
import os
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from llm_dvfs import errors
from llm_dvfs.control.clocks import clock_changes_allowed, nearest_supported, requested_columns
from llm_dvfs.devices import compute_processes, devices, last_error
from llm_dvfs.errors import ConfigError, DataNotFound
from llm_dvfs.sweep.config import DEFAULT_CPU_MODEL, DEFAULT_GPU_MODEL, SweepConfig, resolve_device
from llm_dvfs.sweep.rundir import FORMAT_VERSION, RunDir, git_revision, json_default, now_iso, versions
from llm_dvfs.sweep.served import LoadLevel, check_config, check_exclusions, endpoint_models

log = logging.getLogger("llm_dvfs.sweep.plan")


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
        """The ``*_requested`` columns (NaN = as found), as :class:`~llm_dvfs.control.clocks.LockResult` has them."""
        return requested_columns(self.sm_mhz, self.mem_mhz, self.power_limit_w)


@dataclass(frozen=True)
class Cell:
    """One model × task × clock point × batch size × repeat: a unit of work and of writing.

    A served-traffic cell (``engine`` continuous or endpoint) has a load level instead of a
    batch size (``batch_size`` None); both are part of its identity (``cell_id``)."""

    index: int
    model: str
    task: str
    clock: ClockPoint
    batch_size: Optional[int]
    repeat: int
    engine: str = "generate"
    load: Optional[LoadLevel] = None
    gpu_model: Optional[str] = None   # set when a parallel sweep's GPUs are of several models

    @property
    def cell_id(self) -> str:
        # the GPU model is part of the identity only in a sweep over several GPU models (so a
        # resume never mixes them); a run on one GPU model keeps the ids it always had
        gm = f"|{self.gpu_model}" if self.gpu_model else ""
        if self.load is not None:
            return f"{self.model}|{self.task}|{self.clock.label}|{self.engine}|{self.load.label}|r{self.repeat}{gm}"
        return f"{self.model}|{self.task}|{self.clock.label}|bs{self.batch_size}|r{self.repeat}{gm}"

    @property
    def key(self) -> str:
        """File-name-safe, stable key of the cell (hash of ``cell_id``)."""
        return hashlib.sha1(self.cell_id.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WorkerSpec:
    """One worker of a parallel sweep (:mod:`llm_dvfs.sweep.parallel`): the GPU(s) it owns, as the
    driver sees them (:class:`~llm_dvfs.devices.DeviceInfo`; several for ``gpus_per_model`` > 1).
    A Ray worker's GPUs are only known once it runs (``gpus`` empty, ``gpu_model`` from the plan)."""

    gpus: tuple[Any, ...]
    gpu_model: Optional[str] = None

    @property
    def label(self) -> str:
        return ("GPU " + "+".join(str(g.index) for g in self.gpus)) if self.gpus else "a Ray GPU"


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
    engine: str = "generate"                 # generate | continuous | endpoint
    loads: list[LoadLevel] = field(default_factory=list)   # served engines' load levels
    endpoint: Optional[dict[str, Any]] = None              # the server's identity (endpoint)
    # parallel sweeps (sweep/parallel.py): one entry per worker; empty = this process alone
    workers: list[WorkerSpec] = field(default_factory=list)
    backend: Optional[str] = None                          # local | ray
    gpu_group: list[Any] = field(default_factory=list)     # a worker's GPUs when it owns several
    points_by_gpu_model: dict[str, list[ClockPoint]] = field(default_factory=dict)

    @property
    def energy_available(self) -> bool:
        return self.gpu is not None

    @property
    def measured_gpus(self) -> list[Any]:
        """The GPU(s) this process measures: the worker's group, else the one GPU (or none)."""
        return list(self.gpu_group) if self.gpu_group else ([self.gpu] if self.gpu is not None else [])

    def describe(self) -> str:
        """A few lines for the terminal: what will run."""
        n_req = sum(len(self.task_entry(c.task).samples) for c in self.cells)
        lines = [
            f"run directory: {self.out}",
            f"mode: {self.mode}" + (" (clocks as found; nothing is changed)" if self.mode == "observe" else ""),
            f"models: {', '.join(self.models)} on {self.device}",
            f"tasks: {', '.join(f'{t.name} ({len(t.samples)} samples)' for t in self.tasks)}",
            f"clock points: {', '.join(c.label for c in self.clock_points)}",
            (f"batch sizes: {', '.join(map(str, self.config.batch_sizes))}" if not self.loads else
             f"engine: {self.engine}" + (f" ({self.endpoint.get('url')}, {self.endpoint.get('version') or 'version unknown'})"
                                         if self.endpoint else "")
             + f"; load levels: {', '.join(l.label for l in self.loads)}") + f"; repeats: {self.config.repeats}",
            f"cells: {len(self.cells)} ({n_req} measured requests)",
            "energy: " + (f"measured on GPU {self.gpu.index} ({self.gpu.name})" if self.gpu is not None and not self.workers
                          else "measured on each worker's GPU(s)" if self.workers
                          else "unavailable (no NVIDIA driver/GPU: time only)"),
        ]
        if self.workers:
            lines.append(f"workers: {len(self.workers)} ({self.backend}): "
                         + ", ".join(f"{w.label}" + (f" ({w.gpu_model})" if w.gpu_model else "") for w in self.workers))
        return "\n".join(lines)

    def task_entry(self, name: str) -> TaskEntry:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)


def _gpus() -> tuple[list[Any], Optional[str]]:
    try:
        devs = devices()
    except errors.LlmDvfsError as e:
        return [], f"{type(e).__name__}: {e}"
    return devs, (None if devs else (last_error() or "no NVIDIA GPU visible"))


def _check_model(spec: str, model_args: Optional[dict[str, Any]] = None,
                 chat_template: bool = False) -> None:
    """Cheap validity check of a model spec and its model args (no weights are loaded): a hub
    id must be in the cache or on the hub at the revision asked for; with ``chat_template`` its
    tokenizer must have a chat template."""
    from llm_dvfs.workload.model_args import split_model_args
    from llm_dvfs.workload.models import ModelSpec, load_tokenizer

    ms = ModelSpec.parse(spec)
    own, rest = split_model_args(model_args, ms.kind)  # ConfigError: keys an arch: model can't use
    if ms.kind == "hub":
        from llm_dvfs.workload.hub import ensure_hub
        rev = own.get("revision")
        # offline (or no route to the hub) and not cached: one clear error at once (DataNotFound)
        ensure_hub(ms.target, None if rev is None else str(rev), rest.get("cache_dir"))
        try:
            from transformers import AutoConfig
            AutoConfig.from_pretrained(ms.target, revision=None if rev is None else str(rev),
                                       trust_remote_code=bool(own.get("trust_remote_code", False)),
                                       **{k: v for k, v in rest.items() if k in ("cache_dir", "token")})
        except (OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataNotFound(
                f"model {spec!r} is not an arch: name, not a local directory, and not available "
                f"from the Hugging Face hub or its cache ({msg}). Use arch:NAME for random weights "
                "(python -c 'import llm_dvfs.workload.models as m; print(m.list_arch())'), a local directory, "
                f"or download it first (`hf download {ms.target}`)") from None
    if chat_template and not getattr(load_tokenizer(ms, model_args), "chat_template", None):
        where = "the offline tokenizer of arch: models" if ms.kind == "arch" and "tokenizer" not in own \
            else f"the tokenizer of {spec}"
        raise ConfigError(f"--apply-chat-template: {where} has no chat template; drop the option, or "
                          "give a tokenizer that has one (--model-args tokenizer=DIR_OR_HUB_ID)")


def _tasks(cfg: SweepConfig) -> list[TaskEntry]:
    from llm_dvfs.workload.tasks import get_task

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
    me = os.getpid()
    return [(p, m) for p, m in compute_processes(nvml_index) if p != me]


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
        if not RunDir(out).has_manifest():
            raise ConfigError(RunDir(out).not_a_run_dir())
        probe_dir = out
    else:
        if out.exists():
            if not out.is_dir():
                raise ConfigError(f"output {str(out)!r} exists and is not a directory")
            if any(out.iterdir()):
                hint = " (it is a run directory: use --resume to continue it)" if RunDir(out).has_manifest() else ""
                raise ConfigError(f"output directory {str(out)!r} is not empty{hint}; choose a new one")
        # the run directory is built next to it and renamed into place (RunDir.create_new)
        probe_dir = out.parent
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
    """``runs/YYYYmmdd-HHMMSS`` (local time), the output directory when none is given."""
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
    engine, loads = check_config(cfg, notes)  # served-traffic settings (ConfigError), before any work
    # 1. output (cheap, and nothing is created here)
    out = Path(resume if resume is not None else (cfg.out or default_out_dir())).expanduser()
    _check_out_dir(out, resume is not None)
    clock_changes_allowed(cfg.allow_clock_changes)  # a bad LLM_DVFS_ALLOW_CLOCK_CHANGES fails here
    # 2. device and GPU
    device = resolve_device(cfg.device)
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
    elif gpu is not None and engine == "endpoint":
        notes.append(f"endpoint mode: GPU {gpu.index} ({gpu.name}) of this host is measured; it must be the "
                     "server's GPU, and nothing else should run on it")
    elif gpu is not None and not device.startswith("cuda"):
        notes.append(f"the model runs on the CPU but GPU {gpu.index} ({gpu.name}) is measured: its energy "
                     "does not include the CPU's work (use --gpu none to measure time only)")
    # 2b. parallel sweeps: the workers and their GPUs (--gpus, --gpus-per-model, --ray)
    workers, backend = _workers(cfg, gpus, engine, notes)
    if workers and workers[0].gpus:
        gpu = workers[0].gpus[0]
    elif cfg.gpus is not None and not workers:  # --gpus with one GPU: today's path, on that GPU
        gpu = _pick_gpus(cfg, gpus)[0]
        if device.startswith("cuda"):
            device = f"cuda:{gpu.index}"
    # 3. models
    endpoint = None
    if engine == "endpoint":  # the server's model; EndpointError (unreachable) -> ConfigError here
        models, endpoint = endpoint_models(cfg)
    else:
        models = cfg.models
        if models is None:
            models = [DEFAULT_GPU_MODEL if device.startswith("cuda") else DEFAULT_CPU_MODEL]
            notes.append(f"no models given: using the embedded default {models[0]} (random weights)")
        for m in models:
            _check_model(m, cfg.model_args, cfg.apply_chat_template)
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
    gpu_models = list(dict.fromkeys(g.name for w in workers for g in w.gpus[:1]))
    # (a parallel run's; a single-GPU run resumed on another GPU model gets a note, above)
    if resume is not None and stored.get("gpu_models") is not None and (stored.get("workers") or workers) and \
            sorted(stored["gpu_models"]) != sorted(gpu_models or ([gpu.name] if gpu is not None else [])):
        raise ConfigError(f"the run in {str(out)!r} ran on {', '.join(stored['gpu_models']) or 'no GPU'}; this resume "
                          f"would run on {', '.join(gpu_models) or (gpu.name if gpu is not None else 'no GPU')}: a "
                          "cell's GPU model is part of its identity (choose GPUs of the same model(s) with --gpus)")
    by_model: dict[str, list[ClockPoint]] = {}
    if stored_mode == "observe":
        mode, points = "observe", [ClockPoint()]
    elif len(gpu_models) > 1:  # heterogeneous GPUs: clock points resolved per GPU model
        for name in gpu_models:
            rep = next(g for w in workers for g in w.gpus if g.name == name)
            mode, by_model[name] = _clock_points(cfg, rep, notes)
        points = list(dict.fromkeys(p for ps in by_model.values() for p in ps))
    else:
        mode, points = _clock_points(cfg, gpu, notes)
    # 5. tasks and their samples (an empty dataset is an error here, before any GPU work)
    tasks = _tasks(cfg)
    check_exclusions(cfg, loads, min(len(t.samples) for t in tasks))
    if cfg.ner == "nltk":
        _require_nltk()
    # 6. other processes on the GPU
    check_busy(gpu, cfg.on_busy_gpu, notes)
    # 7. the cells, in execution order
    cells: list[Cell] = []
    # a sweep over several GPU models runs the grid once per model (a cell's GPU model is part
    # of its identity: its results are not interchangeable with another model's)
    for gm, gm_points in (by_model.items() if by_model else [(None, points)]):
        for m in models:
            for cp in gm_points:
                for t in tasks:
                    for load in loads:  # served engines: load levels instead of batch sizes
                        for r in range(cfg.repeats):
                            cells.append(Cell(len(cells), m, t.name, cp, None, r, engine, load, gm))
                    for bs in (cfg.batch_sizes if not loads else []):
                        for r in range(cfg.repeats):
                            cells.append(Cell(len(cells), m, t.name, cp, bs, r, gpu_model=gm))
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):  # pragma: no cover - models/batch sizes are de-duplicated
        raise ConfigError("duplicate cells in the grid")
    return Plan(config=cfg, out=out, mode=mode, device=device, gpu=gpu, gpus=gpus, models=list(models),
                tasks=tasks, clock_points=points, cells=cells, notes=notes, resume=resume is not None,
                engine=engine, loads=loads, endpoint=endpoint, workers=workers, backend=backend,
                points_by_gpu_model=by_model)


def _pick_gpus(cfg: SweepConfig, gpus: list[Any]) -> list[Any]:
    """The GPUs ``cfg.gpus`` names (CUDA indices, or all visible), in that order.

    Raises:
        ConfigError: an index that is not visible, or no GPU at all.
    """
    if cfg.gpus == "all":
        if not gpus:
            raise ConfigError("--gpus all: no GPU is visible (no NVIDIA driver, or CUDA_VISIBLE_DEVICES hides them)")
        return list(gpus)
    out = []
    for i in cfg.gpus:
        g = next((g for g in gpus if g.index == i), None)
        if g is None:
            raise ConfigError(f"--gpus: GPU {i} is not visible ({len(gpus)} GPU(s) found: "
                              f"{', '.join(str(x.index) for x in gpus) or 'none'})")
        out.append(g)
    return out


def _workers(cfg: SweepConfig, gpus: list[Any], engine: str, notes: list[str]) -> tuple[list[WorkerSpec], Optional[str]]:
    """The workers of a parallel sweep and its backend (``local`` | ``ray``), or ``([], None)``
    for a sweep in this process (no ``--gpus`` of more than one worker, no ``--ray``).

    Raises:
        ConfigError: Ray asked for but not installed (says how to install it), GPUs not
            visible or not divisible into groups of ``gpus_per_model``, served traffic.
    """
    k = cfg.gpus_per_model
    if cfg.ray is not None:
        try:
            importlib.import_module("ray")
        except ImportError:
            raise ConfigError("--ray needs Ray, which is not installed: pip install 'llm_dvfs[ray]'") from None
    if cfg.ray is None and (cfg.gpus is None or (k == 1 and len(_pick_gpus(cfg, gpus)) == 1)):
        if k > 1:
            raise ConfigError("--gpus-per-model needs --gpus (e.g. --gpus 0,1 --gpus-per-model 2) or --ray")
        return [], None
    if engine != "generate":
        raise ConfigError(f"--gpus/--ray run lock-step (generate) cells; the {engine} engine runs on one GPU "
                          "(drop --gpus/--ray, or run one sweep per GPU)")
    if cfg.ray is not None and cfg.gpus is None:
        # the cluster's GPUs are known once the actors run; the plan takes this host's as the model
        return [WorkerSpec((), gpus[0].name if gpus else None)], "ray"
    picked = _pick_gpus(cfg, gpus)
    if len(picked) % k:
        raise ConfigError(f"--gpus-per-model {k}: {len(picked)} GPU(s) do not split into groups of {k}")
    groups = [tuple(picked[i:i + k]) for i in range(0, len(picked), k)]
    for grp in groups:
        if len({g.name for g in grp}) > 1:
            raise ConfigError(f"--gpus-per-model {k}: a model's GPUs must be of one model, got "
                              f"{', '.join(f'{g.index} ({g.name})' for g in grp)}")
    return [WorkerSpec(grp, grp[0].name) for grp in groups], ("ray" if cfg.ray is not None else "local")


def _require_nltk() -> None:
    from llm_dvfs.workload.features import check_nltk_data

    try:
        check_nltk_data()
    except DataNotFound as e:
        raise DataNotFound(f"{e} (on the command line: --ner heuristic or --ner off)") from None


# ============================================================================================
# manifest
# ============================================================================================
def _serialisable_config(cfg: SweepConfig) -> dict[str, Any]:
    return json.loads(json.dumps(cfg.to_dict(), default=json_default))


def new_manifest(plan: Plan, argv: Optional[Sequence[str]]) -> dict[str, Any]:
    """The manifest a new run of ``plan`` starts with (status ``running``, no cells done)."""
    gpu = plan.gpu
    return {
        "tool": "llm_dvfs.run",
        "format_version": FORMAT_VERSION,
        "package_version": versions()["llm_dvfs"],
        "git_revision": git_revision(),
        "started_at": now_iso(),
        "finished_at": None,
        "status": "running",
        "command": list(argv) if argv is not None else sys.argv,
        "host": socket.gethostname(),
        "versions": versions(),
        "driver_version": gpu.driver_version if gpu is not None else None,
        "nvml_version": gpu.nvml_version if gpu is not None else None,
        "gpus": [g.to_dict() for g in plan.gpus],
        "measured_gpu": gpu.index if gpu is not None else None,
        "gpu_models": list(dict.fromkeys(g.name for w in plan.workers for g in w.gpus[:1]))
                      or ([gpu.name] if gpu is not None else []),
        "workers": [],   # a parallel sweep's: host, GPU UUIDs, pid of each worker (sweep/parallel.py)
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
            "resolved_engine": plan.engine,
            "load_levels": [lv.describe() for lv in plan.loads],
        },
        "endpoint": plan.endpoint,
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


__all__ = ["GpuBusy", "ClockPoint", "Cell", "WorkerSpec", "TaskEntry", "Plan", "prepare", "resolve_clocks",
           "busy_processes", "check_busy", "default_out_dir", "new_manifest"]
