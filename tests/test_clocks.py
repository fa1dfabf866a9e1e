"""ClockController, the restore watchdog and the clocks CLI, against the emulated H100.

Safety: every test that can change clocks goes through the ``gpu`` fixture, which first calls
``assert_emulated_nvml()`` (skips unless NVML calls go to the emulator), so the suite can never
touch a real GPU. Subprocesses inherit that environment.
"""
from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
import time

import pytest

import llm_dvfs as ld
from llm_dvfs.control import clocks, guard
from fakes.fake_gpu import NVML_ERROR_NOT_SUPPORTED, assert_emulated_nvml

pytestmark = pytest.mark.native


@pytest.fixture
def gpu(fake_gpu, monkeypatch):
    """The emulated GPU, verified to be the emulator; leaves no change and no watchdog behind."""
    assert_emulated_nvml()
    monkeypatch.delenv(clocks.ALLOW_ENV, raising=False)
    yield fake_gpu
    guard._shutdown()  # while LLM_DVFS_NVML_LIBRARY still names the emulator
    fake_gpu.set_permission(True)
    fake_gpu.clear_failures()


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_dvfs.clocks", *args], env=env or _env(),
                          capture_output=True, text=True, timeout=timeout)


def _readline(p: subprocess.Popen, timeout_s: float = 60.0) -> str:
    ready, _, _ = select.select([p.stdout], [], [], timeout_s)
    assert ready, "child printed nothing"
    line = p.stdout.readline()
    assert line, f"child ended early: rc={p.wait()} stderr={p.stderr.read()}"
    return line


def _wait_until(pred, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)


def _pid_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


# ---- pure helpers --------------------------------------------------------------------------
def test_clock_event_reasons_decode_to_names():
    assert clocks.decode_clock_event_reasons(0x5) == ("gpu_idle", "sw_power_cap")
    assert clocks.decode_clock_event_reasons(0x40 | 0x1000) == ("hw_thermal_slowdown", "unknown_0x1000")
    assert clocks.decode_clock_event_reasons(0) == ()
    assert clocks.decode_clock_event_reasons(None) == ()
    assert clocks.nearest_supported(1203, range(345, 1981, 15)) == [1200, 1215]
    assert clocks.nearest_supported(1200, range(345, 1981, 15)) == [1200]
    assert clocks.nearest_supported(2100, range(345, 1981, 15)) == [1980]


# ---- validation ----------------------------------------------------------------------------
def test_validation_names_nearest_values_and_changes_nothing(gpu):
    ctl = ld.ClockController(0)  # validation needs no opt-in
    assert ctl.validate(1200.0, 1593) == (1200, 1593)
    with pytest.raises(ld.ConfigError, match=r"sm_mhz=1203 .* nearest supported: 1200 and 1215 MHz"):
        ctl.validate(1203)
    with pytest.raises(ld.ConfigError, match=r"345-1980 MHz in 15 MHz steps, 110 values"):
        ctl.validate(1203)
    with pytest.raises(ld.ConfigError, match=r"sm_mhz=2100 .* nearest supported: 1980 MHz"):
        ctl.validate(2100)
    with pytest.raises(ld.ConfigError, match=r"at memory clock 1593 MHz; nearest supported: 1410 MHz"):
        ctl.validate(1500, 1593)
    with pytest.raises(ld.ConfigError, match=r"mem_mhz=1600 .* nearest supported: 1593 and 2619 MHz"):
        ctl.validate(mem_mhz=1600)
    with pytest.raises(ld.ConfigError, match="whole MHz"):
        ctl.validate(1200.5)
    with pytest.raises(ld.ConfigError, match=r"outside the range 200-700 W .* nearest valid: 700 W"):
        ctl.validate_power_limit(800)
    with pytest.raises(ld.ConfigError, match=r"nearest valid: 200 W"):
        ctl.validate_power_limit(150)

    allowed = ld.ClockController(0, allow_clock_changes=True)
    with pytest.raises(ld.ConfigError, match="1200 and 1215"):
        allowed.lock(1203)
    with pytest.raises(ld.ConfigError, match="1200 and 1215"):
        with allowed.locked(1203, power_limit_w=300):  # validated before anything changes
            pass
    assert gpu.is_pristine()
    assert gpu.call_count("nvmlDeviceSetGpuLockedClocks") == 0
    assert gpu.call_count("nvmlDeviceSetPowerManagementLimit") == 0


