"""Served-traffic cells of a sweep (issue 15): load levels, their checks, and running one cell.

A *served* cell runs a task's samples as requests through a serving engine under a load, instead
of lock-step ``generate`` batches: the continuous engine (transformers' continuous batching,
:class:`~llm_dvfs.workload.continuous.ContinuousEngine`, in this process) or an OpenAI-compatible
server (:class:`~llm_dvfs.workload.endpoint.EndpointClient`). The load is a
:class:`LoadLevel`: closed loop (N users), Poisson arrivals at R req/s (seeded) or a trace file.
Levels join the sweep's axes in place of batch sizes: models × tasks × clock points × load
levels × repeats (:func:`llm_dvfs.sweep.plan.prepare`).

One cell (:func:`run_cell`): the engine is started (continuous) or reached (endpoint); one
monitor window opens; :func:`llm_dvfs.workload.load.drive` issues the requests (the task's
prompts, its stop sequences, ``max_new_tokens``) and measures the load achieved over its
steady-state window (warm-up and cool-down excluded as ``drive`` defines them); the window
closes when the last request is done; :func:`llm_dvfs.meter.concurrency.attribute_served`
splits the window's energy over every request (engine steps for the continuous engine, token
timestamps for an endpoint). Every request becomes a row, warm-up, cool-down and failed ones
included (``load_phase``, ``error``); the cell's marker and ``manifest["served"][cell_id]`` hold
the load achieved, the energy accounting (idle, unattributed, the sum check against the
monitor's window energy) and the engine's or server's identity.

Failure modes: settings that cannot work are :class:`~llm_dvfs.errors.ConfigError` at plan time
(an unreachable endpoint too). During a cell a failed request is a row with its ``error``. When
the server stops answering, the continuous engine dies, or every request of a cell failed, the
cell is still written (its finished requests are kept) but marked ``aborted`` and
:class:`ServedCellAborted` is raised (exit status 1); ``--resume`` runs an aborted cell again.
This module imports neither the plan nor the executor (they import it).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from llm_dvfs.errors import ConfigError
from llm_dvfs.sweep.served_rows import attribute, cell_tables
from llm_dvfs.workload.serving import EngineError

log = logging.getLogger("llm_dvfs.sweep.served")

SERVED_ENGINES = ("continuous", "endpoint")
#: How long the clock point's warm-up and the reachability check wait for an endpoint, s.
ENDPOINT_CHECK_TIMEOUT_S = 10.0


class ServedCellAborted(EngineError):
    """A served cell could not be measured as asked (server gone, engine dead, every request
    failed). The cell's finished requests are written; ``--resume`` runs the cell again."""


# ============================================================================================
# load levels and checks (plan time)
# ============================================================================================
@dataclass(frozen=True)
class LoadLevel:
    """One load of the sweep's load axis.

    Attributes:
        kind: ``concurrency`` (closed loop, ``value`` users), ``rate`` (Poisson arrivals,
            ``value`` req/s) or ``trace`` (arrival times read from ``source``).
        value: users or req/s; None for a trace.
        source: the trace file (trace only).
        times_s: the trace's arrival times, s from the start (trace only; not part of the
            identity: the file name is).
    """

    kind: str
    value: Optional[float] = None
    source: Optional[str] = None
    times_s: tuple[float, ...] = field(default=(), compare=False, repr=False)

    @property
    def label(self) -> str:
        """``c4``, ``rate2.5``, ``trace-arrivals.csv``: the load's part of a cell id."""
        if self.kind == "concurrency":
            return f"c{int(self.value)}"
        if self.kind == "rate":
            return f"rate{self.value:g}"
        return f"trace-{Path(str(self.source)).name}"

    def row(self) -> dict[str, Any]:
        """The ``arrival_rate_rps`` and ``concurrency`` columns of the cell's rows (a trace: its
        mean rate)."""
        if self.kind == "concurrency":
            return {"concurrency": int(self.value), "arrival_rate_rps": None}
        if self.kind == "rate":
            return {"concurrency": None, "arrival_rate_rps": float(self.value)}
        t = self.times_s
        span = t[-1] - t[0] if len(t) > 1 else 0.0
        return {"concurrency": None, "arrival_rate_rps": (len(t) - 1) / span if span > 0 else None}

    def n_requests(self, n_samples: int) -> int:
        """Requests a cell issues: every sample, or for a trace the first min(samples, arrivals)."""
        return min(n_samples, len(self.times_s)) if self.kind == "trace" else n_samples

    def schedule(self, n: int, seed: int, repeat: int) -> Any:
        """The :mod:`llm_dvfs.workload.load` schedule of ``n`` requests. Poisson arrivals are
        seeded from (``seed``, ``repeat``): every model and clock point of a repeat sees the
        same arrival times (paired comparisons), and a rerun the same ones again."""
        from llm_dvfs.workload.load import ClosedLoop, OpenLoop, TraceArrivals

        if self.kind == "concurrency":
            return ClosedLoop(int(self.value), n)
        if self.kind == "rate":
            return OpenLoop(float(self.value), n, seed=arrival_seed(seed, repeat))
        return TraceArrivals(self.times_s[:n], source=str(self.source))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "label": self.label, "value": self.value,
                "source": self.source, **({"arrivals": len(self.times_s)} if self.kind == "trace" else {})}


