"""Crash consistency of the run directory (issue 14), proven by fault injection (tests/faults.py):
SIGKILL at seeded random instants with a resume after each, every kind of file damaged once,
one owner per run directory, every signal ending the same way, clear errors instead of tracebacks.

The kill and damage counts and what each left behind are written to the terminal (the
``faults:`` lines), also when the tests pass.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import faults
from fakes.fake_gpu import assert_emulated_nvml
from llm_dvfs.analysis.rundata import load_run
from llm_dvfs.errors import DataNotFound
from llm_dvfs.run import main
from llm_dvfs.sweep import lock as run_lock
from llm_dvfs.sweep import signals
from llm_dvfs.sweep.rundir import RunDir

pytestmark = pytest.mark.changes_clocks


def _say(request: pytest.FixtureRequest, lines: list[str]) -> None:
    """Write to the terminal past output capture: the counts are the closing note's."""
    tr = request.config.pluginmanager.getplugin("terminalreporter")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if tr is None or capman is None:  # pragma: no cover - e.g. xdist workers: the captured output
        print("\n".join(f"faults: {line}" for line in lines))
        return
    with capman.global_and_fixture_disabled():
        tr.write_line("")
        for line in lines:
            tr.write_line(f"faults: {line}")


@pytest.fixture
def reference(fake_gpu, tmp_path) -> tuple[Path, dict[str, pd.DataFrame], float]:
    """An uninterrupted run of faults.GRID: its directory, tables and wall time (s)."""
    assert_emulated_nvml()
    fake_gpu.set_power_w(300.0)
    ref = tmp_path / "ref"
    t0 = time.monotonic()
    assert faults.run(ref, tmp_path / "ref.log", resume=False) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    wall_s = time.monotonic() - t0
    assert fake_gpu.is_pristine()
    return ref, faults.read_tables(ref), wall_s


def _campaign(request, fake_gpu, tmp_path, reference, n_kills: int, seed: int) -> None:
    ref, tables, wall_s = reference
    # instants within 90 % of an uninterrupted run's wall time (start-up included)
    kills, runs = faults.kill_campaign(tmp_path / "kills", n_kills, seed, max_delay_s=0.9 * wall_s,
                                       is_pristine=fake_gpu.is_pristine)
    for out in runs:
        faults.check_final(out, tables)
    assert sum(k.killed for k in kills) == n_kills
    _say(request, [f"{n_kills} kill points (seed {seed}; {len(kills) - n_kills} more sweeps ended before their "
                   f"instant), {len(runs)} run directories, each resumed to tables equal to an uninterrupted "
                   "run's; the emulated GPU was at its defaults after every kill:"]
         + [f"  {k.line()}" for k in kills])


def test_sigkill_at_random_instants_then_resume_gives_the_uninterrupted_tables(request, fake_gpu, tmp_path,
                                                                               reference):
    _campaign(request, fake_gpu, tmp_path, reference, n_kills=6, seed=14)


@pytest.mark.slow
def test_sigkill_at_many_random_instants(request, fake_gpu, tmp_path, reference):
    _campaign(request, fake_gpu, tmp_path, reference, n_kills=24, seed=1414)


# ---------------------------------------------------------------------------------------------
# every kind of file damaged once
# ---------------------------------------------------------------------------------------------
def _resume(run: Path) -> int:
    return main(["--resume", str(run), "--allow-clock-changes", "-q"])


def _a_cell(run: Path) -> str:
    return sorted(p.name.split(".")[0] for p in (run / "cells").glob("*.json"))[1]


