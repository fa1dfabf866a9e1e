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

Windows, token marks and the per-step attribution are :class:`llm_dvfs.meter.calls.CallMeter`'s
(the sweep's runner measures through it too); this module adds the pieces and the split rule.
Nothing here imports lm_eval; torch is imported on first use.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from llm_dvfs.meter.calls import ATTRIBUTED_COLUMNS, TRACE_MARGIN_S, CallMeter, MeteredCall

log = logging.getLogger(__name__)


@dataclass
class Batch(MeteredCall):
    """One measured model call (a :class:`~llm_dvfs.meter.calls.MeteredCall`: ``window``,
    ``t_start_s``, ``t_end_s``, ``timing``) and the pieces of work in it.

    Attributes:
        pieces: ``(row index in the cell's rows, weight)`` per piece of work in the call, in
            batch order (for generate: one per prompt, in the order of the output rows).
        timing: for a generate call, its ``tokens_per_sequence`` is what each prompt really
            generated (up to its stop sequence: :meth:`~llm_dvfs.meter.calls.MeteredCall.set_tokens`).
    """

    pieces: list[tuple[int, float]] = field(default_factory=list)


def _split(total: Optional[float], weights: list[float]) -> list[float]:
    """``total`` in proportion to ``weights`` (NaN where there is nothing to split)."""
    s = float(sum(weights))
    if total is None or not math.isfinite(total) or s <= 0:
        return [math.nan] * len(weights)
    return [float(total) * w / s for w in weights]


class BatchMeter(CallMeter):
    """Windows around forward passes and ``generate`` calls on one device (a
    :class:`~llm_dvfs.meter.calls.CallMeter` whose calls are :class:`Batch` es), and the split
    of their energy over the cell's requests.

    Args: as :class:`~llm_dvfs.meter.calls.CallMeter` (``monitor``, ``device``,
    ``token_timing``, ``sync_devices``; ``timing_error`` says why token timing is off).
    """

    record_type = Batch

    def forward(self, fn: Callable[[], Any], name: str = "lm_eval.forward") -> tuple[Any, Batch]:
        """``fn()`` (a forward pass) inside a window; returns (its result, the Batch, no pieces yet)."""
        return self.call(fn, name)  # type: ignore[return-value]

    def generate(self, model: Any, kwargs: dict[str, Any],
                 name: str = "lm_eval.generate") -> tuple[Any, Batch]:
        """``model.generate(**kwargs)`` inside a window, every step marked when token timing is
        on; returns (the output ids, the Batch; set what each prompt generated with
        ``batch.set_tokens``)."""
        return super().generate(model, kwargs, name)  # type: ignore[return-value]

    # -- after the cell ----------------------------------------------------------------------
    def finish(self, rows: list[dict[str, Any]], batches: list[Batch],
               cell_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
        """Fill the measurement columns of ``rows`` (in place) from ``batches``.

        Returns (tokens rows, power rows, the cell's info: ``batches``, ``busy_s``, ``energy_j``
        of the windows, ``energy_method``, ``warnings``, ``attribution``).
        """
        acc: dict[int, dict[str, Any]] = {}
        warnings: list[str] = []
        idle = self.idle_power_w
        window_energy: list[float] = []
        methods: set[str] = set()
        for k, b in enumerate(batches):
            m = b.measurement()
            warnings.extend(f"batch {k}: {e}" for e in b.errors())
            window_energy.append(m.energy_j)
            methods.add(m.energy_method)
            weights = [w for _, w in b.pieces]
            e_share = _split(m.energy_j, weights)
            c_share = _split(m.energy_j_counter, weights)
            a_share = _split(m.active_energy_j, weights)
            for j, ((i, _), e, c, a) in enumerate(zip(b.pieces, e_share, c_share, a_share)):
                r = acc.get(i)
                if r is None:  # the first batch of this request gives its batch and clock columns
                    r = acc[i] = {"energy_j": 0.0, "energy_j_counter": 0.0, "active_energy_j": 0.0,
                                  "latency_s": 0.0, "batches": set(), "batch_index": j,
                                  "sm_mhz_observed": m.sm_mhz, "mem_mhz_observed": m.mem_mhz,
                                  "clock_event_reasons": m.clock_event_reasons if m.devices else None,
                                  "avg_power_w": m.avg_power_w, "energy_method": m.energy_method}
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
        tokens, summary = self._attribute(rows, batches, cell_id, warnings)
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
                   warnings: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-step attribution of the generate batches (see the module docstring)."""
        timed = [b for b in batches if b.timing is not None]
        if not timed:
            return [], {}
        ids = [[rows[i]["request_id"] for i, _ in b.pieces] for b in timed]
        by_id = {rows[i]["request_id"]: rows[i] for b in timed for i, _ in b.pieces}
        try:
            per, tokens, summary = self.attribute(timed, ids, cell_id)
        except Exception as e:  # noqa: BLE001 - attribution must never lose the request rows
            msg = f"token attribution failed ({type(e).__name__}: {e}); energy split evenly per batch"
            log.warning("%s: %s", cell_id, msg)
            warnings.append(msg)
            return [], {}
        # time only: a request's latency stays the summed duration of its batches
        keep = ATTRIBUTED_COLUMNS if self.monitor is not None else ("ttft_s", "tpot_s")
        for rid, p in per.items():
            by_id[rid].update({k: v for k, v in p.items() if k in keep})
        return tokens, summary


__all__ = ["Batch", "BatchMeter", "TRACE_MARGIN_S"]
