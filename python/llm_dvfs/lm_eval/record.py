"""The run directory of an lm-evaluation-harness run: request rows, per-task totals, manifest.

:class:`HarnessRecord` collects the rows the harness model (:mod:`llm_dvfs.lm_eval.model`)
measures and writes them with the sweep's own writers (:class:`llm_dvfs.sweep.rundir.RunDir`,
:func:`llm_dvfs.schema.to_frame`), so the directory has the layout of a sweep's (docs/sweep.md):

* one *cell* per harness task and model call (``loglikelihood``, ``loglikelihood_rolling`` or
  ``generate_until``): ``cell_id = MODEL|TASK|as-found|bsB|rN`` (N counts earlier calls for the
  same task by this model object), written to ``cells/`` when the call returns;
* ``requests.parquet`` / ``requests.csv`` (one row per harness request), ``tokens.parquet``
  (per generated token, generate_until only), ``power.parquet`` (the trace of every cell),
  rewritten from the cells after every call;
* ``manifest.json`` with ``engine: "lm_eval"``, the lm-eval version, the model, the tasks and
  ``lm_eval.tasks``: per task totals (requests, docs, tokens, energy, busy time).

Nothing here imports lm_eval: the record is plain data, so importing :mod:`llm_dvfs.lm_eval`
stays cheap. Failure modes: :class:`~llm_dvfs.errors.ConfigError` for an output directory that
cannot be created or is not empty; ``OSError`` from the writers is re-raised.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import math
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import pandas as pd

from llm_dvfs.errors import ConfigError
from llm_dvfs.schema import to_frame
from llm_dvfs.sweep.rundir import FORMAT_VERSION, RunDir, git_revision, now_iso, versions

#: The name lm-eval knows the model by (``--model llm_dvfs-hf``).
MODEL_NAME = "llm_dvfs-hf"
#: ``engine`` in manifest.json.
ENGINE = "lm_eval"
#: The harness's request types, in the order lm-eval issues them.
REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


def lm_eval_version() -> Optional[str]:
    """The installed lm-eval version (read from its metadata, lm_eval is not imported), or None."""
    try:
        return importlib.metadata.version("lm_eval")
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclass(frozen=True)
class HarnessCell:
    """One task's requests of one model call: what :class:`RunDir` writes as a cell."""

    index: int
    cell_id: str
    task: str
    request_type: str
    repeat: int = 0  # earlier calls for this task by the same model object (the cell id's rN)

    @property
    def key(self) -> str:
        """File-name-safe, stable key (hash of ``cell_id``), as the sweep's cells have."""
        return hashlib.sha1(self.cell_id.encode()).hexdigest()[:16]


def _sum(values: Sequence[float]) -> Optional[float]:
    """Sum, or None when any value is missing (NaN): a partial sum would read as a total."""
    vals = [float(v) for v in values]
    if not vals or any(not math.isfinite(v) for v in vals):
        return None
    return float(sum(vals))


