"""Runner: one task's requests through Hugging Face ``generate``, measured, as result rows.

The sweep's calls of ``generate`` (models.py loads the model, stopping.py builds the stop
checks). It takes a loaded model (:class:`llm_dvfs.models.LoadedModel`), a task's samples and a
:class:`~llm_dvfs.monitor.PowerMonitor` and returns one row per request in the ``requests`` schema of :mod:`llm_dvfs.schema`, plus the
``tokens`` rows. It neither changes clocks nor writes files (that is :mod:`llm_dvfs.sweep.execute`).

Per batch of ``batch_size`` requests (prompts padded on the left, ``batch_index`` recorded):

1. ``torch.cuda.synchronize`` (no earlier work leaks into the window), open a monitor window;
2. ``model.generate`` with the decoding settings of :class:`GenerationSettings`, with a
   :class:`~llm_dvfs.timeline.TokenTimer` marking the start, the end of every step (the first
   ends the prefill) and the end;
3. synchronize again, close the window;
4. outside the window: decode the outputs and score them with the task's metric.

Generation follows Hugging Face and lm-evaluation-harness: EOS ids are the model's
``generation_config``'s (all of them: Llama-3 instruct models have several), never replaced by
the tokenizer's single one; a sequence also ends at the task's stop sequences (``Task.stop``,
e.g. ``"\n"`` after a BoolQ answer) through ``StopStringCriteria``, built once per task outside
the measured windows (building it reads the whole vocabulary: ~0.1 s for 18k tokens). Each row
records why its sequence ended (``stop_reason``: ``eos`` | ``stop_string`` | ``max_new_tokens``)
and how many tokens it generated (``tokens_out``, through the token that ended it). With
``apply_chat_template`` each prompt is one user turn of the tokenizer's chat template with the
generation prompt added (``add_generation_prompt=True``), tokenized without adding special
tokens again (the template has them).

After the cell's last batch the windows are finalised (energy over each window, median observed
clocks, OR of the clock-event reasons; done once per cell because finalising waits for the
sampler to deliver samples past a window's end), and
:func:`llm_dvfs.attribution.attribute` integrates the power trace
over each step (one sensor-lag estimate for the whole cell) and splits every step's energy over
the sequences still generating in it: per request ``energy_j``, ``prefill_energy_j``,
``decode_energy_j``, ``ttft_s``, ``tpot_s``, ``j_per_token``, and one ``tokens`` row per
generated token. If the attribution cannot run (no trace) each request keeps ``1/batch_size``
of its batch window's energy. Without a GPU (time only) the marks still give TTFT, TPOT and the
token intervals; energies are NaN (``energy_method='none'``). All of this lives in
:class:`llm_dvfs.meter.calls.CallMeter`, the one place that knows how measuring works (the
lm-evaluation-harness model measures through it too).

``latency_s`` is the batch's duration: every request of a batch waits for the whole batch.
Warm-up batches (``warmup``) run the cell's own shapes first and are excluded from the rows.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

from llm_dvfs.errors import ConfigError
from llm_dvfs.meter.calls import ATTRIBUTED_COLUMNS, CallMeter, MeteredCall
from llm_dvfs.workload.stopping import STOP_REASONS, build_stop_criteria, eos_token_ids, finish_reasons

log = logging.getLogger(__name__)

DECODING_MODES = ("greedy", "sampled")


@dataclass(frozen=True)
class GenerationSettings:
    """How ``generate`` is called.

    Attributes:
        max_new_tokens: upper bound of generated tokens per request (≥ 1).
        fixed_output_length: also set ``min_new_tokens = max_new_tokens`` so every request
            generates exactly ``max_new_tokens`` tokens (EOS suppressed): controlled comparisons.
        decoding: ``"greedy"`` or ``"sampled"``.
        temperature, top_p: sampling parameters (used with ``decoding="sampled"``).
        seed: seeds sampled decoding; each batch is seeded from (seed, cell, batch number), so a
            resumed sweep draws the same tokens as an uninterrupted one.
        stop_sequences: end a sequence at the task's stop strings (``Task.stop``); off with
            ``fixed_output_length`` (exactly max_new_tokens tokens means no early stop).
        apply_chat_template: wrap each prompt in the tokenizer's chat template as one user turn
            with the generation prompt (ConfigError at :class:`Runner` when it has none).
    """

    max_new_tokens: int = 32
    fixed_output_length: bool = False
    decoding: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_sequences: bool = True
    apply_chat_template: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.decoding not in DECODING_MODES:
            raise ConfigError(f"decoding must be one of {', '.join(DECODING_MODES)}, got {self.decoding!r}")
        if not (self.temperature > 0):
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def generate_kwargs(self, tokenizer: Any, model: Any = None) -> dict[str, Any]:
        """``generate`` keyword arguments (stop strings are the runner's: they are per task).

        EOS ids are left to the model's ``generation_config``; only when it has none (and
        ``model`` is given) is the tokenizer's EOS passed, so that generation can end at all.
        """
        kw: dict[str, Any] = {"max_new_tokens": self.max_new_tokens,
                              "pad_token_id": tokenizer.pad_token_id}
        gc = getattr(model, "generation_config", None)
        if model is not None and getattr(gc, "eos_token_id", None) is None \
                and tokenizer.eos_token_id is not None:
            kw["eos_token_id"] = tokenizer.eos_token_id
        if self.fixed_output_length:
            kw["min_new_tokens"] = self.max_new_tokens
        if self.decoding == "greedy":
            kw["do_sample"] = False
            # generation_config of some checkpoints carries sampling params; greedy ignores them
            kw.update(temperature=None, top_p=None, top_k=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        return kw


# --------------------------------------------------------------------------------------------
# task adapter: the few things the runner needs from llm_dvfs.workload.tasks
# --------------------------------------------------------------------------------------------
def score_batch(task: Any, samples: Sequence[Any], outputs: Sequence[str], loaded: Any, *,
                add_special_tokens: bool = True) -> list[float]:
    """Per-request quality by the task's metric (NaN where the task has none).

    ``task.scoring`` decides what :meth:`Task.score` gets: ``generate`` the generated text,
    ``loglik`` the log-likelihoods of ``sample.choices`` (HellaSwag; extra forward passes, so
    call this outside measured windows), ``none`` nothing (NaN). ``add_special_tokens=False``
    for prompts that carry their special tokens already (a chat template's).
    """
    scoring = getattr(task, "scoring", "none")
    if scoring == "generate":
        return [float(task.score(s, o)) for s, o in zip(samples, outputs)]
    if scoring == "loglik":
        from llm_dvfs.workload.scoring import sample_logliks

        return [float(task.score(s, sample_logliks(loaded.model, loaded.tokenizer, s,
                                                   add_special_tokens=add_special_tokens)))
                for s in samples]
    return [math.nan] * len(samples)


# --------------------------------------------------------------------------------------------
# the runner
# --------------------------------------------------------------------------------------------
@dataclass
class CellRows:
    """What :meth:`Runner.run` returns: row dicts for the ``requests`` and ``tokens`` tables,
    the host-monotonic span (s) of the measured batches (for the power trace), warnings, and
    the attribution summary (for the cell's record)."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    tokens: list[dict[str, Any]] = field(default_factory=list)
    t_start_s: float = math.nan
    t_end_s: float = math.nan
    warnings: list[str] = field(default_factory=list)
    attribution: dict[str, Any] = field(default_factory=dict)


def _batch_seed(seed: int, cell_id: str, batch_no: int) -> int:
    return zlib.crc32(f"{seed}|{cell_id}|{batch_no}".encode()) & 0x7FFFFFFF


class Runner:
    """Runs requests of one loaded model, measured.

    Args:
        loaded: a :class:`llm_dvfs.models.LoadedModel` (its tokenizer is set to pad on the left).
        monitor: a started :class:`~llm_dvfs.monitor.PowerMonitor`, or None / one that is not
            ``available``: time only (``energy_method='none'``, energies NaN).
        settings: :class:`GenerationSettings`.
        gpu_name: recorded in the ``gpu_name`` column (None, a null, when no GPU is measured).
        token_timing: mark every generation step (TTFT, TPOT, per-token rows and energy);
            False = one window per batch only (phase columns NaN).

    Raises:
        ConfigError: ``max_new_tokens`` leaves no room for a prompt in the model's context, or
            ``apply_chat_template`` with a tokenizer that has no chat template.
    """

    def __init__(self, loaded: Any, monitor: Any = None,
                 settings: GenerationSettings = GenerationSettings(), *, gpu_name: Optional[str] = None,
                 token_timing: bool = True) -> None:
        self.loaded = loaded
        self.monitor = monitor
        self.settings = settings
        self.gpu_name = gpu_name
        self.device = str(loaded.device)
        self._meter = CallMeter(monitor, self.device, token_timing)
        ctx = self._context_limit()
        self._max_prompt_tokens = ctx - settings.max_new_tokens
        if self._max_prompt_tokens < 1:
            raise ConfigError(f"max_new_tokens={settings.max_new_tokens} leaves no room for a prompt "
                              f"in the context of {loaded.spec.raw} ({ctx} tokens)")
        loaded.tokenizer.padding_side = "left"  # decoder-only batched generation pads on the left
        if settings.apply_chat_template and not getattr(loaded.tokenizer, "chat_template", None):
            raise ConfigError(f"--apply-chat-template: the tokenizer of {loaded.spec.raw} "
                              f"({getattr(loaded, 'tokenizer_source', '') or 'its own'}) has no chat "
                              "template; drop the option, or give a tokenizer that has one "
                              "(--model-args tokenizer=DIR_OR_HUB_ID)")
        self.eos_ids = [] if settings.fixed_output_length else eos_token_ids(loaded)
        # per stop-string tuple: (criteria list for generate, a CPU copy for finish_reasons)
        self._stop_criteria: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def _context_limit(self) -> int:
        cfg = getattr(self.loaded.model, "config", None)
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        return 1 << 30

    # -- pieces ------------------------------------------------------------------------------
    def format_prompt(self, prompt: str) -> str:
        """The text the model is given: ``prompt`` itself, or with ``apply_chat_template`` one
        user turn of the tokenizer's chat template followed by its generation prompt."""
        if not self.settings.apply_chat_template:
            return prompt
        return self.loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)

    def stop_strings(self, task: Any) -> tuple[str, ...]:
        """The stop strings generation ends at for ``task``: its ``stop`` unless stop sequences
        are off or the output length is fixed."""
        if self.settings.fixed_output_length or not self.settings.stop_sequences:
            return ()
        return tuple(s for s in (getattr(task, "stop", ()) or ()) if s)

    def _criteria(self, stops: tuple[str, ...]) -> tuple[Any, Any]:
        """(``StoppingCriteriaList`` for generate, CPU copy) for ``stops``; (None, None) for none.

        Built once per stop tuple (:func:`~llm_dvfs.workload.stopping.build_stop_criteria`:
        ``generate(stop_strings=..., tokenizer=...)`` would rebuild it inside every measured
        window).
        """
        if not stops:
            return None, None
        if stops not in self._stop_criteria:
            self._stop_criteria[stops] = build_stop_criteria(self.loaded.tokenizer, stops)
        return self._stop_criteria[stops]

    def generate_kwargs(self, stops: tuple[str, ...] = ()) -> dict[str, Any]:
        """``generate`` keyword arguments for a task with stop strings ``stops``."""
        kw = self.settings.generate_kwargs(self.loaded.tokenizer, self.loaded.model)
        crit, _ = self._criteria(stops)
        if crit is not None:
            kw["stopping_criteria"] = crit
        return kw

    def encode(self, prompts: Sequence[str]) -> tuple[dict[str, Any], list[int]]:
        """Tokenize a batch of model inputs (left padded; truncated on the left to fit the
        context). Special tokens are added as the tokenizer does, except for chat-templated
        prompts, which carry them already.

        Returns (``input_ids``/``attention_mask`` on the model's device, unpadded prompt
        lengths in tokens).
        """
        tok = self.loaded.tokenizer
        side = tok.truncation_side
        tok.truncation_side = "left"  # keep the end of the prompt: the question and the cue
        try:
            enc = tok(list(prompts), return_tensors="pt", padding=True, truncation=True,
                      max_length=self._max_prompt_tokens,
                      add_special_tokens=not self.settings.apply_chat_template)
        finally:
            tok.truncation_side = side
            # a fast tokenizer leaves padding/truncation switched on in its Rust backend; code
            # that encodes through the backend directly (llm_dvfs.workload.features) would count pads
            backend = getattr(tok, "backend_tokenizer", None)
            if backend is not None:
                backend.no_padding()
                backend.no_truncation()
        lengths = [int(x) for x in enc["attention_mask"].sum(dim=1).tolist()]
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}, lengths

    def finish(self, out: Any, prompt_len: int, stops: tuple[str, ...] = ()) -> tuple[list[int], list[str]]:
        """Tokens generated and stop reason per row (:func:`finish_reasons` with this model's
        EOS ids and the criterion generate used for ``stops``)."""
        return finish_reasons(out, prompt_len, eos_ids=self.eos_ids, stop=self._criteria(stops)[1])

    def out_lengths(self, out: Any, prompt_len: int, stops: tuple[str, ...] = ()) -> list[int]:
        """Generated tokens per row: up to and including the token that ended it (an EOS id of
        the generation config, or the one completing a stop string); padding after it is not
        output."""
        return self.finish(out, prompt_len, stops)[0]

    def warmup(self, prompts: Sequence[str], batch_size: int, n_batches: int = 1,
               stops: tuple[str, ...] = ()) -> float:
        """Run ``n_batches`` unmeasured batches of ``batch_size`` (task prompts, formatted as
        the measured ones are, reused cyclically); returns the wall time spent, s."""
        if n_batches <= 0 or not prompts:
            return 0.0
        import torch

        t0 = time.monotonic()
        kwargs = self.generate_kwargs(stops)
        for b in range(n_batches):
            batch = [prompts[(b * batch_size + i) % len(prompts)] for i in range(batch_size)]
            inputs, _ = self.encode([self.format_prompt(p) for p in batch])
            with torch.inference_mode():
                self.loaded.model.generate(**inputs, **kwargs)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.monotonic() - t0

    # -- a cell ------------------------------------------------------------------------------
    def run(self, task: Any, samples: Sequence[Any], *, batch_size: int, cell_id: str,
            context: Mapping[str, Any], features: Optional[Any] = None, warmup: int = 1,
            repeat: int = 0, progress: Optional[Any] = None,
            on_batch: Optional[Callable[[int], None]] = None) -> CellRows:
        """Measure every sample of ``samples`` once, in batches of ``batch_size``.

        Args:
            task: the :class:`llm_dvfs.tasks.Task` (quality metric, scoring, stop strings).
            samples: its :class:`~llm_dvfs.tasks.Sample` s (the task's template applied; the
                chat template, when on, is applied here), in run order (the last batch may be
                smaller).
            batch_size: requests per ``generate`` call (≥ 1).
            cell_id: recorded in every row; request ids are ``cell_id|sample id|position``.
            context: columns common to the cell's rows (``task``, the clock settings requested,
                ``idle_power_w`` of the clock point, ...), merged into every request row.
            features: DataFrame of ``feat_*`` columns aligned with ``samples`` (one row each),
                computed once per task by the caller; None = no feature columns.
            warmup: unmeasured batches run first with the cell's batch size.
            repeat: the repeat number (``repeat`` column).
            progress: a tqdm-like object; ``update(n)`` is called with the requests done.
            on_batch: called with the number of requests after each measured batch.

        Returns:
            :class:`CellRows`.
        Raises:
            ConfigError: batch_size < 1. ValueError: features not aligned with samples.
        """
        import torch

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        lm = self.loaded
        raw_prompts = [s.prompt for s in samples]
        if self.settings.apply_chat_template:
            # the scorer sees what the model saw (HellaSwag's log-likelihoods follow the prompt)
            samples = [dataclasses.replace(s, prompt=self.format_prompt(s.prompt)) for s in samples]
        prompts = [s.prompt for s in samples]
        stops = self.stop_strings(task)
        feat_rows: list[dict[str, float]] = [{} for _ in samples]
        if features is not None and len(features.columns):
            if len(features) != len(samples):
                raise ValueError(f"features has {len(features)} rows for {len(samples)} samples")
            fcols = [c for c in features.columns if c.startswith("feat_")]
            feat_rows = features[fcols].astype("float64").to_dict("records")
        metric = str(getattr(task, "metric", "") or "")
        res = CellRows()
        if warmup:
            self.warmup(raw_prompts, batch_size, warmup, stops)
        kwargs = self.generate_kwargs(stops)
        measured: list[tuple[MeteredCall, list[dict[str, Any]]]] = []
        n_trunc = 0
        for b0 in range(0, len(samples), batch_size):
            batch_no = b0 // batch_size
            idx = list(range(b0, min(b0 + batch_size, len(samples))))
            inputs, lengths = self.encode([prompts[i] for i in idx])
            n_trunc += sum(1 for n in lengths if n >= self._max_prompt_tokens)
            if self.settings.decoding == "sampled":
                torch.manual_seed(_batch_seed(self.settings.seed, cell_id, batch_no))
            with torch.inference_mode():
                out, call = self._meter.generate(lm.model, {**inputs, **kwargs}, name="batch")
            prompt_len = int(inputs["input_ids"].shape[1])
            out_lens, reasons = self.finish(out, prompt_len, stops)
            call.set_tokens(out_lens)
            new_ids = out[:, prompt_len:].detach().cpu()
            texts = [lm.tokenizer.decode(new_ids[k, :out_lens[k]], skip_special_tokens=True)
                     for k in range(len(idx))]
            # outside the window: quality (may run forward passes, e.g. HellaSwag)
            qual = score_batch(task, [samples[i] for i in idx], texts, lm,
                               add_special_tokens=not self.settings.apply_chat_template)
            rows = self._rows(idx, samples, prompts, texts, lengths, out_lens, qual, feat_rows,
                              cell_id, context, metric, repeat, batch_size)
            for row, why in zip(rows, reasons):
                row["stop_reason"] = why
            res.requests.extend(rows)
            measured.append((call, rows))
            if progress is not None:
                progress.update(len(idx))
            if on_batch is not None:
                on_batch(len(idx))
        # finalise the windows (only the last one can still wait for samples), then attribute
        for batch_no, (call, rows) in enumerate(measured):
            self._fill(rows, call)
            res.warnings.extend(f"batch {batch_no}: {e}" for e in call.errors())
        if measured:
            res.t_start_s, res.t_end_s = measured[0][0].t_start_s, measured[-1][0].t_end_s
        self._attribute(res, [c for c, _ in measured], [[r["request_id"] for r in rows] for _, rows in measured],
                        cell_id)
        if n_trunc:
            res.warnings.append(f"{n_trunc} prompt(s) truncated on the left to {self._max_prompt_tokens} "
                                "tokens to fit the context")
        return res

    @staticmethod
    def _fill(rows: list[dict[str, Any]], call: MeteredCall) -> None:
        """The batch window's values into its rows; energies shared evenly (the attribution
        replaces them per request when it runs)."""
        m = call.measurement()
        share = 1.0 / len(rows)

        def part(v: Optional[float]) -> float:
            return math.nan if v is None or not math.isfinite(v) else float(v) * share

        energy = part(m.energy_j)
        for row in rows:
            n_out = row["tokens_out"]
            row.update({
                "sm_mhz_observed": m.sm_mhz,
                "mem_mhz_observed": m.mem_mhz,
                "clock_event_reasons": m.clock_event_reasons if m.devices else None,
                "latency_s": call.duration_s,
                "energy_j": energy,
                "j_per_token": energy / n_out if n_out > 0 and math.isfinite(energy) else math.nan,
                "avg_power_w": m.avg_power_w,
                "active_energy_j": part(m.active_energy_j),
                "energy_j_counter": part(m.energy_j_counter),
                "energy_method": m.energy_method,
            })

    def _attribute(self, res: CellRows, calls: list[MeteredCall], batch_ids: list[list[str]],
                   cell_id: str) -> None:
        """Overwrite the window-share values with the attribution's per-request values."""
        try:
            per, tokens, summary = self._meter.attribute(calls, batch_ids, cell_id)
        except Exception as e:  # noqa: BLE001 - attribution must never lose the request rows
            msg = f"token attribution failed ({type(e).__name__}: {e}); energy split evenly per batch"
            log.warning("%s: %s", cell_id, msg)
            res.warnings.append(msg)
            return
        for row in res.requests:
            p = per.get(row["request_id"])
            if p:
                row.update({k: v for k, v in p.items() if k in ATTRIBUTED_COLUMNS})
        res.tokens = tokens
        res.attribution = summary

    def _rows(self, idx: list[int], samples: Sequence[Any], prompts: list[str], texts: list[str],
              lengths: list[int], out_lens: list[int], qual: list[float],
              feat_rows: list[dict[str, float]], cell_id: str, context: Mapping[str, Any],
              metric: str, repeat: int, batch_size: int) -> list[dict[str, Any]]:
        """Request rows of one batch, without the measurement (:meth:`_fill` adds it)."""
        lm = self.loaded
        rows = []
        for k, i in enumerate(idx):
            sid = str(samples[i].sample_id)
            row: dict[str, Any] = {
                "cell_id": cell_id,
                "request_id": f"{cell_id}|{sid}|{i}",
                "model": lm.spec.raw,
                "weights": lm.weights,
                "dtype": lm.dtype,
                "sample_id": sid,
                "repeat": int(repeat),
                "batch_size": int(batch_size),
                "batch_index": k,
                "device": self.device,
                "gpu_name": self.gpu_name,
                "tokens_in": int(lengths[k]),
                "tokens_out": int(out_lens[k]),
                # the commit that pins the weights (None for arch: and local models)
                "revision": getattr(lm, "revision", None),
                "quality_metric": metric or None,
                "quality": qual[k],
                # null when there is no score to judge (no metric, not scored); False when the
                # score exists but is meaningless (random weights)
                "quality_valid": (lm.weights == "pretrained") if metric and math.isfinite(qual[k]) else None,
                "prompt": prompts[i],
                "output_text": texts[k],
            }
            row.update(context)
            row.update(feat_rows[i])
            rows.append(row)
        return rows


def bare_generate(loaded: Any, prompts: Sequence[str], batch_size: int,
                  settings: GenerationSettings) -> tuple[int, float]:
    """Unmeasured ``generate`` over ``prompts`` in batches, the same tokenization as
    :class:`Runner` (the baseline of ``bench/harness_overhead.py``).

    Returns (generated tokens, wall seconds).
    """
    import torch

    r = Runner(loaded, None, settings, token_timing=False)
    kwargs = r.generate_kwargs()
    n_tok = 0
    dev = str(loaded.device)
    t0 = time.perf_counter()
    for b0 in range(0, len(prompts), batch_size):
        inputs, _ = r.encode([r.format_prompt(p) for p in prompts[b0:b0 + batch_size]])
        with torch.inference_mode():
            out = loaded.model.generate(**inputs, **kwargs)
        n_tok += sum(r.out_lengths(out, int(inputs["input_ids"].shape[1])))
    if dev.startswith("cuda"):
        torch.cuda.synchronize(dev)
    return n_tok, time.perf_counter() - t0


__all__ = ["GenerationSettings", "Runner", "CellRows", "DECODING_MODES",
           "STOP_REASONS", "score_batch", "bare_generate", "eos_token_ids", "finish_reasons"]
