"""What both serving engines share: the request given to ``submit``, the handle it returns, and
two small drivers (all at once / staggered, and closed loop) for tests and simple runs.

Engines (:class:`llm_dvfs.workload.continuous.ContinuousEngine`,
:class:`llm_dvfs.workload.endpoint.EndpointClient`) expose ``submit(request) -> RequestHandle``,
safe to call from any thread; a load generator calls it at each arrival and waits on the
handles. The record of a finished request is a :class:`llm_dvfs.meter.concurrency.ServedRequest`
(times in host monotonic seconds, the power monitor's timeline).

Importing this module loads neither torch nor transformers.
"""
from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np

from llm_dvfs.errors import ConfigError, LlmDvfsError
from llm_dvfs.meter.concurrency import ServedRequest
from llm_dvfs.meter.measurement import now_ns

__all__ = ["ServeRequest", "RequestHandle", "TokenEvent", "EngineError", "as_request",
           "failed_request", "now_s", "submit_all", "run_closed_loop"]


def now_s() -> float:
    """Host monotonic time, s: the timeline of power samples, marks and every served record."""
    return now_ns() * 1e-9


class EngineError(LlmDvfsError):
    """A serving engine could not start or stopped working (the message says why)."""


_ids = itertools.count()


@dataclass
class ServeRequest:
    """One request for an engine.

    Attributes:
        prompt: the prompt text (completions) — or None when ``input_ids``/``messages`` is given.
        input_ids: prompt token ids (local engines only; an endpoint needs text).
        messages: chat messages (``[{"role": "user", "content": ...}]``) for chat endpoints; a
            local engine applies the tokenizer's chat template.
        request_id: unique id; None = ``req-N`` from a process-wide counter.
        max_new_tokens: upper bound of generated tokens; None = the engine's default.
        metadata: copied into ``ServedRequest.extra["metadata"]`` (sample id, task, ...).
    """

    prompt: Optional[str] = None
    input_ids: Optional[Sequence[int]] = None
    messages: Optional[list[dict[str, Any]]] = None
    request_id: Optional[str] = None
    max_new_tokens: Optional[int] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.prompt is None and self.input_ids is None and self.messages is None:
            raise ConfigError("a ServeRequest needs a prompt, input_ids or messages")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int)
                                                or self.max_new_tokens < 1):
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.request_id is None:
            self.request_id = f"req-{next(_ids)}"


def as_request(request: Union[ServeRequest, str, Sequence[int]]) -> ServeRequest:
    """A :class:`ServeRequest` from itself, a prompt string or a sequence of token ids."""
    if isinstance(request, ServeRequest):
        return request
    if isinstance(request, str):
        return ServeRequest(prompt=request)
    if isinstance(request, Sequence) and all(isinstance(i, int) for i in request):
        return ServeRequest(input_ids=list(request))
    raise ConfigError(f"cannot make a request from {type(request).__name__}; pass a ServeRequest, "
                      "a prompt string or a list of token ids")


def failed_request(request: ServeRequest, t_arrival_s: float, error: str, *,
                   token_times_s: Sequence[float] = (), n_prompt_tokens: int = 0,
                   stop_reason: str = "error", **extra: Any) -> ServedRequest:
    """The record of a request that did not finish: ``stop_reason`` (``error`` by default),
    ``extra["error"]`` = the message, and whatever tokens arrived before it failed."""
    tt = np.asarray(token_times_s, dtype=np.float64)
    return ServedRequest(
        request_id=str(request.request_id), t_arrival_s=t_arrival_s, t_admit_s=None,
        t_first_token_s=float(tt[0]) if tt.size else None, token_times_s=tt, t_end_s=now_s(),
        n_prompt_tokens=int(n_prompt_tokens), n_output_tokens=int(tt.size), stop_reason=stop_reason,
        extra={"error": error, "metadata": dict(request.metadata), **extra})


@dataclass(frozen=True)
class TokenEvent:
    """One streamed token (or chunk): its index in the output, host monotonic time (s), the
    token id where the engine knows it, and the text piece where it has one."""

    index: int
    t_s: float
    token_id: Optional[int] = None
    text: Optional[str] = None