def test_each_kind_of_damage_is_recovered_or_refused_with_the_recovery_command(request, fake_gpu, tmp_path,
                                                                               reference, capsys):
    ref, tables, _ = reference
    results: list[str] = []

    def case(name: str, damage, expect_rc: int = 0, says: tuple[str, ...] = (), rerun: bool = False) -> Path:
        run = faults.copy_run(ref, tmp_path / name)
        before = {p.name: p.stat().st_mtime_ns for p in (run / "cells").glob("*.json")}
        what = damage(run)
        capsys.readouterr()
        rc = _resume(run)
        err = capsys.readouterr().err
        assert rc == expect_rc, (name, err[-2000:])
        for s in says:
            assert s in err, (name, s, err[-2000:])
        assert "Traceback" not in err
        assert fake_gpu.is_pristine()
        if rc == 0:
            faults.check_final(run, tables)
            after = {p.name: p.stat().st_mtime_ns for p in (run / "cells").glob("*.json")}
            rerun_cells = sorted(k for k in after if before.get(k) != after[k])
            assert bool(rerun_cells) == rerun, (name, rerun_cells)
            left = f"recovered (rc 0{', its cell re-run' if rerun_cells else ''}, tables equal the reference)"
        else:
            left = f"refused, rc {rc}: {err.strip().splitlines()[-1][:150]}"
        results.append(f"  {name}: {what} -> {left}")
        return run

    # a part file truncated (the reproduction): reported by name, quarantined, re-run
    def part(run: Path) -> str:
        p = run / "cells" / f"{_a_cell(run)}.requests.parquet"
        faults.truncate(p)
        return f"truncate -s 100 cells/{p.name}"
    run = case("part-parquet", part, says=("damaged part", "size 100 bytes"), rerun=True)
    m = json.loads((run / "manifest.json").read_text())
    assert len(m["repairs"]) == 1 and m["repairs"][0]["problem"].startswith("size 100 bytes")
    assert len(list((run / "damaged").iterdir())) == 4  # the marker and the three parts, kept

    def part_flip(run: Path) -> str:  # same size, one byte changed: only the digest sees it
        p = run / "cells" / f"{_a_cell(run)}.tokens.parquet"
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0xFF
        p.write_bytes(bytes(b))
        return f"one byte flipped in cells/{p.name}"
    case("part-byte-flip", part_flip, says=("SHA-256 differs",), rerun=True)

    def part_gone(run: Path) -> str:
        p = run / "cells" / f"{_a_cell(run)}.power.parquet"
        p.unlink()
        return f"rm cells/{p.name}"
    case("part-missing", part_gone, rerun=True)

    def marker(run: Path) -> str:
        p = run / "cells" / f"{_a_cell(run)}.json"
        faults.garble(p)
        return f"garbage in cells/{p.name}"
    case("marker-json", marker, says=("marker unreadable",), rerun=True)

    def legacy_marker(run: Path) -> str:  # a marker written before the digests: the footer is read
        m = run / "cells" / f"{_a_cell(run)}.json"
        info = json.loads(m.read_text())
        del info["parts"]
        m.write_text(json.dumps(info))
        faults.truncate(run / "cells" / f"{_a_cell(run)}.power.parquet")
        return "a marker without digests (older runs) and its power part truncated"
    case("legacy-marker", legacy_marker, says=("unreadable Parquet",), rerun=True)

    def manifest(run: Path) -> str:
        faults.truncate(run / "manifest.json", 40)
        return "manifest.json truncated to 40 bytes"
    case("manifest", manifest, says=("recovered the manifest from manifest.json.bak",))

    def manifest_both(run: Path) -> str:
        faults.truncate(run / "manifest.json", 40)
        faults.garble(run / "manifest.json.bak")
        return "manifest.json truncated and manifest.json.bak garbled"
    case("manifest-and-backup", manifest_both, expect_rc=2, says=("the manifest cannot be read", "another --out"))

    for t in ("requests", "tokens", "power"):
        def table(run: Path, t=t) -> str:
            faults.truncate(run / f"{t}.parquet")
            if t == "requests":  # the report refuses it, naming the command that rebuilds it
                with pytest.raises(DataNotFound, match=f"rebuilt .* --resume {run} --allow-clock-changes"):
                    load_run(run)
            return f"{t}.parquet truncated"
        case(f"{t}-table", table)

    def csv(run: Path) -> str:
        faults.truncate(run / "requests.csv", 30)
        return "requests.csv truncated"
    case("requests-csv", csv)

    def lockfile(run: Path) -> str:
        faults.garble(run / run_lock.LOCK_NAME)
        return "garbage in .lock"
    run = case("lock-file", lockfile, says=("ended without releasing",))
    assert run_lock.read_owner(run / run_lock.LOCK_NAME)["released_at"]

    def stray_tmp(run: Path) -> str:
        (run / "cells" / ".x.requests.parquet.abc.tmp").write_bytes(b"PAR1")
        (run / "cells" / "ffffffffffffffff.requests.parquet").write_bytes(b"PAR1")  # a cell killed mid-write
        return "a stray temporary file and a part of an unfinished cell in cells/"
    run = case("stray-files", stray_tmp)
    assert not list((run / "cells").glob(".*.tmp")) and not list((run / "cells").glob("ffff*"))

    def runlog(run: Path) -> str:
        faults.truncate(run / "run.log", 10)
        return "run.log truncated"
    case("run-log", runlog)

    # a start killed before its directory existed: the leftover is named, then removed by a start
    left = tmp_path / ".early.creating-999999"
    left.mkdir()
    (left / "manifest.json").write_text("{}")
    (left / run_lock.LOCK_NAME).write_text('{"pid": 999999}')
    capsys.readouterr()
    assert _resume(tmp_path / "early") == 2
    err = capsys.readouterr().err
    assert ".early.creating-999999 holds nothing measured" in err and "run the original command again" in err
    assert main([*faults.GRID, "--out", str(tmp_path / "early")]) == 0
    assert "removed" in capsys.readouterr().err and not left.exists()
    faults.check_final(tmp_path / "early", tables)
    results.append("  creating-leftover: .NAME.creating-<pid> of a killed start -> --resume refused (rc 2, "
                   "says to run the original command); the original command removed it and ran (rc 0)")
    _say(request, [f"{len(results)} kinds of damage tried:"] + results)


