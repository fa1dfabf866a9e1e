"""Continuous batching engine over Hugging Face transformers' own (``ContinuousBatchingManager``).

Requests arrive at any time from any thread (:meth:`ContinuousEngine.submit`); transformers'
background thread admits them between engine steps, prefills the new ones and decodes the
running ones in the same forward pass (paged KV cache). What is recorded, all on the host
monotonic timeline of the power monitor (s):

* per request (:class:`~llm_dvfs.meter.concurrency.ServedRequest`): arrival (our ``submit``),
  admission (when the scheduler first scheduled it: HF's ``lifespan[0]``, so ``admit - arrival``
  is the queueing delay), every token (HF's ``record_timestamps``, taken when the step's tokens
  reached the host), first token, end (``lifespan[1]``), prompt/output tokens, stop reason
  (``eos`` | ``length`` | ``error`` | ``cancelled``);
* per engine step (:class:`~llm_dvfs.meter.concurrency.EngineStep`): its host interval (from the
  start of the scheduling of the batch to the end of the update that consumed its outputs) and,
  from the scheduler's own batch, the prompt tokens each request prefilled and the tokens each
  decoded in it. ``step_source == "scheduler"``.

How: transformers exposes no public step callback (5.17 .. 5.24), so the engine wraps three
methods of the manager's batch processor on the instance (``scheduler.schedule_batch``,
``prepare_next_batch``, ``update_batch``; found by feature detection, never by version). If they
are missing, steps are derived from the shared token timestamps instead
(:func:`steps_from_token_times`, ``step_source == "token_timestamps"``) and the engine says so.

Synchronous batching is the default (``async_batching=False``): each step's host interval then
brackets its GPU work (the update blocks on the outputs' copy to the host). With async
double-buffering the CPU preparation of step k+1 overlaps the GPU work of step k; step starts
are then clipped to the previous step's end, an approximation.

Limits: the engine owns the model while it runs (transformers swaps the attention implementation
to a paged one and restores it on :meth:`stop`), so do not call ``generate`` on it meanwhile.
Continuous batching applies temperature / top-k / top-p only; ``fixed_output_length`` is done by
ignoring EOS (EOS may then appear as an ordinary token, where ``generate``'s ``min_new_tokens``
suppresses it). Sampled decoding draws from one RNG for the whole batch: outputs depend on the
batching. On the CPU the KV cache is sized by ``cache_tokens``: transformers' memory-based
default, with the attention mask sdpa needs (``max_batch_tokens x cache tokens``, 14.6 GB there),
made the first request take ~50 s on 2 cores.
"""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import math
import threading
import time
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from llm_dvfs.errors import ConfigError
from llm_dvfs.meter.concurrency import EngineStep, ServedRequest
from llm_dvfs.workload.runner import GenerationSettings
from llm_dvfs.workload.serving import (EngineError, RequestHandle, ServeRequest, TokenEvent,
                                       as_request, failed_request, now_s)

log = logging.getLogger(__name__)

__all__ = ["ContinuousEngine", "steps_from_token_times", "DEFAULT_CPU_CACHE_TOKENS",
           "DEFAULT_CPU_MAX_BATCH_TOKENS"]

#: KV cache size (tokens, all requests together) used on the CPU unless ``cache_tokens`` is given
DEFAULT_CPU_CACHE_TOKENS = 8192
#: tokens per forward pass on the CPU unless ``max_batch_tokens`` is given (longer prompts are
#: prefilled in chunks)
DEFAULT_CPU_MAX_BATCH_TOKENS = 512
ENGINE_NAME = "hf-continuous"


def _perf_offset_s() -> float:
    """host monotonic - time.perf_counter(), s (transformers stamps with perf_counter; on Linux
    both read CLOCK_MONOTONIC and this is ~0, elsewhere it maps one onto the other)."""
    best = (math.inf, 0.0)
    for _ in range(5):
        a = now_s()
        p = time.perf_counter()
        b = now_s()
        best = min(best, (b - a, 0.5 * (a + b) - p))
    return best[1]


