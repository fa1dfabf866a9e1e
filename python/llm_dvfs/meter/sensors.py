"""A sensor model per GPU, measured rather than assumed.

What each power source of one GPU really delivers: the sample buffer's spacing and how often
its value changes, the instant field's update period, the energy counter's update period and
read latency, and the buffer's lag behind the work. ``sensor_probe.measure()`` takes a few
seconds of dense sampling (and, where torch with CUDA is present, a few matmul bursts for the
lag); ``python -m llm_dvfs.info --sensors`` runs it and caches the result per GPU UUID here, and
every ``PowerMonitor`` started later uses the cached lag of its GPUs (else the per-source
default).

Read-only: nothing here changes a GPU setting.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np

from llm_dvfs.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

# What a source resolves when nothing was measured: H100/H200 values (docs/design.md).
DEFAULT_RESOLUTION_S = {"buffer": 0.02, "instant": 0.1, "counter": 0.1, "average": 1.0, "none": float("inf")}


@dataclass
class SensorModel:
    """Measured cadence of one GPU's power sources. Times in s; None = not measured."""

    uuid: str
    name: str = ""
    buffer_spacing_s: Optional[float] = None    # median interval between buffer samples
    buffer_change_s: Optional[float] = None     # median interval between buffer value changes
    field_update_s: Optional[float] = None      # median interval between instant-field changes
    counter_update_s: Optional[float] = None    # median interval between counter changes
    counter_read_s: Optional[float] = None      # median duration of one counter read
    lag_s: Optional[float] = None               # buffer lag behind the work
    lag_method: str = "default"                 # measured | default
    n_bursts: int = 0
    measured_at: str = ""

    def resolution_s(self, source: str) -> float:
        """Shortest interval the source resolves: its update period (measured, else default)."""
        measured = {"buffer": self.buffer_change_s, "instant": self.field_update_s,
                    "counter": self.counter_update_s}.get(source)
        return float(measured) if measured else DEFAULT_RESOLUTION_S.get(source, float("inf"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SensorModel":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _median_change_interval(t: np.ndarray, v: np.ndarray) -> Optional[float]:
    """Median time between value changes (needs at least 3 changes)."""
    if len(t) < 4:
        return None
    ch = t[1:][np.diff(v) != 0]
    return float(np.median(np.diff(ch))) if len(ch) >= 3 else None


def _counter_update_interval(t: np.ndarray, mj: np.ndarray, max_read_gap_s: float = 0.02) -> Optional[float]:
    """Median time between counter changes, from pairs of consecutive changes whose reads are
    never more than ``max_read_gap_s`` apart in between (dense reads: a probe's 5 ms reads). A
    window edge's bracket stops at its first change and slow-lane reads are 1 s apart: neither
    resolves the update period, and neither is used."""
    if len(t) < 4:
        return None
    v = np.asarray(mj, dtype=np.float64)
    ch = np.flatnonzero(np.diff(v) != 0) + 1          # read indices that show a new value
    if len(ch) < 2:
        return None
    wide = np.concatenate(([0], np.cumsum(np.diff(t) > max_read_gap_s)))  # wide gaps up to read i
    dense = wide[ch[1:]] == wide[ch[:-1] - 1]        # no wide gap from the read before one change
    iv = np.diff(t[ch])[dense]                        # to the read that shows the next
    return float(np.median(iv)) if len(iv) >= 3 else None


def _median_spacing(t: np.ndarray) -> Optional[float]:
    return float(np.median(np.diff(t))) if len(t) >= 3 else None


def model_from_lanes(uuid: str, name: str, lanes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]],
                     *, changes_only: tuple[str, ...] = ("instant",)) -> SensorModel:
    """A model from recorded lanes (kind -> (t_s, value, extra) as the monitor stores them).

    The poll lanes store changes only, so their spacing is the change interval; the counter lane
    stores every read (value = call duration, extra = mJ); its update period comes only from
    runs of dense reads.
    """
    bt, bv, _ = lanes.get("buffer", (np.empty(0),) * 3)
    it, iv, _ = lanes.get("instant", (np.empty(0),) * 3)
    ct, cdur, cmj = lanes.get("counter", (np.empty(0),) * 3)
    field = _median_spacing(it) if "instant" in changes_only else _median_change_interval(it, iv)
    return SensorModel(
        uuid=uuid, name=name,
        buffer_spacing_s=_median_spacing(bt),
        buffer_change_s=_median_change_interval(bt, bv),
        field_update_s=field,
        counter_update_s=_counter_update_interval(ct, cmj),
        counter_read_s=float(np.median(cdur)) if len(cdur) else None,
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


# -- the cache --------------------------------------------------------------------------------
def cache_path() -> Path:
    """``$LLM_DVFS_CACHE_DIR/sensors.json``, else ``$XDG_CACHE_HOME/llm_dvfs/sensors.json``,
    else ``~/.cache/llm_dvfs/sensors.json``."""
    base = os.environ.get("LLM_DVFS_CACHE_DIR")
    if not base:
        base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llm_dvfs")
    return Path(base) / "sensors.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:  # a damaged cache is ignored, never fatal
        log.warning("ignoring unreadable sensor cache %s: %s", path, e)
        return {}


def load(uuid: str, path: Optional[Path] = None) -> Optional[SensorModel]:
    """The cached model of the GPU with this UUID, or None."""
    d = _read_cache(path or cache_path()).get(uuid)
    if not isinstance(d, dict):
        return None
    try:
        return SensorModel.from_dict(d)
    except TypeError:
        return None


def save(model: SensorModel, path: Optional[Path] = None) -> Path:
    """Store ``model`` under its UUID (atomic replace of the whole cache file)."""
    path = path or cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache(path)
    data[model.uuid] = model.to_dict()
    atomic_write_bytes(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
    return path
