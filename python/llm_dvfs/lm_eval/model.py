"""The lm-evaluation-harness model ``llm_dvfs-hf``: every harness request measured.

Importing this module imports lm_eval and registers the model (``@register_model``), so that
``lm_eval.simple_evaluate(model="llm_dvfs-hf", model_args="pretrained=...,out=RUN_DIR")`` and
``python -m llm_dvfs.lm_eval --model llm_dvfs-hf ...`` find it. The harness builds the prompts,
decides what is asked and scores the answers (its results JSON stays its own); this model
answers with a Hugging Face causal LM loaded by :func:`llm_dvfs.workload.models.load_model`
(hub id, local directory or ``arch:NAME``), measures every batch in a PowerMonitor window
(:mod:`llm_dvfs.lm_eval.batches`) and writes an llm_dvfs run directory
(:mod:`llm_dvfs.lm_eval.record`).

What the energy of a request is:

* ``loglikelihood``: one forward pass per batch of up to ``batch_size`` (context, continuation)
  pairs of one task, longest first. The window's energy is split over the pairs in proportion to
  ``tokens_in``, the tokens each pair put through the model (context + continuation - 1: the last
  continuation token is predicted, never fed). ``tokens_out`` is 0 (nothing is generated),
  ``output_text`` holds the scored continuation, ``latency_s`` the batch's duration.
* ``loglikelihood_rolling``: the string's disjoint windows of at most ``max_length`` tokens (the
  harness's rolling windows) are scored like pairs; the request's energy is the sum of its
  windows' shares, its ``latency_s`` the summed duration of the batches it was in.
* ``generate_until``: one ``generate`` call per batch of prompts of one task with identical
  generation arguments. Each prompt stops at the first of its ``until`` sequences (looked for in
  its generated text only), at EOS or after ``max_gen_toks``; the batch ends when every prompt
  has stopped. Energy is attributed per step (equal split over the prompts still generating,
  docs/attribution.md); ``tokens_out`` counts the tokens up to and including the one that
  completed the stop sequence, ``output_text`` is that text (the harness gets it cut before the
  stop sequence).

Rows follow :data:`llm_dvfs.schema.REQUEST_COLUMNS`: ``task`` is the harness task name,
``sample_id`` its ``doc_id``, ``request_id`` ``CELL_ID|doc_id|idx|k`` (``idx``: the harness's
index of the request within its doc, e.g. the answer choice; ``k``: the copy, when a task repeats
a request). Quality columns are empty: the harness scores. Without a GPU, or with the model on
the CPU, the run is timed only (energies NaN/null, ``energy_method`` ``none``).
"""
from __future__ import annotations

import atexit
import importlib
import json
import logging
from typing import Any, Callable, Optional, Sequence

from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from llm_dvfs.errors import ConfigError, LlmDvfsError
from llm_dvfs.lm_eval.batches import Batch, BatchMeter
from llm_dvfs.lm_eval.record import MODEL_NAME, REQUEST_TYPES, HarnessCell, HarnessRecord, new_manifest
from llm_dvfs.lm_eval.stopping import gen_settings, generated_lengths, stop_criteria
from llm_dvfs.workload.models import load_model
from llm_dvfs.workload.scoring import encode_pair, fed_tokens, token_logliks

log = logging.getLogger(__name__)

# lm-eval registers its own models (hf, vllm, ...) on first lookup only while its registry is
# empty: registering ours first would hide them, so let it register them now.
importlib.import_module("lm_eval.models")

_DEFAULT_MAX_LENGTH = 2048  # lm-eval's HF model's fallback when neither config nor tokenizer says


def _int_arg(name: str, value: Any, minimum: int) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}"
                          + (" (measured batches need a fixed size: 'auto' is not supported)"
                             if name == "batch_size" else "")) from None
    if v < minimum or str(value).strip() not in (str(v), f"+{v}"):
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return v


