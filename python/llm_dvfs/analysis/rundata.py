"""The data a report is built from and made of: a run directory's tables, and the report.

:func:`load_run` reads a run directory written by ``python -m llm_dvfs.run`` (manifest.json,
requests.parquet — requests.csv as a fallback —, tokens.parquet, power.parquet) and brings every
table to the nullable dtypes of :mod:`llm_dvfs.schema` (what was not measured is ``<NA>``);
:class:`Report` holds what
:func:`llm_dvfs.analysis.build.build_report` computed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from llm_dvfs.errors import DataNotFound
from llm_dvfs.schema import conform

#: The CSV tables a report writes (``<name>.csv``), in this order.
CSV_TABLES = ("key_table", "summary", "optimal_clocks", "phase_points", "phase_fits", "correlations",
              "regression", "edp", "edp_optima", "cell_power")


@dataclass
class RunData:
    """The tables of a run directory. ``tokens``/``power`` are None when absent; ``notes``
    collects what was missing or repaired while loading."""
    path: Path
    manifest: dict[str, Any]
    requests: pd.DataFrame
    tokens: pd.DataFrame | None
    power: pd.DataFrame | None
    notes: list[str] = field(default_factory=list)


def _typed(df: pd.DataFrame, kind: str, notes: list[str], source: str) -> pd.DataFrame:
    """Bring a table read from disk to the schema's nullable dtypes (:func:`llm_dvfs.schema.conform`);
    missing columns are added as null and named in ``notes``.

    Run directories of format 1 (before the pyarrow schema) wrote ``clock_event_reasons = -1``
    for "not read"; a bitmask is never negative, so a negative value is read as null here rather
    than as "every throttle bit set".
    """
    df = conform(kind, df, notes, source)
    if "clock_event_reasons" in df.columns:
        neg = (df["clock_event_reasons"] < 0).fillna(False).to_numpy(dtype=bool)
        if neg.any():
            notes.append(f"{source}: {int(neg.sum())} clock_event_reasons of an older format (negative = "
                         "not read) are treated as null.")
            df.loc[neg, "clock_event_reasons"] = pd.NA
    return df


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory.

    Raises:
        DataNotFound: the directory does not exist, or has neither requests.parquet nor
            requests.csv, or its requests table is empty.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise DataNotFound(f"run directory {str(path)!r} does not exist")
    notes: list[str] = []
    manifest: dict[str, Any] = {}
    mpath = path / "manifest.json"
    if mpath.is_file() or (path / "manifest.json.bak").is_file():
        errs = []
        for p in (mpath, path / "manifest.json.bak"):  # the sweep writes the backup just before
            try:
                manifest = json.loads(p.read_text(encoding="utf-8"))
                break
            except (OSError, ValueError) as e:
                errs.append(f"{p.name}: {e}")
        if errs:
            notes.append(f"manifest could not be read ({'; '.join(errs)})"
                         + ("; read manifest.json.bak instead." if manifest else "."))
    else:
        notes.append("manifest.json is missing: the run's configuration and versions are unknown.")
    rebuild = (f"python -m llm_dvfs.run --resume {path}"
               + (" --allow-clock-changes" if manifest.get("mode") == "sweep" else ""))
    if (path / "requests.parquet").is_file():
        try:
            requests = pd.read_parquet(path / "requests.parquet")
        except Exception as e:  # pyarrow's ArrowInvalid (truncated), OSError, ...
            raise DataNotFound(f"{path / 'requests.parquet'} is damaged ({type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else ''}); the run tables are rebuilt from "
                               f"the finished cells by: {rebuild}") from None
        src = "requests.parquet"
    elif (path / "requests.csv").is_file():
        requests = pd.read_csv(path / "requests.csv", keep_default_na=True)
        src = "requests.csv"
        notes.append("requests.parquet is missing; read requests.csv instead.")
    elif manifest:
        raise DataNotFound(f"{path} has no finished cell yet (no requests.parquet); continue the run with: {rebuild}")
    else:
        raise DataNotFound(f"{path} has no requests.parquet or requests.csv: is it a run directory "
                           "written by `python -m llm_dvfs.run`?")
    if requests.empty:
        raise DataNotFound(f"{path / src} has no rows: the run has no finished cell yet"
                           + (f"; continue it with: {rebuild}" if manifest else ""))
    requests = _typed(requests, "requests", notes, src)

    def optional(name: str, kind: str) -> pd.DataFrame | None:
        p = path / f"{name}.parquet"
        if not p.is_file():
            notes.append(f"{name}.parquet is missing: no power trace can be drawn.")
            return None
        try:
            df = pd.read_parquet(p)
        except Exception as e:  # damaged: the report goes on without it
            notes.append(f"{name}.parquet is damaged ({type(e).__name__}); left out. `{rebuild}` rebuilds it.")
            return None
        return _typed(df, kind, notes, p.name)

    return RunData(path, manifest, requests, optional("tokens", "tokens"), optional("power", "power"), notes)


@dataclass
class Report:
    """Everything a report contains; :func:`llm_dvfs.analysis.build.build_report` also writes it
    to ``out_dir``. ``key`` is the table of :func:`llm_dvfs.analysis.findings.key_table`; its
    terminal text is :func:`llm_dvfs.analysis.render.format_key_table`."""
    run: RunData
    out_dir: Path
    group_keys: list[str]
    latency_limit: float
    summary: pd.DataFrame
    optimal: pd.DataFrame
    phase_points: pd.DataFrame
    phase_fits: pd.DataFrame
    correlations: pd.DataFrame
    regression: pd.DataFrame
    key: pd.DataFrame
    findings: list[str]
    cannot_conclude: list[str]
    figures: dict[str, tuple[Path, str]]     # name -> (png path, caption)
    trace_request: str | None
    files: list[Path]
    edp: pd.DataFrame = field(default_factory=pd.DataFrame)          # tradeoffs.edp_table
    edp_optima: pd.DataFrame = field(default_factory=pd.DataFrame)   # tradeoffs.edp_optima
    cell_power: pd.DataFrame = field(default_factory=pd.DataFrame)   # tradeoffs.cell_power
    figure_notes: dict[str, list[str]] = field(default_factory=dict)  # name -> how to read it, numbers
    served_load: pd.DataFrame = field(default_factory=pd.DataFrame)  # analysis.served.load_table (served runs)
    served_notes: list[str] = field(default_factory=list)            # energy accounting, in words
