"""Are a run directory's finished cells intact? Part-file digests, their verification, quarantine.

Every finished cell's marker (``cells/<key>.json``) records, for each of its part files, the
SHA-256, the size in bytes and the row count (:func:`part_record`, written by
:meth:`llm_dvfs.sweep.rundir.RunDir.write_cell`). Before a resume plans its work,
:func:`verify_cells` checks every finished cell against its marker; a damaged cell (a part
missing, truncated, changed, or a marker that is not JSON) is reported (one log line naming the
file) and *quarantined*: its files move to ``RUN/damaged/`` (kept for inspection, out of the
way) so the cell counts as not done and runs again.

Why digests and not just "can pyarrow read it": a part truncated at a page boundary or with a
flipped byte can still parse, and reading every part in full costs more than hashing it.
Markers of runs older than the digests (no ``parts`` key) are checked by reading the Parquet
footer's row count instead.

Failure modes: the functions here never raise on a damaged file (that is what they report);
``OSError`` from moving files to ``damaged/`` is logged and the file is deleted instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

log = logging.getLogger("llm_dvfs.sweep.integrity")

DAMAGED_DIR = "damaged"
_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of the file (read in 1 MiB chunks). Raises OSError."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def part_record(path: Path, rows: int) -> dict[str, Any]:
    """What a marker records of one part file: name, ``sha256``, ``size_bytes``, ``rows``."""
    return {"file": path.name, "sha256": sha256_file(path), "size_bytes": path.stat().st_size, "rows": int(rows)}


@dataclass(frozen=True)
class Damage:
    """One damaged finished cell: the cell's key, the file at fault and what is wrong with it."""

    key: str
    file: Path
    problem: str

    def as_dict(self) -> dict[str, str]:
        return {"key": self.key, "file": str(self.file), "problem": self.problem}


def _parquet_rows(path: Path) -> Optional[int]:
    try:
        import pyarrow.parquet as pq
        return int(pq.read_metadata(path).num_rows)
    except Exception:  # pyarrow raises ArrowInvalid, OSError, ... for a damaged footer
        return None


def check_part(path: Path, rec: Optional[dict[str, Any]]) -> Optional[str]:
    """What is wrong with part file ``path`` given its marker record ``rec`` (None: a marker
    without digests), or None when it is intact. Never raises."""
    if not path.is_file():
        return "missing"
    if rec is None:
        return None if _parquet_rows(path) is not None else "unreadable Parquet (no valid footer)"
    try:
        size = path.stat().st_size
        if size != rec.get("size_bytes"):
            return f"size {size} bytes, the marker recorded {rec.get('size_bytes')}"
        if sha256_file(path) != rec.get("sha256"):
            return "SHA-256 differs from the one the marker recorded"
    except OSError as e:
        return f"unreadable ({e.strerror})"
    return None


def check_cell(cells_dir: Path, key: str, tables: Sequence[str]) -> Optional[Damage]:
    """The first damage found in cell ``key`` (marker, then each part), or None."""
    marker = cells_dir / f"{key}.json"
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as e:
        return Damage(key, marker, f"marker unreadable ({e})")
    parts = info.get("parts")
    for t in tables:
        p = cells_dir / f"{key}.{t}.parquet"
        rec = parts.get(t) if isinstance(parts, dict) else None
        if isinstance(parts, dict) and rec is None:
            problem: Optional[str] = "not recorded in the marker"
        else:
            problem = check_part(p, rec)
        if problem:
            return Damage(key, p, problem)
    return None


def _marker_keys(cells_dir: Path) -> list[str]:
    return sorted(p.name[:-len(".json")] for p in cells_dir.glob("*.json") if "." not in p.name[:-len(".json")])


def verify_cells(cells_dir: Path, tables: Sequence[str], keys: Optional[Iterable[str]] = None) -> list[Damage]:
    """Check the cells that have a marker (or those in ``keys``); returns the damaged ones."""
    todo = _marker_keys(cells_dir) if keys is None else list(keys)
    out = []
    for key in todo:
        d = check_cell(cells_dir, key, tables)
        if d is not None:
            out.append(d)
    return out


def quarantine(run_dir: Path, cells_dir: Path, key: str) -> list[Path]:
    """Move the marker (first: from then on the cell is not done) and the parts of cell ``key``
    to ``RUN/damaged/``; returns where they went. A file that cannot be moved is deleted."""
    dest = run_dir / DAMAGED_DIR
    moved = []
    files = [cells_dir / f"{key}.json"] + sorted(cells_dir.glob(f"{key}.*.parquet"))
    for p in files:
        if not p.exists():
            continue
        try:
            dest.mkdir(exist_ok=True)
            target = dest / p.name
            n = 1
            while target.exists():  # an earlier quarantine of the same cell
                target = dest / f"{p.name}.{n}"
                n += 1
            os.replace(p, target)
            moved.append(target)
        except OSError as e:
            log.warning("cannot move %s to %s (%s); deleting it", p, dest, e.strerror)
            try:
                p.unlink()
            except OSError:
                pass
    return moved


def report(d: Damage, run_dir: Path) -> str:
    """The log line of a damaged cell."""
    return (f"damaged part {d.file}: {d.problem}; cell {d.key} moved to {run_dir / DAMAGED_DIR} and "
            "will be run again")


__all__ = ["DAMAGED_DIR", "Damage", "sha256_file", "part_record", "check_part", "check_cell", "verify_cells",
           "quarantine", "report"]
