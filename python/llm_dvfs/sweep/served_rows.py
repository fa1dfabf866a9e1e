"""The tables of a served-traffic cell: attribution of the window's energy, and the rows.

:func:`attribute` runs :func:`llm_dvfs.meter.concurrency.attribute_served` over a cell's monitor
window (the monitor's calibrated trace and sensor lag, so the attribution's window energy is the
monitor's own); :func:`cell_tables` turns the served records into ``requests``, ``tokens`` and
``power`` tables in the schema of :mod:`llm_dvfs.schema`, with quality scored as the lock-step
runner scores it. Used by :mod:`llm_dvfs.sweep.served` (which runs the cell); kept apart so that
each module stays short. No torch import unless a task scores by log-likelihood.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import socket
from typing import Any, Optional, Sequence

import numpy as np

from llm_dvfs.schema import to_frame

log = logging.getLogger("llm_dvfs.sweep.served")

#: Trace margin around a cell's window, s (lag compensation shifts samples across its edges).
TRACE_MARGIN_S = 0.5
# the engines' stop reasons -> the lock-step runner's names where they mean the same
_STOP_NAMES = {"length": "max_new_tokens"}
_SOURCES = ("buffer", "instant", "average")


def failed(rec: Any) -> bool:
    """A request that did not finish (its record carries ``extra["error"]``)."""
    return "error" in (rec.extra or {})


def token_rows_without_energy(records: Sequence[Any], cell_id: str) -> list[dict[str, Any]]:
    """Token rows (times only, energy null) of served requests when no energy was measured."""
    from llm_dvfs.meter.attribution import request_token_rows

    out: list[dict[str, Any]] = []
    for r in records:
        n = int(r.token_times_s.size)
        if n:
            out.extend(request_token_rows(np.concatenate(([r.t_start_s], r.token_times_s)), n,
                                          r.request_id, cell_id))
    return out


def attribute(m: Any, records: list[Any], steps: Optional[list[Any]], prefill_weight: float, cell_id: str,
              idle_w: float) -> tuple[Any, dict[str, dict[str, Any]], list[dict[str, Any]], list[str]]:
    """(ServedAttribution or None, per-request values by id, token rows, warnings).

    ``m`` is the cell window's :class:`~llm_dvfs.meter.measurement.Measurement` (None without a
    GPU: times only). ``steps`` None = attribution by token timestamps (an endpoint). An
    attribution that fails (inconsistent records) is a warning, never lost rows: the rows then
    carry times only.
    """
    if m is None or not math.isfinite(m.energy_j):
        return None, {}, token_rows_without_energy(records, cell_id), []
    from llm_dvfs.meter.concurrency import DEFAULT_WEIGHTS_SOURCE, PhaseWeights, attribute_served
    from llm_dvfs.meter.served import DEFAULT_PREFILL_PER_TOKEN

    weights = PhaseWeights(prefill_weight, 1.0,
                           source=DEFAULT_WEIGHTS_SOURCE if prefill_weight == DEFAULT_PREFILL_PER_TOKEN
                           else f"--prefill-weight {prefill_weight:g}")
    try:
        att = attribute_served(
            m.trace(TRACE_MARGIN_S), records, steps, window_s=(m.t_start_s, m.t_end_s),
            # the monitor's lag per device: a closed loop that never idles gives the lag search a
            # flat objective, and the same lag makes the attribution's window energy the monitor's
            lag_s={d: dm.lag_s for d, dm in m.devices.items()}, weights=weights,
            idle_power_w=idle_w if idle_w is not None and math.isfinite(idle_w) else None,
            source=m.energy_method if m.energy_method in _SOURCES else None, cell_id=cell_id,
            counter_energy_j=m.energy_j_counter)
    except Exception as e:  # noqa: BLE001 - the rows must survive a failed attribution
        msg = f"attribution under concurrency failed ({type(e).__name__}: {e}); energies left empty"
        return None, {}, token_rows_without_energy(records, cell_id), [msg]
    per = {r["request_id"]: r for r in att.requests}
    return att, per, att.tokens.to_dict("records"), []


def _quality(ctx: Any, entry: Any, samples: Sequence[Any], records: Sequence[Any], apply_chat: bool
             ) -> tuple[list[float], str, list[str]]:
    """Per-request quality by the task's metric (NaN for failed requests and where it cannot be
    scored), the metric name, and warnings."""
    from llm_dvfs.workload.runner import score_batch

    metric = str(getattr(entry.task, "metric", "") or "")
    qual = [math.nan] * len(records)
    if not metric:
        return qual, metric, []
    idx = [i for i, r in enumerate(records) if not failed(r)]
    if getattr(entry.task, "scoring", "none") == "loglik" and ctx.loaded is None:
        return qual, metric, [f"task {entry.name} is scored by log-likelihood, which needs the model in this "
                              "process: quality is empty for an endpoint"]
    samp = [samples[i] for i in idx]
    if apply_chat and ctx.runner is not None:  # the scorer sees what the model saw
        samp = [dataclasses.replace(s, prompt=ctx.runner.format_prompt(s.prompt)) for s in samp]
    q = score_batch(entry.task, samp, [str(records[i].extra.get("output_text") or "") for i in idx], ctx.loaded,
                    add_special_tokens=not apply_chat)
    for i, v in zip(idx, q):
        qual[i] = v
    return qual, metric, []


def cell_tables(ctx: Any, cell: Any, entry: Any, feats: Any, samples: Sequence[Any], records: list[Any],
                load: Any, per: dict[str, dict[str, Any]], tokens: list[dict[str, Any]], m: Any, idle_w: float,
                level_row: dict[str, Any]) -> tuple[dict[str, Any], int, list[str], list[str]]:
    """({"requests", "tokens", "power"} frames, failed requests, their distinct errors, warnings).

    One row per request in sample order: the lock-step columns where they apply (clocks observed
    over the cell's window, quality, features), the attribution's energy and times, and
    ``engine``, ``arrival_rate_rps``, ``concurrency``, ``load_phase``, ``error``.
    """
    plan = ctx.plan
    cfg = plan.config
    lm = ctx.loaded
    apply_chat = bool(cfg.apply_chat_template and lm is not None)
    qual, metric, warnings = _quality(ctx, entry, samples, records, apply_chat)
    fcols = [c for c in getattr(feats, "columns", []) if str(c).startswith("feat_")]
    feat_rows = feats[fcols].astype("float64").to_dict("records") if fcols else [{} for _ in samples]
    rows, errors = [], []
    n_failed = 0
    for i, (s, r) in enumerate(zip(samples, records)):
        bad = failed(r)
        n_failed += bad
        if bad and r.extra["error"] not in errors:
            errors.append(str(r.extra["error"]))
        known_prompt = r.extra.get("prompt_token_source", "tokens") != "unknown"
        row: dict[str, Any] = {
            "cell_id": cell.cell_id, "request_id": r.request_id, "model": cell.model,
            "revision": getattr(lm, "revision", None) if lm is not None else None,
            "weights": lm.weights if lm is not None else None, "dtype": lm.dtype if lm is not None else None,
            "task": cell.task, "sample_id": str(s.sample_id), "repeat": int(cell.repeat),
            "device": str(lm.device) if lm is not None else None,
            "gpu_name": plan.gpu.name if plan.gpu is not None else None,
            "gpu_uuid": plan.gpu.uuid if plan.gpu is not None else None, "host": socket.gethostname(),
            **cell.clock.requested_row(),
            "sm_mhz_observed": m.sm_mhz if m is not None else None,
            "mem_mhz_observed": m.mem_mhz if m is not None else None,
            "clock_event_reasons": m.clock_event_reasons if m is not None and m.devices else None,
            "tokens_in": int(r.n_prompt_tokens) if known_prompt or r.n_prompt_tokens else None,
            "tokens_out": int(r.n_output_tokens),
            "stop_reason": _STOP_NAMES.get(str(r.stop_reason), r.stop_reason),
            "error": r.extra.get("error"),
            "engine": cell.engine, **level_row, "load_phase": load.records[i].phase,
            "ttft_s": r.ttft_s, "tpot_s": r.tpot_s, "latency_s": r.latency_s,
            "t_arrival_s": float(r.t_arrival_s), "t_start_s": r.t_start_s, "t_end_s": float(r.t_end_s),
            "queue_s": r.queue_s, "idle_power_w": idle_w, "energy_method": "none",
            "quality_metric": metric or None, "quality": qual[i],
            # an endpoint's weights are unknown: its scores are taken as real
            "quality_valid": ((lm.weights == "pretrained") if lm is not None else True)
            if metric and math.isfinite(qual[i]) else None,
            "prompt": ctx.runner.format_prompt(s.prompt) if apply_chat else s.prompt,
            "output_text": r.extra.get("output_text"),
        }
        p = per.get(r.request_id)
        if p:
            row.update({k: v for k, v in p.items() if k not in ("request_id", "cell_id", "tokens_in")})
        row.update(feat_rows[i] if i < len(feat_rows) else {})
        rows.append(row)
    power = []
    if ctx.mon is not None and m is not None:
        tr = ctx.mon.trace(m.t_start_s, m.t_end_s)
        power = [{"cell_id": cell.cell_id, "t_s": t, "device": d, "power_w": p, "source": src}
                 for t, d, p, src in tr[["t_s", "device", "power_w", "source"]].itertuples(index=False)]
    tables = {"requests": to_frame("requests", rows), "tokens": to_frame("tokens", tokens),
              "power": to_frame("power", power)}
    return tables, n_failed, errors, warnings


__all__ = ["TRACE_MARGIN_S", "failed", "token_rows_without_energy", "attribute", "cell_tables"]
