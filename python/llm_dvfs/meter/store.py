"""The monitor's sample store: one append-only, time-ordered lane per (record kind, device).

Records arrive from the sampler in drains that are already in time order per lane. Each lane
keeps preallocated numpy arrays that grow by doubling, so appending costs amortised O(new
records) and reading a lane is an O(1) view: a window measured after ten hours of sampling
costs what it costs after ten seconds (the previous store re-sorted its whole history on every
pull). With ``history_s`` set, records older than that are dropped as new ones arrive (the
oldest retained instant is ``start_s``).

Records that would go back in time on a lane are dropped: after ``stop(); start()`` the new
sampler re-reads the driver's buffer (its last ~2.4 s), and those samples are already stored.

Error records (kind ``error``: value = NVML field id, extra = nvmlReturn, aux = NvmlSym index)
are also filed per *error lane* (symbol, field), so that :meth:`SampleStore.error_episodes`
finds the errors in force during a window by bisection, O(lanes · log n + k), instead of
replaying the whole error history before it.
"""
from __future__ import annotations

from typing import Iterable, Optional

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
        # device -> (NvmlSym index, field id) -> that error lane's records (x = nvmlReturn)
        self._error_lanes: dict[int, dict[tuple[int, int], Lane]] = {}
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
            lane = self.lane(name, dev)
            n_before = lane.n
            # buffer samples carry driver timestamps: an equal time is a re-read, not a new sample
            lane.append(t_all[idx], rec["value"][idx], rec["extra"][idx].copy(), aux,
                        strict=(name == "buffer"))
            if name == "error":
                self._file_errors(dev, lane, n_before)
        self._latest_s = max(self._latest_s, float(t_all.max()))
        if self._latest_s >= self._next_trim_s:
            self._trim()

    def _file_errors(self, dev: int, lane: Lane, n_before: int) -> None:
        """File the error records the lane just kept (from position ``n_before``) by error lane."""
        if lane.n == n_before:
            return
        by_lane = self._error_lanes.setdefault(dev, {})
        sl = slice(n_before, lane.n)
        t, v, x, sym = lane.t[sl], lane.v[sl], lane.x[sl], lane.aux[sl]
        pairs, which = np.unique(np.column_stack([sym, v]), axis=0, return_inverse=True)
        which = which.reshape(-1)
        for p, (s, f) in enumerate(pairs):
            key = (int(s), int(f))
            sub = by_lane.get(key)
            if sub is None:
                sub = by_lane[key] = Lane(capacity=16)
            m = which == p
            sub.append(t[m], v[m], x[m])

    def _trim(self) -> None:
        assert self.history_s is not None
        t_min = self._latest_s - self.history_s
        for lane in self._lanes.values():
            lane.trim_before(t_min)
        # each error lane keeps its record in force at t_min: an error that began before the
        # retained history and still lasts is still reported
        for by_lane in self._error_lanes.values():
            for lane in by_lane.values():
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

    def error_episodes(self, dev: int, lo_s: float, hi_s: float,
                       transient_codes: Iterable[int] = ()) -> list[tuple[int, int, int]]:
        """(nvmlReturn, NvmlSym index, field id) of each error of ``dev`` in force at some time in
        [lo_s, hi_s] (host monotonic s).

        The sampler records a lane's error once when it starts and once with code 0 when the
        lane works again, so an error that began before ``lo_s`` counts while it lasts: first
        those (the last record of each error lane before ``lo_s``, in the order they began),
        then every non-zero record inside [lo_s, hi_s] in time order. Codes in
        ``transient_codes`` never persist from before ``lo_s`` (the sampler stops calling a lane
        that answers NOT_SUPPORTED: it falls back and records nothing more). Costs
        O(error lanes · log n + k) for n error records and k of them inside the interval.
        """
        transient = set(transient_codes)
        before: list[tuple[float, tuple[int, int, int]]] = []
        for (sym, field_id), lane in self._error_lanes.get(dev, {}).items():
            i = int(np.searchsorted(lane.t[:lane.n], lo_s, side="left")) - 1  # last record < lo_s
            if i >= 0:
                code = int(lane.x[i])
                if code and code not in transient:
                    before.append((float(lane.t[i]), (code, sym, field_id)))
        before.sort(key=lambda e: e[0])
        t, field_ids, codes = self.get("error", dev)
        syms = self.get_aux("error", dev)
        i0 = int(np.searchsorted(t, lo_s, side="left"))
        i1 = int(np.searchsorted(t, hi_s, side="right"))
        during = [(int(codes[j]), int(syms[j]), int(field_ids[j])) for j in range(i0, i1) if codes[j]]
        return [e for _, e in before] + during

    def n_records(self) -> int:
        return sum(lane.n for lane in self._lanes.values())