def arrival_seed(seed: int, repeat: int) -> int:
    """Seed of the Poisson arrivals of repeat ``repeat`` under ``--seed seed``."""
    return zlib.crc32(f"{int(seed)}|arrivals|r{int(repeat)}".encode()) & 0x7FFFFFFF


def engine_of(cfg: Any) -> str:
    """The engine a config asks for: ``engine``, else ``endpoint`` when a URL is given, else
    ``generate``."""
    return cfg.engine or ("endpoint" if cfg.endpoint else "generate")


def check_config(cfg: Any, notes: list[str]) -> tuple[str, list[LoadLevel]]:
    """The engine and load levels of ``cfg`` (a SweepConfig), checking the served-traffic
    settings against each other. Reads the arrival trace. Appends notes (a default load).

    Raises:
        ConfigError: load options with the lock-step engine, two kinds of load, batch sizes with
            a served engine, an engine that contradicts ``--endpoint``, a bad trace file, ...
    """
    engine = engine_of(cfg)
    kinds = [k for k in ("concurrency", "arrival_rate", "arrival_trace") if getattr(cfg, k) is not None]
    if cfg.endpoint and engine != "endpoint":
        raise ConfigError(f"--endpoint measures a server: it cannot be combined with --engine {engine}")
    if engine == "endpoint" and not cfg.endpoint:
        raise ConfigError("--engine endpoint needs the server's URL: --endpoint http://HOST:PORT")
    if engine == "generate":
        given = kinds + [k for k in ("warmup_requests", "cooldown_requests", "warmup_s", "cooldown_s")
                         if getattr(cfg, k)] + (["endpoint_model"] if cfg.endpoint_model else [])
        if given:
            raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in given)}: served-traffic settings; "
                              "they need --engine continuous or --endpoint URL")
        return engine, []
    if len(kinds) > 1:
        raise ConfigError(f"give one kind of load: {' or '.join('--' + k.replace('_', '-') for k in kinds)}")
    if list(cfg.batch_sizes) != [1]:
        raise ConfigError(f"--batch-sizes applies to --engine generate; the {engine} engine batches requests "
                          "as they arrive: vary the load with --concurrency or --arrival-rate instead")
    if engine == "endpoint":
        if cfg.apply_chat_template:
            raise ConfigError("--apply-chat-template with --endpoint: use --endpoint-api chat (the server "
                              "applies its own chat template)")
        if cfg.on_busy_gpu == "refuse":
            raise ConfigError("--on-busy-gpu refuse cannot work with --endpoint: the server itself is another "
                              "process on the GPU")
        if cfg.models is not None and len(cfg.models) > 1:
            raise ConfigError("--endpoint measures the one model the server serves; name it with "
                              "--endpoint-model (not several --models)")
        if cfg.models and cfg.endpoint_model and cfg.models[0] != cfg.endpoint_model:
            raise ConfigError(f"--models {cfg.models[0]} and --endpoint-model {cfg.endpoint_model} disagree")
    if cfg.concurrency is not None:
        levels = [LoadLevel("concurrency", float(c)) for c in cfg.concurrency]
    elif cfg.arrival_rate is not None:
        levels = [LoadLevel("rate", float(r)) for r in cfg.arrival_rate]
    elif cfg.arrival_trace is not None:
        from llm_dvfs.workload.load import TraceArrivals

        tr = TraceArrivals.from_file(Path(cfg.arrival_trace).expanduser())  # ConfigError with the line
        levels = [LoadLevel("trace", source=str(cfg.arrival_trace), times_s=tr.times_s)]
    else:
        levels = [LoadLevel("concurrency", 1.0)]
        notes.append(f"--engine {engine} without a load: one user (--concurrency 1); give --concurrency N "
                     "or --arrival-rate R for more")
    if cfg.decoding == "sampled" and engine == "continuous":
        notes.append("sampled decoding with continuous batching draws from one RNG for the whole batch: "
                     "outputs depend on what ran alongside")
    return engine, levels


