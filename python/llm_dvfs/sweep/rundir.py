"""The files of a run directory: atomic writes, strict JSON, :class:`RunDir`, manifest facts.

One concern: what lies on disk and how it is written, so that a kill at any moment leaves either
the old file or the new one (temporary file + ``os.replace``), never a part. It knows nothing of
the grid; the sweep (:mod:`llm_dvfs.sweep.execute`) decides what is written when. Layout (docs/sweep.md)::

    DIR/manifest.json        config, mode, versions, git revision, GPUs, start/end, status,
                             clock points (idle baseline, settle check), notes
    DIR/manifest.json.bak    the same (written just before it): what a damaged manifest is
                             recovered from
    DIR/.lock                the owner's flock and record (llm_dvfs.sweep.lock)
    DIR/requests.parquet     one row per request × clock point (llm_dvfs.schema schema)
    DIR/requests.csv         the same, as CSV
    DIR/tokens.parquet       per-token rows (where token attribution ran)
    DIR/power.parquet        the raw power trace of every cell (cell_id column)
    DIR/summary.csv          per model × task × batch size × clock point (written at the end)
    DIR/run.log              the log of every invocation (start and resumes)
    DIR/cells/<key>.{requests,tokens,power}.parquet, <key>.json   one finished cell each; the
                             .json marker is written last and is what "finished" means; it
                             records SHA-256, size and rows of each part (llm_dvfs.sweep.integrity)
    DIR/damaged/             parts of cells found damaged on a resume (those cells ran again)

A new run directory is built as ``.NAME.creating-<pid>`` next to it, locked, its manifest written
first, and renamed into place (:meth:`RunDir.create_new`): an interrupt before the rename leaves
nothing at NAME (and at worst that temporary directory, which the next start removes), after it
a directory that ``--resume`` continues.

Failure modes: :meth:`RunDir.create`, :meth:`RunDir.create_new` and :meth:`RunDir.read_manifest`
raise :class:`~llm_dvfs.errors.ConfigError` (the last only when the manifest and its backup are
both unreadable); the writers re-raise the ``OSError`` after removing their temporary file;
:meth:`RunDir.consolidate` never raises on a damaged part (it quarantines the cell and says so).
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Protocol, Sequence

import numpy as np
import pandas as pd

from llm_dvfs.atomic import atomic_write_bytes, atomic_write_with
from llm_dvfs.errors import ConfigError
from llm_dvfs.schema import conform, empty, read_parquet, write_parquet
import llm_dvfs.sweep.integrity as integrity  # not `from llm_dvfs.sweep import`: the package imports this
from llm_dvfs.sweep.lock import RunLock, describe_owner, is_locked, read_owner

log = logging.getLogger("llm_dvfs.sweep.rundir")


class Cell(Protocol):
    """What this module needs of a cell (:class:`llm_dvfs.sweep.plan.Cell` is one): it knows no grid."""

    @property
    def index(self) -> int: ...

    @property
    def cell_id(self) -> str: ...

    @property
    def key(self) -> str: ...


#: Version of the run-directory format (``format_version`` in manifest.json). 2: Parquet files
#: carry the pyarrow schema of :mod:`llm_dvfs.schema` (nulls where nothing was measured, units as
#: field metadata); version 1 wrote -1 for an unread clock_event_reasons and False for an
#: unknown boolean (llm_dvfs.analysis.rundata reads both).
FORMAT_VERSION = 2


def json_default(o: Any) -> Any:
    """``json.dumps`` default: numpy scalars, paths, sets and tuples; anything else as ``str``."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def _finite(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as None (strict JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as strict JSON (NaN → null), atomically."""
    text = json.dumps(_finite(json.loads(json.dumps(obj, default=json_default))), indent=2, allow_nan=False)
    atomic_write_bytes(path, (text + "\n").encode())


def _pid_alive(pid_text: str) -> bool:
    """Whether the process ``pid_text`` (a temporary directory's suffix) lives on this host."""
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # our own leftover (an earlier attempt in this process): removable
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


