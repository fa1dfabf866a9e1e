"""Client for any OpenAI-compatible server (vLLM, SGLang, TGI, ``transformers serve``, ...):
``/v1/completions`` and ``/v1/chat/completions`` with ``stream: true``, every streamed chunk
stamped on the power monitor's host monotonic timeline as it arrives.

Stdlib only (``http.client``). One connection per request, so ``submit``/``complete`` may be
called from any number of threads. What a :class:`~llm_dvfs.meter.concurrency.ServedRequest`
from here holds:

* ``t_arrival_s``: just before the request is sent; ``t_admit_s``: None (a server does not say
  when its scheduler admitted a request; ``extra["t_headers_s"]`` is when the response headers
  came, which most servers send before the first token, not at admission);
* ``token_times_s``: one entry per streamed chunk that carried output text — one token per chunk
  on the servers above at low load, but a server may pack several tokens into one chunk;
  ``t_first_token_s`` is the first such chunk; ``t_end_s`` is ``[DONE]`` or the end of the stream;
* ``n_output_tokens`` / ``n_prompt_tokens``: from the ``usage`` field when the server sends it
  (requested with ``stream_options: {"include_usage": true}``), else the number of chunks and the
  given tokenizer's count (``extra["token_count_source"]`` says which; 0 prompt tokens when
  unknown);
* ``stop_reason``: the server's ``finish_reason`` (``stop``, ``length``, ...), or ``error`` with
  ``extra["error"]`` and the tokens that arrived before the failure.

Failures are records, not exceptions: an unreachable server, an HTTP error (status and body), a
malformed stream line, a connection lost mid-stream or a stream that ends without
``finish_reason`` or ``[DONE]`` each give a failed record; finished requests are unaffected.
Only a malformed URL (``ConfigError``, at construction) and :meth:`EndpointClient.check` on an
unreachable server (``EndpointError``) raise. A stream that ends after a ``finish_reason`` chunk
but without ``data: [DONE]`` is complete (``transformers serve`` 5.24 sends no ``[DONE]``;
``extra["done_marker"]`` records it).
"""
from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from llm_dvfs.errors import ConfigError
from llm_dvfs.meter.concurrency import ServedRequest
from llm_dvfs.workload.serving import (EngineError, RequestHandle, ServeRequest, TokenEvent,
                                       as_request, failed_request, now_s)

__all__ = ["EndpointClient", "EndpointError", "APIS", "parse_endpoint_url"]

APIS = ("completions", "chat")
ENGINE_NAME = "openai-endpoint"
_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
_BODY_LIMIT = 2000  # characters of an error body kept in a message


class EndpointError(EngineError):
    """The endpoint cannot be used at all (unreachable, no model); per-request failures are
    recorded in the request's record instead."""


def parse_endpoint_url(url: str) -> tuple[str, str, int, str, Optional[str]]:
    """``(scheme, host, port, base_path, api)`` of an endpoint URL.

    ``http://host:8000``, ``http://host:8000/v1`` and the full
    ``http://host:8000/v1/chat/completions`` are all accepted; ``api`` is ``chat`` /
    ``completions`` when the URL names the route, else None. A path before ``/v1`` (a proxy
    prefix) is kept.

    Raises:
        ConfigError: not http(s), no host, a bad port.
    """
    u = urllib.parse.urlsplit(str(url).strip())
    if u.scheme not in ("http", "https"):
        raise ConfigError(f"endpoint URL {url!r} must start with http:// or https:// "
                          "(e.g. http://127.0.0.1:8000/v1)")
    try:
        port = u.port
    except ValueError:
        raise ConfigError(f"endpoint URL {url!r} has an invalid port") from None
    if not u.hostname:
        raise ConfigError(f"endpoint URL {url!r} has no host (e.g. http://127.0.0.1:8000/v1)")
    path = u.path.rstrip("/")
    api = None
    for name, route in _PATHS.items():
        if path.endswith(route):
            api, path = name, path[: -len(route)]
    if path.endswith("/v1"):
        path = path[:-3]
    return u.scheme, u.hostname, port or (443 if u.scheme == "https" else 80), path, api