def check_exclusions(cfg: Any, levels: Sequence[LoadLevel], n_samples: int) -> None:
    """Warm-up and cool-down must leave requests (and, open loop, time) to measure at every
    level, with ``n_samples`` samples in the smallest task.

    Raises:
        ConfigError: they do not.
    """
    for lv in levels:
        n = lv.n_requests(n_samples)
        if cfg.warmup_requests + cfg.cooldown_requests >= n:
            raise ConfigError(f"--warmup-requests {cfg.warmup_requests} and --cooldown-requests "
                              f"{cfg.cooldown_requests} leave none of the {n} requests at load {lv.label} to "
                              "measure (raise --samples)")
        if lv.kind != "concurrency" and cfg.warmup_s + cfg.cooldown_s > 0:
            t = lv.schedule(n, cfg.seed, 0).arrivals_s()
            if cfg.warmup_s + cfg.cooldown_s >= float(t[-1] - t[0]):
                raise ConfigError(f"--warmup-s {cfg.warmup_s:g} + --cooldown-s {cfg.cooldown_s:g} cover the whole "
                                  f"{float(t[-1] - t[0]):.3g} s of arrivals at load {lv.label}")


def _client(cfg: Any, model: Optional[str], timeout_s: float, extra_body: Optional[dict] = None) -> Any:
    from llm_dvfs.workload.endpoint import EndpointClient

    sampled = cfg.decoding == "sampled"
    body = dict(extra_body or {})
    if sampled:
        body.update(top_p=cfg.top_p, seed=int(cfg.seed))
    if cfg.fixed_output_length:
        body["ignore_eos"] = True  # vLLM, SGLang: run to max_tokens
    return EndpointClient(cfg.endpoint, api=cfg.endpoint_api, model=model, max_new_tokens=cfg.max_new_tokens,
                          temperature=cfg.temperature if sampled else 0.0, timeout_s=timeout_s, extra_body=body)


def endpoint_models(cfg: Any) -> tuple[list[str], dict[str, Any]]:
    """The endpoint's model (``--endpoint-model``, ``--models``, else the first it lists) and
    its identity (version, models, Server header), from one round of requests to it.

    Raises:
        ConfigError: the server cannot be reached or names no model (the message says which).
    """
    client = _client(cfg, cfg.endpoint_model or (cfg.models[0] if cfg.models else None), ENDPOINT_CHECK_TIMEOUT_S)
    try:
        info = client.check()
    except EngineError as e:
        raise ConfigError(f"--endpoint {cfg.endpoint}: {e}") from None
    if info.get("models") and client.model not in info["models"]:
        log.warning("the endpoint lists models %s, not %r; requests name %r anyway",
                    ", ".join(map(str, info["models"])), client.model, client.model)
    return [str(client.model)], client.describe()


