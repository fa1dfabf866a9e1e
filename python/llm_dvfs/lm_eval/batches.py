"""Measuring the harness model's batches: a PowerMonitor window around every model call.

A *batch* is one model call: a forward pass over up to ``batch_size`` log-likelihood pieces, or
one ``generate`` call over up to ``batch_size`` prompts. :class:`BatchMeter` opens a monitor
window around it (the model's CUDA device synchronised at both edges, so the window holds the
call's GPU work and nothing queued before it) and, for ``generate``, marks every step with a
:class:`~llm_dvfs.meter.timeline.TokenTimer`. After a cell's last batch, :meth:`BatchMeter.finish`
finalises the windows (once per cell: finalising waits for the sampler to deliver samples past
a window's end) and turns them into request values:

* **Split rule.** A batch's window energy (and its counter delta and active energy) is split
  over its pieces in proportion to their weights, so the requests of a batch sum exactly to
  the batch's energy. Log-likelihood pieces weigh the tokens they put through the model
  (padding is batching overhead, shared in the same proportion); generate pieces weigh 1 each.
  A request made of several pieces (``loglikelihood_rolling`` windows) gets the sum of its
  pieces' shares, and as ``latency_s`` the summed duration of the batches it was in.
* **Generate batches** are then attributed per step (:func:`llm_dvfs.meter.attribution.attribute`,
  as the sweep's runner does): each step's energy is split equally over the sequences still
  generating, which gives ``ttft_s``, ``tpot_s``, ``prefill_energy_j``, ``decode_energy_j``
  and one ``tokens`` row per generated token. If that fails, the equal window split stays and
  the cell's info says why.
* **Without a GPU** (no monitor, or one that is not ``available``) everything is timed on the
  host clock and every energy is NaN with ``energy_method = "none"``; nothing raises.

Nothing here imports lm_eval; torch is imported on first use.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)

#: trace margin around a cell for the attribution's lag search and power.parquet, s
TRACE_MARGIN_S = 0.25


@dataclass
class Batch:
    """One measured model call.

    Attributes:
        pieces: ``(row index in the cell's rows, weight)`` per piece of work in the call, in
            batch order (for generate: one per prompt, in the order of the output rows).
        window: the monitor Window (None when time only).
        t_start_s, t_end_s: the call's edges, host monotonic s.
        timing: the :class:`~llm_dvfs.meter.timeline.TokenTiming` of a generate call (None for
            forward passes or without token timing); its ``tokens_per_sequence`` is what each
            prompt really generated (up to its stop sequence).
    """

    pieces: list[tuple[int, float]] = field(default_factory=list)
    window: Any = None
    t_start_s: float = math.nan
    t_end_s: float = math.nan
    timing: Any = None

    @property
    def duration_s(self) -> float:
        return self.t_end_s - self.t_start_s


def _split(total: Optional[float], weights: list[float]) -> list[float]:
    """``total`` in proportion to ``weights`` (NaN where there is nothing to split)."""
    s = float(sum(weights))
    if total is None or not math.isfinite(total) or s <= 0:
        return [math.nan] * len(weights)
    return [float(total) * w / s for w in weights]


class BatchMeter:
    """Windows around forward passes and ``generate`` calls on one device.

    Args:
        monitor: a started :class:`~llm_dvfs.meter.monitor.PowerMonitor`; None or one that is
            not ``available`` = time only.
        device: the model's input device (``cuda:N`` or ``cpu``), where token marks are taken.
        token_timing: mark every generate step (TTFT, TPOT, per-token rows and energy).
        sync_devices: CUDA ordinals synchronised at every window edge (a model split over GPUs
            needs all of them); None = ``device`` alone when it is a CUDA device.
    """

    def __init__(self, monitor: Any, device: str, token_timing: bool = True,
                 sync_devices: Optional[list[int]] = None) -> None:
        self.monitor = monitor if (monitor is not None and getattr(monitor, "available", False)) else None
        self.device = device
        if sync_devices is None:
            sync_devices = [int(device.split(":")[1]) if ":" in device else 0] if device.startswith("cuda") else []
        self._sync_devices = list(sync_devices)
        self.timer = None
        self.timing_error: Optional[str] = None
        if token_timing:
            from llm_dvfs import errors
            from llm_dvfs.meter.timeline import Timeline, TokenTimer
            try:
                # built now, not at the first generate: a missing CUDA driver library must not
                # fail a task halfway
                self.timer = TokenTimer(device=device, timeline=Timeline("auto", device=device))
            except (errors.LlmDvfsError, OSError) as e:
                self.timing_error = f"{type(e).__name__}: {e}"
                log.warning("token timing unavailable on %s (%s): TTFT, TPOT and per-token energy "
                            "will be empty", device, self.timing_error)

    def _sync(self) -> None:
        if self._sync_devices:
            import torch
            for d in self._sync_devices:
                torch.cuda.synchronize(d)

    @staticmethod
    def _now_s() -> float:
        from llm_dvfs.meter.timeline import host_monotonic_ns
        return host_monotonic_ns() * 1e-9

    def _open(self, name: str) -> tuple[Any, float]:
        self._sync()  # earlier queued work must not leak into the window
        # sync=False: this meter synchronises the model's device itself; the monitor's default
        # would synchronise every monitored device a second time at each edge
        w = self.monitor.begin_window(name, sync=False) if self.monitor is not None else None
        return w, (self._now_s() if w is None else w.t_start_ns * 1e-9)

    def _close(self, w: Any) -> float:
        self._sync()
        if w is None:
            return self._now_s()
        w.end()
        return w.t_end_ns * 1e-9

    def forward(self, fn: Callable[[], Any], name: str = "lm_eval.forward") -> tuple[Any, Batch]:
        """``fn()`` (a forward pass) inside a window; returns (its result, the Batch, no pieces yet)."""
        w, t0 = self._open(name)
        try:
            res = fn()
        finally:
            t1 = self._close(w)
        return res, Batch(window=w, t_start_s=t0, t_end_s=t1)

    def generate(self, model: Any, kwargs: dict[str, Any],
                 name: str = "lm_eval.generate") -> tuple[Any, Batch]:
        """``model.generate(**kwargs)`` inside a window, every step marked when token timing is
        on; returns (the output ids, the Batch; set ``timing`` via :meth:`set_tokens`)."""
        w, t0 = self._open(name)
        try:
            out = self.timer.generate(model, **kwargs) if self.timer is not None else model.generate(**kwargs)
        finally:
            t1 = self._close(w)
        timing = self.timer.timing if self.timer is not None else None
        return out, Batch(window=w, t_start_s=t0, t_end_s=t1, timing=timing)

    @staticmethod
    def set_tokens(batch: Batch, tokens_per_sequence: list[int]) -> None:
        """What each prompt of a generate batch really generated (the timer counts to the first
        EOS only; a stop sequence ends a prompt earlier)."""
        if batch.timing is not None:
            import numpy as np
            batch.timing = dataclasses.replace(batch.timing,
                                               tokens_per_sequence=np.asarray(tokens_per_sequence, dtype=np.int64))

    # -- after the cell ----------------------------------------------------------------------
    def finish(self, rows: list[dict[str, Any]], batches: list[Batch],
               cell_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """Fill the measurement columns of ``rows`` (in place) from ``batches``.

        Returns (tokens rows, power rows, the cell's info: ``batches``, ``busy_s``, ``energy_j``
        of the windows, ``energy_method``, ``warnings``, ``attribution``).
        """
        acc: dict[int, dict[str, Any]] = {}
        warnings: list[str] = []
        idle = self.monitor.idle_power_w if self.monitor is not None else None
        idle = idle if idle is not None and math.isfinite(idle) else None
        window_energy: list[float] = []
        methods: set[str] = set()
        for k, b in enumerate(batches):
            m = b.window.measurement() if b.window is not None else None
            errs = [str(e) for e in m.errors] if m is not None else []
            if m is not None and m.dropped_records:
                errs.append(f"{m.dropped_records} sampler records dropped")
            warnings.extend(f"batch {k}: {e}" for e in errs)
            energy = m.energy_j if m is not None else math.nan
            window_energy.append(energy)
            method = m.energy_method if m is not None else "none"
            methods.add(method)
            weights = [w for _, w in b.pieces]
            e_share = _split(energy, weights)
            c_share = _split(m.energy_j_counter if m is not None else None, weights)
            a_share = _split(m.active_energy_j if m is not None else None, weights)
            for j, ((i, _), e, c, a) in enumerate(zip(b.pieces, e_share, c_share, a_share)):
                r = acc.get(i)
                if r is None:  # the first batch of this request gives its batch and clock columns
                    r = acc[i] = {"energy_j": 0.0, "energy_j_counter": 0.0, "active_energy_j": 0.0,
                                  "latency_s": 0.0, "batches": set(), "batch_index": j,
                                  "sm_mhz_observed": m.sm_mhz if m is not None else math.nan,
                                  "mem_mhz_observed": m.mem_mhz if m is not None else math.nan,
                                  "clock_event_reasons": m.clock_event_reasons if m is not None and m.devices else None,
                                  "avg_power_w": m.avg_power_w if m is not None else math.nan,
                                  "energy_method": method}
                r["energy_j"] += e
                r["energy_j_counter"] += c
                r["active_energy_j"] += a
                if k not in r["batches"]:
                    r["batches"].add(k)
                    r["latency_s"] += b.duration_s
        for i, r in acc.items():
            r.pop("batches")
            row = rows[i]
            row.update(r)
            if idle is not None:
                row["idle_power_w"] = idle
            n_out = int(row.get("tokens_out") or 0)
            row["j_per_token"] = row["energy_j"] / n_out if n_out > 0 and math.isfinite(row["energy_j"]) else math.nan
        tokens, summary = self._attribute(rows, batches, cell_id, idle, warnings)
        power: list[dict[str, Any]] = []
        if self.monitor is not None and batches:
            tr = self.monitor.trace(batches[0].t_start_s - TRACE_MARGIN_S, batches[-1].t_end_s + TRACE_MARGIN_S)
            power = [{"cell_id": cell_id, "t_s": t, "device": d, "power_w": p, "source": s}
                     for t, d, p, s in tr[["t_s", "device", "power_w", "source"]].itertuples(index=False)]
        finite = [e for e in window_energy if math.isfinite(e)]
        info = {"batches": len(batches), "busy_s": float(sum(b.duration_s for b in batches)),
                "energy_j": float(sum(finite)) if finite and len(finite) == len(window_energy) else None,
                "energy_method": "+".join(sorted(methods)) or "none", "warnings": warnings,
                "attribution": summary}
        return tokens, power, info

    def _attribute(self, rows: list[dict[str, Any]], batches: list[Batch], cell_id: str,
                   idle: Optional[float], warnings: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-step attribution of the generate batches (see the module docstring)."""
        timed = [b for b in batches if b.timing is not None]
        if not timed:
            return [], {}
        from llm_dvfs.meter import attribution

        ids = [[rows[i]["request_id"] for i, _ in b.pieces] for b in timed]
        by_id = {rows[i]["request_id"]: rows[i] for b in timed for i, _ in b.pieces}
        try:
            if self.monitor is not None:
                t0, t1 = timed[0].timing.t_start_s, timed[-1].timing.t_end_s
                trace = self.monitor.trace(t0 - TRACE_MARGIN_S, t1 + TRACE_MARGIN_S)
                att = attribution.attribute(
                    trace, [b.timing for b in timed], request_ids=ids, cell_id=cell_id, window_s=(t0, t1),
                    batch_counter_energy_j=[b.window.measurement().energy_j_counter for b in timed],
                    idle_power_w=idle)
                keep = ("ttft_s", "tpot_s", "latency_s", "energy_j", "prefill_energy_j", "decode_energy_j",
                        "j_per_token", "avg_power_w", "energy_method", "energy_j_counter", "idle_power_w",
                        "active_energy_j")
                for r in att.requests:
                    by_id[r["request_id"]].update({k: v for k, v in r.items() if k in keep})
                return att.tokens.to_dict("records"), att.summary()
            tokens: list[dict[str, Any]] = []
            for b, rids in zip(timed, ids):
                bounds = b.timing.bounds_s
                for j, rid in enumerate(rids):
                    n = int(b.timing.tokens_per_sequence[j])
                    by_id[rid].update({"ttft_s": b.timing.ttft_s, "tpot_s": attribution.request_tpot_s(bounds, n)})
                    tokens.extend(attribution.request_token_rows(bounds, n, rid, cell_id))
            return tokens, {"energy_method": "none"}
        except Exception as e:  # noqa: BLE001 - attribution must never lose the request rows
            msg = f"token attribution failed ({type(e).__name__}: {e}); energy split evenly per batch"
            log.warning("%s: %s", cell_id, msg)
            warnings.append(msg)
            return [], {}


__all__ = ["Batch", "BatchMeter", "TRACE_MARGIN_S"]