def _describe_conn_error(e: BaseException, where: str) -> str:
    if isinstance(e, ConnectionRefusedError):
        return f"cannot connect to {where} ({e}): is the server running and listening there?"
    if isinstance(e, socket.gaierror):
        return f"cannot resolve the host of {where} ({e})"
    if isinstance(e, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)):
        return (f"{where}: the server closed the connection before answering "
                f"({type(e).__name__}: {e}): did it die?")
    if isinstance(e, (socket.timeout, TimeoutError)):
        return f"{where} did not answer in time ({type(e).__name__}: {e})"
    return f"{where}: {type(e).__name__}: {e}"


class _StreamFailure(Exception):
    """A failure while reading one stream (the message is the record's error)."""


class EndpointClient:
    """Streams requests to an OpenAI-compatible server and records each one.

    Args:
        url: the server, e.g. ``http://127.0.0.1:8000/v1`` (see :func:`parse_endpoint_url`).
        api: ``completions`` or ``chat``; None = from the URL, else ``completions``.
        model: the ``model`` field sent; None = the first id ``/v1/models`` lists (in :meth:`check`).
        max_new_tokens: ``max_tokens`` when a request gives none.
        temperature: sent as is (0 = greedy on the servers above).
        timeout_s: socket timeout: connecting, and the longest silence within a stream.
        api_key: sent as ``Authorization: Bearer ...``.
        headers: more request headers.
        extra_body: more JSON fields for every request (``top_p``, ``ignore_eos``, ...).
        include_usage: ask for the ``usage`` chunk (``stream_options``).
        tokenizer: counts prompt tokens when the server sends no ``usage``.

    Raises:
        ConfigError: malformed URL or unknown ``api``.
    """

    name = ENGINE_NAME

    def __init__(self, url: str, *, api: Optional[str] = None, model: Optional[str] = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, timeout_s: float = 60.0,
                 api_key: Optional[str] = None, headers: Optional[Mapping[str, str]] = None,
                 extra_body: Optional[Mapping[str, Any]] = None, include_usage: bool = True,
                 tokenizer: Any = None) -> None:
        self.scheme, self.host, self.port, self.base_path, url_api = parse_endpoint_url(url)
        self.api = api or url_api or "completions"
        if self.api not in APIS:
            raise ConfigError(f"api must be one of {', '.join(APIS)}, got {self.api!r}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        self.url = f"{self.scheme}://{self.host}:{self.port}{self.base_path}"
        self.model = model
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.timeout_s = float(timeout_s)
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                        **(dict(headers) if headers else {})}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.extra_body = dict(extra_body or {})
        self.include_usage = include_usage
        self.tokenizer = tokenizer
        self._info: Optional[dict[str, Any]] = None

    # -- plumbing ----------------------------------------------------------------------------
    def _conn(self, timeout_s: Optional[float] = None) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout_s or self.timeout_s)

    def _get_json(self, path: str, timeout_s: float) -> tuple[int, Any, Optional[str]]:
        """(status, parsed JSON or text, Server header) of a GET. Raises OSError/HTTPException."""
        conn = self._conn(timeout_s)
        try:
            conn.request("GET", self.base_path + path, headers={
                k: v for k, v in self.headers.items() if k != "Accept"})
            resp = conn.getresponse()
            raw = resp.read(1 << 20).decode("utf-8", "replace")
            try:
                body: Any = json.loads(raw)
            except ValueError:
                body = raw[:_BODY_LIMIT]
            return resp.status, body, resp.getheader("server")
        finally:
            conn.close()

    # -- identity ----------------------------------------------------------------------------
    def server_info(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """What the server says about itself: ``version`` (from ``/version``: vLLM, SGLang;
        ``/info``: TGI), ``models`` (ids from ``/v1/models``), ``server_header`` (the ``Server``
        response header), ``responses`` (the scalar fields of each JSON answer by route).
        Missing routes are skipped.

        Raises:
            EndpointError: the server cannot be reached at all.
        """
        info: dict[str, Any] = {"url": self.url, "api": self.api}
        reached = False
        last_err = None
        for path in ("/version", "/info", "/v1/models"):
            try:
                status, body, server = self._get_json(path, timeout_s)
            except (OSError, http.client.HTTPException) as e:
                last_err = e
                if isinstance(e, (ConnectionRefusedError, socket.gaierror)):
                    break
                continue
            reached = True
            if server and "server_header" not in info:
                info["server_header"] = server
            if status != 200:
                continue
            if path == "/v1/models" and isinstance(body, dict):
                info["models"] = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
            elif isinstance(body, dict):
                keep = {k: v for k, v in body.items() if isinstance(v, (str, int, float, bool))}
                info.setdefault("responses", {})[path] = keep
                if "version" in keep and "version" not in info:
                    info["version"] = str(keep["version"])
        if not reached:
            raise EndpointError(_describe_conn_error(last_err, self.url) if last_err is not None
                                else f"{self.url} did not answer")
        self._info = info
        return info

    def check(self) -> dict[str, Any]:
        """Reach the server, learn its identity and pick the model if none was given.

        Raises:
            EndpointError: unreachable, or no model given and ``/v1/models`` lists none.
        """
        info = self.server_info()
        if self.model is None:
            models = info.get("models") or []
            if not models:
                raise EndpointError(f"{self.url}: no model given and /v1/models lists none; pass "
                                    "model=")
            self.model = str(models[0])
        info["model"] = self.model
        return info

    def describe(self) -> dict[str, Any]:
        """JSON-able identity for a run manifest (``server_info`` once, cached)."""
        info = dict(self._info) if self._info is not None else {"url": self.url, "api": self.api}
        info.update(engine=ENGINE_NAME, model=self.model)
        return info

    # -- requests ----------------------------------------------------------------------------
    def _body(self, req: ServeRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "stream": True,
                                "max_tokens": req.max_new_tokens or self.max_new_tokens,
                                "temperature": self.temperature}
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        if self.api == "chat":
            if req.messages is not None:
                body["messages"] = req.messages
            elif req.prompt is not None:
                body["messages"] = [{"role": "user", "content": req.prompt}]
            else:
                raise ConfigError(f"request {req.request_id}: a chat endpoint needs messages or a prompt")
        elif req.prompt is not None:
            body["prompt"] = req.prompt
        elif req.input_ids is not None:
            body["prompt"] = [int(i) for i in req.input_ids]  # token ids: vLLM, SGLang accept them
        else:
            raise ConfigError(f"request {req.request_id}: a completions endpoint needs a prompt")
        body.update(self.extra_body)
        return body

    def _prompt_tokens(self, req: ServeRequest) -> Optional[int]:
        if req.input_ids is not None:
            return len(req.input_ids)
        if self.tokenizer is None:
            return None
        text = req.prompt if req.prompt is not None else "\n".join(
            str(m.get("content", "")) for m in req.messages or [])
        return len(self.tokenizer(text)["input_ids"])

    def complete(self, request: Union[ServeRequest, str], handle: Optional[RequestHandle] = None
                 ) -> ServedRequest:
        """Send one request and read its stream to the end (blocking). Never raises for a
        failure of the request: the record says what happened (see the module doc).

        Raises:
            ConfigError: the request cannot be expressed for this ``api``.
        """
        req = as_request(request)
        if self.model is None:
            try:
                self.check()
            except EndpointError as e:
                return failed_request(req, now_s(), str(e), engine=ENGINE_NAME)
        body = json.dumps(self._body(req)).encode()
        path = self.base_path + _PATHS[self.api]
        where = f"POST {self.url}{_PATHS[self.api]}"
        st = _Stream(self.api, handle)
        t0 = handle.t_submit_s if handle is not None else now_s()
        conn = self._conn()
        if handle is not None:
            handle.set_cancel(lambda: _shutdown(conn))  # cancel() unblocks the reader
        try:
            if handle is not None and handle.cancelled:
                raise _StreamFailure("cancelled by the client before it was sent")
            try:
                conn.request("POST", path, body=body, headers=self.headers)
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException) as e:
                raise _StreamFailure(_describe_conn_error(e, where)) from None
            st.t_headers = now_s()
            server = resp.getheader("server")
            if resp.status >= 400:
                raw = resp.read(1 << 16).decode("utf-8", "replace").strip()
                raise _StreamFailure(f"HTTP {resp.status} {resp.reason} from {where}: "
                                     f"{raw[:_BODY_LIMIT] or '(empty body)'}")
            ctype = (resp.getheader("content-type") or "").lower()
            if "text/event-stream" not in ctype and "json" in ctype:
                st.whole(resp.read().decode("utf-8", "replace"))  # server ignored stream=true
            else:
                st.read(resp, lambda: handle is not None and handle.cancelled)
        except _StreamFailure as e:
            reason = "cancelled" if handle is not None and handle.cancelled else "error"
            return failed_request(req, t0, str(e), token_times_s=st.times, stop_reason=reason,
                                  n_prompt_tokens=st.prompt_tokens or self._prompt_tokens(req) or 0,
                                  engine=ENGINE_NAME, output_text="".join(st.texts),
                                  t_headers_s=st.t_headers, n_chunks=len(st.times))
        finally:
            conn.close()
        return self._record(req, t0, st, server)

    def _record(self, req: ServeRequest, t0: float, st: "_Stream", server: Optional[str]) -> ServedRequest:
        tt = np.asarray(st.times, dtype=np.float64)
        n_out, n_prompt = st.completion_tokens, st.prompt_tokens
        src = "usage"
        if n_out is None:
            n_out, src = int(tt.size), "chunks"
        if n_prompt is None:
            n_prompt = self._prompt_tokens(req)
        extra = {"engine": ENGINE_NAME, "output_text": "".join(st.texts), "token_count_source": src,
                 "n_chunks": int(tt.size), "done_marker": st.done, "t_headers_s": st.t_headers,
                 "prompt_token_source": "usage" if st.prompt_tokens is not None else
                 ("tokenizer" if n_prompt is not None else "unknown"),
                 "metadata": dict(req.metadata), "response_model": st.model,
                 "server_header": server}
        return ServedRequest(
            request_id=str(req.request_id), t_arrival_s=t0, t_admit_s=None,
            t_first_token_s=float(tt[0]) if tt.size else None, token_times_s=tt,
            t_end_s=st.t_end if st.t_end is not None else now_s(),
            n_prompt_tokens=int(n_prompt or 0), n_output_tokens=int(n_out),
            stop_reason=st.finish_reason, extra=extra)

    def submit(self, request: Union[ServeRequest, str, Sequence[int]]) -> RequestHandle:
        """Start a request on its own thread now (its arrival is this call) and return its
        handle; streamed chunks are pushed to the handle as they arrive. Thread-safe."""
        req = as_request(request)
        h = RequestHandle(req, now_s())

        def run() -> None:
            try:
                rec = self.complete(req, h)
            except Exception as e:  # noqa: BLE001 - a record, never a dead thread
                rec = failed_request(req, h.t_submit_s, f"{type(e).__name__}: {e}", engine=ENGINE_NAME)
            h.resolve(rec)

        threading.Thread(target=run, name=f"llm_dvfs-endpoint-{req.request_id}", daemon=True).start()
        return h