# ============================================================================================
# hooks for the executor
# ============================================================================================
def aborted(rd: Any, cell: Any) -> bool:
    """True when ``cell``'s marker says it was aborted (``--resume`` runs it again)."""
    import json

    try:
        return bool(json.loads(rd.marker(cell).read_text(encoding="utf-8")).get("aborted"))
    except (OSError, ValueError):
        return False


def stop_strings(cfg: Any, task: Any) -> tuple[str, ...]:
    """The task's stop sequences unless they are off or the output length is fixed (as
    :meth:`llm_dvfs.workload.runner.Runner.stop_strings`)."""
    if cfg.fixed_output_length or not cfg.stop_sequences:
        return ()
    return tuple(s for s in (getattr(task, "stop", ()) or ()) if s)


def warmup_endpoint(cfg: Any, model: str, task_entry: Any, n: int) -> float:
    """``n`` unmeasured requests to the endpoint, one after another (the clock point's warm-up);
    returns the seconds spent. Raises :class:`ServedCellAborted` when the server does not answer."""
    if n <= 0:
        return 0.0
    t0 = time.monotonic()
    client = _client(cfg, model, cfg.request_timeout_s, _stop_body(stop_strings(cfg, task_entry.task)))
    for k in range(n):
        rec = client.complete(task_entry.samples[k % len(task_entry.samples)].prompt)
        if rec.stop_reason == "error":
            raise ServedCellAborted(f"warm-up request to {cfg.endpoint} failed: {rec.extra.get('error')}")
    return time.monotonic() - t0


def _stop_body(stops: tuple[str, ...]) -> dict[str, Any]:
    return {"stop": list(stops)} if stops else {}


# ============================================================================================
# one cell
# ============================================================================================
#: Tokens added to each request's prompt length when sizing the cache (chat template, BOS, the
#: partly filled last page).
CACHE_MARGIN_TOKENS = 64


def cache_tokens_for(level: LoadLevel, prompt_tokens: Sequence[int], max_new_tokens: int) -> int:
    """KV-cache capacity (tokens) the continuous engine needs for one cell: every request that
    can be in flight at once (``concurrency`` users in a closed loop; every request of an open
    loop or trace) holding its longest prompt plus ``max_new_tokens``, with a margin.

    Why not transformers' default: on a GPU it sizes the cache to the free memory (most of an
    H200's 141 GB), which a measurement has no use for and which makes start-up slow. On the
    H200 the step times did not change measurably with the smaller cache (TPOT p50 at 4 users:
    67 ms sized vs 73 and 98 ms in two runs with the default; bench/cb_probe.py): transformers
    5.17's engine steps take 50-100 ms there either way (README, *Measured on an H200*).
    """
    n = len(prompt_tokens)
    in_flight = min(n, int(level.value)) if level.kind == "concurrency" else n
    longest = max(prompt_tokens, default=0) + max_new_tokens + CACHE_MARGIN_TOKENS
    return max(1, in_flight) * longest


def _cell_cache_tokens(ctx: Any, level: LoadLevel, samples: Sequence[Any]) -> Optional[int]:
    """--cb-cache-tokens, else :func:`cache_tokens_for` the cell (None on the CPU: the engine's
    own CPU default)."""
    cfg = ctx.plan.config
    if cfg.cb_cache_tokens is not None:
        return int(cfg.cb_cache_tokens)
    if not str(ctx.loaded.device).startswith("cuda"):
        return None
    tok = ctx.loaded.tokenizer
    return cache_tokens_for(level, [len(tok(s.prompt)["input_ids"]) for s in samples], cfg.max_new_tokens)