# ---- the opt-in gate -----------------------------------------------------------------------
def test_setters_refuse_without_opt_in_and_reading_works(gpu):
    ctl = ld.ClockController(0)
    assert ctl.state().sm_mhz == 1980 and ctl.state().power_limit_w == 700.0
    for attempt in (lambda: ctl.lock(1200), lambda: ctl.set_power_limit(300),
                    lambda: ctl.locked(1200).__enter__()):
        with pytest.raises(ld.ClockChangeNotAllowed) as ei:
            attempt()
        msg = str(ei.value)
        assert "allow_clock_changes=True" in msg and "--allow-clock-changes" in msg
        assert "LLM_DVFS_ALLOW_CLOCK_CHANGES=1" in msg
    assert gpu.is_pristine()
    assert guard._guard().watchdog_pid() is None  # nothing was even prepared


def test_env_var_opts_in(gpu, monkeypatch):
    monkeypatch.setenv(clocks.ALLOW_ENV, "1")
    ctl = ld.ClockController(0)
    assert ctl.changes_allowed
    r = ctl.lock(1200)
    assert gpu.locked_clocks() == (1200, 1200) and r.settled and r.observed_sm_mhz == 1200
    ctl.reset()
    assert gpu.is_pristine()
    monkeypatch.setenv(clocks.ALLOW_ENV, "0")
    with pytest.raises(ld.ClockChangeNotAllowed):
        ctl.lock(1200)
    monkeypatch.setenv(clocks.ALLOW_ENV, "maybe")
    with pytest.raises(ld.ConfigError, match="LLM_DVFS_ALLOW_CLOCK_CHANGES='maybe'"):
        ld.ClockController(0)


def test_cli_flag_and_env_opt_in(gpu):
    probe = [sys.executable, "-c",
             "from llm_dvfs.control.clocks import read_state; print('SM', read_state(0).sm_mhz)"]
    r = _cli("lock", "--device", "0", "--sm-mhz", "1200", "--", *probe)
    assert r.returncode == 2
    assert "--allow-clock-changes" in r.stderr and "refusing to lock clocks" in r.stderr
    assert gpu.is_pristine()

    r = _cli("lock", "--device", "0", "--sm-mhz", "1200", "--allow-clock-changes", "--", *probe)
    assert r.returncode == 0, r.stderr
    assert "SM 1200" in r.stdout
    assert gpu.is_pristine()

    r = _cli("lock", "--sm-mhz", "1200", "--", *probe, env=_env(LLM_DVFS_ALLOW_CLOCK_CHANGES="1"))
    assert r.returncode == 0, r.stderr
    assert "SM 1200" in r.stdout
    assert gpu.is_pristine()


# ---- permissions ---------------------------------------------------------------------------
def test_no_permission_names_the_privilege_and_leaves_nothing_marked(gpu):
    ctl = ld.ClockController(0, allow_clock_changes=True)
    gpu.set_permission(False)
    with pytest.raises(ld.NoPermission) as ei:
        ctl.lock(1200)
    e = ei.value
    assert e.code == 4 and e.function == "nvmlDeviceSetGpuLockedClocks"
    assert "root" in str(e) and "CAP_SYS_ADMIN" in str(e) and "Nothing was changed" in str(e)
    with pytest.raises(ld.NoPermission, match="power limit to 300 W"):
        ctl.set_power_limit(300)
    assert gpu.is_pristine()
    assert guard._guard().snapshot() == {"devices": {}}  # the failed changes were un-marked
    gpu.set_permission(True)
    assert ctl.lock(1200).settled and gpu.locked_clocks() == (1200, 1200)
    ctl.reset()
    assert gpu.is_pristine()