def _shutdown(conn: Optional[http.client.HTTPConnection]) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # unblocks the reader's recv
        except OSError:
            pass


class _Stream:
    """Server-sent events of one response: parsed, stamped, checked."""

    def __init__(self, api: str, handle: Optional[RequestHandle]) -> None:
        self.api, self.handle = api, handle
        self.times: list[float] = []
        self.texts: list[str] = []
        self.finish_reason: Optional[str] = None
        self.completion_tokens: Optional[int] = None
        self.prompt_tokens: Optional[int] = None
        self.done = False
        self.model: Optional[str] = None
        self.t_headers: Optional[float] = None
        self.t_end: Optional[float] = None
        self.line_no = 0

    def read(self, resp: http.client.HTTPResponse, cancelled: Any) -> None:
        data: list[str] = []
        t_data = 0.0
        while True:
            try:
                raw = resp.readline(1 << 20)
            except (OSError, http.client.HTTPException) as e:
                if cancelled():
                    raise _StreamFailure("cancelled by the client") from None
                raise _StreamFailure(self._lost(f"{type(e).__name__}: {e}")) from None
            t = now_s()
            if not raw:
                break
            self.line_no += 1
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if line == "":
                if data:
                    self.event("\n".join(data), t_data)
                    data = []
                    if self.done:
                        break
                continue
            if line.startswith(":"):
                continue  # SSE comment / keep-alive
            field, colon, value = line.partition(":")
            if not colon or field not in ("data", "event", "id", "retry"):
                raise _StreamFailure(f"malformed stream line {self.line_no}: {line[:200]!r} is not "
                                     "a server-sent event field (expected 'data: ...')")
            if field == "data":
                if not data:
                    t_data = t  # the event's time: its first data line's arrival
                data.append(value[1:] if value.startswith(" ") else value)
        if data:
            self.event("\n".join(data), t_data)
        if cancelled():
            raise _StreamFailure("cancelled by the client")
        if not self.done and self.finish_reason is None:
            raise _StreamFailure(self._lost("the stream ended without a finish_reason or [DONE]"))
        self.t_end = self.t_end if self.t_end is not None else now_s()

    def _lost(self, what: str) -> str:
        return (f"connection lost mid-stream after {len(self.times)} token chunk(s) ({what}): the "
                "server died or closed the stream early")

    def event(self, payload: str, t: float) -> None:
        if payload.strip() == "[DONE]":
            self.done, self.t_end = True, t
            return
        try:
            obj = json.loads(payload)
        except ValueError as e:
            raise _StreamFailure(f"malformed stream line {self.line_no}: data is not JSON ({e}): "
                                 f"{payload[:200]!r}") from None
        if not isinstance(obj, dict):
            raise _StreamFailure(f"malformed stream line {self.line_no}: data is not a JSON object: "
                                 f"{payload[:200]!r}")
        self.chunk(obj, t)

    def chunk(self, obj: dict, t: float) -> None:
        if "error" in obj:
            err = obj["error"]
            msg = err.get("message", err) if isinstance(err, dict) else err
            raise _StreamFailure(f"the server reported an error mid-stream: {msg}")
        self.model = obj.get("model", self.model)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.completion_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.prompt_tokens = usage["prompt_tokens"]
        for c in obj.get("choices") or []:
            if not isinstance(c, dict) or c.get("index", 0) != 0:
                continue
            if self.api == "chat":
                delta = c.get("delta") or c.get("message") or {}
                has, text = "content" in delta and delta["content"] is not None, delta.get("content")
                # a role announcement ({"role": "assistant", "content": ""}) is not a token
                if has and text == "" and "role" in delta:
                    has = False
            else:
                has, text = "text" in c and c["text"] is not None, c.get("text")
            fin = c.get("finish_reason")
            # the closing chunk often carries "" text with the finish_reason: not a token
            if has and (text or fin is None):
                self.times.append(t)
                self.texts.append(text or "")
                if self.handle is not None:
                    self.handle.push_token(TokenEvent(len(self.times) - 1, t, None, text or ""))
            if fin is not None:
                self.finish_reason = str(fin)
                self.t_end = t

    def whole(self, raw: str) -> None:
        """A non-streamed JSON response (the server ignored ``stream``): one chunk at the end."""
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise _StreamFailure(f"response is neither a stream nor JSON ({e}): {raw[:200]!r}") from None
        for c in obj.get("choices") or []:
            if isinstance(c, dict) and "message" in c:
                c.setdefault("delta", c["message"])
        self.chunk(obj, now_s())
        if self.finish_reason is None:
            self.finish_reason = "unknown"