class _Continuous:
    """The continuous engine for one cell: submit(i) serves request i (blocking), ending it at
    the task's stop sequences by cancelling it (what servers do), as generate's stop strings."""

    def __init__(self, ctx: Any, stops: tuple[str, ...], timeout_s: float, cache_tokens: Optional[int]) -> None:
        from llm_dvfs.workload.continuous import ContinuousEngine

        self.engine = ContinuousEngine(ctx.loaded, ctx.runner.settings, cache_tokens=cache_tokens).start()
        self.stops, self.timeout_s = stops, timeout_s
        self.longest = max((len(s) for s in stops), default=0)

    def serve(self, req: Any) -> Any:
        if not self.stops:
            return self.engine.submit(req).result(self.timeout_s)
        h = self.engine.submit(req, stream=True)
        text = ""
        for ev in h.stream(timeout=self.timeout_s):
            piece = ev.text or ""
            tail = text[-self.longest:] + piece
            text += piece
            if any(s in tail for s in self.stops):
                h.cancel()
                return _stopped(h.result(self.timeout_s), ev.index + 1, text)
        return h.result(self.timeout_s)

    def alive(self) -> bool:
        return self.engine.running

    def describe(self) -> dict[str, Any]:
        return self.engine.describe()

    def steps(self) -> list[Any]:
        return self.engine.steps()

    def close(self) -> None:
        self.engine.stop()


class _Endpoint:
    """The endpoint client for one cell (one connection per request)."""

    def __init__(self, cfg: Any, model: str, stops: tuple[str, ...]) -> None:
        self.client = _client(cfg, model, cfg.request_timeout_s, _stop_body(stops))

    def serve(self, req: Any) -> Any:
        return self.client.complete(req)

    def alive(self) -> bool:
        try:
            self.client.server_info(timeout_s=ENDPOINT_CHECK_TIMEOUT_S)
            return True
        except EngineError:
            return False

    def describe(self) -> dict[str, Any]:
        return self.client.describe()

    def steps(self) -> None:
        return None  # a server exposes no steps: attribution by token timestamps

    def close(self) -> None:
        pass


def _stopped(rec: Any, n_tokens: int, text: str) -> Any:
    """The record of a request ended at a stop sequence after ``n_tokens`` tokens (the one that
    completed it included; one more may have been generated before the cancel took effect)."""
    from llm_dvfs.meter.concurrency import ServedRequest

    n = min(n_tokens, int(rec.token_times_s.size))
    extra = {k: v for k, v in rec.extra.items() if k != "error"}
    extra["output_text"] = text
    return ServedRequest(rec.request_id, rec.t_arrival_s, rec.t_admit_s, rec.t_first_token_s,
                         rec.token_times_s[:n], rec.t_end_s, rec.n_prompt_tokens, n, "stop_string", extra)


def _admissions_from_steps(records: list[Any], steps: Optional[list[Any]]) -> None:
    """A cancelled (stopped) request's record has no admission time; the first step that
    prefilled it gives one (its start, the scheduler's time of admission)."""
    if not steps:
        return
    first: dict[str, float] = {}
    for s in steps:
        for rid in s.prefill_tokens:
            first.setdefault(str(rid), s.t_start_s)
    for r in records:
        if r.t_admit_s is None and r.request_id in first and r.token_times_s.size:
            t = min(max(first[r.request_id], r.t_arrival_s), float(r.token_times_s[0]))
            r.t_admit_s = t