# ---- locking, settling, restoring ----------------------------------------------------------
def test_locked_restores_what_it_found_after_an_exception(gpu):
    from llm_dvfs import _core
    _core.set_power_limit_w(0, 500.0)          # found: a non-default limit ...
    _core.set_applications_clocks(0, 1593, 1200)  # ... and non-default applications clocks
    ctl = ld.ClockController(0, allow_clock_changes=True)
    with pytest.raises(RuntimeError, match="boom"):
        with ctl.locked(sm_mhz=1305, mem_mhz=2619, power_limit_w=300) as lk:
            assert gpu.locked_clocks() == (1305, 1305)
            assert gpu.mem_locked_clocks() == (2619, 2619)
            assert gpu.power_limit_w() == 300.0
            assert lk.settled and lk.observed_sm_mhz == 1305 and lk.observed_mem_mhz == 2619
            assert lk.mem_method == "locked"
            assert lk.requested_row() == {"sm_mhz_requested": 1305.0, "mem_mhz_requested": 2619.0,
                                          "power_limit_w_requested": 300.0}
            raise RuntimeError("boom")
    assert gpu.locked_clocks() == (0, 0) and gpu.mem_locked_clocks() == (0, 0)
    assert gpu.power_limit_w() == 500.0
    assert gpu.app_clocks() == (1593, 1200)
    assert ctl.active == {"sm_mhz": None, "mem_mhz": None, "mem_method": None, "power_limit_w": None}


def test_nested_locked_blocks_restore_the_outer_lock(gpu):
    ctl = ld.ClockController(0, allow_clock_changes=True)
    with ctl.locked(1500):
        with ctl.locked(1200, power_limit_w=400) as inner:
            assert gpu.locked_clocks() == (1200, 1200) and inner.observed_sm_mhz == 1200
        assert gpu.locked_clocks() == (1500, 1500)
        assert gpu.power_limit_w() == 700.0
        assert ctl.state().sm_mhz == 1500
    assert gpu.is_pristine()


def test_memory_falls_back_to_applications_clocks(gpu):
    gpu.fail("nvmlDeviceSetMemoryLockedClocks", NVML_ERROR_NOT_SUPPORTED, -1)
    ctl = ld.ClockController(0, allow_clock_changes=True)
    with ctl.locked(1200, mem_mhz=1593) as lk:
        assert lk.mem_method == "applications"
        assert gpu.app_clocks() == (1593, 1200)
        assert gpu.mem_locked_clocks() == (0, 0)
        assert lk.observed_mem_mhz == 1593 and lk.observed_sm_mhz == 1200
    assert gpu.is_pristine()


def test_settle_reports_power_cap_and_observed_clocks(gpu):
    gpu.set_power_w(1200.0)  # a load that would draw 1200 W at 1980 MHz: capped at 700 W
    ctl = ld.ClockController(0, allow_clock_changes=True)
    with pytest.warns(clocks.ClockSettleWarning, match="sw_power_cap"):
        r = ctl.lock(1980, timeout_s=0.2)
    assert not r.settled
    assert "sw_power_cap" in r.reasons and r.observed.limiting_reasons == ("sw_power_cap",)
    assert r.observed_sm_mhz < 1980 and r.clock_event_reasons & 0x4
    with pytest.raises(clocks.ClockNotSettled) as ei:
        ctl.lock(1950, timeout_s=0.1, require_settled=True)
    assert ei.value.result.observed_sm_mhz < 1950
    r = ctl.lock(600)  # low enough to fit under the limit
    assert r.settled and r.observed_sm_mhz == 600 and r.reasons == ()
    ctl.reset()
    assert gpu.locked_clocks() == (0, 0)


