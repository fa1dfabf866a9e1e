"""Stream-ordered marks on the host monotonic timeline, and :class:`TokenTimer` for ``generate``.

All times are on the host ``CLOCK_MONOTONIC`` timeline in seconds: the timeline of
``llm_dvfs._core.monotonic_ns()`` and of the power trace's ``t_s`` column, so marks and power
samples can be compared directly.

Modes of :class:`Timeline`:

``event`` (GPU default)
    ``mark()`` records a pooled CUDA event on the stream: asynchronous, no synchronisation per
    mark. ``resolve()`` waits for the marks, then maps each event to host time through
    calibration points (an event on an idle private stream, its completion bracketed by host
    clock reads while spinning on ``cuEventQuery``), with a fitted GPU/host clock drift. Each
    resolved mark carries an alignment uncertainty bound.
``callback``
    ``mark()`` enqueues a host function (``cuLaunchHostFunc``) that writes the host clock when
    the stream reaches it. Its latency is unknown (no uncertainty is reported) and it blocks the
    stream while it runs; it exists so both methods can be measured on a real GPU
    (``bench/attribution_accuracy.py``).
``host``
    ``mark()`` reads the host clock. Used for CPU inference and when no CUDA driver exists.

Importing this module loads neither torch, transformers nor the CUDA driver.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from llm_dvfs.errors import ConfigError, LlmDvfsError

try:  # the native core; absent in a source checkout that was not built
    from llm_dvfs import _core  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - exercised only without the extension
    _core = None

__all__ = [
    "CudaError",
    "Marks",
    "Timeline",
    "TokenTiming",
    "TokenTimer",
    "tokens_per_sequence",
    "LABEL_START",
    "LABEL_STEP",
    "LABEL_END",
]

# Mark labels used by TokenTimer (any int32 is allowed in a Timeline).
LABEL_START = 1  # request start, just before generate()
LABEL_STEP = 2   # one generation step (prefill for the first) has produced its logits
LABEL_END = 3    # generate() returned

MODES = ("auto", "event", "callback", "host")


from llm_dvfs.errors import CudaError  # noqa: E402  (re-exported: the C++ translator and users import it here)


def host_monotonic_ns() -> int:
    """Host ``CLOCK_MONOTONIC`` in ns (the native clock when built, else Python's: the same clock)."""
    return int(_core.monotonic_ns()) if _core is not None else time.monotonic_ns()


@dataclass(frozen=True)
class Marks:
    """Resolved marks, in the order they were taken.

    Attributes:
        t_s: mark times, host monotonic s (when the stream reached the mark).
        label: the label given to each mark.
        uncertainty_s: alignment uncertainty bound per mark, s; NaN = unknown (callback mode).
        host_call_s: when ``mark()`` was called on the host, s (``t_s - host_call_s`` is how far
            the host ran ahead of the GPU).
        mode: ``event`` | ``callback`` | ``host``.
        drift_ppm: fitted GPU clock rate relative to the host clock, ppm (event mode).
        drift_fitted: False when the calibration span was too short to fit the drift.
    """

    t_s: np.ndarray
    label: np.ndarray
    uncertainty_s: np.ndarray
    host_call_s: np.ndarray
    mode: str
    drift_ppm: float = 0.0
    drift_fitted: bool = False

    @property
    def max_uncertainty_s(self) -> float:
        """Largest per-mark uncertainty, s (NaN if unknown, 0 with no marks)."""
        if len(self.uncertainty_s) == 0:
            return 0.0
        return float(np.max(self.uncertainty_s))

    def __len__(self) -> int:
        return len(self.t_s)


def _torch():
    import torch  # deferred: importing llm_dvfs must stay cheap

    return torch


def _device_key(device: Any) -> str:
    """'cuda:N' (N defaulting to torch's current device) or 'cpu', for comparing devices."""
    if not _is_cuda_device(device):
        return "cpu"
    torch = _torch()
    d = torch.device(device)
    return f"cuda:{d.index if d.index is not None else torch.cuda.current_device()}"


def _is_cuda_device(device: Any) -> bool:
    if device is None:
        return False
    return str(getattr(device, "type", device)).startswith("cuda")


class Timeline:
    """Marks on one device's stream(s), resolved to host monotonic time.

    Args:
        mode: ``auto`` (``event`` for a CUDA device, else ``host``), ``event``, ``callback`` or
            ``host``.
        device: the torch device whose stream is marked (``cuda:N``, ``cpu`` or None = cpu).
        stream: default stream handle for ``mark()`` (an int ``cudaStream_t``); None = torch's
            current stream of ``device`` at construction (refresh with :meth:`use_current_stream`).
        reserve: events/slots created up front so that ``mark()`` does not allocate.
        auto_calibrate_s: event mode; recalibrate when marks are further apart than this.

    Raises:
        ConfigError: unknown mode, or ``event``/``callback`` without the native core.
        LibraryNotFound: no CUDA driver library (``LLM_DVFS_CUDA_LIBRARY`` overrides the path).
        CudaError: a driver call failed (e.g. no CUDA context: initialise torch.cuda first).
    """

    def __init__(
        self,
        mode: str = "auto",
        *,
        device: Any = None,
        stream: Optional[int] = None,
        reserve: int = 1024,
        auto_calibrate_s: float = 5.0,
    ) -> None:
        if mode not in MODES:
            raise ConfigError(f"timeline mode must be one of {MODES}, not {mode!r}")
        if mode == "auto":
            mode = "event" if _is_cuda_device(device) else "host"
        self.device = device
        self._mode = mode
        self.stream = 0 if stream is None else int(stream)
        self._py_marks: list[tuple[int, int]] = []  # host mode without the native core
        if mode == "host":
            self._native = _core.Timeline("host", reserve, auto_calibrate_s) if _core is not None else None
        else:
            if _core is None:
                raise ConfigError(f"timeline mode {mode!r} needs the native core (llm_dvfs._core); "
                                  "build the package or use mode='host'")
            if _is_cuda_device(device):
                torch = _torch()
                dev = torch.device(device)
                # Make the device's primary context current on this thread before the native
                # side captures it (torch creates contexts lazily).
                with torch.cuda.device(dev):
                    torch.cuda.synchronize(dev)
                    self._native = _core.Timeline(mode, reserve, auto_calibrate_s)
                    if stream is None:
                        self.stream = int(torch.cuda.current_stream(dev).cuda_stream)
            else:
                self._native = _core.Timeline(mode, reserve, auto_calibrate_s)
        self._mark = self._native.mark if self._native is not None else None

    @property
    def mode(self) -> str:
        return self._mode

    def use_current_stream(self) -> int:
        """Set the default stream to torch's current stream of ``device``; returns the handle."""
        if _is_cuda_device(self.device):
            torch = _torch()
            self.stream = int(torch.cuda.current_stream(torch.device(self.device)).cuda_stream)
        return self.stream

    def mark(self, label: int = 0, stream: Optional[int] = None) -> int:
        """Take a mark (non-blocking); returns its index. ``stream`` defaults to :attr:`stream`."""
        if self._mark is not None:
            return self._mark(self.stream if stream is None else stream, label)
        self._py_marks.append((time.monotonic_ns(), int(label)))
        return len(self._py_marks) - 1

    def calibrate(self) -> dict:
        """Event mode: take a calibration point now; returns host_ns, half_width_ns, gpu_ns."""
        if self._native is None:
            now = time.monotonic_ns()
            return {"host_ns": now, "half_width_ns": 0, "gpu_ns": float(now)}
        return self._native.calibrate()

    def resolve(self, timeout_s: float = 10.0) -> Marks:
        """Wait for all marks (up to ``timeout_s``; < 0 = forever) and map them to host time.

        Raises:
            TimeoutError: marks still pending after ``timeout_s``.
            CudaError: a driver call failed.
        """
        if self._native is None:
            t = np.array([m[0] for m in self._py_marks], dtype=np.int64)
            lab = np.array([m[1] for m in self._py_marks], dtype=np.int32)
            return Marks(t * 1e-9, lab, np.zeros(len(t)), t * 1e-9, "host")
        r = self._native.resolve(timeout_s)
        unc = r["uncertainty_ns"].astype(np.float64)
        unc[unc < 0] = np.nan
        return Marks(
            t_s=r["t_ns"].astype(np.float64) * 1e-9,
            label=r["label"],
            uncertainty_s=unc * 1e-9,
            host_call_s=r["host_call_ns"].astype(np.float64) * 1e-9,
            mode=self._mode,
            drift_ppm=float(r["drift_ppm"]),
            drift_fitted=bool(r["drift_fitted"]),
        )

    def clear(self) -> None:
        """Forget all marks (calibration history is kept)."""
        if self._native is not None:
            self._native.clear()
        self._py_marks.clear()

    def stats(self) -> dict:
        """Counters of the native timeline (marks, calibrations, events_created, ...)."""
        return dict(self._native.stats()) if self._native is not None else {"marks": len(self._py_marks)}

    def __len__(self) -> int:
        return len(self._native) if self._native is not None else len(self._py_marks)


# ---------------------------------------------------------------------------------------------
# Token timing for Hugging Face generate


@dataclass(frozen=True)
class TokenTiming:
    """Timing of one ``generate`` call (one request, or one batch of requests).

    Attributes:
        t_start_s: request start (mark before ``generate``), host monotonic s.
        step_end_s: one mark per generation step as taken by the hook (step 0 = prefill); may
            hold more entries than :attr:`steps` when generate undid speculative steps.
        t_end_s: mark after ``generate`` returned.
        steps: generated length kept in the output (max over the batch).
        tokens_per_sequence: generated tokens of each sequence, up to and including its first
            EOS (pad after it is not counted), shape (batch,).
        uncertainty_s: largest mark alignment uncertainty, s (NaN = unknown).
        mode: timeline mode; hook: ``logits_processor`` | ``stopping_criteria``.
    """

    t_start_s: float
    step_end_s: np.ndarray
    t_end_s: float
    steps: int
    tokens_per_sequence: np.ndarray
    uncertainty_s: float = 0.0
    mode: str = "host"
    hook: str = "logits_processor"

    @property
    def batch_size(self) -> int:
        return int(len(self.tokens_per_sequence))

    @property
    def bounds_s(self) -> np.ndarray:
        """Step boundaries, shape (steps + 1,): start, end of steps 0..steps-2, end.

        Step k (token k of every sequence still generating) spans ``bounds_s[k]`` to
        ``bounds_s[k + 1]``. The last step runs to the end mark, so the intervals tile
        ``[t_start_s, t_end_s]`` exactly (what follows the last logits - sampling, stop checks,
        returning - belongs to the last token). With no generated token: ``[start, end]``.
        """
        inner = self.step_end_s[: max(self.steps - 1, 0)]
        return np.concatenate(([self.t_start_s], inner, [self.t_end_s])).astype(np.float64)

    @property
    def ttft_s(self) -> float:
        """Time to first token: start to the end of the prefill step, s (NaN with no steps)."""
        return float(self.step_end_s[0] - self.t_start_s) if len(self.step_end_s) else float("nan")

    @property
    def latency_s(self) -> float:
        return float(self.t_end_s - self.t_start_s)


def _eos_list(eos: Any) -> list[int]:
    if eos is None:
        return []
    if hasattr(eos, "tolist"):
        eos = eos.tolist()
    if isinstance(eos, (list, tuple)):
        return [int(e) for e in eos]
    return [int(eos)]


def tokens_per_sequence(
    sequences: Any,
    prompt_len: int,
    eos_token_id: Any = None,
) -> np.ndarray:
    """Generated tokens of each sequence: up to and including its first EOS, else all.

    Args:
        sequences: ``generate`` output ids, shape (batch, prompt_len + steps) (tensor or array).
        prompt_len: input length (padded; the same for the whole batch).
        eos_token_id: int, list of ints or None (no EOS: every sequence has ``steps`` tokens).
    Returns:
        int64 array, shape (batch,).
    """
    seq = sequences.detach().cpu().numpy() if hasattr(sequences, "detach") else np.asarray(sequences)
    gen = seq[:, prompt_len:]
    steps = gen.shape[1]
    eos = _eos_list(eos_token_id)
    if not eos or steps == 0:
        return np.full(seq.shape[0], steps, dtype=np.int64)
    is_eos = np.isin(gen, eos)
    has = is_eos.any(axis=1)
    first = is_eos.argmax(axis=1)
    return np.where(has, first + 1, steps).astype(np.int64)


def _make_hooks():
    """The transformers hook classes, built on first use (keeps transformers out of import)."""
    from transformers import LogitsProcessor, StoppingCriteria

    class MarkLogitsProcessor(LogitsProcessor):
        """Marks the end of each step's forward pass; returns the scores untouched (no GPU work)."""

        def __init__(self, timer: "TokenTimer") -> None:
            self.timer = timer

            # LogitsProcessorList runs inspect.signature(processor.__call__) on every step
            # (~20 µs, 6x the mark itself). An instance attribute shadows the bound method for
            # that lookup only (calls still go through type(self).__call__), and a function
            # with a precomputed __signature__ makes the inspection nearly free.
            def _signature(input_ids, scores):  # pragma: no cover - never called
                return scores

            _signature.__signature__ = inspect.signature(_signature)
            self.__call__ = _signature

        def __call__(self, input_ids, scores):
            self.timer._step()
            return scores

    class MarkStoppingCriteria(StoppingCriteria):
        """Marks the end of each step after sampling; never stops generation."""

        def __init__(self, timer: "TokenTimer") -> None:
            self.timer = timer
            self._false = None

        def __call__(self, input_ids, scores, **kwargs):
            self.timer._step()
            f = self._false
            if f is None or f.shape[0] != input_ids.shape[0] or f.device != input_ids.device:
                torch = _torch()
                f = self._false = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            return f

    return MarkLogitsProcessor, MarkStoppingCriteria


_HOOKS: Optional[tuple] = None

HOOKS = ("logits_processor", "stopping_criteria")


class TokenTimer:
    """Per-step marks for Hugging Face ``generate``: request start, end of prefill (first
    token), every decode step, and the end.

    The default hook is a ``LogitsProcessor``: called once per step right after the forward
    pass, it adds no GPU work (a ``StoppingCriteria`` hook must return a device tensor and adds
    one small kernel per step; pick it with ``hook="stopping_criteria"``). With batch size > 1
    there is one mark per step for the whole batch; per-sequence token counts come from the
    output ids (first EOS).

    Usage::

        timer = TokenTimer()                        # device/mode picked from the model
        out = timer.generate(model, input_ids=ids, max_new_tokens=64)
        timing = timer.timing                       # TokenTiming: bounds_s, tokens_per_sequence

    or by hand::

        timer.begin(device=model.device)
        out = model.generate(ids, logits_processor=timer.logits_processor, max_new_tokens=64)
        timing = timer.end(out, prompt_len=ids.shape[1], eos_token_id=model.generation_config.eos_token_id)

    Args:
        device: torch device of the logits (None: taken from the model in :meth:`generate`, or
            from ``begin(device=...)``).
        mode: timeline mode (see :class:`Timeline`); ``auto`` = event marks on CUDA devices.
        hook: ``logits_processor`` (default) or ``stopping_criteria``.
        timeline: use this Timeline instead of creating one.
    """

    def __init__(
        self,
        device: Any = None,
        *,
        mode: str = "auto",
        hook: str = "logits_processor",
        timeline: Optional[Timeline] = None,
    ) -> None:
        if hook not in HOOKS:
            raise ConfigError(f"TokenTimer hook must be one of {HOOKS}, not {hook!r}")
        if mode not in MODES:
            raise ConfigError(f"timeline mode must be one of {MODES}, not {mode!r}")
        self.device = device
        self.mode = mode
        self.hook = hook
        self.timeline = timeline
        self._own_timeline = timeline is None
        self.timing: Optional[TokenTiming] = None
        self._step = self._no_request
        self._hook_obj = None
        self._active = False

    # -- hooks -------------------------------------------------------------------------------
    def _no_request(self) -> None:
        raise LlmDvfsError("TokenTimer hook called outside begin()/end(); call timer.begin() "
                           "before generate (or use timer.generate)")

    def _hook(self):
        global _HOOKS
        if self._hook_obj is None:
            if _HOOKS is None:
                _HOOKS = _make_hooks()
            cls = _HOOKS[0] if self.hook == "logits_processor" else _HOOKS[1]
            self._hook_obj = cls(self)
        return self._hook_obj

    @property
    def logits_processor(self):
        """A ``LogitsProcessorList`` holding the mark hook (hook="logits_processor")."""
        from transformers import LogitsProcessorList

        if self.hook != "logits_processor":
            raise ConfigError("this TokenTimer uses hook='stopping_criteria'; pass timer.stopping_criteria")
        return LogitsProcessorList([self._hook()])

    @property
    def stopping_criteria(self):
        """A ``StoppingCriteriaList`` holding the mark hook (hook="stopping_criteria")."""
        from transformers import StoppingCriteriaList

        if self.hook != "stopping_criteria":
            raise ConfigError("this TokenTimer uses hook='logits_processor'; pass timer.logits_processor")
        return StoppingCriteriaList([self._hook()])

    def generate_kwargs(self, **kwargs: Any) -> dict:
        """``kwargs`` for ``model.generate`` with the hook appended to any given list."""
        key = self.hook
        given = kwargs.get(key)
        ours = self.logits_processor if key == "logits_processor" else self.stopping_criteria
        if given is not None:
            merged = type(ours)(list(given))
            merged.extend(ours)
            ours = merged
        out = dict(kwargs)
        out[key] = ours
        return out

    # -- request lifecycle ---------------------------------------------------------------------
    def _ensure_timeline(self, device: Any) -> Timeline:
        if device is not None:
            self.device = device
        tl = self.timeline
        if tl is None or (self._own_timeline and device is not None and _device_key(tl.device) != _device_key(device)):
            tl = self.timeline = Timeline(self.mode, device=self.device)
        return tl

    def begin(self, device: Any = None, stream: Optional[int] = None) -> None:
        """Start a request: clears the timeline and marks the start on the current stream."""
        tl = self._ensure_timeline(device)
        tl.clear()
        if stream is not None:
            tl.stream = int(stream)
        else:
            tl.use_current_stream()
        mark, s = tl.mark, tl.stream
        if tl._mark is not None:  # fast path: straight into the native call
            native_mark = tl._mark
            self._step = lambda: native_mark(s, LABEL_STEP)
        else:
            self._step = lambda: mark(LABEL_STEP)
        self.timing = None
        self._active = True
        tl.mark(LABEL_START)

    def end(
        self,
        outputs: Any = None,
        *,
        prompt_len: Optional[int] = None,
        eos_token_id: Any = None,
        timeout_s: float = 30.0,
    ) -> TokenTiming:
        """Mark the end, resolve the marks and count each sequence's tokens.

        Args:
            outputs: what ``generate`` returned (ids tensor or an output with ``.sequences``);
                None = count tokens as the number of steps for a single sequence.
            prompt_len: input length (``input_ids.shape[1]``); required with ``outputs``.
            eos_token_id: int or list (the model's ``generation_config.eos_token_id``).
        Raises:
            LlmDvfsError: ``begin`` was not called, or the hook never ran (not passed to generate).
            TimeoutError: marks did not complete within ``timeout_s``.
        """
        if not self._active or self.timeline is None:
            raise LlmDvfsError("TokenTimer.end() without begin()")
        tl = self.timeline
        tl.mark(LABEL_END)
        self._active = False
        self._step = self._no_request
        marks = tl.resolve(timeout_s)
        lab = marks.label
        starts = np.flatnonzero(lab == LABEL_START)
        ends = np.flatnonzero(lab == LABEL_END)
        step_t = marks.t_s[lab == LABEL_STEP]
        if outputs is not None:
            seq = getattr(outputs, "sequences", outputs)
            if prompt_len is None:
                raise ConfigError("TokenTimer.end(outputs) needs prompt_len (input_ids.shape[1])")
            steps = int(seq.shape[1]) - int(prompt_len)
            counts = tokens_per_sequence(seq, int(prompt_len), eos_token_id)
        else:
            steps = len(step_t)
            counts = np.array([steps], dtype=np.int64)
        if steps > len(step_t):
            raise LlmDvfsError(
                f"generate produced {steps} tokens but the TokenTimer hook marked {len(step_t)} "
                f"steps: pass timer.{self.hook} to generate (or use timer.generate)")
        self.timing = TokenTiming(
            t_start_s=float(marks.t_s[starts[0]]),
            step_end_s=step_t,
            t_end_s=float(marks.t_s[ends[-1]]),
            steps=steps,
            tokens_per_sequence=counts,
            uncertainty_s=marks.max_uncertainty_s,
            mode=marks.mode,
            hook=self.hook,
        )
        return self.timing

    def generate(self, model: Any, *args: Any, **kwargs: Any) -> Any:
        """``model.generate(*args, **kwargs)`` timed; the result is in :attr:`timing`.

        The device comes from ``input_ids`` (or the model); EOS ids from the model's
        generation config unless ``eos_token_id`` is passed.
        """
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        device = getattr(ids, "device", None) or getattr(model, "device", None)
        eos = kwargs.get("eos_token_id")
        if eos is None:
            gc = kwargs.get("generation_config") or getattr(model, "generation_config", None)
            eos = getattr(gc, "eos_token_id", None)
        prompt_len = int(ids.shape[1]) if ids is not None else None
        self.begin(device=device)
        try:
            out = model.generate(*args, **self.generate_kwargs(**kwargs))
        except BaseException:
            self._active = False
            self._step = self._no_request
            raise
        self.end(out if prompt_len is not None else None, prompt_len=prompt_len, eos_token_id=eos)
        return out