class HarnessRecord:
    """Rows of every measured harness request, the per-task totals, and the run directory.

    Args:
        out: the run directory; None = keep everything in memory only (:meth:`requests_frame`,
            :meth:`task_totals`). It must not exist yet or be empty.
        manifest: the facts the manifest starts with (:func:`new_manifest`).

    Raises:
        ConfigError: ``out`` exists and is not an empty directory, or cannot be created.
    """

    def __init__(self, out: Optional[Path], manifest: Mapping[str, Any]) -> None:
        self.rundir: Optional[RunDir] = None
        if out is not None:
            out = Path(out).expanduser()
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise ConfigError(f"out={str(out)!r} exists and is not an empty directory: give a new "
                                  "run directory (a harness run does not resume)")
            self.rundir = RunDir(out)
            self.rundir.create()
        self.manifest: dict[str, Any] = dict(manifest)
        self.cells: list[HarnessCell] = []
        self._requests: list[pd.DataFrame] = []
        self._cell_info: dict[str, dict[str, Any]] = {}
        self._calls: dict[str, int] = {}  # task -> model calls so far (the rN of its cells)
        if self.rundir is not None:
            self.rundir.write_manifest(self.manifest)

    @property
    def path(self) -> Optional[Path]:
        return None if self.rundir is None else self.rundir.path

    def new_cell(self, model: str, task: str, request_type: str, batch_size: int) -> HarnessCell:
        """The next cell of ``task`` (its cell_id counts the earlier calls for that task)."""
        n = self._calls.get(task, 0)
        self._calls[task] = n + 1
        # the index is provisional: add_cell numbers cells in the order they are written
        return HarnessCell(len(self.cells), f"{model}|{task}|as-found|bs{batch_size}|r{n}", task, request_type, n)

    def add_cell(self, cell: HarnessCell, requests: Sequence[Mapping[str, Any]],
                 tokens: Sequence[Mapping[str, Any]], power: Sequence[Mapping[str, Any]],
                 info: Mapping[str, Any]) -> None:
        """Record (and, with a run directory, write) one finished cell.

        Raises:
            ValueError: a row key outside the schema (from :func:`llm_dvfs.schema.to_frame`).
        """
        frames = {"requests": to_frame("requests", requests), "tokens": to_frame("tokens", tokens),
                  "power": to_frame("power", power)}
        cell = HarnessCell(len(self.cells), cell.cell_id, cell.task, cell.request_type, cell.repeat)
        self.cells.append(cell)
        self._requests.append(frames["requests"])
        meta = dict(info, task=cell.task, request_type=cell.request_type, finished_at=now_iso())
        self._cell_info[cell.cell_id] = meta
        if self.rundir is not None:
            self.rundir.write_cell(cell, frames, meta)

    def requests_frame(self) -> pd.DataFrame:
        """Every request row so far, as one typed ``requests`` table."""
        frames = [f for f in self._requests if len(f)]
        return pd.concat(frames, ignore_index=True) if frames else to_frame("requests", [])

    def task_totals(self) -> dict[str, dict[str, Any]]:
        """Per harness task: ``request_types``, ``requests``, ``docs``, ``batches``, ``tokens_in``,
        ``tokens_out``, ``energy_j`` (sum over its requests; None when any is unmeasured),
        ``energy_j_per_request`` (mean), ``busy_s`` (sum of its batches' durations, s: the
        model time the task took), ``energy_method`` (the methods seen, ``+``-joined)."""
        out: dict[str, dict[str, Any]] = {}
        df = self.requests_frame()
        for cell in self.cells:
            info = self._cell_info[cell.cell_id]
            t = out.setdefault(cell.task, {"request_types": [], "batches": 0, "busy_s": 0.0})
            if cell.request_type not in t["request_types"]:
                t["request_types"].append(cell.request_type)
            t["batches"] += int(info.get("batches", 0))
            t["busy_s"] += float(info.get("busy_s", 0.0))
        for task, g in df.groupby("task", sort=True):
            t = out.setdefault(str(task), {"request_types": [], "batches": 0, "busy_s": 0.0})
            energy = _sum(g["energy_j"].astype("float64").tolist())
            t.update({
                "requests": int(len(g)),
                "docs": int(g["sample_id"].nunique()),
                "tokens_in": int(g["tokens_in"].sum()),
                "tokens_out": int(g["tokens_out"].clip(lower=0).sum()),
                "energy_j": energy,
                "energy_j_per_request": None if energy is None else energy / len(g),
                "energy_method": "+".join(sorted(set(map(str, g["energy_method"].dropna())))) or "none",
            })
        return out

    def write(self, status: str, *, tables: bool = True) -> None:
        """Rewrite the manifest (``status``: running | complete | failed | interrupted) and,
        with ``tables``, the run tables from the cells, atomically; a no-op without a run
        directory."""
        self.manifest["status"] = status
        self.manifest["finished_at"] = now_iso() if status == "complete" else None
        self.manifest["cells_done"] = len(self.cells)
        self.manifest["tasks"] = sorted({c.task for c in self.cells})
        lm = self.manifest.setdefault("lm_eval", {})
        lm["tasks"] = self.task_totals()
        self.manifest.setdefault("config", {})["tasks"] = self.manifest["tasks"]
        if self.rundir is None:
            return
        if tables:
            self.rundir.consolidate(self.cells)
        self.rundir.write_manifest(self.manifest)


def new_manifest(*, model: Mapping[str, Any], model_args: Mapping[str, Any], batch_size: int,
                 device: str, gpus: Sequence[Any], measured: Sequence[Any],
                 notes: Sequence[str]) -> dict[str, Any]:
    """The manifest a harness run starts with (status ``running``).

    Args:
        model: :meth:`llm_dvfs.workload.models.LoadedModel.describe`.
        model_args: the model's arguments as lm-eval passed them (JSON-able values).
        batch_size: requests per measured batch.
        device: where the model runs (``cuda:N`` / ``cpu``).
        gpus: every visible :class:`~llm_dvfs.devices.DeviceInfo`; measured: those the monitor
            measures (empty: time only).
        notes: what the reader must know (time only, CPU, ...).
    """
    first = measured[0] if measured else None
    vers = versions()
    vers["lm_eval"] = lm_eval_version()
    return {
        "tool": "llm_dvfs.lm_eval",
        "engine": ENGINE,
        "lm_eval_version": vers["lm_eval"],
        "format_version": FORMAT_VERSION,
        "package_version": vers["llm_dvfs"],
        "git_revision": git_revision(),
        "started_at": now_iso(),
        "finished_at": None,
        "status": "running",
        "command": list(sys.argv),
        "host": socket.gethostname(),
        "versions": vers,
        "driver_version": first.driver_version if first is not None else None,
        "nvml_version": first.nvml_version if first is not None else None,
        "gpus": [g.to_dict() for g in gpus],
        "measured_gpus": [g.index for g in measured],
        "device": device,
        "energy_available": bool(measured),
        "mode": "observe",  # the harness model never changes clocks
        "model": dict(model),
        "tasks": [],
        "notes": list(notes),
        "config": {"models": [model.get("model")], "batch_sizes": [int(batch_size)], "mode": "observe",
                   "device": device, "tasks": []},
        "lm_eval": {"model_name": MODEL_NAME, "version": vers["lm_eval"],
                    "model_args": {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v))
                                   for k, v in model_args.items()},
                    "tasks": {}},
    }


__all__ = ["MODEL_NAME", "ENGINE", "REQUEST_TYPES", "HarnessCell", "HarnessRecord", "new_manifest",
           "lm_eval_version"]