def test_a_settle_loop_keeps_one_nvml_session(gpu):
    # wait_settled reads the state every poll_s; a session per read was an nvmlInit and an
    # nvmlShutdown each time (and a dlopen/dlclose of the library as the last session).
    from llm_dvfs import _core
    gpu.set_power_w(1200.0)  # capped below 1980 MHz: the loop polls until its timeout
    ctl = ld.ClockController(0)
    inits, shutdowns = gpu.call_count("nvmlInit"), gpu.call_count("nvmlShutdown")
    reads = gpu.call_count("nvmlDeviceGetPowerManagementLimitConstraints")  # one per state read
    with pytest.warns(clocks.ClockSettleWarning):
        r = ctl.wait_settled(1980, timeout_s=0.3, poll_s=0.01)
    assert not r.settled and r.observed_sm_mhz < 1980
    assert ctl.capabilities()["gpu_locked_clocks"] and ctl.state().power_limit_w == 700.0
    n_reads = gpu.call_count("nvmlDeviceGetPowerManagementLimitConstraints") - reads
    assert n_reads >= 10
    assert gpu.call_count("nvmlInit") - inits == 1  # the controller's session, once
    assert gpu.call_count("nvmlShutdown") == shutdowns and _core.nvml_refcount() == 1
    ctl.close()
    assert gpu.call_count("nvmlShutdown") == shutdowns + 1 and _core.nvml_refcount() == 0
    assert ctl.state().sm_mhz < 1980  # reopened on use
    ctl.close()


def test_capabilities_and_state(gpu):
    ctl = ld.ClockController(0)
    assert ctl.capabilities() == {"gpu_locked_clocks": True, "mem_locked_clocks": True,
                                  "applications_clocks": True, "power_limit": True}
    st = ctl.state()
    assert (st.sm_mhz, st.mem_mhz, st.app_sm_mhz, st.app_mem_mhz) == (1980, 2619, 1980, 2619)
    assert (st.power_limit_min_w, st.power_limit_max_w, st.power_limit_default_w) == (200.0, 700.0, 700.0)
    assert st.power_w == pytest.approx(300.0, rel=0.01)


@pytest.mark.fake_gpu(devices=2)
def test_two_gpus_are_guarded_independently(gpu, monkeypatch):
    c0 = ld.ClockController(0, allow_clock_changes=True)
    c1 = ld.ClockController("cuda:1", allow_clock_changes=True)
    c0.lock(1200)
    c1.lock(1500)
    assert gpu.locked_clocks(0) == (1200, 1200) and gpu.locked_clocks(1) == (1500, 1500)
    assert set(guard._guard().snapshot()["devices"]) == {"0", "1"}
    c1.reset()
    assert gpu.locked_clocks(1) == (0, 0) and gpu.locked_clocks(0) == (1200, 1200)
    guard.restore_all()  # what the exit handlers run
    assert gpu.is_pristine(0) and gpu.is_pristine(1)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    only = ld.ClockController(0, allow_clock_changes=True)  # CUDA ordinal 0 is NVML GPU 1
    assert only.nvml_index == 1
    with only.locked(1305):
        assert gpu.locked_clocks(1) == (1305, 1305) and gpu.locked_clocks(0) == (0, 0)
    assert gpu.is_pristine(1)
    with pytest.raises(ld.ConfigError, match="GPU 1 is not visible"):
        ld.ClockController(1)
    with pytest.raises(ld.ConfigError, match="got 'all'"):
        ld.ClockController("all")


@pytest.mark.changes_clocks
@pytest.mark.fake_gpu(devices=2, cuda_order="1,0")
def test_cuda_ordinal_locks_the_gpu_cuda_calls_by_that_ordinal(gpu):
    """CUDA's order is not NVML's (fastest-first vs PCI): ClockController(0) is NVML device 1."""
    assert_emulated_nvml()
    from llm_dvfs import _core
    loaded = _core.cuda_library_path()
    if loaded and loaded != os.environ["LLM_DVFS_CUDA_LIBRARY"]:
        pytest.skip(f"another CUDA driver library is loaded in this process ({loaded})")
    ctl = ld.ClockController(0, allow_clock_changes=True)
    assert (ctl.device, ctl.nvml_index) == (0, 1) and ctl.info.uuid.endswith("000000000001")
    with ctl.locked(1200):
        assert gpu.locked_clocks(1) == (1200, 1200) and gpu.locked_clocks(0) == (0, 0)
    assert gpu.is_pristine(0) and gpu.is_pristine(1)
    other = ld.ClockController("cuda:1", allow_clock_changes=True)
    assert other.nvml_index == 0
    with other.locked(1500):
        assert gpu.locked_clocks(0) == (1500, 1500) and gpu.locked_clocks(1) == (0, 0)
    assert gpu.is_pristine(0) and gpu.is_pristine(1)