class RunDir:
    """The files of one run directory (layout in the module docstring)."""

    TABLES = ("requests", "tokens", "power")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.cells_dir = self.path / "cells"
        self._frames: dict[str, dict[str, pd.DataFrame]] = {}  # cell key -> table -> frame
        self.last_full_consolidation = -math.inf
        self.damaged: list[integrity.Damage] = []  # cells quarantined by consolidate()

    def create(self) -> None:
        try:
            self.cells_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the run directory {str(self.path)!r}: {e}") from None

    # -- creation --
    def creating_leftovers(self) -> list[Path]:
        """Temporary directories of starts of this run directory that never got renamed into place."""
        parent = self.path.parent
        if not parent.is_dir():
            return []
        return sorted(parent.glob(f".{self.path.name}.creating-*"))

    def not_a_run_dir(self) -> str:
        """The error text for ``--resume`` of a directory without a manifest, with the way out."""
        msg = f"--resume {str(self.path)!r}: no manifest.json there; not a run directory"
        left = self.creating_leftovers()
        if left:
            msg += (f". A start of it was killed before the run directory was created ({left[0]} holds "
                    "nothing measured): run the original command again (without --resume); it removes that")
        return msg

    def clean_leftovers(self) -> list[Path]:
        """Remove the temporary directories of killed starts (nothing measured is in them: cells
        are only written after the rename). Returns what was removed.

        Raises:
            ConfigError: a start of this directory is under way in a live process.
        """
        removed = []
        for p in self.creating_leftovers():
            if is_locked(p) or _pid_alive(p.name.rpartition("-")[2]):  # (it may not have locked yet)
                raise ConfigError(f"run directory {self.path} is being created by "
                                  f"{describe_owner(read_owner(p / '.lock'))}; choose another --out")
            shutil.rmtree(p, ignore_errors=True)
            log.warning("removed %s, left by a start of %s that was killed before the run directory existed "
                        "(nothing had been measured)", p, self.path)
            removed.append(p)
        return removed

    def create_new(self, manifest: Mapping[str, Any], command: Optional[Sequence[str]] = None) -> RunLock:
        """Create the run directory atomically: ``.NAME.creating-<pid>`` with its lock, the manifest
        (first) and ``cells/``, renamed into place. ``self.path`` must be absent or an empty
        directory. Returns the held lock (its descriptor survives the rename).

        Raises:
            ConfigError: the directory cannot be created, or appeared meanwhile and is not empty.
        """
        tmp = self.path.parent / f".{self.path.name}.creating-{os.getpid()}"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as e:
            raise ConfigError(f"cannot create the run directory {str(self.path)!r}: {e}") from None
        lk = RunLock(tmp)
        try:
            lk.acquire(command, display_dir=self.path)
            write_json(tmp / "manifest.json.bak", manifest)
            write_json(tmp / "manifest.json", manifest)
            (tmp / "cells").mkdir()
            os.rename(tmp, self.path)  # replaces an empty directory; fails on a non-empty one
        except BaseException as e:
            lk.release()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, OSError):
                raise ConfigError(f"cannot create the run directory {str(self.path)!r}: {e.strerror}"
                                  + (" (another run created it meanwhile)" if self.path.exists() else "")) from None
            raise
        lk.run_dir = self.path
        return lk

    # -- manifest --
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def manifest_backup_path(self) -> Path:
        return self.path / "manifest.json.bak"

    def has_manifest(self) -> bool:
        """Whether there is a manifest (or its backup) here: a run directory."""
        return self.manifest_path.is_file() or self.manifest_backup_path.is_file()

    def read_manifest(self) -> dict[str, Any]:
        """The manifest; from manifest.json.bak (with a warning) when manifest.json is damaged.

        Raises:
            ConfigError: neither file can be read as a JSON object.
        """
        errs = []
        for p in (self.manifest_path, self.manifest_backup_path):
            try:
                m = json.loads(p.read_text(encoding="utf-8"))
                if not isinstance(m, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError, UnicodeDecodeError) as e:
                errs.append(f"{p.name}: {e}")
                continue
            if p != self.manifest_path:
                log.warning("%s is damaged (%s); recovered the manifest from %s", self.manifest_path, errs[0], p.name)
            return m
        raise ConfigError(f"{self.path}: the manifest cannot be read ({'; '.join(errs)}); the run cannot be "
                          f"resumed. Its finished cells are in {self.cells_dir}; start the sweep again with "
                          "another --out")

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Write the backup, then manifest.json (each atomically): one of them is always whole."""
        write_json(self.manifest_backup_path, manifest)
        write_json(self.manifest_path, manifest)

    # -- cells --
    def marker(self, cell: Cell) -> Path:
        return self.cells_dir / f"{cell.key}.json"

    def is_done(self, cell: Cell) -> bool:
        p = self.marker(cell)
        if not p.is_file():
            return False
        try:
            info = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return info.get("cell_id") == cell.cell_id and all(
            (self.cells_dir / f"{cell.key}.{t}.parquet").is_file() for t in self.TABLES)

    def write_cell(self, cell: Cell, tables: Mapping[str, pd.DataFrame], info: Mapping[str, Any]) -> None:
        """Write a finished cell: its tables first (in the schema of :mod:`llm_dvfs.schema`), the
        marker last (each atomically), with SHA-256, size and rows of every part."""
        parts = {}
        for t in self.TABLES:
            df = tables[t]
            p = self.cells_dir / f"{cell.key}.{t}.parquet"
            atomic_write_with(p, lambda tmp, df=df, t=t: write_parquet(t, df, tmp))
            parts[t] = integrity.part_record(p, len(df))
        write_json(self.marker(cell), dict(info, cell_id=cell.cell_id, key=cell.key, index=cell.index, parts=parts))
        self._frames[cell.key] = {t: conform(t, tables[t]) for t in self.TABLES}

    def cell_tables(self, cell: Cell) -> dict[str, pd.DataFrame]:
        if cell.key not in self._frames:
            self._frames[cell.key] = {t: read_parquet(t, self.cells_dir / f"{cell.key}.{t}.parquet")
                                      for t in self.TABLES}
        return self._frames[cell.key]

    def verify(self, cells: Sequence[Cell]) -> list[integrity.Damage]:
        """Check every finished cell against its marker's digests (and every marker that is
        not JSON); quarantine the damaged ones (they run again) and log each. Returns them."""
        keys = [c.key for c in cells if self.marker(c).is_file()]
        found = integrity.verify_cells(self.cells_dir, self.TABLES, keys)
        for d in found:
            log.warning("%s", integrity.report(d, self.path))
            integrity.quarantine(self.path, self.cells_dir, d.key)
            self._frames.pop(d.key, None)
        return found

    def consolidate(self, cells: Sequence[Cell], tables: Sequence[str] = TABLES) -> dict[str, int]:
        """Rewrite the run tables (requests.parquet and .csv, tokens.parquet, power.parquet;
        or those named in ``tables``) from the finished cells, in plan order, atomically.
        Returns row counts per table. A cell whose part cannot be read is quarantined (it runs
        again on a resume), logged and left out (``self.damaged``): this never raises on one."""
        done = []
        for c in cells:
            if not self.is_done(c):
                continue
            try:
                self.cell_tables(c)
            except Exception as e:  # pyarrow's ArrowInvalid, OSError, a schema mismatch, ...
                d = integrity.Damage(c.key, self.cells_dir / f"{c.key}.*.parquet",
                                     f"unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                log.error("%s", integrity.report(d, self.path))
                integrity.quarantine(self.path, self.cells_dir, c.key)
                self._frames.pop(c.key, None)
                self.damaged.append(d)
                continue
            done.append(c)
        counts = {}
        for t in tables:
            frames = [self.cell_tables(c)[t] for c in done]
            frames = [f for f in frames if len(f)]
            # concatenation can widen dtypes (a column all-null in one part): conform brings the
            # schema's back before writing
            df = conform(t, pd.concat(frames, ignore_index=True)) if frames else empty(t)
            atomic_write_with(self.path / f"{t}.parquet", lambda tmp, df=df, t=t: write_parquet(t, df, tmp))
            if t == "requests":
                atomic_write_with(self.path / "requests.csv", lambda tmp, df=df: df.to_csv(tmp, index=False))
            counts[t] = len(df)
        return counts

    def remove_partial(self, cells: Sequence[Cell]) -> int:
        """Delete the part files of unfinished cells and stray temporaries (left by a kill).
        Returns how many files were removed."""
        done = {c.key for c in cells if self.is_done(c)}
        n = 0
        for p in list(self.cells_dir.iterdir()) + list(self.path.glob(".*.tmp")):
            stray_tmp = p.name.startswith(".") and p.name.endswith(".tmp")
            unfinished = p.is_file() and p.name.split(".")[0] not in done
            if stray_tmp or unfinished:
                try:
                    p.unlink()
                    n += 1
                except OSError:
                    pass
        return n


# ============================================================================================
# manifest
# ============================================================================================
def now_iso() -> str:
    """Now, UTC, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_revision() -> Optional[str]:
    """The git commit of the llm_dvfs source tree (``+dirty`` when modified), or None."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no", "--", "."],
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


#: Distributions whose versions the manifest records (``None`` = not installed).
VERSIONED_PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "huggingface-hub", "numpy", "pandas",
                      "pyarrow", "scipy", "matplotlib", "nltk", "tqdm")


def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version() -> Optional[str]:
    """CUDA of the torch build: ``torch.version.cuda`` when torch is already imported, else from
    the installed distributions (a ``+cu128`` wheel tag, or the nvidia-cuda-runtime wheel that
    the default Linux build depends on), so that reading it never imports torch."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return getattr(getattr(torch, "version", None), "cuda", None)
    local = (_dist_version("torch") or "").partition("+")[2]
    if local.startswith("cu") and local[2:].isdigit() and len(local) >= 5:
        return f"{local[2:-1]}.{local[-1]}"
    if local:  # +cpu, +rocm6.2, ...: no CUDA
        return None
    for name in ("nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12", "nvidia-cuda-runtime-cu11",
                 "nvidia-cuda-runtime"):
        v = _dist_version(name)
        if v:  # 12.4.127 -> 12.4, as torch.version.cuda spells it
            return ".".join(v.split(".")[:2])
    return None


def versions() -> dict[str, Optional[str]]:
    """Versions of llm_dvfs, Python, CUDA and the packages a run depends on (None = absent).

    Read from the installed distributions' metadata (:mod:`importlib.metadata`), never by
    importing the packages: importing torch to read a version costs seconds and memory. Never
    raises.
    """
    from llm_dvfs import __version__

    out: dict[str, Optional[str]] = {"llm_dvfs": __version__, "python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        out[name] = _dist_version(name)
    out["cuda"] = _cuda_version()
    return out


__all__ = ["FORMAT_VERSION", "VERSIONED_PACKAGES", "RunDir", "write_json", "json_default", "now_iso",
           "git_revision", "versions"]
