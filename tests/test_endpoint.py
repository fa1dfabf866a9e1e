"""EndpointClient against the stdlib OpenAI stub (tests/servers/openai_stub.py) over arch:tiny:
streaming completions and chat, stamps, usage, server identity, every fault as a clear error
with the finished requests kept; and against `transformers serve` where its extras exist."""
from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llm_dvfs.errors import ConfigError
from llm_dvfs.workload.endpoint import EndpointClient, EndpointError, parse_endpoint_url
from llm_dvfs.workload.serving import ServeRequest, run_closed_loop, submit_all

from servers.openai_stub import ContinuousBackend, Faults, GenerateBackend, OpenAIStub

STUB = Path(__file__).resolve().parent / "servers" / "openai_stub.py"
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny():
    from llm_dvfs.workload.models import load_model

    return load_model("arch:tiny", device="cpu", seed=0)


@pytest.fixture(scope="module")
def stub(tiny):
    with OpenAIStub(GenerateBackend(tiny)) as s:
        yield s


def _generate_text(tiny, prompt, n):
    import torch

    from llm_dvfs.workload.runner import GenerationSettings

    enc = tiny.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = tiny.model.generate(**enc, **GenerationSettings(max_new_tokens=n).generate_kwargs(tiny.tokenizer))
    return tiny.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def _check_stamps(r, n):
    t = r.token_times_s
    assert len(t) == n == r.n_output_tokens and r.extra["n_chunks"] == n
    assert r.t_arrival_s < r.extra["t_headers_s"] <= r.t_first_token_s == t[0]
    assert np.all(np.diff(t) > 0) and t[-1] <= r.t_end_s
    assert r.t_admit_s is None  # a server does not say when it admitted a request


def test_completions_stream_identity_and_usage(tiny, faults):
    c = EndpointClient(faults.url, max_new_tokens=MAX_NEW)
    info = c.check()
    assert info["models"] == ["llm_dvfs-stub/arch:tiny"] and c.model == "llm_dvfs-stub/arch:tiny"
    assert info["version"].startswith("llm_dvfs-openai-stub")
    assert info["server_header"].startswith("llm_dvfs-openai-stub/")
    prompt = "The quick brown fox jumps over the lazy dog"
    r = c.complete(ServeRequest(prompt=prompt, metadata={"sample_id": "s1"}))
    _check_stamps(r, MAX_NEW)
    assert r.stop_reason == "length" and r.extra["done_marker"] is True
    assert r.extra["token_count_source"] == "usage" and r.extra["prompt_token_source"] == "usage"
    assert r.n_prompt_tokens == len(tiny.tokenizer(prompt)["input_ids"])
    assert r.extra["output_text"] == _generate_text(tiny, prompt, MAX_NEW)
    assert r.extra["metadata"] == {"sample_id": "s1"}
    assert c.describe()["engine"] == "openai-endpoint"


def test_chat_stream(tiny, faults):
    c = EndpointClient(faults.url.replace("/v1", "/v1/chat/completions"), max_new_tokens=4)
    assert c.api == "chat"
    r = c.complete(ServeRequest(messages=[{"role": "user", "content": "Say hello"}]))
    _check_stamps(r, 4)  # the role chunk is not a token
    assert r.stop_reason == "length"
    assert r.n_prompt_tokens == len(tiny.tokenizer("user: Say hello\nassistant:")["input_ids"])


def test_without_usage_or_done_counts_chunks(tiny, faults):
    faults.faults = Faults(no_done=True)  # transformers serve 5.24 sends no [DONE]
    c = EndpointClient(faults.url, max_new_tokens=5, include_usage=False, tokenizer=tiny.tokenizer)
    r = c.complete("Hello there general")
    _check_stamps(r, 5)
    assert r.stop_reason == "length" and r.extra["done_marker"] is False
    assert r.extra["token_count_source"] == "chunks" and r.extra["prompt_token_source"] == "tokenizer"
    assert r.n_prompt_tokens == len(tiny.tokenizer("Hello there general")["input_ids"])


def test_http_error_reports_status_and_body(faults):
    faults.faults = Faults(http_status=500)
    r = EndpointClient(faults.url).complete("x")
    assert r.stop_reason == "error" and r.n_output_tokens == 0
    assert "HTTP 500" in r.extra["error"] and "injected failure" in r.extra["error"]
    assert "/v1/completions" in r.extra["error"]