@register_model(MODEL_NAME)
class LlmDvfsLM(LM):
    """lm-evaluation-harness model that measures the energy of every request.

    Constructed by lm-eval from ``--model_args`` (``pretrained=arch:tiny,dtype=float32,
    device=cpu,batch_size=4,out=RUN_DIR``; see :meth:`create_from_arg_string`) or directly.

    Args:
        pretrained: model spec for :func:`~llm_dvfs.workload.models.load_model` (hub id, local
            directory, ``arch:NAME``). Required.
        dtype, device, device_map, revision, tokenizer, trust_remote_code, seed,
            attn_implementation: passed to ``load_model``.
        batch_size: requests per measured batch (integer >= 1; lm-eval's ``auto`` is refused:
            a measured batch must have a known size).
        out: the llm_dvfs run directory to write (new or empty); None = keep the rows in memory
            (:attr:`record`).
        max_length: the context in tokens; default: the model's (``max_position_embeddings``
            etc.), else the tokenizer's ``model_max_length``, else 2048.
        max_gen_toks: ``generate_until``'s default when a task does not say (256, as lm-eval's).
        warmup: unmeasured repetitions of the first batch of each request type (CUDA kernel
            selection, allocator growth) before the measured ones.
        idle_s: measure the GPU's idle power for this long first (s; 0 = skip); then rows have
            ``idle_power_w`` and ``active_energy_j``.
        token_timing: mark every generate step (TTFT, TPOT, per-token rows and energy).
        monitor: a started PowerMonitor to measure with (programmatic use); default: one over
            the GPU(s) holding the model's parameters, none (time only) for a CPU model.
        max_batch_size: accepted for lm-eval's CLI and ignored.

    Raises:
        ConfigError: no ``pretrained``, an unknown argument, a bad batch size, a non-empty
            ``out``, and whatever ``load_model`` rejects. DataNotFound: a model that cannot be
            loaded (the message says how to get it).
    """

    def __init__(self, pretrained: Optional[str] = None, dtype: Any = "auto", device: Any = None,
                 device_map: Any = None, batch_size: Any = 1, out: Optional[str] = None,
                 revision: Optional[str] = None, tokenizer: Optional[str] = None,
                 trust_remote_code: bool = False, seed: int = 0, attn_implementation: Optional[str] = None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, warmup: int = 1,
                 idle_s: float = 0.0, token_timing: bool = True, monitor: Any = None,
                 max_batch_size: Any = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise ConfigError(f"unknown model argument(s) for {MODEL_NAME}: {', '.join(sorted(unknown))} "
                              "(known: pretrained, dtype, device, device_map, batch_size, out, revision, "
                              "tokenizer, trust_remote_code, seed, attn_implementation, max_length, "
                              "max_gen_toks, warmup, idle_s, token_timing)")
        if not pretrained:
            raise ConfigError(f"{MODEL_NAME} needs pretrained=MODEL (a hub id, a local directory or arch:NAME)")
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, 1)
        self.warmup = _int_arg("warmup", warmup, 0)
        self.loaded = load_model(str(pretrained), dtype=dtype, device=device, device_map=device_map,
                                 revision=revision, trust_remote_code=bool(trust_remote_code),
                                 seed=int(seed), tokenizer=tokenizer, attn_implementation=attn_implementation)
        self.tokenizer = self.loaded.tokenizer
        self.model = self.loaded.model
        self._device = self.loaded.device
        self._max_length = _int_arg("max_length", max_length, 2) if max_length is not None else self._context()
        notes: list[str] = []
        # the CUDA devices holding parameters: measured, and synchronised at window edges
        cuda = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
        self.monitor, gpus, measured = self._monitor(monitor, cuda, notes)
        self._own_monitor = monitor is None and self.monitor is not None
        if float(idle_s) > 0 and self.monitor is not None and self.monitor.available:
            self.monitor.measure_idle(float(idle_s))
        self.meter = BatchMeter(self.monitor, str(self.loaded.device), bool(token_timing), sync_devices=cuda)
        if self.meter.timing_error:
            notes.append(f"token timing unavailable ({self.meter.timing_error}): no TTFT, TPOT or tokens rows")
        self.gpu_name = ", ".join(g.name for g in measured)
        args = {"pretrained": pretrained, "dtype": dtype, "device": device, "device_map": device_map,
                "batch_size": self.batch_size, "out": out, "revision": revision, "tokenizer": tokenizer,
                "trust_remote_code": trust_remote_code, "seed": seed, "attn_implementation": attn_implementation,
                "max_length": self._max_length, "max_gen_toks": self.max_gen_toks, "warmup": self.warmup,
                "idle_s": idle_s, "token_timing": token_timing}
        self.record = HarnessRecord(out, new_manifest(
            model=self.loaded.describe(), model_args=args, batch_size=self.batch_size,
            device=str(self.loaded.device), gpus=gpus, measured=measured, notes=notes))
        self._warm: set[str] = set()
        for n in notes:
            log.warning("%s: %s", MODEL_NAME, n)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: Optional[dict] = None) -> "LlmDvfsLM":
        """From lm-eval's ``--model_args`` string (``key=value,...``, values typed by lm-eval's
        ``simple_parse_args_string``). ``additional_config`` (lm-eval's ``--batch_size``,
        ``--device``) fills only what the string leaves out: lm-eval's CLI always sends
        ``batch_size=1``, which must not clash with ``batch_size=`` in the string."""
        return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: Optional[dict] = None) -> "LlmDvfsLM":
        """As :meth:`create_from_arg_string`, from a dict."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**dict(arg_dict), **extra)

    def _context(self) -> int:
        cfg = getattr(self.model, "config", None)
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        v = getattr(self.tokenizer, "model_max_length", None)
        return v if isinstance(v, int) and 0 < v < 1 << 30 else _DEFAULT_MAX_LENGTH

    @staticmethod
    def _monitor(monitor: Any, cuda: list[int], notes: list[str]) -> tuple[Any, list, list]:
        """(the monitor to use or None, visible GPUs, measured GPUs) for a model on ``cuda``."""
        from llm_dvfs.devices import devices

        if monitor is not None:
            gpus = list(getattr(monitor, "device_info", []))
            if not getattr(monitor, "available", False):
                notes.append("the monitor given measures no GPU: energy is unavailable (time only)")
                return monitor, gpus, []
            if not cuda:
                notes.append(f"the model runs on the CPU but GPU(s) {[g.index for g in gpus]} are measured: "
                             "their energy does not include the CPU's work")
            return monitor, gpus, gpus
        gpus = devices()
        if not cuda:
            notes.append("the model runs on the CPU: energy is not measured (time only; energy_method "
                         "'none'). Energy needs the model on an NVIDIA GPU with its driver.")
            return None, gpus, []
        from llm_dvfs.meter.monitor import PowerMonitor

        try:
            mon = PowerMonitor(devices=cuda).start()
        except LlmDvfsError as e:
            notes.append(f"GPU(s) {cuda} cannot be measured ({type(e).__name__}: {e}): time only")
            return None, gpus, []
        atexit.register(mon.stop)
        return mon, gpus, [g for g in gpus if g.index in cuda]

    def close(self) -> None:
        """Stop the monitor this model started (a monitor passed in is left running)."""
        if self._own_monitor and self.monitor is not None:
            self.monitor.stop()

    # -- lm-eval's interface -----------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> Optional[str]:
        if not chat_template:
            return None
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``(log-likelihood in nats, is greedy)`` of each ``(context, continuation)``."""
        return self._call("loglikelihood", requests, self._loglik_task, disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each ``(string,)`` over the harness's disjoint rolling windows."""
        return self._call("loglikelihood_rolling", requests, self._rolling_task, disable_tqdm)

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """The continuation of each ``(context, gen_kwargs)``, cut before its stop sequence."""
        return self._call("generate_until", requests, self._generate_task, disable_tqdm)

    # -- one call: per task, measured, then written ------------------------------------------
    def _call(self, request_type: str, requests: list, run_task: Callable, disable_tqdm: bool) -> list:
        from tqdm.auto import tqdm

        assert request_type in REQUEST_TYPES
        results: list[Any] = [None] * len(requests)
        by_task: dict[str, list[tuple[int, Any]]] = {}
        for pos, req in enumerate(requests):
            by_task.setdefault(str(getattr(req, "task_name", None) or "unknown"), []).append((pos, req))
        bar = tqdm(total=len(requests), desc=f"{MODEL_NAME} {request_type}", disable=disable_tqdm)
        status = "failed"
        self.record.write("running", tables=False)
        try:
            for task, items in by_task.items():
                cell = self.record.new_cell(self.loaded.spec.raw, task, request_type, self.batch_size)
                rows: list[dict[str, Any]] = []
                batches = run_task(cell, items, results, rows, bar)
                tokens, power, info = self.meter.finish(rows, batches, cell.cell_id)
                for w in info["warnings"]:
                    log.warning("%s: %s", cell.cell_id, w)
                self.record.add_cell(cell, rows, tokens, power, info)
            status = "complete"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            bar.close()
            self.record.write(status)
        return results

    def _row(self, cell: HarnessCell, req: Any, copies: dict, **values: Any) -> dict[str, Any]:
        """A request row without its measurement (the meter adds it). ``copies`` counts the
        requests of the cell seen per (doc_id, idx), so repeated requests get distinct ids."""
        doc, idx = getattr(req, "doc_id", None), getattr(req, "idx", 0)
        k = copies[(doc, idx)] = copies.get((doc, idx), -1) + 1
        return {"cell_id": cell.cell_id, "request_id": f"{cell.cell_id}|{doc}|{idx}|{k}",
                "model": self.loaded.spec.raw, "weights": self.loaded.weights, "dtype": self.loaded.dtype,
                "task": cell.task, "sample_id": "" if doc is None else str(doc), "repeat": cell.repeat,
                "batch_size": self.batch_size,  # the configured size, as the sweep's rows have it
                "device": str(self.loaded.device), "gpu_name": self.gpu_name, "quality_metric": "",
                "quality_valid": False, **values}

    def _warmup(self, request_type: str, fn: Callable[[], Any]) -> None:
        """Run ``fn`` (the first batch) ``warmup`` times, unmeasured, once per request type."""
        if request_type in self._warm:
            return
        self._warm.add(request_type)
        for _ in range(self.warmup):
            fn()

    def _eos_ids(self) -> Any:
        """EOS id(s): the checkpoint's generation config (several for some instruct models), else
        the tokenizer's."""
        gc = getattr(self.model, "generation_config", None)
        eos = getattr(gc, "eos_token_id", None)
        return eos if eos is not None else self.tokenizer.eos_token_id

    def _pad_id(self) -> int:
        tok = self.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0))

    def _forward_batches(self, request_type: str, pieces: list[tuple[int, list[int], list[int]]],
                         bar: Any) -> tuple[list[Any], list[Batch]]:
        """Score ``(row, context ids, continuation ids)`` pieces, longest first, ``batch_size``
        per measured forward pass. Returns (LoglikResult per piece in the given order, batches)."""
        order = sorted(range(len(pieces)), key=lambda i: -(len(pieces[i][1]) + len(pieces[i][2])))
        out: list[Any] = [None] * len(pieces)
        batches: list[Batch] = []
        for b0 in range(0, len(order), self.batch_size):
            chunk = order[b0:b0 + self.batch_size]
            pairs = [(pieces[i][1], pieces[i][2]) for i in chunk]

            def score(pairs=pairs):
                return token_logliks(self.model, pairs, pad_token_id=self._pad_id(), max_length=self._max_length)

            self._warmup(request_type, score)
            res, batch = self.meter.forward(score, f"lm_eval.{request_type}")
            for i, r in zip(chunk, res):
                out[i] = r
                ctx, cont = pieces[i][1], pieces[i][2]
                batch.pieces.append((pieces[i][0], float(fed_tokens(len(ctx), len(cont), self._max_length))))
            batches.append(batch)
            if request_type == "loglikelihood":
                bar.update(len(chunk))
        return out, batches

    def _loglik_task(self, cell: HarnessCell, items: list, results: list, rows: list,
                     bar: Any) -> list[Batch]:
        copies: dict = {}
        pieces = []
        for pos, req in items:
            context, continuation = req.args
            ctx, cont = encode_pair(self.tokenizer, context, continuation)
            if not cont:
                raise ValueError(f"{cell.task} doc {req.doc_id}: continuation {continuation!r} has no tokens of "
                                 "its own after the context")
            rows.append(self._row(cell, req, copies, tokens_in=fed_tokens(len(ctx), len(cont), self._max_length),
                                  tokens_out=0, prompt=context, output_text=continuation))
            pieces.append((len(rows) - 1, ctx, cont))
        res, batches = self._forward_batches("loglikelihood", pieces, bar)
        for (pos, req), r in zip(items, res):
            results[pos] = (r.loglik, r.is_greedy)
            self.cache_hook.add_partial("loglikelihood", req.args, results[pos])
        return batches

    def _rolling_task(self, cell: HarnessCell, items: list, results: list, rows: list,
                      bar: Any) -> list[Batch]:
        copies: dict = {}
        tok = self.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        pieces, owner = [], []
        for pos, req in items:
            (string,) = req.args
            ids = list(tok(string)["input_ids"])
            windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=ids, prefix_token=prefix, max_seq_len=self._max_length, context_len=1)]
            rows.append(self._row(cell, req, copies, tokens_out=0, prompt=string, output_text="",
                                  tokens_in=sum(fed_tokens(len(c), len(t), self._max_length) for c, t in windows)))
            for c, t in windows:
                pieces.append((len(rows) - 1, list(c), list(t)))
                owner.append(pos)
        res, batches = self._forward_batches("loglikelihood_rolling", pieces, bar)
        sums: dict[int, float] = {pos: 0.0 for pos, _ in items}
        for pos, r in zip(owner, res):
            sums[pos] += r.loglik
        for pos, req in items:
            results[pos] = sums[pos]
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, sums[pos])
            bar.update(1)
        return batches

    def _generate_task(self, cell: HarnessCell, items: list, results: list, rows: list,
                       bar: Any) -> list[Batch]:
        import torch

        tok = self.tokenizer
        copies: dict = {}
        groups: dict[str, list[tuple[int, Any]]] = {}
        for pos, req in items:  # a batch shares its generation arguments, as in lm-eval's HF model
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append((pos, req))
        batches: list[Batch] = []
        eos_text = tok.decode([tok.eos_token_id], skip_special_tokens=False) if tok.eos_token_id is not None else None
        for group in groups.values():
            until, max_gen, kwargs = gen_settings(group[0][1].args[1], self.max_gen_toks, eos_text)
            max_ctx = self._max_length - max_gen
            if max_ctx < 1:
                raise ConfigError(f"{cell.task}: max_gen_toks={max_gen} leaves no room for a prompt in the "
                                  f"context of {self.loaded.spec.raw} ({self._max_length} tokens)")
            lens = {pos: len(tok(req.args[0])["input_ids"]) for pos, req in group}
            group.sort(key=lambda x: -lens[x[0]])  # longest first, as lm-eval's HF model
            for b0 in range(0, len(group), self.batch_size):
                chunk = group[b0:b0 + self.batch_size]
                enc = tok([req.args[0] for _, req in chunk], return_tensors="pt", padding=True)
                ids, mask = enc["input_ids"][:, -max_ctx:], enc["attention_mask"][:, -max_ctx:]
                prompt_len = int(ids.shape[1])
                call = dict(kwargs, input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                            max_new_tokens=max_gen, pad_token_id=self._pad_id())

                def crit(n=len(chunk)):
                    return stop_criteria(tok, until, prompt_len, n, self._eos_ids())

                def warm(call=call, crit=crit):
                    with torch.inference_mode():
                        self.model.generate(**call, stopping_criteria=crit())

                self._warmup("generate_until", warm)
                stop = crit()
                with torch.inference_mode():
                    out, batch = self.meter.generate(self.model, dict(call, stopping_criteria=stop))
                n_out = generated_lengths(stop, out, prompt_len)
                batch.set_tokens(n_out)
                gen = out[:, prompt_len:].detach().cpu()
                for j, (pos, req) in enumerate(chunk):
                    text = tok.decode(gen[j, :n_out[j]], skip_special_tokens=True)
                    results[pos] = _cut(text, until)
                    self.cache_hook.add_partial("generate_until", req.args, results[pos])
                    rows.append(self._row(cell, req, copies, tokens_in=int(mask[j].sum()),
                                          tokens_out=int(n_out[j]), prompt=req.args[0], output_text=text))
                    batch.pieces.append((len(rows) - 1, 1.0))
                batches.append(batch)
                bar.update(len(chunk))
        return batches


def _cut(text: str, until: Sequence[str]) -> str:
    """The text before the first occurrence of each stop sequence (the harness's post-processing)."""
    for s in until:
        if s:
            text = text.split(s)[0]
    return text


__all__ = ["LlmDvfsLM", "MODEL_NAME"]