# ---- the watchdog --------------------------------------------------------------------------
def test_watchdog_is_replaced_if_it_dies_and_restores_on_sigterm(gpu):
    ctl = ld.ClockController(0, allow_clock_changes=True)
    ctl.lock(1200)
    g = guard._guard()
    first = g.watchdog_pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)  # a killed watchdog cannot restore ...
    g._proc.wait(timeout=10)
    ctl.lock(1305)  # ... so the next change starts a new one
    second = g.watchdog_pid()
    assert second not in (None, first)
    os.kill(second, signal.SIGTERM)  # a terminated one restores before it goes
    g._proc.wait(timeout=10)
    assert gpu.locked_clocks() == (0, 0)
    ctl.reset()  # restoring again is harmless
    assert gpu.is_pristine()


_OWNER = r"""
import os, signal, sys, time
if "ignore-sigint" in sys.argv:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # e.g. a background job of a non-interactive shell
else:  # what a foreground process has, also when pytest itself was started with SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
import llm_dvfs as ld
from llm_dvfs.control import guard
ctl = ld.ClockController(0, allow_clock_changes=True)
ctl.lock(sm_mhz=1200, mem_mhz=1593)
ctl.set_power_limit(350)
extra = ""
if "fork" in sys.argv:
    pid = os.fork()   # a child that outlives us must not keep the watchdog's pipe open
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    extra = str(pid)
print("locked", guard._guard().watchdog_pid(), extra, flush=True)
if "exit" in sys.argv:
    sys.exit(0)
time.sleep(60)
"""


@pytest.mark.parametrize("fork", [False, True], ids=["plain", "with-forked-child"])
def test_sigkilled_owner_is_restored_within_a_second(gpu, fork):
    p = subprocess.Popen([sys.executable, "-c", _OWNER] + (["fork"] if fork else []),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    grandchild = None
    try:
        words = _readline(p).split()
        watchdog = int(words[1])
        grandchild = int(words[2]) if fork else None
        assert gpu.locked_clocks() == (1200, 1200)
        assert gpu.mem_locked_clocks() == (1593, 1593) and gpu.power_limit_w() == 350.0
        p.kill()
        p.wait()
        assert _wait_until(gpu.is_pristine, 1.0), (gpu.locked_clocks(), gpu.power_limit_w())
        assert _wait_until(lambda: _pid_gone(watchdog), 10.0)
    finally:
        if p.poll() is None:
            p.kill()
        if grandchild:
            try:
                os.kill(grandchild, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "exit"])