def test_malformed_stream_line(faults):
    faults.faults = Faults(malformed_after=2)
    r = EndpointClient(faults.url, max_new_tokens=MAX_NEW).complete("x y z")
    assert r.stop_reason == "error" and "malformed stream line" in r.extra["error"]
    assert "unterminated" in r.extra["error"]  # the offending line is quoted
    assert r.n_output_tokens == 2 and len(r.token_times_s) == 2  # partial tokens kept


def test_dropped_stream_fails_one_request_keeps_the_others(faults):
    c = EndpointClient(faults.url, max_new_tokens=MAX_NEW)
    c.check()
    faults.faults = Faults(die_after=3, on_requests={faults.requests_seen + 2})
    res = run_closed_loop(c.submit, [f"prompt {k}" for k in range(3)], 1, timeout_s=60)
    assert [r.stop_reason for r in res] == ["length", "error", "length"]
    bad = res[1]
    assert "connection lost mid-stream after 3 token chunk(s)" in bad.extra["error"]
    assert bad.n_output_tokens == 3 and bad.t_first_token_s == bad.token_times_s[0]
    assert all(r.n_output_tokens == MAX_NEW for r in (res[0], res[2]))


def _start_stub_process(*args):
    proc = subprocess.Popen([sys.executable, str(STUB), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = [None]
    t = threading.Thread(target=lambda: line.__setitem__(0, proc.stdout.readline()), daemon=True)
    t.start()
    t.join(120)
    if not line[0] or not line[0].startswith("LISTENING "):
        proc.kill()
        raise AssertionError(f"stub did not start: {line[0]!r} {proc.stderr.read()[-2000:]}")
    return proc, line[0].split()[1]


def test_server_process_dies_mid_run():
    proc, url = _start_stub_process("--die-after", "2", "--kill", "--on-requests", "2")
    try:
        c = EndpointClient(url, max_new_tokens=4, timeout_s=30)
        res = run_closed_loop(c.submit, ["a", "b", "c", "d"], 1, timeout_s=60)
        assert proc.wait(30) == 3
        after = c.complete("e")  # the process is gone for sure now
    finally:
        proc.kill()
        proc.wait()
    assert res[0].stop_reason == "length" and res[0].n_output_tokens == 4  # finished: kept
    assert res[1].stop_reason == "error" and res[1].n_output_tokens == 2
    assert "connection lost mid-stream after 2" in res[1].extra["error"]
    for r in res[2:]:  # refused, or reset when it connected while the process was dying
        assert r.stop_reason == "error" and r.n_output_tokens == 0
        assert ("Connection refused" in r.extra["error"]
                or "closed the connection before answering" in r.extra["error"])
    assert after.stop_reason == "error" and "Connection refused" in after.extra["error"]
    assert "is the server running" in after.extra["error"]


def test_bad_urls_and_unreachable_server():
    for bad in ("ftp://host/v1", "localhost:8000", "http://", "http://host:99999/v1"):
        with pytest.raises(ConfigError):
            EndpointClient(bad)
    with pytest.raises(ConfigError, match="api"):
        EndpointClient("http://127.0.0.1:1/v1", api="embeddings")
    assert parse_endpoint_url("https://h/proxy/v1/completions") == ("https", "h", 443, "/proxy", "completions")
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = EndpointClient(f"http://127.0.0.1:{port}/v1", timeout_s=5)
    with pytest.raises(EndpointError, match="Connection refused"):
        c.check()
    r = c.complete("hello")  # a request is recorded as failed, not raised
    assert r.stop_reason == "error" and "is the server running" in r.extra["error"]


def test_submit_streams_and_cancels(faults):
    c = EndpointClient(faults.url, max_new_tokens=MAX_NEW)
    h = c.submit("Stream me")
    events = list(h.stream(timeout=60))
    rec = h.result(5)
    assert [e.t_s for e in events] == list(rec.token_times_s)
    assert "".join(e.text for e in events) == rec.extra["output_text"]
    long = c.submit(ServeRequest(prompt="long one", max_new_tokens=1500))
    next(iter(long.stream(timeout=60)))
    assert long.cancel()
    rec = long.result(30)
    assert rec.stop_reason == "cancelled" and 1 <= rec.n_output_tokens < 1500


class _Canned(http.server.BaseHTTPRequestHandler):
    """Answers any POST with the class's canned SSE body (close-delimited, HTTP/1.0)."""

    body = b""

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(type(self).body)


def _canned(body: bytes):
    handler = type("H", (_Canned,), {"body": body})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/v1"


def test_sse_parsing_details():
    ev = lambda obj: b"data: " + json.dumps(obj).encode() + b"\r\n\r\n"  # noqa: E731
    body = (b": keep-alive comment\r\n\r\n" + b"event: message\r\nid: 1\r\n"
            + ev({"choices": [{"index": 0, "text": "a"}]})
            + b'data: {"choices": [{"index": 0,\ndata: "text": "b"}]}\n\n'  # one event, two lines
            + ev({"choices": [{"index": 0, "text": "", "finish_reason": None}]})  # an empty token
            + ev({"choices": [{"index": 0, "text": "", "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 3, "completion_tokens": 3}}))  # no [DONE]
    srv, url = _canned(body)
    try:
        r = EndpointClient(url, model="m").complete("p")
        assert r.stop_reason == "stop" and r.extra["output_text"] == "ab"
        assert r.n_output_tokens == 3 == r.extra["n_chunks"] and r.n_prompt_tokens == 3
        srv.RequestHandlerClass.body = ev({"choices": [{"index": 0, "text": "a"}]}) + b"garbage\n\n"
        r = EndpointClient(url, model="m").complete("p")
        assert r.stop_reason == "error" and "'garbage' is not a server-sent event" in r.extra["error"]
        srv.RequestHandlerClass.body = (ev({"choices": [{"index": 0, "text": "a"}]})
                                        + ev({"error": {"message": "out of memory"}}))
        r = EndpointClient(url, model="m").complete("p")
        assert "server reported an error mid-stream: out of memory" in r.extra["error"]
        assert r.n_output_tokens == 1
        srv.RequestHandlerClass.body = ev({"choices": [{"index": 0, "text": "a"}]})  # then EOF
        r = EndpointClient(url, model="m").complete("p")
        assert "ended without a finish_reason or [DONE]" in r.extra["error"]
    finally:
        srv.shutdown()
        srv.server_close()


def test_concurrent_requests_overlap_on_continuous_backend(tiny):
    from llm_dvfs.workload.continuous import ContinuousEngine

    with ContinuousEngine(tiny, cache_tokens=2048, max_batch_tokens=256) as eng:
        with OpenAIStub(ContinuousBackend(eng)) as s:
            c = EndpointClient(s.url, max_new_tokens=8)
            res = submit_all(c.submit, [f"request number {k} says" for k in range(4)], timeout_s=60)
            steps = eng.steps()
    assert all(r.stop_reason == "length" and r.n_output_tokens == 8 for r in res)
    overlaps = sum(1 for i, a in enumerate(res) for b in res[i + 1:]
                   if a.t_first_token_s < b.t_end_s and b.t_first_token_s < a.t_end_s)
    assert overlaps >= 3
    assert max(len(st.decode_tokens) for st in steps) >= 2  # batched on the server side


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_against_transformers_serve(tiny, tmp_path):
    """`transformers serve` (needs its serving extras: fastapi, uvicorn, openai) on arch:tiny
    saved to a directory, with a chat template added: the client works against it unchanged."""
    from transformers.utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve needs `pip install transformers[serving]`")
    exe = Path(sys.executable).with_name("transformers")
    if not exe.exists():
        pytest.skip("no transformers CLI next to this python")
    d = tmp_path / "tiny"
    tiny.model.save_pretrained(d)
    tiny.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    tiny.tokenizer.save_pretrained(d)
    tiny.tokenizer.chat_template = None
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([str(exe), "serve", str(d), "--device", "cpu", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        c = EndpointClient(f"http://127.0.0.1:{port}/v1", max_new_tokens=5, timeout_s=120)
        deadline = time.monotonic() + 180
        while True:
            try:
                info = c.check()
                break
            except EndpointError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(proc.stderr.read().decode()[-3000:]) from None
                time.sleep(1)
        assert info["server_header"] == "uvicorn" and info["models"] == [str(d)]
        r = c.complete("Hello world")
        assert r.stop_reason == "length" and r.n_output_tokens == 5, r.extra
        assert r.extra["token_count_source"] == "usage" and len(r.token_times_s) == 5
        assert np.all(np.diff(r.token_times_s) >= 0)
        chat = EndpointClient(f"http://127.0.0.1:{port}/v1", api="chat", max_new_tokens=4, timeout_s=120)
        r = chat.complete(ServeRequest(messages=[{"role": "user", "content": "Hi"}]))
        assert r.stop_reason == "length" and r.n_output_tokens == 4, r.extra
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