# ---------------------------------------------------------------------------------------------
# one owner
# ---------------------------------------------------------------------------------------------
_HOLDER = r"""
import sys, time
from llm_dvfs.sweep import lock
lk = lock.RunLock(sys.argv[1]).acquire(["holder"])
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_owner_is_refused_and_a_killed_owner_is_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(run_lock.RunDirInUse, match=rf"run directory {run} is in use by pid {p.pid} on host "
                                                          rf"{os.uname().nodename} since 20\d\d-.*\(command: holder\)"):
            run_lock.RunLock(run).acquire()
        assert run_lock.is_locked(run)
    finally:
        p.kill()
        p.wait()
    # the kernel dropped the dead owner's flock: taken over, and the dead owner is reported
    lk = run_lock.RunLock(run).acquire(["me"])
    try:
        assert lk.previous["pid"] == p.pid and "released_at" not in lk.previous
    finally:
        lk.release()
    rec = run_lock.read_owner(run / run_lock.LOCK_NAME)
    assert rec["pid"] == os.getpid() and rec["released_at"]
    again = run_lock.RunLock(run).acquire()  # a clean release leaves no "previous owner"
    assert again.previous is None
    again.release()


def test_two_resumes_of_one_run_one_is_refused(fake_gpu, tmp_path, reference, capsys):
    ref, tables, _ = reference
    run = faults.copy_run(ref, tmp_path / "two")
    faults.truncate(run / "cells" / f"{_a_cell(run)}.requests.parquet")  # so that the resume has work
    p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert _resume(run) == 2
        err = capsys.readouterr().err
        assert f"is in use by pid {p.pid}" in err and "Traceback" not in err
        assert not (run / "damaged").exists()  # the refused resume changed nothing
    finally:
        p.kill()
        p.wait()
    assert _resume(run) == 0
    faults.check_final(run, tables)


# ---------------------------------------------------------------------------------------------
# every signal ends the same way
# ---------------------------------------------------------------------------------------------
def _sweep(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llm_dvfs.run", *faults.GRID, "--clocks", "1980,1500,1200",
                             "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=faults._default_sigint)


def _wait_cell(out: Path, p: subprocess.Popen) -> None:
    deadline = time.monotonic() + 240
    while not list((out / "cells").glob("*.json")):
        assert p.poll() is None and time.monotonic() < deadline, "the sweep ended or stalled"
        time.sleep(0.01)


@pytest.mark.parametrize("sig,status", [("SIGINT", 130), ("SIGTERM", 143), ("SIGHUP", 129)])
def test_each_signal_restores_marks_interrupted_and_prints_the_resume_command(fake_gpu, tmp_path, sig, status):
    out = tmp_path / sig
    p = _sweep(out)
    _wait_cell(out, p)
    p.send_signal(getattr(signal, sig))
    printed, _ = p.communicate(timeout=120)
    assert p.returncode == status, printed[-3000:]
    assert f"interrupted ({sig})" in printed and f"--resume {out} --allow-clock-changes" in printed
    assert "Traceback" not in printed
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "interrupted" and m["interruptions"][-1]["signal"] == sig
    assert fake_gpu.is_pristine()
    assert not run_lock.is_locked(out)


def test_an_early_interrupt_leaves_nothing_or_a_resumable_directory(request, fake_gpu, tmp_path):
    """SIGTERM at instants from start-up to the first cells: either nothing at --out and the
    message says to run the command again, or a directory that the printed command resumes."""
    seen = []
    for i, delay_s in enumerate((0.3, 1.2, 2.4, 3.6)):
        out = tmp_path / f"early{i}"
        p = _sweep(out)
        time.sleep(delay_s)
        p.send_signal(signal.SIGTERM)
        printed, _ = p.communicate(timeout=120)
        assert fake_gpu.is_pristine()
        assert not RunDir(out).creating_leftovers()
        if p.returncode == 0:  # it finished first (a fast machine): nothing to check
            seen.append(f"+{delay_s} s: finished first")
            continue
        if p.returncode == -signal.SIGTERM:  # still importing: handlers are installed before any write
            assert not out.exists()
            seen.append(f"+{delay_s} s: died during start-up (default SIGTERM), nothing at --out")
            continue
        assert p.returncode == 143 and "Traceback" not in printed, printed[-3000:]
        if RunDir(out).has_manifest():
            assert f"--resume {out} --allow-clock-changes" in printed
            assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
            cmd = ["--resume", str(out), "--allow-clock-changes", "-q"]
            seen.append(f"+{delay_s} s: resumable directory")
        else:
            assert "nothing was written. Run the same command again" in printed and not out.exists()
            cmd = [*faults.GRID, "--clocks", "1980,1500,1200", "--out", str(out)]
            seen.append(f"+{delay_s} s: nothing at --out")
        assert main(cmd) == 0
    _say(request, ["SIGTERM at start-up: " + "; ".join(seen)])


def test_repeated_signals_never_print_a_traceback(fake_gpu, tmp_path):
    out = tmp_path / "many"
    p = _sweep(out)
    _wait_cell(out, p)
    for _ in range(3):
        p.send_signal(signal.SIGINT)
        time.sleep(0.05)
    printed, _ = p.communicate(timeout=120)
    assert p.returncode == 130, printed[-3000:]
    assert "Traceback" not in printed and "Exception ignored" not in printed
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert fake_gpu.is_pristine()


def test_handlers_are_restored_and_ignored_signals_stay_ignored():
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    before_int = before[signal.SIGINT]
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with signals.handled() as h:
            assert signal.getsignal(signal.SIGTERM) is h and signal.getsignal(signal.SIGINT) is h
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN  # nohup's: left alone
            with pytest.raises(signals.SignalExit) as e:
                h(signal.SIGTERM, None)
            assert e.value.exit_status == 143 and signals.exit_status(KeyboardInterrupt()) == 130
            with pytest.raises(signals.SignalExit):
                signals.raise_pending()  # the first one was not caught (acknowledged) yet
            signals.acknowledge()
            signals.raise_pending()
            h(signal.SIGINT, None)  # while shutting down: swallowed
        assert h.later == 1
        assert signal.getsignal(signal.SIGINT) is h  # after a signal: shutdown mode to the end
    finally:
        for s, prev in before.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
    with signals.handled() as h2:
        pass
    assert signal.getsignal(signal.SIGINT) is before_int and not h2.active


def test_a_signal_inside_a_finalizer_is_raised_at_the_next_batch_not_dropped():
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    got = []

    class Finalized:
        def __del__(self):
            h(signal.SIGTERM, sys._getframe())  # as the signal would arrive: in a __del__
            got.append("no exception here")

    try:
        with signals.handled() as h:
            obj = Finalized()
            del obj  # an exception raised in __del__ would be printed and dropped
            assert got == ["no exception here"] and h.signum == signal.SIGTERM
            with pytest.raises(signals.SignalExit) as e:
                signals.raise_pending()  # what the sweep calls after each batch and cell
            assert e.value.exit_status == 143
            signals.acknowledge()
    finally:
        for s, prev in before.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------
# clear errors, rc 2, no traceback
# ---------------------------------------------------------------------------------------------
def test_clock_lock_of_a_missing_command_restores_and_says_so(fake_gpu):
    r = subprocess.run([sys.executable, "-m", "llm_dvfs.clocks", "lock", "--sm-mhz", "1200", "--allow-clock-changes",
                        "--", "/nonexistent/cmd"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot run '/nonexistent/cmd': No such file or directory; the clocks were restored" in r.stderr
    assert fake_gpu.is_pristine()


def test_report_errors_are_clear(tmp_path, reference):
    from llm_dvfs.report import main as report_main

    ref, _, _ = reference
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    r = subprocess.run([sys.executable, "-m", "llm_dvfs.report", str(ref), "--out", str(blocker / "rep")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"cannot write the report to '{blocker / 'rep'}': Not a directory" in r.stderr
    if os.geteuid() != 0:  # root writes into read-only directories
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        assert report_main([str(ref), "--out", str(ro / "rep")]) == 2
    # a run killed before its first cell: nothing to report yet, and how to continue
    early = tmp_path / "early"
    early.mkdir()
    for name in ("manifest.json", "manifest.json.bak"):
        (early / name).write_text((ref / name).read_text())
    with pytest.raises(DataNotFound, match=f"no finished cell yet .*--resume {early} --allow-clock-changes"):
        load_run(early)
    assert RunDir(early).has_manifest()
