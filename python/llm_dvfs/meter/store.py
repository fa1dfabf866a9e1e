"""The monitor's sample store: one append-only, time-ordered lane per (record kind, device).

Records arrive from the sampler in drains that are already in time order per lane. Each lane
keeps preallocated numpy arrays that grow by doubling, so appending costs amortised O(new
records) and reading a lane is an O(1) view: a window measured after ten hours of sampling
costs what it costs after ten seconds (the previous store re-sorted its whole history on every
pull). With ``history_s`` set, records older than that are dropped as new ones arrive (the
oldest retained instant is ``start_s``).

Records that would go back in time on a lane are dropped: after ``stop(); start()`` the new
sampler re-reads the driver's buffer (its last ~2.4 s), and those samples are already stored.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

_EMPTY_F = np.empty(0)
_EMPTY_U = np.empty(0, dtype=np.uint64)


class Lane:
    """Time-ordered records of one kind on one device: t (host monotonic s), value, extra."""

    __slots__ = ("t", "v", "x", "n", "dropped_out_of_order", "aux")

    def __init__(self, capacity: int = 1024, aux: bool = False) -> None:
        self.t = np.empty(capacity)
        self.v = np.empty(capacity)
        self.x = np.empty(capacity, dtype=np.uint64)
        self.aux = np.empty(capacity) if aux else None
        self.n = 0
        self.dropped_out_of_order = 0

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.t[:self.n], self.v[:self.n], self.x[:self.n]

    def append(self, t: np.ndarray, v: np.ndarray, x: np.ndarray, aux: Optional[np.ndarray] = None,
               *, strict: bool = False) -> None:
        """Append records (sorted here if the chunk is not). Records at or before the lane's last
        time (strict) or before it (not strict) are dropped and counted."""
        if len(t) == 0:
            return
        if len(t) > 1 and np.any(np.diff(t) < 0):
            order = np.argsort(t, kind="stable")
            t, v, x = t[order], v[order], x[order]
            aux = aux[order] if aux is not None else None
        if self.n:
            last = self.t[self.n - 1]
            keep = t > last if strict else t >= last
            if not keep.all():
                self.dropped_out_of_order += int((~keep).sum())
                t, v, x = t[keep], v[keep], x[keep]
                aux = aux[keep] if aux is not None else None
                if len(t) == 0:
                    return
        need = self.n + len(t)
        if need > len(self.t):
            cap = max(need, 2 * len(self.t))
            for name in ("t", "v", "x", "aux"):
                old = getattr(self, name)
                if old is None:
                    continue
                new = np.empty(cap, dtype=old.dtype)
                new[:self.n] = old[:self.n]
                setattr(self, name, new)
        sl = slice(self.n, need)
        self.t[sl], self.v[sl], self.x[sl] = t, v, x
        if self.aux is not None:
            self.aux[sl] = aux if aux is not None else 0.0
        self.n = need

    def trim_before(self, t_min: float) -> None:
        """Drop records older than ``t_min``, keeping the one in force at it (zero-order hold)."""
        k = int(np.searchsorted(self.t[:self.n], t_min, side="right")) - 1
        if k <= 0:
            return
        m = self.n - k
        self.t[:m] = self.t[k:self.n]
        self.v[:m] = self.v[k:self.n]
        self.x[:m] = self.x[k:self.n]
        if self.aux is not None:
            self.aux[:m] = self.aux[k:self.n]
        self.n = m


class SampleStore:
    """Records drained from the sampler, by kind and device.

    Args:
        kinds: record kind name -> id (``_core.RECORD_KINDS``).
        history_s: keep only this many seconds of history (None: keep everything). Trimming
            happens in steps of a quarter of ``history_s`` so that it stays amortised O(1).
    """

    def __init__(self, kinds: dict[str, int], history_s: Optional[float] = None) -> None:
        self.kinds = kinds
        self.kind_names = {v: k for k, v in kinds.items()}
        self.history_s = history_s
        self.start_s = float("-inf")     # oldest instant the store still covers
        self._lanes: dict[tuple[str, int], Lane] = {}
        self._latest_s = float("-inf")
        self._next_trim_s = float("inf") if history_s is None else float("-inf")

    def lane(self, kind: str, dev: int) -> Lane:
        key = (kind, dev)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(aux=(kind == "error"))
        return lane

    def add(self, rec: dict[str, np.ndarray]) -> None:
        """Append one drain (dict of equal-length arrays: t_ns, kind, device, value, extra, aux)."""
        n = len(rec["t_ns"])
        if n == 0:
            return
        t_all = rec["t_ns"].astype(np.float64) * 1e-9
        key = rec["kind"].astype(np.int64) * 65536 + rec["device"].astype(np.int64)
        # one stable sort groups the drain by lane and keeps each lane's time order
        order = np.argsort(key, kind="stable")
        ks = key[order]
        cuts = np.flatnonzero(np.diff(ks)) + 1
        for idx in np.split(order, cuts):
            kind_id, dev = divmod(int(key[idx[0]]), 65536)
            name = self.kind_names.get(kind_id, f"kind{kind_id}")
            aux = rec["aux"][idx].astype(np.float64) if name == "error" else None
            # buffer samples carry driver timestamps: an equal time is a re-read, not a new sample
            self.lane(name, dev).append(t_all[idx], rec["value"][idx], rec["extra"][idx].copy(), aux,
                                        strict=(name == "buffer"))
        self._latest_s = max(self._latest_s, float(t_all.max()))
        if self._latest_s >= self._next_trim_s:
            self._trim()

    def _trim(self) -> None:
        assert self.history_s is not None
        t_min = self._latest_s - self.history_s
        for lane in self._lanes.values():
            lane.trim_before(t_min)
        self.start_s = max(self.start_s, t_min)
        self._next_trim_s = self._latest_s + 0.25 * self.history_s

    def get(self, kind: str, dev: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t_s, value, extra) of one lane, time-ordered views (do not modify)."""
        lane = self._lanes.get((kind, dev))
        if lane is None:
            return _EMPTY_F, _EMPTY_F, _EMPTY_U
        return lane.view()

    def get_aux(self, kind: str, dev: int) -> np.ndarray:
        lane = self._lanes.get((kind, dev))
        if lane is None or lane.aux is None:
            return _EMPTY_F
        return lane.aux[:lane.n]

    def n_records(self) -> int:
        return sum(lane.n for lane in self._lanes.values())
