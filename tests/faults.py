"""Fault-injection harness for the run directory (as SQLite tests crash safety): kill a real sweep
with SIGKILL at seeded random instants, resume it each time, and check the invariants; corrupt
each kind of file of a finished run once and check that it is recovered or refused clearly.

Used by tests/test_faults.py. Everything runs against the emulated GPU (the caller's fake_gpu
fixture sets the environment the subprocesses inherit); clock changes are on, so a kill can hit
a locked clock point and the watchdog must put the clocks back.

Invariants after every kill (:func:`check_after_kill`):
  * the emulated GPU is back at its defaults (within :data:`PRISTINE_WITHIN_S`);
  * the directory is resumable: it has a manifest (``--resume`` continues), or nothing is at
    ``--out`` (starting again is the recovery); a leftover ``.NAME.creating-<pid>`` holds no cell;
  * no cell is half-finished: every marker's parts are intact (:func:`llm_dvfs.sweep.integrity.verify_cells`).
After the last resume (:func:`check_final`): the run tables equal an uninterrupted run's in
every column but timing and energy, no request is duplicated or lost (requests, tokens, power).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import pandas as pd

from llm_dvfs.sweep import integrity
from llm_dvfs.sweep.rundir import RunDir

#: A small grid: arch:tiny on short synthetic prompts, 2 clock points x 2 batch sizes = 4 cells,
#: clock changes on (against the emulator).
GRID = ["--models", "arch:tiny", "--tasks", "synthetic:max_words=24", "--samples", "3", "--max-new-tokens", "6",
        "--ner", "heuristic", "--idle-s", "0.2", "--warmup", "1", "--clocks", "1980,1200", "--batch-sizes", "1,2",
        "--allow-clock-changes", "-q"]
N_CELLS = 4
#: What an uninterrupted run and a killed-and-resumed one must agree on (no timing, no energy).
DETERMINISTIC = ["cell_id", "request_id", "model", "weights", "task", "sample_id", "repeat", "batch_size",
                 "batch_index", "sm_mhz_requested", "tokens_in", "tokens_out", "prompt", "output_text"]
PRISTINE_WITHIN_S = 10.0


def _default_sigint() -> None:
    # a foreground process's SIGINT, also when pytest was started with SIGINT ignored
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(out: Path, log: Path, resume: bool) -> subprocess.Popen:
    """Start the sweep of :data:`GRID` into ``out`` (or ``--resume out``), output to ``log``."""
    args = ["--resume", str(out), "--allow-clock-changes", "-q"] if resume else [*GRID, "--out", str(out)]
    with open(log, "ab") as f:
        return subprocess.Popen([sys.executable, "-m", "llm_dvfs.run", *args], stdout=f, stderr=subprocess.STDOUT,
                                preexec_fn=_default_sigint)


def run(out: Path, log: Path, resume: bool, timeout_s: float = 300.0) -> int:
    """Run the sweep (or its resume) to the end; returns the exit status."""
    p = start(out, log, resume)
    return p.wait(timeout_s)


def state_of(out: Path) -> str:
    """What lies at ``out`` (and next to it), in words: what a kill left behind."""
    left = RunDir(out).creating_leftovers()
    extra = f"; leftover {left[0].name}" if left else ""
    if not RunDir(out).has_manifest():
        return "nothing at --out" + extra
    rd = RunDir(out)
    try:
        status = rd.read_manifest().get("status")
    except Exception as e:  # reported, not raised: the invariants say whether it is acceptable
        return f"manifest unreadable ({e})"
    done = len(list(rd.cells_dir.glob("*.json")))
    markers = {p.name.split(".")[0] for p in rd.cells_dir.glob("*.json")}
    partial = sorted({p.name.split(".")[0] for p in rd.cells_dir.iterdir()} - markers) if rd.cells_dir.is_dir() else []
    tmp = [p.name for p in list(rd.cells_dir.glob(".*.tmp")) + list(rd.path.glob(".*.tmp"))]
    return (f"manifest '{status}', {done} of {N_CELLS} cells done"
            + (f", parts of {len(partial)} unfinished cell(s)" if partial else "")
            + (f", {len(tmp)} temporary file(s)" if tmp else "") + extra)


@dataclass
class Kill:
    """One kill point: which directory, after how long, and what it left behind."""

    run_index: int
    resume: bool
    delay_s: float
    killed: bool          # False: the process had already ended (its exit status in ``rc``)
    rc: Optional[int]
    left: str

    def line(self) -> str:
        what = "killed" if self.killed else f"ended first (rc {self.rc})"
        return (f"run {self.run_index} {'resume' if self.resume else 'start '} +{self.delay_s:5.2f} s "
                f"{what}: {self.left}")


def check_after_kill(out: Path, is_pristine: Callable[[], bool]) -> None:
    """The invariants that must hold at every instant a kill can leave (module docstring)."""
    deadline = time.monotonic() + PRISTINE_WITHIN_S
    while not is_pristine():
        assert time.monotonic() < deadline, "the emulated GPU was not restored after the kill"
        time.sleep(0.05)
    rd = RunDir(out)
    for p in rd.creating_leftovers():
        assert not (p / "cells").is_dir() or not any((p / "cells").iterdir()), f"{p} holds cells"
    if rd.has_manifest():
        m = rd.read_manifest()  # ConfigError if neither manifest.json nor its backup is whole
        assert m.get("tool") == "llm_dvfs.run"
        assert not integrity.verify_cells(rd.cells_dir, RunDir.TABLES), "a finished cell is damaged"
    else:
        assert not out.exists() or not any(out.iterdir()), f"{out} holds files but no manifest"


def kill_campaign(base: Path, n_kills: int, seed: int, max_delay_s: float,
                  is_pristine: Callable[[], bool]) -> tuple[list[Kill], list[Path]]:
    """SIGKILL sweeps ``n_kills`` times at seeded random instants in [0.1, ``max_delay_s``] s
    after their start, resuming after each kill; a run that completes before its kill instant is
    finished (recorded, not counted) and the next kill hits a new run. Returns every attempt and
    the run directories, all completed at the end."""
    rng = random.Random(seed)
    kills: list[Kill] = []
    runs = [base / "run0"]
    base.mkdir(parents=True, exist_ok=True)
    log = base / "campaign.log"
    while sum(k.killed for k in kills) < n_kills:
        assert len(kills) < 4 * n_kills, "the sweeps keep ending before the kill instants"
        out = runs[-1]
        resume = RunDir(out).has_manifest()
        p = start(out, log, resume)
        delay = rng.uniform(0.1, max_delay_s)
        try:
            rc: Optional[int] = p.wait(delay)
            killed = False
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait(30)
            rc, killed = None, True
        check_after_kill(out, is_pristine)
        kills.append(Kill(len(runs) - 1, resume, delay, killed, rc, state_of(out)))
        if not killed:
            assert rc == 0, f"the sweep failed (rc {rc}); see {log}"
            runs.append(base / f"run{len(runs)}")
    for out in runs:  # finish every run
        if not (RunDir(out).has_manifest() and RunDir(out).read_manifest().get("status") == "complete"):
            rc = run(out, log, RunDir(out).has_manifest())
            assert rc == 0, f"the final resume of {out} failed (rc {rc}); see {log}"
        check_after_kill(out, is_pristine)
    return kills, runs


def read_tables(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(run_dir / f"{t}.parquet") for t in RunDir.TABLES}


def check_final(run_dir: Path, ref: dict[str, pd.DataFrame]) -> None:
    """The run's tables equal the uninterrupted run's ``ref`` (no timing/energy), nothing duplicated or lost."""
    got = read_tables(run_dir)
    req, want = got["requests"], ref["requests"]
    assert req["request_id"].is_unique, "a request is duplicated"
    assert set(req["request_id"]) == set(want["request_id"]), "a request is lost (or extra)"
    cols = DETERMINISTIC + sorted(c for c in want.columns if c.startswith("feat_"))
    pd.testing.assert_frame_equal(req[cols].reset_index(drop=True), want[cols].reset_index(drop=True))
    tok, tok_ref = got["tokens"], ref["tokens"]
    assert len(tok) == len(tok_ref) and not tok.duplicated(["request_id", "token_index"]).any()
    assert set(tok["request_id"]) == set(tok_ref["request_id"])
    assert set(got["power"]["cell_id"]) == set(ref["power"]["cell_id"])
    assert len(pd.read_csv(run_dir / "requests.csv")) == len(want)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete" and m["cells_done"] == N_CELLS


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def truncate(path: Path, size: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(min(size, max(path.stat().st_size - 1, 0)))


def garble(path: Path) -> None:
    path.write_bytes(b"\x00{not json")