def run_cell(ctx: Any, cell: Any, entry: Any, feats: Any, idle_w: float) -> None:
    """Measure one served cell and write it (module docstring). ``ctx`` is the executor's
    cell context (plan, run directory, manifest, monitor, runner, loaded model, progress).

    Raises:
        ServedCellAborted: after writing the cell, when it could not be measured as asked.
        KeyboardInterrupt: the engine is stopped first; nothing of the cell is written.
    """
    from llm_dvfs.workload.load import drive
    from llm_dvfs.workload.serving import ServeRequest, failed_request

    plan, mon, progress = ctx.plan, ctx.mon, ctx.progress
    cfg = plan.config
    t_cell = time.monotonic()
    level: LoadLevel = cell.load
    n = level.n_requests(len(entry.samples))
    samples = list(entry.samples[:n])
    stops = stop_strings(cfg, entry.task)
    chat = cfg.apply_chat_template and cell.engine == "continuous"
    reqs = [ServeRequest(prompt=None if chat else s.prompt,
                         messages=[{"role": "user", "content": s.prompt}] if chat else None,
                         request_id=f"{cell.cell_id}|{s.sample_id}|{i}", max_new_tokens=cfg.max_new_tokens,
                         metadata={"index": i}) for i, s in enumerate(samples)]
    schedule = level.schedule(n, cfg.seed, cell.repeat)
    eng: Any = (_Continuous(ctx, stops, cfg.request_timeout_s, _cell_cache_tokens(ctx, level, samples))
                if cell.engine == "continuous" else _Endpoint(cfg, cell.model, stops))
    bar = progress.cell(n, f"{cell.model} {cell.task} {cell.clock.label} {cell.engine} {level.label}")

    def done(_: Any) -> None:
        if bar is not None:
            bar.update(1)
        progress.advance(1)

    w = None
    try:
        w = mon.begin_window("served", sync=False) if mon is not None else None
        t0 = time.monotonic()
        load = drive(schedule, lambda i: eng.serve(reqs[i]), warmup_s=cfg.warmup_s, cooldown_s=cfg.cooldown_s,
                     warmup_requests=cfg.warmup_requests, cooldown_requests=cfg.cooldown_requests, on_done=done)
        if w is not None:
            w.end()  # the last request is done: nothing after it belongs to the cell
        alive = eng.alive()  # before close: is the server / engine still there?
        steps, describe = eng.steps(), eng.describe()
    finally:
        if w is not None:
            w.end()  # (again, on an exception; a no-op otherwise)
        eng.close()
        if bar is not None:
            bar.close()
    records = []
    for i, rec in enumerate(load.records):
        if rec.ok and rec.result is not None:
            records.append(rec.result)
        else:  # submit raised (a timeout): still a row, with its error
            err = f"{type(rec.error).__name__}: {rec.error}" if rec.error is not None else "not issued"
            t = rec.t_issued_s if math.isfinite(rec.t_issued_s) else t0
            records.append(dataclasses.replace(failed_request(reqs[i], t, err), t_end_s=max(rec.t_done_s, t)
                                               if math.isfinite(rec.t_done_s) else t))
    _admissions_from_steps(records, steps)
    m = w.measurement() if w is not None else None
    att, per, tokens, warnings = attribute(m, records, steps, cfg.prefill_weight, cell.cell_id, idle_w)
    tables, n_failed, errors, more = cell_tables(ctx, cell, entry, feats, samples, records, load, per, tokens, m,
                                                 idle_w, level.row())
    warnings += more
    info = _summary(cell, level, load, att, m, records, steps, describe, n_failed, errors)
    why = None
    if n_failed:
        warnings.append(f"{n_failed} of {n} requests failed (kept as rows with their error), e.g.: {errors[0]}")
        if not alive:
            what = (f"the endpoint {cfg.endpoint} stopped answering" if cell.engine == "endpoint"
                    else "the continuous batching engine stopped")
            why = f"{what} during the cell: {errors[0]}"
        elif n_failed == n:
            why = f"every request failed, e.g.: {errors[0]}"
    if why:
        info["aborted"] = why
    _write(ctx, cell, tables, info, warnings, time.monotonic() - t_cell)
    if why:
        kept = n - n_failed
        raise ServedCellAborted(f"cell {cell.cell_id}: {why}. {kept} of {n} requests finished; they and the failed "
                                f"ones (with their errors) are kept in {plan.out}/requests.parquet, and --resume "
                                "runs this cell again")