def _queue_empty(mgr: Any) -> bool:
    q = getattr(getattr(mgr, "output_router", None), "output_queue", None)
    return q is None or q.empty()


class _Pending:
    """A scheduled step waiting for its update: start, tokens per request, who emits a token."""

    __slots__ = ("t_start_s", "prefill", "decode", "emits")

    def __init__(self, t_start_s: float, prefill: dict, decode: dict, emits: tuple) -> None:
        self.t_start_s, self.prefill, self.decode, self.emits = t_start_s, prefill, decode, emits


class _Open:
    """Engine-side state of a submitted request."""

    __slots__ = ("handle", "max_new_tokens", "eos", "stream", "n_pushed", "text", "prefix_off",
                 "read_off")

    def __init__(self, handle: RequestHandle, max_new_tokens: int, eos: set, stream: bool) -> None:
        self.handle, self.max_new_tokens, self.eos, self.stream = handle, max_new_tokens, eos, stream
        self.n_pushed = 0
        self.text = ""  # streamed so far
        self.prefix_off = self.read_off = 0  # incremental detokenization window


class ContinuousEngine:
    """Serve a loaded model with transformers' continuous batching, recording every request and
    every engine step.

    Args:
        loaded: a :class:`llm_dvfs.workload.models.LoadedModel` (any ``arch:``, hub or local model
            whose architecture transformers' continuous batching supports).
        settings: decoding settings (:class:`~llm_dvfs.workload.runner.GenerationSettings`);
            ``max_new_tokens`` is the default per request.
        cache_tokens: KV cache capacity in tokens (all requests together); None = 8192 on the
            CPU, transformers' memory-based default on a GPU.
        page_size: tokens per cache page (transformers 5.24's ``page_size``, 5.17's ``block_size``);
            None = 32 on the CPU, transformers' default (256) on a GPU.
        max_batch_tokens: tokens per forward pass (prefill chunks + decodes); None = 512 on the
            CPU, transformers' default on a GPU.
        max_requests_per_batch: requests per forward pass; None = transformers' default.
        scheduler: ``fifo`` (decodes first) or ``prefill_first``.
        async_batching: transformers' async double-buffering; False (default) keeps step
            boundaries exact; None = transformers decides.
        prefix_sharing: let requests share cached prompt prefixes (transformers' default): a
            shared prefix is not computed again, so that request's steps prefill fewer tokens
            than its prompt has (``extra["prefill_tokens_computed"]``).
        warmup: run transformers' warm-up (CUDA graph capture) in :meth:`start`; None = on CUDA only.
        cb_options: more ``ContinuousBatchingConfig`` fields by name (checked against the
            installed transformers).
        decode_text: put the decoded output in ``extra["output_text"]`` (and text pieces in
            streamed events).

    Raises:
        ConfigError: bad settings, or a ``cb_options`` key this transformers does not have.
    """

    name = ENGINE_NAME

    def __init__(self, loaded: Any, settings: GenerationSettings = GenerationSettings(), *,
                 cache_tokens: Optional[int] = None, page_size: Optional[int] = None,
                 max_batch_tokens: Optional[int] = None, max_requests_per_batch: Optional[int] = None,
                 scheduler: str = "fifo", async_batching: Optional[bool] = False,
                 prefix_sharing: bool = True, warmup: Optional[bool] = None,
                 cb_options: Optional[Mapping[str, Any]] = None, decode_text: bool = True) -> None:
        if scheduler not in ("fifo", "prefill_first"):
            raise ConfigError(f"scheduler must be fifo or prefill_first, got {scheduler!r}")
        for k, v in (("cache_tokens", cache_tokens), ("page_size", page_size),
                     ("max_batch_tokens", max_batch_tokens),
                     ("max_requests_per_batch", max_requests_per_batch)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ConfigError(f"{k} must be an integer >= 1, got {v!r}")
        self.loaded = loaded
        self.settings = settings
        self.device = str(loaded.device)
        self.decode_text = decode_text
        self._cpu = not self.device.startswith("cuda")
        self._opts = dict(cache_tokens=cache_tokens, page_size=page_size,
                          max_batch_tokens=max_batch_tokens,
                          max_requests_per_batch=max_requests_per_batch, scheduler=scheduler,
                          async_batching=async_batching, prefix_sharing=prefix_sharing,
                          cb_options=dict(cb_options or {}))
        self._warmup = (not self._cpu) if warmup is None else bool(warmup)
        self._cb_config = self._make_cb_config()  # ConfigError now, not in start()
        cfg = getattr(loaded.model, "config", None)
        ctx = next((v for a in ("max_position_embeddings", "n_positions")
                    if isinstance(v := getattr(cfg, a, None), int) and v > 0), 1 << 30)
        self._context = ctx
        self._mgr: Any = None
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._steps: list[EngineStep] = []
        self._emits: list[tuple] = []
        self._pending: collections.deque = collections.deque()
        self._prefilled: dict[str, int] = {}  # prompt tokens computed per request (bg thread)
        self._last_sched: Any = None
        self._last_end = -math.inf
        self._ready = threading.Event()
        self._dispatcher: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._perf_off = 0.0
        self.hook_errors = 0
        self.step_source = "none"
        self.t_started_s = math.nan

    # -- configuration -----------------------------------------------------------------------
    def _make_cb_config(self) -> Any:
        from transformers import ContinuousBatchingConfig

        fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
        o = self._opts
        kw: dict[str, Any] = {"scheduler_type": o["scheduler"], "seed": self.settings.seed,
                              "use_async_batching": o["async_batching"],
                              "allow_block_sharing": o["prefix_sharing"]}
        page_key = "page_size" if "page_size" in fields else "block_size"
        page = o["page_size"] or (32 if self._cpu else None)
        if page is not None:
            kw[page_key] = page
        cache_tokens = o["cache_tokens"] or (DEFAULT_CPU_CACHE_TOKENS if self._cpu else None)
        if cache_tokens is not None:
            kw["num_blocks"] = max(2, -(-cache_tokens // (page or 256)))
        mbt = o["max_batch_tokens"] or (DEFAULT_CPU_MAX_BATCH_TOKENS if self._cpu else None)
        if mbt is not None:
            kw["max_batch_tokens"] = mbt
        if o["max_requests_per_batch"] is not None:
            kw["max_requests_per_batch"] = o["max_requests_per_batch"]
        if self._cpu and "use_cuda_graph" in fields:
            kw["use_cuda_graph"] = False
        unknown = sorted(set(o["cb_options"]) - fields)
        if unknown:
            raise ConfigError(f"cb_options {', '.join(unknown)} not in this transformers' "
                              f"ContinuousBatchingConfig; fields: {', '.join(sorted(fields))}")
        kw.update(o["cb_options"])
        return ContinuousBatchingConfig(**{k: v for k, v in kw.items() if k in fields})

    def _generation_config(self) -> Any:
        from transformers import GenerationConfig

        tok = self.loaded.tokenizer
        base = getattr(self.loaded.model, "generation_config", None)
        gc = copy.deepcopy(base) if base is not None else GenerationConfig()
        kw = self.settings.generate_kwargs(tok)
        kw.pop("min_new_tokens", None)  # not supported by CB; fixed length = EOS ignored per request
        gc.update(**kw)
        if gc.eos_token_id is None:
            gc.eos_token_id = -1  # what transformers would set, without its warning
        return gc

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout_s: float = 600.0) -> "ContinuousEngine":
        """Create the manager, install the step hooks, warm up, start transformers' generation
        thread and wait until its KV cache exists (so the first request's queueing delay is not
        the cache's allocation).

        Raises:
            EngineError: the generation thread died or was not ready within ``timeout_s``.
        """
        if self._mgr is not None:
            return self
        import torch

        self._perf_off = _perf_offset_s()
        self._stopping.clear()
        self._ready.clear()
        # no_grad, not inference_mode: transformers < 5.2x runs its generation thread outside
        # inference mode, and in-place updates there to tensors made here (warm-up buffers, KV
        # cache) would fail ("Inplace update to inference tensor outside InferenceMode").
        with torch.no_grad():
            mgr = self.loaded.model.init_continuous_batching(
                generation_config=self._generation_config(),
                continuous_batching_config=self._cb_config)
            hooked = self._install_hooks(mgr)
            self.step_source = "scheduler" if hooked else "token_timestamps"
            if not hooked:
                log.warning("transformers' continuous batching internals not found: engine steps "
                            "will be derived from token timestamps (step_source=token_timestamps)")
            if self._warmup and hasattr(mgr, "warmup"):
                mgr.warmup()
            mgr.start()
        self._mgr = mgr
        deadline = time.monotonic() + timeout_s
        while hooked and not self._ready.wait(0.05):
            if not mgr.is_running() or time.monotonic() > deadline:
                err = getattr(getattr(mgr, "background_thread_status", None), "fatal_error", None)
                self._mgr = None
                mgr.stop(block=True, timeout=5)
                raise EngineError(f"continuous batching did not start on {self.device}: "
                                  + (f"{type(err).__name__}: {err}" if err else
                                     f"not ready after {timeout_s} s"))
        self.t_started_s = now_s()
        self._dispatcher = threading.Thread(target=self._dispatch, name="llm_dvfs-cb-dispatch",
                                            daemon=True)
        self._dispatcher.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Finish the requests in flight, stop the generation thread and give the model back
        (attention implementation restored). Requests not finished by then are failed."""
        mgr = self._mgr
        if mgr is None:
            return
        self._stopping.set()
        mgr.stop(block=True, timeout=timeout_s)
        if self._dispatcher is not None:
            self._dispatcher.join(timeout_s)
        self._fail_open("engine stopped before the request finished")
        if hasattr(mgr, "destroy"):
            mgr.destroy()
        self._mgr = None

    def __enter__(self) -> "ContinuousEngine":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._mgr is not None and self._mgr.is_running()

    # -- requests ----------------------------------------------------------------------------
    def encode(self, request: ServeRequest) -> list[int]:
        """The prompt's token ids (chat messages through the tokenizer's chat template), cut on
        the left to leave room for ``max_new_tokens`` in the context, as the runner does."""
        tok = self.loaded.tokenizer
        if request.input_ids is not None:
            ids = [int(i) for i in request.input_ids]
        elif request.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise ConfigError(f"request {request.request_id}: chat messages need a tokenizer "
                                  "with a chat template (this one has none); send a prompt")
            ids = list(tok.apply_chat_template(request.messages, add_generation_prompt=True,
                                               tokenize=True, return_dict=False))
        else:
            ids = tok(request.prompt)["input_ids"]
        room = self._context - (request.max_new_tokens or self.settings.max_new_tokens)
        return ids[-room:] if 0 < room < len(ids) else ids

    def submit(self, request: Union[ServeRequest, str, Sequence[int]], *,
               stream: bool = False) -> RequestHandle:
        """Queue a request now (thread-safe); its arrival time is this call's.

        ``stream=True`` pushes every token to the handle as it is generated
        (:meth:`RequestHandle.stream`); otherwise tokens arrive with the final record.
        A request the manager refuses (stopping, crashed) is resolved at once as failed.

        Raises:
            EngineError: the engine was not started. ConfigError: a bad request.
        """
        req = as_request(request)
        t0 = now_s()
        if self._mgr is None:
            raise EngineError("ContinuousEngine.submit before start()")
        ids = self.encode(req)
        max_new = req.max_new_tokens or self.settings.max_new_tokens
        eos = -1 if self.settings.fixed_output_length else self._mgr.generation_config.eos_token_id
        eos_set = set() if eos is None or eos == -1 else set(eos if isinstance(eos, list) else [eos])
        h = RequestHandle(req, t0, cancel=lambda: self._cancel(str(req.request_id)))
        with self._lock:
            if req.request_id in self._open:
                raise ConfigError(f"request id {req.request_id!r} is already in flight")
            self._open[str(req.request_id)] = _Open(h, max_new, eos_set, stream)
        rid = self._mgr.add_request(ids, request_id=str(req.request_id), max_new_tokens=max_new,
                                    streaming=stream, record_timestamps=True, eos_token_id=eos)
        if rid is None:
            with self._lock:
                self._open.pop(str(req.request_id), None)
            h.resolve(failed_request(req, t0, "the continuous batching manager refused the request "
                                     "(stopping or crashed)", n_prompt_tokens=len(ids),
                                     engine=ENGINE_NAME))
        return h

    def _cancel(self, rid: str) -> None:
        with self._lock:
            o = self._open.pop(rid, None)
        if o is None or self._mgr is None:
            return
        self._mgr.cancel_request(rid)
        ev = o.handle.events() if o.stream else []  # what was streamed before the cancel
        o.handle.resolve(failed_request(o.handle.request, o.handle.t_submit_s, "cancelled",
                                        token_times_s=[e.t_s for e in ev], stop_reason="cancelled",
                                        engine=ENGINE_NAME))

    # -- records -----------------------------------------------------------------------------
    def steps(self, since_s: Optional[float] = None) -> list[EngineStep]:
        """Engine steps recorded so far (those starting at or after ``since_s``), in order."""
        s = list(self._steps)
        return s if since_s is None else [x for x in s if x.t_start_s >= since_s]

    def clear_records(self) -> None:
        """Forget recorded steps (e.g. after a warm-up phase)."""
        with self._lock:
            self._steps.clear()
            self._emits.clear()

    def describe(self) -> dict[str, Any]:
        """JSON-able identity for a run manifest: engine, transformers version, step source and
        the continuous batching config as resolved by transformers (once started)."""
        import transformers

        cfg = getattr(self._mgr, "continuous_batching_config", None) or self._cb_config
        simple = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                  if isinstance(getattr(cfg, f.name), (int, float, str, bool, type(None), tuple))}
        return {"engine": ENGINE_NAME, "transformers": transformers.__version__,
                "device": self.device, "step_source": self.step_source,
                "attn_implementation": getattr(self.loaded.model.config, "_attn_implementation", None),
                "hook_errors": self.hook_errors, "cb_config": simple}

    # -- transformers internals (background thread) -------------------------------------------
    def _install_hooks(self, mgr: Any) -> bool:
        """Wrap the batch processor's scheduling/update methods when the manager creates it."""
        create = getattr(mgr, "_create_batch_processor", None)
        if create is None:
            return False
        try:
            from transformers.generation.continuous_batching import RequestStatus
            decoding = RequestStatus.DECODING
        except ImportError:
            return False
        engine = self

        def create_hooked() -> Any:
            bp = create()
            if not getattr(bp, "_llm_dvfs_hooked", False):
                if not all(hasattr(bp, a) for a in ("prepare_next_batch", "update_batch", "scheduler")):
                    raise RuntimeError("transformers' batch processor lacks prepare_next_batch/"
                                       "update_batch/scheduler; llm_dvfs cannot record steps")
                engine._hook_processor(bp, decoding)
                bp._llm_dvfs_hooked = True
            engine._ready.set()
            return bp

        mgr._create_batch_processor = create_hooked
        return True

    def _hook_processor(self, bp: Any, decoding: Any) -> None:
        sched, prepare, update = bp.scheduler, bp.prepare_next_batch, bp.update_batch
        schedule = sched.schedule_batch
        engine = self

        def schedule_hooked(*a: Any, **k: Any) -> Any:
            # status before scheduling tells decode from prefill (scheduling flips a fully
            # prefilled request to DECODING before its forward pass runs)
            before = {rid: st.status for d in (sched.waiting_requests, sched.active_requests)
                      for rid, st in d.items()}
            out = schedule(*a, **k)
            engine._last_sched = (out[0], before)
            return out

        def prepare_hooked() -> bool:
            t0 = now_s()
            engine._last_sched = None
            ok = prepare()
            if ok:
                try:
                    engine._on_scheduled(t0, decoding)
                except Exception:  # noqa: BLE001 - bookkeeping must never break generation
                    engine.hook_errors += 1
                    # keep steps and updates paired: an empty step rather than a shifted one
                    engine._pending.append(_Pending(t0, {}, {}, ()))
            return ok

        def update_hooked() -> None:
            update()
            t1 = now_s()
            try:
                p = engine._pending.popleft()
            except IndexError:
                engine.hook_errors += 1
                return
            t0 = max(p.t_start_s, engine._last_end)  # async: the previous step still ran then
            engine._last_end = t1
            with engine._lock:
                engine._steps.append(EngineStep(t0, t1, p.prefill, p.decode))
                engine._emits.append(p.emits)

        sched.schedule_batch = schedule_hooked
        bp.prepare_next_batch = prepare_hooked
        bp.update_batch = update_hooked

    def _on_scheduled(self, t0: float, decoding: Any) -> None:
        scheduled, before = self._last_sched or ([], {})
        prefill: dict[str, int] = {}
        decode: dict[str, int] = {}
        emits = []
        for fs in scheduled or ():
            rid = fs.state.request_id
            n = int(fs.query_length)
            if before.get(rid) == decoding:
                decode[rid] = n
            else:
                prefill[rid] = n
                self._prefilled[rid] = self._prefilled.get(rid, 0) + n
            if fs.has_new_token:
                emits.append(rid)
        self._pending.append(_Pending(t0, prefill, decode, tuple(emits)))

    # -- outputs (dispatcher thread) -----------------------------------------------------------
    def _dispatch(self) -> None:
        mgr = self._mgr
        while True:
            out = mgr.get_result(timeout=0.05)
            if out is None:
                # get_result returns at once once the thread is gone: leave when drained
                if not mgr.is_running() and _queue_empty(mgr):
                    break
                continue
            with self._lock:
                o = self._open.get(out.request_id)
            if o is None:
                continue  # cancelled, or not ours
            try:
                if o.stream:
                    self._push(o, out)
                if out.is_finished():
                    with self._lock:
                        self._open.pop(out.request_id, None)
                    o.handle.resolve(self._served(o, out))
            except Exception as e:  # noqa: BLE001 - one bad record must not stop the others
                log.exception("continuous engine: recording request %s failed", out.request_id)
                with self._lock:
                    self._open.pop(out.request_id, None)
                o.handle.resolve(failed_request(o.handle.request, o.handle.t_submit_s,
                                                f"recording failed: {type(e).__name__}: {e}",
                                                engine=ENGINE_NAME))
        err = getattr(getattr(mgr, "background_thread_status", None), "fatal_error", None)
        self._fail_open("generation thread stopped" + (f": {type(err).__name__}: {err}" if err else ""))

    def _fail_open(self, why: str) -> None:
        with self._lock:
            left = list(self._open.values())
            self._open.clear()
        for o in left:
            ev = o.handle.events()
            o.handle.resolve(failed_request(o.handle.request, o.handle.t_submit_s, why,
                                            token_times_s=[e.t_s for e in ev], engine=ENGINE_NAME))

    def _push(self, o: _Open, out: Any) -> None:
        gen = out.generated_tokens
        ts = out.timestamps
        tok = self.loaded.tokenizer
        last = len(gen) - 1
        for k in range(o.n_pushed, len(gen)):
            t = ts[k] + self._perf_off if ts is not None and k < len(ts) else now_s()
            piece = None
            if self.decode_text:
                if k == last and out.is_finished():
                    # the last piece flushes whatever the window held back
                    full = tok.decode(gen, skip_special_tokens=True)
                    piece = full[len(o.text):] if full.startswith(o.text) else ""
                else:
                    # incremental detokenization over a short window (cost per token bounded,
                    # not quadratic): hold back while the text ends inside a UTF-8 sequence
                    before = tok.decode(gen[o.prefix_off:o.read_off], skip_special_tokens=True)
                    after = tok.decode(gen[o.prefix_off:k + 1], skip_special_tokens=True)
                    piece = ""
                    if len(after) > len(before) and not after.endswith("\ufffd"):
                        piece = after[len(before):]
                        o.prefix_off, o.read_off = o.read_off, k + 1
                o.text += piece
            o.handle.push_token(TokenEvent(k, t, int(gen[k]), piece))
        o.n_pushed = len(gen)

    def _token_times_from_steps(self, rid: str, n: int) -> np.ndarray:
        with self._lock:
            t = [s.t_end_s for s, e in zip(self._steps, self._emits) if rid in e]
        t = t[-n:] if n else []
        return np.asarray(([math.nan] * (n - len(t))) + t, dtype=np.float64)

    def _served(self, o: _Open, out: Any) -> ServedRequest:
        h = o.handle
        off = self._perf_off
        gen = [int(x) for x in out.generated_tokens]
        n = len(gen)
        ts = out.timestamps
        if ts is not None and len(ts) == n:
            tt, src = np.asarray(ts, dtype=np.float64) + off, "hf_timestamps"
        else:  # a soft-reset (re-prefilled) request loses its earlier stamps; steps have them
            tt, src = self._token_times_from_steps(h.request_id, n), "steps"
        start, end = out.lifespan
        # the clocks agree to ~1 us; never let conversion noise put admission before arrival
        admit = max(start + off, h.t_submit_s) if start > 0 else None
        t_end = end + off if end > 0 else now_s()
        if out.error is not None:
            reason = "error"
        elif n and gen[-1] in o.eos:
            reason = "eos"
        elif n >= o.max_new_tokens:
            reason = "length"
        else:
            reason = str(getattr(out.status, "name", out.status)).lower()
        extra: dict[str, Any] = {"engine": ENGINE_NAME, "output_ids": gen, "token_times_source": src,
                                 "metadata": dict(h.request.metadata),
                                 "t_hf_created_s": out.created_time + off}
        computed = self._prefilled.pop(h.request_id, None)
        if computed is not None:
            # fewer than n_prompt_tokens when a prompt prefix was served from the cache
            # (prefix sharing) or, more after a soft reset (the output was prefilled again)
            extra["prefill_tokens_computed"] = computed
        if out.error is not None:
            extra["error"] = str(out.error)
        if self.decode_text:
            extra["output_text"] = self.loaded.tokenizer.decode(gen, skip_special_tokens=True)
        return ServedRequest(
            request_id=h.request_id, t_arrival_s=h.t_submit_s, t_admit_s=admit,
            t_first_token_s=float(tt[0]) if n and math.isfinite(tt[0]) else None,
            token_times_s=tt, t_end_s=max(t_end, float(tt[-1]) if n and math.isfinite(tt[-1]) else t_end),
            n_prompt_tokens=len(out.prompt_ids), n_output_tokens=n, stop_reason=reason, extra=extra)


def steps_from_token_times(requests: Iterable[ServedRequest], gap_s: float = 5e-4) -> list[EngineStep]:
    """Engine steps reconstructed from token timestamps alone (for engines that expose no step
    boundaries): tokens stamped within ``gap_s`` of each other belong to one step.

    A step runs from the previous step's end (or, after idle time, from the earliest admission
    or arrival of its requests) to its last token. A request's first token counts as a prefill
    of its whole prompt, every later token as one decode. This is an approximation: chunked
    prefills and steps that emit no token (a prefill chunk) are folded into the next token's
    step, and two steps closer than ``gap_s`` merge.
    """
    toks = []
    starts: dict[str, float] = {}
    prompts: dict[str, int] = {}
    for r in requests:
        starts[r.request_id] = r.t_admit_s if r.t_admit_s is not None else r.t_arrival_s
        prompts[r.request_id] = int(r.n_prompt_tokens)
        toks.extend((float(t), r.request_id, k) for k, t in enumerate(r.token_times_s)
                    if math.isfinite(t))
    toks.sort()
    steps: list[EngineStep] = []
    prev_end = -math.inf
    i = 0
    while i < len(toks):
        j = i + 1
        while j < len(toks) and toks[j][0] - toks[j - 1][0] <= gap_s:
            j += 1
        group = toks[i:j]
        prefill = {rid: prompts[rid] for _, rid, k in group if k == 0}
        decode = {rid: 1 for _, rid, k in group if k > 0}
        t_end = group[-1][0]
        t_start = max(prev_end, min(starts[rid] for _, rid, _ in group))
        steps.append(EngineStep(min(t_start, group[0][0]), t_end, prefill, decode))
        prev_end = t_end
        i = j
    return steps