class RequestHandle:
    """A submitted request: wait for its :class:`ServedRequest`, or iterate its tokens as they
    arrive. Thread-safe; engines call :meth:`push_token` and :meth:`resolve`.

    Attributes:
        request: the :class:`ServeRequest`.
        request_id: its id.
        t_submit_s: when ``submit`` was called, host monotonic s (the request's arrival).
    """

    def __init__(self, request: ServeRequest, t_submit_s: float,
                 cancel: Optional[Callable[[], None]] = None) -> None:
        self.request = request
        self.request_id = str(request.request_id)
        self.t_submit_s = float(t_submit_s)
        self._cond = threading.Condition()
        self._events: list[TokenEvent] = []
        self._result: Optional[ServedRequest] = None
        self._callbacks: list[Callable[[ServedRequest], None]] = []
        self._cancel = cancel
        self.cancelled = False

    # -- engine side -----------------------------------------------------------------------
    def push_token(self, event: TokenEvent) -> None:
        """Record a streamed token (engines only; ignored once resolved)."""
        with self._cond:
            if self._result is None:
                self._events.append(event)
                self._cond.notify_all()

    def resolve(self, result: ServedRequest) -> bool:
        """Set the final record (engines only). Returns False when it was already set."""
        with self._cond:
            if self._result is not None:
                return False
            self._result = result
            callbacks = list(self._callbacks)
            self._cond.notify_all()
        for cb in callbacks:
            cb(result)
        return True

    # -- caller side -----------------------------------------------------------------------
    def done(self) -> bool:
        """True once the request finished, failed or was cancelled."""
        return self._result is not None

    def result(self, timeout: Optional[float] = None) -> ServedRequest:
        """The request's record, waiting up to ``timeout`` s (None: forever).

        A failed request is a record too (``stop_reason == "error"``, ``extra["error"]``).

        Raises:
            TimeoutError: not finished within ``timeout``.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._result is not None, timeout):
                raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
            return self._result  # type: ignore[return-value]

    def events(self) -> list[TokenEvent]:
        """The tokens streamed so far (a copy)."""
        with self._cond:
            return list(self._events)

    def add_done_callback(self, fn: Callable[[ServedRequest], None]) -> None:
        """Call ``fn(record)`` when the request is done (at once when it already is), on the
        engine's thread: keep it short."""
        with self._cond:
            if self._result is None:
                self._callbacks.append(fn)
                return
            res = self._result
        fn(res)

    def stream(self, timeout: Optional[float] = None) -> Iterator[TokenEvent]:
        """Yield :class:`TokenEvent` s as they arrive, until the request is done (engines that
        do not stream deliver them all at the end).

        Raises:
            TimeoutError: no token and no end within ``timeout`` s of the previous one.
        """
        i = 0
        while True:
            with self._cond:
                ok = self._cond.wait_for(lambda: len(self._events) > i or self._result is not None,
                                         timeout)
                if not ok:
                    raise TimeoutError(f"request {self.request_id}: nothing streamed for {timeout} s")
                new = self._events[i:]
                finished = self._result is not None
            for ev in new:
                yield ev
            i += len(new)
            if finished and not new:
                return

    def set_cancel(self, fn: Optional[Callable[[], None]]) -> None:
        """How :meth:`cancel` reaches the engine (engines only)."""
        self._cancel = fn

    def cancel(self) -> bool:
        """Ask the engine to stop generating; the record then has ``stop_reason="cancelled"``.
        Returns False when the request is already done."""
        if self.done():
            return False
        self.cancelled = True
        if self._cancel is not None:
            self._cancel()
        return True


Submit = Callable[[Any], RequestHandle]


def submit_all(submit: Submit, requests: Sequence[Any], *, stagger_s: float = 0.0,
               timeout_s: Optional[float] = None) -> list[ServedRequest]:
    """Submit every request from this thread, ``stagger_s`` apart (0 = all at once), then wait
    for all. Returns the records in request order (failed ones included).

    Raises:
        TimeoutError: a request did not finish within ``timeout_s`` of the last submission.
    """
    handles = []
    t0 = time.monotonic()
    for k, r in enumerate(requests):
        if stagger_s > 0:
            delay = t0 + k * stagger_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        handles.append(submit(r))
    return [h.result(timeout_s) for h in handles]


def run_closed_loop(submit: Submit, requests: Sequence[Any], concurrency: int, *,
                    timeout_s: Optional[float] = None) -> list[ServedRequest]:
    """``concurrency`` users, each submitting its next request as soon as its previous one is
    done (a closed loop), until every request was served. Returns records in request order.

    Raises:
        ConfigError: concurrency < 1. TimeoutError: a request took longer than ``timeout_s``.
    """
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    results: list[Optional[ServedRequest]] = [None] * len(requests)
    nxt = itertools.count()
    errors: list[BaseException] = []
    lock = threading.Lock()

    def user() -> None:
        while not errors:
            with lock:
                k = next(nxt)
            if k >= len(requests):
                return
            try:
                results[k] = submit(requests[k]).result(timeout_s)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(e)
                return

    threads = [threading.Thread(target=user, name=f"llm_dvfs-user-{i}", daemon=True)
               for i in range(min(concurrency, max(len(requests), 1)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None]
