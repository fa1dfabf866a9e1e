"""Timeline marks and TokenTimer: host mode, a real generate on a tiny model, and the native
CUDA-event / host-callback paths against tests/fakes/fake_cuda.c (a fake libcuda)."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from llm_dvfs.meter import timeline as tlmod
from llm_dvfs.meter.attribution import attribute
from llm_dvfs.errors import ConfigError, LlmDvfsError
from llm_dvfs.meter.timeline import (
    LABEL_END,
    LABEL_START,
    LABEL_STEP,
    CudaError,
    Timeline,
    TokenTimer,
    TokenTiming,
    tokens_per_sequence,
)

from gil_probe import python_thread_ticks, ticks_inside

FAKES = Path(__file__).parent / "fakes"
_core = tlmod._core
_skip_native = pytest.mark.skipif(_core is None or not hasattr(_core, "Timeline"),
                                  reason="llm_dvfs._core with the timeline is not built")


def native(fn):
    """Marks a test that exercises the C++ core (re-run under sanitizers in CI)."""
    return pytest.mark.native(_skip_native(fn))


# --- host mode and plain helpers ------------------------------------------------------------


@pytest.mark.parametrize("use_native", [False, True])
def test_host_timeline_marks_are_ordered_host_times(monkeypatch, use_native):
    if use_native and (_core is None or not hasattr(_core, "Timeline")):
        pytest.skip("native core not built")
    if not use_native:
        monkeypatch.setattr(tlmod, "_core", None)
    tl = Timeline("auto")  # no device -> host
    assert tl.mode == "host"
    before = tlmod.host_monotonic_ns() * 1e-9
    for lab in (LABEL_START, LABEL_STEP, LABEL_STEP, LABEL_END):
        tl.mark(lab)
    after = tlmod.host_monotonic_ns() * 1e-9
    m = tl.resolve()
    assert len(m) == len(tl) == 4
    assert list(m.label) == [LABEL_START, LABEL_STEP, LABEL_STEP, LABEL_END]
    assert np.all(np.diff(m.t_s) >= 0)
    assert before <= m.t_s[0] and m.t_s[-1] <= after
    assert m.max_uncertainty_s == 0.0
    tl.clear()
    assert len(tl) == 0


def test_bad_modes_are_config_errors():
    with pytest.raises(ConfigError):
        Timeline("gpu")
    with pytest.raises(ConfigError):
        TokenTimer(hook="streamer")


def test_tokens_per_sequence_counts_up_to_first_eos():
    seq = np.array([
        [9, 9, 4, 5, 0, 0],   # eos 5 at gen position 1 -> 2 tokens
        [9, 9, 4, 4, 4, 4],   # no eos -> 4
        [9, 9, 7, 7, 7, 2],   # second eos id 2 at position 3 -> 4
        [9, 9, 2, 0, 0, 0],   # eos first -> 1
    ])
    np.testing.assert_array_equal(tokens_per_sequence(seq, 2, [5, 2]), [2, 4, 4, 1])
    np.testing.assert_array_equal(tokens_per_sequence(seq, 2, None), [4, 4, 4, 4])
    np.testing.assert_array_equal(tokens_per_sequence(seq, 2, 5), [2, 4, 4, 4])


def test_token_timing_bounds_tile_the_request():
    tt = TokenTiming(t_start_s=1.0, step_end_s=np.array([1.3, 1.4, 1.5, 1.55]), t_end_s=1.6,
                     steps=4, tokens_per_sequence=np.array([4]))
    np.testing.assert_allclose(tt.bounds_s, [1.0, 1.3, 1.4, 1.5, 1.6])
    assert tt.ttft_s == pytest.approx(0.3)
    assert tt.latency_s == pytest.approx(0.6)
    # Undone speculative steps (more marks than kept tokens) merge into the last step.
    tt2 = TokenTiming(1.0, np.array([1.3, 1.4, 1.5, 1.55]), 1.6, 2, np.array([2]))
    np.testing.assert_allclose(tt2.bounds_s, [1.0, 1.3, 1.6])


# --- TokenTimer on a real generate ------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   vocab_size=128, intermediate_size=64,
                                   bos_token_id=1, eos_token_id=5, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _force_eos_processor(eos_at: dict[int, int], eos_id: int = 5):
    """A logits processor that makes row r emit EOS at generation step eos_at[r] and never
    before (so the token counts are known)."""
    from transformers import LogitsProcessor

    class Force(LogitsProcessor):
        def __init__(self):
            self.step = 0

        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, eos_id] = -float("inf")
            for row, at in eos_at.items():
                if self.step == at:
                    scores[row] = -float("inf")
                    scores[row, eos_id] = 0.0
            self.step += 1
            return scores

    return Force()


@pytest.mark.parametrize("hook", ["logits_processor", "stopping_criteria"])
def test_generate_marks_one_step_per_generated_token(tiny_llama, hook):
    import torch

    ids = torch.randint(6, 128, (1, 9))
    timer = TokenTimer(hook=hook)
    out = timer.generate(tiny_llama, input_ids=ids, max_new_tokens=7, do_sample=False)
    tt = timer.timing
    new = out.shape[1] - ids.shape[1]
    assert tt.steps == new
    assert len(tt.step_end_s) == new  # one mark per generated token
    assert tt.hook == hook and tt.mode == "host"
    np.testing.assert_array_equal(tt.tokens_per_sequence, [new])
    assert tt.bounds_s.shape == (new + 1,)
    assert np.all(np.diff(tt.bounds_s) >= 0)
    assert 0 < tt.ttft_s <= tt.latency_s
    labels = timer.timeline.resolve().label
    assert list(labels) == [LABEL_START] + [LABEL_STEP] * new + [LABEL_END]


def test_generate_batch_counts_tokens_per_sequence_and_attributes(tiny_llama):
    import torch
    from transformers import LogitsProcessorList

    ids = torch.randint(6, 128, (3, 6))
    user = _force_eos_processor({0: 1, 2: 4})  # row 0: 2 tokens, row 2: 5, row 1: all 8
    timer = TokenTimer()
    timer.generate(tiny_llama, input_ids=ids, attention_mask=torch.ones_like(ids),
                   max_new_tokens=8, do_sample=False,
                   logits_processor=LogitsProcessorList([user]))
    tt = timer.timing
    assert user.step == tt.steps == 8  # the user's processor was kept alongside ours
    np.testing.assert_array_equal(tt.tokens_per_sequence, [2, 8, 5])
    assert len(tt.step_end_s) == 8
    # Attribute a constant 200 W: each step's energy splits over the rows still generating.
    t = np.array([tt.t_start_s - 1.0])
    a = attribute((t, np.array([200.0])), tt, lag_s=0.0, request_ids=["a", "b", "c"])
    step_e = 200.0 * np.diff(tt.bounds_s)
    active = np.array([3, 3, 2, 2, 2, 1, 1, 1])
    expect_b = (step_e / active).sum()
    got = {r["request_id"]: r for r in a.requests}
    assert got["b"]["energy_j"] == pytest.approx(expect_b)
    assert got["a"]["tokens_out"] == 2 and got["c"]["tokens_out"] == 5
    assert sum(r["energy_j"] for r in a.requests) == pytest.approx(200.0 * tt.latency_s)
    assert len(a.tokens) == 2 + 8 + 5


def test_token_timer_lifecycle_errors(tiny_llama):
    import torch

    timer = TokenTimer()
    with pytest.raises(LlmDvfsError, match="without begin"):
        timer.end()
    # The hook outside a request is an error, not a silent no-op.
    with pytest.raises(LlmDvfsError, match="outside begin"):
        tiny_llama.generate(torch.randint(6, 128, (1, 4)), max_new_tokens=2,
                            logits_processor=timer.logits_processor)
    # Forgetting to pass the hook is detected at end().
    ids = torch.randint(6, 128, (1, 4))
    timer.begin()
    out = tiny_llama.generate(ids, max_new_tokens=3, do_sample=False)
    with pytest.raises(LlmDvfsError, match="hook marked 0 steps"):
        timer.end(out, prompt_len=4)
    with pytest.raises(ConfigError):
        TokenTimer(hook="logits_processor").stopping_criteria


# --- native paths with a fake libcuda -------------------------------------------------------


class Fake:
    """ctypes handle on the fake's control functions (same library instance as the loader's)."""

    def __init__(self, path: Path):
        self.lib = lib = ctypes.CDLL(str(path))
        lib.fake_cuda_enqueue.argtypes = [ctypes.c_size_t, ctypes.c_int64]
        lib.fake_cuda_enqueue.restype = ctypes.c_int64
        lib.fake_cuda_set_clock.argtypes = [ctypes.c_double, ctypes.c_int64]
        lib.fake_cuda_set_latency.argtypes = [ctypes.c_int64, ctypes.c_int64]
        lib.fake_cuda_calls.argtypes = [ctypes.c_char_p]
        lib.fake_cuda_calls.restype = ctypes.c_long
        lib.fake_cuda_fail.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
        lib.fake_cuda_live_events.restype = ctypes.c_int64

    def __getattr__(self, name):
        return getattr(self.lib, "fake_cuda_" + name)

    def calls(self, fn: str) -> int:
        return self.lib.fake_cuda_calls(fn.encode())

    def fail(self, fn: str, code: int, count: int = 1) -> None:
        self.lib.fake_cuda_fail(fn.encode(), code, count)

    def truth_ns(self, stream: int) -> np.ndarray:
        n = 65536
        st = (ctypes.c_size_t * n)()
        ts = (ctypes.c_int64 * n)()
        k = self.lib.fake_cuda_log(st, ts, n)
        return np.array([ts[i] for i in range(k) if st[i] == stream], dtype=np.int64)


@pytest.fixture(scope="module")
def fake_cuda(fake_cuda_variant):
    if _core is None or not hasattr(_core, "Timeline"):
        pytest.skip("native core not built")
    # the shared build (conftest): the fake_gpu fixture may have loaded this same file already
    path = fake_cuda_variant("full")
    loaded = _core.cuda_library_path()
    if loaded and loaded != str(path):
        pytest.skip(f"a CUDA driver library is already loaded in this process ({loaded})")
    old = os.environ.get("LLM_DVFS_CUDA_LIBRARY")
    os.environ["LLM_DVFS_CUDA_LIBRARY"] = str(path)
    try:
        assert _core.cuda_driver_version() == 12080
        assert _core.cuda_library_path() == str(path)
        fake = Fake(path)
        yield fake
    finally:
        if old is None:
            os.environ.pop("LLM_DVFS_CUDA_LIBRARY", None)
        else:
            os.environ["LLM_DVFS_CUDA_LIBRARY"] = old


@pytest.fixture
def fake(fake_cuda):
    fake_cuda.reset()
    yield fake_cuda
    fake_cuda.reset()


@native
def test_loader_resolves_versioned_symbols(fake):
    syms = _core.cuda_symbols()
    for name in ("cuEventElapsedTime_v2", "cuEventDestroy_v2", "cuStreamDestroy_v2",
                 "cuCtxPushCurrent_v2", "cuLaunchHostFunc", "cuEventRecord"):
        assert syms[name] is True


@native
def test_event_marks_resolve_to_true_gpu_times_with_drift(fake):
    stream = 0x51
    fake.set_clock(250.0, 987_654_321)  # GPU clock 250 ppm fast and offset: must not matter
    tl = Timeline("event")
    for i in range(8):
        fake.enqueue(stream, 15_000_000)  # 15 ms of "kernels" before each mark
        tl.mark(LABEL_STEP, stream=stream)
    m = tl.resolve(timeout_s=5.0)
    truth = fake.truth_ns(stream)
    assert len(truth) == 8
    err = np.abs(m.t_s * 1e9 - truth)
    # Within the reported bound; and the bound meets the 50 µs target.
    assert np.all(err <= m.uncertainty_s * 1e9 + 1), (err, m.uncertainty_s)
    assert m.max_uncertainty_s < 50e-6
    assert m.drift_fitted and m.drift_ppm == pytest.approx(250.0, abs=25.0)
    # Marks reflect when the stream got there, not when mark() was called.
    assert m.t_s[-1] - m.host_call_s[-1] > 0.1
    np.testing.assert_allclose(np.diff(m.t_s), 0.015, atol=20e-6)


@native
def test_marks_do_not_synchronise(fake):
    stream = 0x52
    tl = Timeline("event", reserve=16)
    tl.mark(LABEL_START, stream=stream)  # the first mark takes a calibration (own stream)
    q0 = fake.calls("cuEventQuery")
    for _ in range(100):
        fake.enqueue(stream, 100_000)
        tl.mark(LABEL_STEP, stream=stream)
    assert fake.calls("cuEventQuery") == q0
    assert fake.calls("cuEventSynchronize") == 0
    assert fake.calls("cuStreamSynchronize") == 0
    tl.resolve()
    st = tl.stats()
    assert st["marks"] == 101 and st["events_created"] >= 101 - 16


@native
def test_events_are_pooled_and_destroyed(fake):
    live0 = fake.live_events()
    tl = Timeline("event", reserve=8)
    for _ in range(5):
        tl.mark(LABEL_STEP, stream=0x53)
    tl.resolve()
    created = tl.stats()["events_created"]
    tl.clear()
    for _ in range(5):
        tl.mark(LABEL_STEP, stream=0x53)
    tl.resolve()
    assert tl.stats()["events_created"] == created  # reused, not recreated
    assert fake.live_events() == live0 + created
    del tl
    assert fake.live_events() == live0


@native
def test_auto_calibration_keeps_long_timelines_accurate(fake):
    stream = 0x54
    fake.set_clock(-120.0, 5)
    tl = Timeline("event", auto_calibrate_s=0.01)
    for _ in range(6):
        fake.enqueue(stream, 2_000_000)
        tl.mark(LABEL_STEP, stream=stream)
        time.sleep(0.015)
    m = tl.resolve()
    assert tl.stats()["calibrations"] >= 6
    err = np.abs(m.t_s * 1e9 - fake.truth_ns(stream))
    assert np.all(err <= m.uncertainty_s * 1e9 + 1)


@native
def test_a_calibrating_mark_lets_other_python_threads_run(fake):
    # Events complete 100 ms after they are recorded, so each of the three calibration brackets
    # the first mark takes spins ~100 ms (as behind a busy GPU).
    fake.set_latency(100_000_000, 20_000)
    tl = Timeline("event", reserve=16)
    with python_thread_ticks() as ran:
        t0 = time.monotonic()
        tl.mark(LABEL_START, stream=0x56)
        t1 = time.monotonic()
    assert tl.stats()["calibrations"] == 1 and t1 - t0 >= 0.3
    # the other thread ran all through the calibration: the GIL was released
    assert len(ticks_inside(ran, t0, t1)) >= 10, (t0, t1, ran)
    fake.set_latency(3000, 20_000)
    t0 = time.monotonic()
    tl.mark(LABEL_STEP, stream=0x56)  # no calibration due: quick, GIL kept
    assert time.monotonic() - t0 < 0.05 and tl.stats()["calibrations"] == 1
    m = tl.resolve(timeout_s=5.0)
    assert len(m) == 2 and m.t_s[1] >= m.t_s[0]


@native
def test_callback_marks_follow_the_stream(fake):
    stream = 0x55
    fake.set_latency(3000, 30_000)
    tl = Timeline("callback")
    for _ in range(4):
        fake.enqueue(stream, 10_000_000)
        tl.mark(LABEL_STEP, stream=stream)
    m = tl.resolve(timeout_s=5.0)
    truth = fake.truth_ns(stream) * 1e-9
    lateness = m.t_s - truth
    assert np.all(lateness >= 30e-6) and np.all(lateness < 0.01)
    assert np.all(np.isnan(m.uncertainty_s))
    assert fake.calls("cuLaunchHostFunc") == 4


@native
def test_resolve_times_out_on_a_busy_stream(fake):
    tl = Timeline("event")
    fake.enqueue(0x56, 3_000_000_000)
    tl.mark(LABEL_STEP, stream=0x56)
    with pytest.raises(TimeoutError):
        tl.resolve(timeout_s=0.05)


@native
def test_driver_errors_raise_cuda_error(fake):
    tl = Timeline("event")
    fake.fail("cuEventRecord", 999)
    with pytest.raises(CudaError) as ei:
        tl.mark(LABEL_STEP, stream=0x57)
    e = ei.value
    assert (e.code, e.function, e.code_name) == (999, "cuEventRecord", "CUDA_ERROR_UNKNOWN")
    assert isinstance(e, LlmDvfsError)
    tl.mark(LABEL_STEP, stream=0x57)  # the next call works again
    assert len(tl) == 1
    fake.set_context(0)
    with pytest.raises(CudaError, match="no current CUDA context") as ei:
        Timeline("event")
    assert ei.value.code == 201


@native
def test_token_timer_with_event_timeline(fake, tiny_llama):
    """The whole native event path under a real generate (CPU model, fake driver stream 0)."""
    import torch

    timer = TokenTimer(timeline=Timeline("event"))
    ids = torch.randint(6, 128, (2, 5))
    out = timer.generate(tiny_llama, input_ids=ids, max_new_tokens=6, do_sample=False)
    tt = timer.timing
    assert tt.mode == "event" and tt.steps == out.shape[1] - 5 == len(tt.step_end_s)
    truth = fake.truth_ns(0) * 1e-9
    assert len(truth) == tt.steps + 2
    np.testing.assert_allclose(tt.bounds_s[[0, -1]], truth[[0, -1]], atol=50e-6)
    assert 0 < tt.uncertainty_s < 50e-6


@native
def test_fallback_symbols_and_missing_host_func(fake_cuda_variant):
    """Unversioned-only driver (old): fallbacks resolve, callback mode is refused. Runs in a
    subprocess because the driver library is loaded once per process."""
    lib = fake_cuda_variant("old")
    code = textwrap.dedent("""
        import llm_dvfs._core as c
        from llm_dvfs.meter.timeline import Timeline, CudaError
        syms = c.cuda_symbols() if c.cuda_driver_version() else {}
        assert syms["cuEventElapsedTime"] and syms["cuEventDestroy"], syms
        assert syms["cuStreamDestroy"] and syms["cuCtxPopCurrent"], syms
        assert syms["cuLaunchHostFunc"] is False, syms
        tl = Timeline("event")
        tl.mark(2, stream=7)
        assert len(tl.resolve().t_s) == 1
        try:
            Timeline("callback")
        except CudaError as e:
            assert e.code == 801 and e.function == "cuLaunchHostFunc", e
        else:
            raise AssertionError("callback mode without cuLaunchHostFunc")
        print("ok")
    """)
    env = dict(os.environ, LLM_DVFS_CUDA_LIBRARY=str(lib))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@native
def test_missing_library_is_library_not_found(tmp_path):
    code = textwrap.dedent("""
        from llm_dvfs.errors import LibraryNotFound
        from llm_dvfs.meter.timeline import Timeline
        try:
            Timeline("event")
        except LibraryNotFound as e:
            assert "LLM_DVFS_CUDA_LIBRARY" in str(e), e
            print("ok")
    """)
    env = dict(os.environ, LLM_DVFS_CUDA_LIBRARY=str(tmp_path / "nope.so"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.native
@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.parametrize("sanitize", ["thread", "address,undefined"])
def test_timeline_under_sanitizers(tmp_path, sanitize, fake_cuda_variant):
    """tests/native/timeline_stress.cpp with the timeline sources under TSan / ASan+UBSan:
    event marks checked against the fake's true times, callback slots written by the driver
    thread, Timelines destroyed with callbacks pending, a concurrent stats reader."""
    lib = fake_cuda_variant("full")
    exe = tmp_path / f"timeline_stress_{sanitize.replace(',', '_')}"
    srcs = [ROOT / "csrc" / f for f in ("dynlib.cpp", "nvml.cpp", "device.cpp", "sampler.cpp", "timeline.cpp")]
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer", f"-fsanitize={sanitize}",
           "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "native" / "timeline_stress.cpp"),
           *map(str, srcs), "-o", str(exe), "-ldl", "-lpthread"]
    b = subprocess.run(cmd, capture_output=True, text=True)
    assert b.returncode == 0, b.stderr[-4000:]
    env = dict(os.environ, LLM_DVFS_CUDA_LIBRARY=str(lib),
               TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1",
               ASAN_OPTIONS="halt_on_error=1:detect_leaks=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    env.pop("LD_PRELOAD", None)  # CI runs pytest with the ASan runtime preloaded; TSan can't share it
    r = subprocess.run([str(exe), "100"], env=env, capture_output=True, text=True, timeout=600)
    report = r.stdout + r.stderr
    assert r.returncode == 0, report[-4000:]
    assert "WARNING: ThreadSanitizer" not in report and "ERROR: AddressSanitizer" not in report
    assert "runtime error" not in report, report[-4000:]
    assert "OK cycles=100" in report