def test_owner_restores_on_signals_and_exit(gpu, how):
    p = subprocess.Popen([sys.executable, "-c", _OWNER] + (["exit"] if how == "exit" else []),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _readline(p)
        if how != "exit":
            p.send_signal(getattr(signal, how))
        p.wait(timeout=30)
        err = p.stderr.read()
        # the owner restored itself (the watchdog found nothing left to do)
        assert gpu.is_pristine()
        if how == "exit":
            assert p.returncode == 0 and "process exit: restored GPU" in err
        else:
            assert p.returncode != 0 and f"received {how}: restored GPU" in err
        assert "restored nothing" in err or "watchdog" not in err
    finally:
        if p.poll() is None:
            p.kill()


def test_ignored_sigint_stays_ignored_and_keeps_the_lock(gpu):
    p = subprocess.Popen([sys.executable, "-c", _OWNER, "ignore-sigint"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        _readline(p)
        p.send_signal(signal.SIGINT)
        time.sleep(0.5)
        # still running, still locked: no restore behind the back of a process that goes on
        assert p.poll() is None
        assert gpu.locked_clocks() == (1200, 1200)
        p.terminate()
        p.wait(timeout=30)
        assert gpu.is_pristine()
    finally:
        if p.poll() is None:
            p.kill()


# ---- the CLI -------------------------------------------------------------------------------
def test_cli_state_human_and_json(gpu):
    r = _cli()
    assert r.returncode == 0, r.stderr
    assert "GPU 0 (nvml 0): NVIDIA H100 80GB HBM3" in r.stdout
    assert "SM 1980 MHz, memory 2619 MHz" in r.stdout
    assert "settable: locked SM clocks, locked memory clocks, applications clocks, power limit" in r.stdout
    r = _cli("--json")
    assert r.returncode == 0, r.stderr
    (d,) = json.loads(r.stdout)["devices"]
    assert d["state"]["sm_mhz"] == 1980 and d["state"]["power_limit_w"] == 700.0
    assert d["state"]["reasons"] == [] and d["capabilities"]["gpu_locked_clocks"] is True
    assert len(d["supported_sm_mhz"]) == 110 and d["supported_mem_mhz"] == [2619, 1593]


def test_cli_without_a_driver_says_so(no_nvml_driver):
    env = _env()
    r = _cli(env=env)
    assert r.returncode == 0 and "no NVIDIA GPU found" in r.stdout
    assert "could not load the NVIDIA management library" in r.stdout
    r = _cli("--json", env=env)
    assert json.loads(r.stdout)["devices"] == []
    r = _cli("reset", "--device", "all", env=env)
    assert r.returncode == 1 and "no NVIDIA GPU found" in r.stderr


def test_cli_reset_recovers_a_crashed_run(gpu):
    from llm_dvfs import _core
    # What a run killed together with its watchdog would leave behind:
    _core.set_gpu_locked_clocks(0, 900, 900)
    _core.set_mem_locked_clocks(0, 1593, 1593)
    _core.set_applications_clocks(0, 1593, 1005)
    _core.set_power_limit_w(0, 250.0)
    assert not gpu.is_pristine()

    gpu.set_permission(False)
    r = _cli("reset", "--device", "all")
    assert r.returncode == 1 and "root" in r.stderr and "no permission" in r.stdout
    assert gpu.locked_clocks() == (900, 900)

    gpu.set_permission(True)
    r = _cli("reset", "--device", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ok"] is True
    assert out["reset"]["0"] == {"gpu_locked": "ok", "mem_locked": "ok", "app_clocks": "ok",
                                 "power_limit": "ok"}
    assert gpu.is_pristine()
    r = _cli("reset", "--device", "all")
    assert r.returncode == 0 and "power limit: already default" in r.stdout
    r = _cli("reset", "--device", "3")
    assert r.returncode == 2 and "GPU 3 is not visible" in r.stderr


def test_requested_row_uses_nan_for_as_found(gpu):
    ctl = ld.ClockController(0, allow_clock_changes=True)
    with ctl.locked(1200) as lk:
        row = lk.requested_row()
    assert row["sm_mhz_requested"] == 1200.0
    assert math.isnan(row["mem_mhz_requested"]) and math.isnan(row["power_limit_w_requested"])


def test_wait_settled_compares_the_power_limit(gpu):
    ctl = ld.ClockController(0, allow_clock_changes=True)
    other = ld.ClockController(0, allow_clock_changes=True)
    ctl.set_power_limit(400.0)
    assert ctl.wait_settled(None, timeout_s=0.2).settled          # the limit it set holds
    other.set_power_limit(450.0)                                  # someone else moves it
    with pytest.warns(clocks.ClockSettleWarning, match="power limit 400 W"):
        r = ctl.wait_settled(None, timeout_s=0.1)
    assert not r.settled and r.observed.power_limit_w == pytest.approx(450.0)
    assert ctl.wait_settled(None, timeout_s=0.1, power_limit_w=450.0).settled
    ctl.reset()
    other.reset()
    assert gpu.is_pristine()
