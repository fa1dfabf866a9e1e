"""A small OpenAI-compatible server for CI: no GPU, no downloads, stdlib HTTP only.

It serves ``POST /v1/completions`` and ``POST /v1/chat/completions`` (streamed as server-sent
events with chunked transfer encoding, ``stream_options.include_usage`` honoured, closing
``data: [DONE]``; non-streamed JSON too), ``GET /v1/models``, ``GET /version`` and
``GET /health``, over the package's own model (``arch:tiny`` by default, greedy):

* ``backend="generate"``: ``model.generate`` with a streamer, one request at a time (a lock):
  requests queue, as on a server without batching;
* ``backend="continuous"``: :class:`llm_dvfs.workload.continuous.ContinuousEngine`, requests
  batched continuously, so concurrent requests overlap.

Chat messages are formatted as ``role: content`` lines followed by ``assistant:`` (the offline
tokenizer has no chat template). Every request is greedy whatever its ``temperature``.

Faults for the client's error paths (:class:`Faults`, settable between requests; all default off):
``http_status`` (answer with that status and an OpenAI-style error body), ``malformed_after``
(after k token chunks send a line that is not JSON), ``die_after`` (after k chunks drop the
connection without finishing the stream), ``stop_server`` (with ``die_after``: also close the
listening socket, so later requests are refused), ``kill`` (with ``die_after``, process mode:
``os._exit`` as a crashing server would), ``no_done`` (omit ``[DONE]``, as ``transformers serve``
5.24 does), ``on_requests`` (1-based numbers of the POST requests the faults apply to; None = all).

In a test::

    stub = OpenAIStub(GenerateBackend(loaded)).start()     # port 0: a free port
    client = EndpointClient(stub.url)                      # http://127.0.0.1:PORT/v1
    ...; stub.stop()

As a process (prints ``LISTENING <url>`` once it accepts connections)::

    python tests/servers/openai_stub.py --port 0 --backend generate --die-after 2 --kill --on-requests 2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

STUB_VERSION = "0.1"
Emit = Callable[[int, str], bool]  # (token id, text piece) -> False to stop generating


class _Abort(Exception):
    """Raised inside generation when the response was cut (fault, client gone)."""


@dataclasses.dataclass
class Faults:
    http_status: Optional[int] = None
    malformed_after: Optional[int] = None
    die_after: Optional[int] = None
    stop_server: bool = False
    kill: bool = False
    no_done: bool = False
    on_requests: Optional[set[int]] = None

    def applies(self, n: int) -> bool:
        return self.on_requests is None or n in self.on_requests


def format_chat(messages: list[dict[str, Any]]) -> str:
    return "".join(f"{m.get('role', 'user')}: {m.get('content', '')}\n" for m in messages) + "assistant:"


class GenerateBackend:
    """``model.generate`` with a streamer; one request at a time."""

    name = "generate"

    def __init__(self, loaded: Any) -> None:
        self.loaded = loaded
        self.lock = threading.Lock()

    def run(self, ids: list[int], max_new: int, emit: Emit) -> str:
        import torch
        from transformers.generation.streamers import BaseStreamer

        from llm_dvfs.workload.runner import GenerationSettings

        tok = self.loaded.tokenizer
        out: list[int] = []

        class Streamer(BaseStreamer):
            first = True

            def put(self, value: Any) -> None:
                if self.first:  # generate passes the prompt first
                    self.first = False
                    return
                for t in value.reshape(-1).tolist():
                    prev = tok.decode(out, skip_special_tokens=True)
                    out.append(int(t))
                    piece = tok.decode(out, skip_special_tokens=True)[len(prev):]
                    if not emit(int(t), piece):
                        raise _Abort()

            def end(self) -> None:
                pass

        kw = GenerationSettings(max_new_tokens=max_new).generate_kwargs(tok)
        x = torch.tensor([ids], device=self.loaded.model.device)
        with self.lock, torch.inference_mode():
            self.loaded.model.generate(input_ids=x, attention_mask=torch.ones_like(x),
                                       streamer=Streamer(), **kw)
        return "stop" if out and out[-1] == tok.eos_token_id else "length"


class ContinuousBackend:
    """Requests through a started ContinuousEngine (streaming handles)."""

    name = "continuous"

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def run(self, ids: list[int], max_new: int, emit: Emit) -> str:
        from llm_dvfs.workload.serving import ServeRequest

        h = self.engine.submit(ServeRequest(input_ids=ids, max_new_tokens=max_new), stream=True)
        for ev in h.stream(timeout=120):
            if not emit(int(ev.token_id), ev.text or ""):
                h.cancel()
                raise _Abort()
        rec = h.result(120)
        if rec.stop_reason == "error":
            raise RuntimeError(rec.extra.get("error", "engine error"))
        return "stop" if rec.stop_reason == "eos" else "length"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"llm_dvfs-openai-stub/{STUB_VERSION}"

    def log_message(self, *args: Any) -> None:  # quiet in tests
        pass

    @property
    def stub(self) -> "OpenAIStub":
        return self.server.stub  # type: ignore[attr-defined]

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        self._json(status, {"error": {"message": message, "type": kind, "code": status}})

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": self.stub.model_name, "object": "model", "owned_by": "llm_dvfs"}]})
        elif path == "/version":
            self._json(200, {"version": f"llm_dvfs-openai-stub {STUB_VERSION}",
                             "backend": self.stub.backend.name})
        elif path == "/health":
            self._json(200, {"status": "ok"})
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        n = self.stub.count_request()
        faults = self.stub.faults if self.stub.faults.applies(n) else Faults()
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except ValueError as e:
            return self._error(400, f"body is not JSON: {e}")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return self._error(404, f"no route {self.path}")
        if faults.http_status:
            return self._error(faults.http_status, "injected failure (stub fault)", "server_error")
        chat = path.endswith("chat/completions")
        tok = self.stub.tokenizer
        if chat:
            if not isinstance(body.get("messages"), list):
                return self._error(400, "messages is required")
            ids = tok(format_chat(body["messages"]))["input_ids"]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and all(isinstance(i, int) for i in prompt):
                ids = list(prompt)
            elif isinstance(prompt, str):
                ids = tok(prompt)["input_ids"]
            else:
                return self._error(400, "prompt (a string or a list of token ids) is required")
        max_new = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        if body.get("stream"):
            self._stream(body, chat, ids, max_new, faults)
        else:
            self._whole(body, chat, ids, max_new)

    def _base(self, chat: bool, rid: str) -> dict[str, Any]:
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.stub.model_name}

    def _whole(self, body: dict, chat: bool, ids: list[int], max_new: int) -> None:
        pieces: list[str] = []
        fin = self.stub.backend.run(ids, max_new, lambda t, p: pieces.append(p) is None)
        text = "".join(pieces)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": fin}
                  if chat else {"index": 0, "text": text, "finish_reason": fin})
        obj = self._base(chat, f"stub-{id(body)}")
        obj["object"] = "chat.completion" if chat else "text_completion"
        obj.update(choices=[choice], usage={"prompt_tokens": len(ids), "completion_tokens": len(pieces),
                                            "total_tokens": len(ids) + len(pieces)})
        self._json(200, obj)

    def _send_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _event(self, obj: Any) -> None:
        self._send_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _die(self, faults: Faults) -> None:
        if faults.kill:
            os._exit(3)  # a crashing server: the OS closes every socket
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.close_connection = True
        if faults.stop_server:
            self.stub.stop()

    def _stream(self, body: dict, chat: bool, ids: list[int], max_new: int, faults: Faults) -> None:
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = self._base(chat, f"stub-{self.stub.requests_seen}")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if chat:
            self._event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                              "finish_reason": None}]})
        sent = [0]

        def emit(token: int, piece: str) -> bool:
            if self.stub.closing:
                return False
            part = {"delta": {"content": piece}} if chat else {"text": piece}
            self._event({**base, "choices": [{"index": 0, **part, "finish_reason": None}]})
            sent[0] += 1
            if faults.malformed_after is not None and sent[0] >= faults.malformed_after:
                self._send_chunk(b'data: {"choices": [{"text": "unterminated\n\n')
                self._send_chunk(b"")
                return False
            if faults.die_after is not None and sent[0] >= faults.die_after:
                self._die(faults)
                return False
            return True

        try:
            fin = self.stub.backend.run(ids, max_new, emit)
        except _Abort:
            # cut by a fault or by stop(): close the connection (an unfinished stream on a
            # kept-alive connection would leave the client waiting for its socket timeout)
            self.close_connection = True
            return
        except (BrokenPipeError, ConnectionResetError):
            return  # the client went away
        except Exception as e:  # noqa: BLE001 - told to the client, as real servers do
            self._event({"error": {"message": f"{type(e).__name__}: {e}", "type": "server_error"}})
            self._send_chunk(b"")
            return
        end = {"delta": {}} if chat else {"text": ""}
        self._event({**base, "choices": [{"index": 0, **end, "finish_reason": fin}]})
        if usage:
            self._event({**base, "choices": [], "usage": {
                "prompt_tokens": len(ids), "completion_tokens": sent[0],
                "total_tokens": len(ids) + sent[0]}})
        if not faults.no_done:
            self._send_chunk(b"data: [DONE]\n\n")
        self._send_chunk(b"")


class OpenAIStub:
    """The server, in a background thread of this process.

    Args:
        backend: :class:`GenerateBackend` or :class:`ContinuousBackend`.
        host, port: where to listen (port 0: a free one; see :attr:`url`).
        model_name: the id ``/v1/models`` lists and chunks carry.
        faults: :class:`Faults` (mutable: tests set them between requests).
        quiet: print no traceback when a fault cuts a handler's connection (that is the test
            server's noise, not the output of the client under test, which tests check for
            tracebacks).
    """

    def __init__(self, backend: Any, *, host: str = "127.0.0.1", port: int = 0,
                 model_name: str = "llm_dvfs-stub/arch:tiny", faults: Optional[Faults] = None,
                 quiet: bool = False) -> None:
        self.backend = backend
        self.tokenizer = (backend.loaded if hasattr(backend, "loaded") else backend.engine.loaded).tokenizer
        self.model_name = model_name
        self.faults = faults or Faults()
        self.requests_seen = 0
        self.closing = False
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.stub = self  # type: ignore[attr-defined]
        if quiet:
            self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self.host, self.port = self.httpd.server_address[:2]
        self._thread: Optional[threading.Thread] = None
        self._serving = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def count_request(self) -> int:
        with self._lock:
            self.requests_seen += 1
            return self.requests_seen

    def serve(self) -> None:
        """Serve in this thread until :meth:`stop`."""
        self._serving.set()
        try:
            self.httpd.serve_forever(poll_interval=0.05)
        finally:
            self._serving.clear()

    def start(self) -> "OpenAIStub":
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve, name="openai-stub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the listening socket (later connections are refused);
        streams in progress stop at their next token. Callable from a request handler."""
        self.closing = True
        with self._lock:
            if self._serving.is_set():
                self.httpd.shutdown()  # waits for the serving loop (never a handler thread)
            self.httpd.server_close()

    def __enter__(self) -> "OpenAIStub":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--model", default="arch:tiny")
    ap.add_argument("--backend", choices=("generate", "continuous"), default="generate")
    ap.add_argument("--http-status", type=int)
    ap.add_argument("--malformed-after", type=int)
    ap.add_argument("--die-after", type=int)
    ap.add_argument("--stop-server", action="store_true")
    ap.add_argument("--kill", action="store_true")
    ap.add_argument("--no-done", action="store_true")
    ap.add_argument("--on-requests", help="comma-separated 1-based request numbers the faults hit")
    a = ap.parse_args(argv)
    from llm_dvfs.workload.models import load_model

    loaded = load_model(a.model, device="cpu", seed=0)
    engine = None
    if a.backend == "continuous":
        from llm_dvfs.workload.continuous import ContinuousEngine

        engine = ContinuousEngine(loaded).start()
        backend: Any = ContinuousBackend(engine)
    else:
        backend = GenerateBackend(loaded)
    faults = Faults(http_status=a.http_status, malformed_after=a.malformed_after, die_after=a.die_after,
                    stop_server=a.stop_server, kill=a.kill, no_done=a.no_done,
                    on_requests={int(x) for x in a.on_requests.split(",")} if a.on_requests else None)
    stub = OpenAIStub(backend, host=a.host, port=a.port, faults=faults,
                      model_name=f"llm_dvfs-stub/{a.model}")
    print(f"LISTENING {stub.url}", flush=True)
    try:
        stub.serve()
    except KeyboardInterrupt:
        pass
    finally:
        stub.httpd.server_close()
        if engine is not None:
            engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