def _summary(cell: Any, level: LoadLevel, load: Any, att: Any, m: Any, records: list[Any], steps: Any,
             describe: dict[str, Any], n_failed: int, errors: list[str]) -> dict[str, Any]:
    """What the marker and ``manifest["served"][cell_id]`` record about a served cell."""
    phases: dict[str, int] = {}
    for r in load.records:
        phases[r.phase] = phases.get(r.phase, 0) + 1
    s = load.summary()
    out: dict[str, Any] = {
        "engine": cell.engine, "engine_info": describe, "load": level.describe(),
        "schedule": {k: s[k] for k in ("kind", "n", "seed", "source") if k in s},
        "achieved": {k: s[k] for k in ("window_s", "window_duration_s", "arrived_rps", "completed_rps",
                                       "mean_concurrency", "lateness_s", "measured", "issued")},
        "phases": phases, "failed": n_failed, "errors": errors[:5], "problems": s["problems"],
        "steps": None if steps is None else len(steps),
        "t_first_arrival_s": min((r.t_arrival_s for r in records), default=None),
    }
    planned = [r.t_scheduled_s for r in load.records]
    if all(math.isfinite(t) for t in planned) and planned:
        out["arrivals_planned_s"] = [round(t - planned[0], 9) for t in planned]
    if m is not None:
        out["monitor"] = {"window_s": [m.t_start_s, m.t_end_s], "energy_j": m.energy_j,
                          "energy_method": m.energy_method, "energy_j_counter": m.energy_j_counter,
                          "avg_power_w": m.avg_power_w, "flags": list(m.flags)}
    if att is not None:
        e = att.summary()
        e["window_s"] = list(e["window_s"])
        if m is not None and m.energy_j:
            # an independent check: the monitor's own integral of the same window
            e["monitor_energy_j"] = m.energy_j
            e["monitor_rel_diff"] = abs(att.window_energy_j - m.energy_j) / abs(m.energy_j)
        e["requests_sum_j"] = att.attributed_energy_j
        out["energy"] = e
    return out


def _write(ctx: Any, cell: Any, tables: dict[str, Any], info: dict[str, Any], warnings: list[str],
           wall_s: float) -> None:
    from llm_dvfs.sweep.rundir import RunDir, now_iso

    rd, manifest, plan = ctx.rd, ctx.manifest, ctx.plan
    for wmsg in warnings:
        log.warning("%s: %s", cell.cell_id, wmsg)
    rd.write_cell(cell, tables, {"finished_at": now_iso(), "wall_s": wall_s, "n_requests": len(tables["requests"]),
                                 "warnings": warnings, "served": {k: v for k, v in info.items() if k != "aborted"},
                                 **({"aborted": info["aborted"]} if "aborted" in info else {})})
    # as the executor does: requests after every cell, the large tables at most every 30 s
    big = time.monotonic() - rd.last_full_consolidation >= 30.0
    rd.consolidate(plan.cells, RunDir.TABLES if big else ("requests",))
    if big:
        rd.last_full_consolidation = time.monotonic()
    small = {k: v for k, v in info.items() if k != "arrivals_planned_s"}  # the marker has them
    manifest.setdefault("served", {})[cell.cell_id] = small
    if "aborted" not in info:
        manifest["cells_done"] = manifest.get("cells_done", 0) + 1
    if warnings:
        manifest["notes"] = list(dict.fromkeys(list(manifest.get("notes", [])) +
                                               [f"{cell.cell_id}: {x}" for x in warnings]))
    rd.write_manifest(manifest)
    req = tables["requests"]
    e = req["energy_j"].dropna()
    a = info.get("achieved", {})
    log.info("cell %d/%d done: %s (%d requests, %s, %.3g req/s arrived, mean concurrency %.3g, %.1f s)",
             cell.index + 1, len(plan.cells), cell.cell_id, len(req),
             f"median energy {float(e.median()):.3g} J" if len(e) else "no energy",
             a.get("arrived_rps", math.nan), a.get("mean_concurrency", math.nan), wall_s)


__all__ = ["LoadLevel", "ServedCellAborted", "SERVED_ENGINES", "arrival_seed", "engine_of", "check_config",
           "check_exclusions", "endpoint_models", "aborted", "stop_strings", "warmup_endpoint", "run_cell",
           ]
