"""Parallel sweeps on the emulated GPUs (``--gpus``, sweep/parallel.py and sweep/worker.py): the
rows of a 4-GPU sweep are those of the 1-GPU sweep, each measured on its own GPU; a worker killed
mid-cell, the driver killed then ``--resume``, Ctrl-C; models over two GPUs; GPUs of two models;
``--ray`` without Ray. The Ray backend's tests are in tests/test_ray.py."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import assert_emulated_nvml
from fakes.fake_gpu import model_power_w
from llm_dvfs import sweep
from llm_dvfs.run import main
from llm_dvfs.sweep.parallel import _choose, _WorkerState

SMALL = ["--models", "arch:tiny", "--tasks", "synthetic:max_words=24", "--samples", "3",
         "--max-new-tokens", "6", "--ner", "heuristic", "--idle-s", "0.2", "--warmup", "1"]
# what must not depend on where a cell ran (timing, energy and GPU identity may)
DETERMINISTIC = ["cell_id", "request_id", "model", "weights", "task", "sample_id", "repeat", "batch_size",
                 "batch_index", "sm_mhz_requested", "sm_mhz_observed", "tokens_in", "tokens_out", "prompt",
                 "output_text", "stop_reason"]
BASE_W = [200.0, 300.0, 400.0, 500.0]  # each emulated GPU draws its own power: rows show where they ran


def _gpu_of(uuid: str) -> int:
    return int(uuid.rsplit("-", 1)[1], 16)  # the emulator's device i has UUID ...-00000000000i


def _read(run: Path) -> tuple[pd.DataFrame, dict]:
    return pd.read_parquet(run / "requests.parquet"), json.loads((run / "manifest.json").read_text())


def _powers(fake_gpu) -> None:
    for i, w in enumerate(BASE_W):
        fake_gpu.set_power_w(w, device=i)


def _pristine(fake_gpu, timeout_s: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not all(fake_gpu.is_pristine(i) for i in range(4)):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too (its parent, the killed driver, is gone; init reaps it)
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait(cond, proc: subprocess.Popen, what: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert proc.poll() is None, f"the sweep ended early (exit {proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
        time.sleep(0.01)


def _workers(run: Path) -> list[dict]:
    try:
        return json.loads((run / "manifest.json").read_text()).get("workers", [])
    except (OSError, ValueError):
        return []


def kill_a_worker_mid_cell(out: Path, proc: subprocess.Popen, what: str, timeout_s: float = 240.0):
    """Wait for 4 workers (``what``) and a started cell, SIGKILL that cell's worker, wait for the
    sweep to finish (exit 0). Returns (the victim's manifest entry, the log's "died during cell"
    match, whose group 1 is the re-run cell's id)."""
    try:
        _wait(lambda: len(_workers(out)) == 4, proc, what, timeout_s=timeout_s)
        started = re.compile(r"cell (\d+) started on worker (\d) ")
        _wait(lambda: started.search((out / "run.log").read_text()), proc, "a started cell")
        m = started.search((out / "run.log").read_text())
        victim = next(w for w in _workers(out) if w["worker"] == int(m.group(2)))
        os.kill(victim["pid"], signal.SIGKILL)
        assert proc.wait(300) == 0, (out / "run.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    log = (out / "run.log").read_text()
    died = re.search(rf"worker {victim['worker']} \(GPU \d on .*\) died during cell (\S+) .*re-queued", log)
    assert died, log[-3000:]
    return victim, died


def _check_per_gpu_power(req: pd.DataFrame) -> None:
    """Each row's power is that of the GPU it names, at the clock it requested."""
    for _, r in req.iterrows():
        i = _gpu_of(r["gpu_uuid"])
        assert r["avg_power_w"] == pytest.approx(model_power_w(BASE_W[i], r["sm_mhz_requested"]), rel=0.03), r["cell_id"]


def rows_of_one_and_many(fake_gpu, tmp_path: Path, backend: list[str], settle_s: float):
    """The same small clock sweep on GPU 0 alone and with ``backend`` (``--gpus all``, ``--ray
    local``) on 4 emulated GPUs; checks their deterministic and feature columns are equal and
    every GPU is restored. Returns (one-GPU rows, parallel rows, parallel manifest)."""
    assert_emulated_nvml()
    _powers(fake_gpu)
    args = [*SMALL, "--clocks", "1980,1500", "--batch-sizes", "1,2", "--allow-clock-changes", "-q"]
    assert main([*args, "--gpus", "0", "--out", str(tmp_path / "one")]) == 0
    assert main([*args, *backend, "--out", str(tmp_path / "many")]) == 0
    assert _pristine(fake_gpu, settle_s)
    one, _ = _read(tmp_path / "one")
    many, man = _read(tmp_path / "many")
    cols = DETERMINISTIC + sorted(c for c in one.columns if c.startswith("feat_"))
    pd.testing.assert_frame_equal(many[cols], one[cols])
    return one, many, man


@pytest.mark.changes_clocks
@pytest.mark.fake_gpu(devices=4)
def test_four_gpus_give_the_rows_of_one(fake_gpu, tmp_path):
    one, four, man = rows_of_one_and_many(fake_gpu, tmp_path, ["--gpus", "all"], settle_s=0.0)
    assert len(four) == len(one) == 12 and four["request_id"].is_unique
    # the 1-GPU run ran on GPU 0 alone; the 4-GPU run's rows name the GPU they ran on, whose power they show
    assert set(one["gpu_uuid"]) == {"GPU-fa4e0000-0000-0000-0000-000000000000"}
    _check_per_gpu_power(one)
    _check_per_gpu_power(four)
    assert set(four["host"]) == {os.uname().nodename}
    assert four.groupby("cell_id")["gpu_uuid"].nunique().max() == 1  # a cell runs on one GPU
    # the manifest lists every worker: host, GPU UUID, pid; the 4 GPUs each measured an idle baseline
    assert sorted(_gpu_of(w["gpu_uuids"][0]) for w in man["workers"]) == [0, 1, 2, 3]
    assert all(w["host"] == os.uname().nodename and w["pid"] > 0 for w in man["workers"])
    assert man["status"] == "complete" and man["cells_done"] == 4 and man["gpu_models"] == ["NVIDIA H100 80GB HBM3"]
    for run in man["clock_point_runs"]:
        i = _gpu_of(run["gpu_uuid"])
        assert run["idle_power_w"] == pytest.approx(model_power_w(BASE_W[i], run["sm_mhz_requested"]), rel=0.03)
    log = (tmp_path / "many" / "run.log").read_text()
    assert re.search(r"worker \d \(GPU \d on .*\) GPU-fa4e\S+: \d cells, busy [\d.]+ s of [\d.]+ s \(\d+ %\)", log)
    assert "ETA" in log
    pw = pd.read_parquet(tmp_path / "many" / "power.parquet")
    assert set(pw["device"]) <= {0, 1, 2, 3} and len(set(pw["device"])) >= 2  # the driver's numbering


def _sweep(args: list[str], out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llm_dvfs.run", *args, "--out", str(out)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


LONGER = [*SMALL, "--samples", "4", "--max-new-tokens", "12", "--clocks", "1980,1500,1200", "--batch-sizes", "1,2",
          "--allow-clock-changes", "-q", "--gpus", "all"]


@pytest.mark.changes_clocks
@pytest.mark.fake_gpu(devices=4)
def test_a_worker_killed_mid_cell_leaves_no_duplicate_and_no_lost_row(fake_gpu, tmp_path):
    assert_emulated_nvml()
    _powers(fake_gpu)
    out = tmp_path / "run"
    proc = _sweep(LONGER, out, tmp_path / "out.log")
    victim, died = kill_a_worker_mid_cell(out, proc, "4 ready workers")
    req, man = _read(out)
    assert len(req) == 6 * 4 and req["request_id"].is_unique  # 3 clocks x 2 batch sizes, 4 samples each
    assert man["status"] == "complete" and man["cells_done"] == 6
    assert len(list((out / "cells").glob("*.json"))) == 6
    tok = pd.read_parquet(out / "tokens.parquet")
    assert tok["request_id"].nunique() == len(req) and len(tok) == req["tokens_out"].sum()
    # the cell it was measuring ran again on another GPU; the killed worker's watchdog restored its GPU
    rerun = req[req["cell_id"] == died.group(1)]
    assert len(rerun) == 4 and victim["gpu_uuids"][0] not in set(rerun["gpu_uuid"])
    lost = next(w for w in man["workers"] if w["worker"] == victim["worker"])
    assert "killed by signal 9" in lost["lost"]
    assert _pristine(fake_gpu)
    _check_per_gpu_power(req)


@pytest.mark.changes_clocks
@pytest.mark.fake_gpu(devices=4)
def test_driver_killed_then_resume_completes_the_run(fake_gpu, tmp_path):
    assert_emulated_nvml()
    _powers(fake_gpu)
    out = tmp_path / "run"
    proc = _sweep(LONGER, out, tmp_path / "out.log")
    try:
        _wait(lambda: len(list((out / "cells").glob("*.json"))) >= 2, proc, "2 finished cells")
        pids = [w["pid"] for w in _workers(out)]
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert 2 <= len(before) < 6
    # the workers die with their driver, and their GPUs are restored
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(p) for p in pids)
    assert _pristine(fake_gpu)
    assert main(["--resume", str(out), "--allow-clock-changes", "-q"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert len(after) == 6 and all(after[k] == v for k, v in before.items())  # finished cells kept
    req, man = _read(out)
    assert man["status"] == "complete" and len(man["resumes"]) == 1
    assert len(req) == 24 and req["request_id"].is_unique
    assert sorted(req["cell_id"].unique()) == sorted(c.cell_id for c in sweep.prepare(
        sweep.resume_config(out, {"allow_clock_changes": True}), resume=out).cells)
    assert len(man["workers"]) == 8  # 4 of the first invocation, 4 of the resume
    _check_per_gpu_power(req)
    assert _pristine(fake_gpu, 0.0)


@pytest.mark.changes_clocks
@pytest.mark.fake_gpu(devices=4)
def test_ctrl_c_stops_the_workers_and_restores_every_gpu(fake_gpu, tmp_path):
    assert_emulated_nvml()
    out = tmp_path / "run"
    # SIGINT at its default in the driver, also when this test runs with SIGINT ignored (a
    # background job): Python then installs its KeyboardInterrupt handler, as in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "llm_dvfs.run", *LONGER, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait(lambda: len(list((out / "cells").glob("*.json"))) >= 1, proc, "a finished cell")
    pids = [w["pid"] for w in _workers(out)]
    proc.send_signal(signal.SIGINT)
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, printed
    assert f"--resume {out} --allow-clock-changes" in printed
    assert not any(_alive(p) for p in pids)
    assert _pristine(fake_gpu, 10.0)
    req, man = _read(out)
    assert man["status"] == "interrupted" and 1 <= man["cells_done"] < 6
    assert len(req) == 4 * man["cells_done"] and req["request_id"].is_unique


@pytest.mark.fake_gpu(devices=4)
def test_a_model_over_two_gpus_is_measured_on_both(fake_gpu, tmp_path):
    _powers(fake_gpu)
    out = tmp_path / "pairs"
    assert main([*SMALL, "--gpus", "all", "--gpus-per-model", "2", "--out", str(out), "-q"]) == 0
    req, man = _read(out)
    assert len(man["workers"]) == 2 and sorted(len(w["gpu_uuids"]) for w in man["workers"]) == [2, 2]
    pairs = {"GPU-fa4e0000-0000-0000-0000-000000000000,GPU-fa4e0000-0000-0000-0000-000000000001": BASE_W[0] + BASE_W[1],
             "GPU-fa4e0000-0000-0000-0000-000000000002,GPU-fa4e0000-0000-0000-0000-000000000003": BASE_W[2] + BASE_W[3]}
    assert set(req["gpu_uuid"]) <= set(pairs)
    for _, r in req.iterrows():  # observe mode, 1980 MHz: the rows' power is the sum of the pair's
        assert r["avg_power_w"] == pytest.approx(pairs[r["gpu_uuid"]], rel=0.03)
    marker = json.loads(next((out / "cells").glob("*.json")).read_text())
    per = marker["energy_j_by_gpu"]
    a, b = (per[u] for u in marker["worker"]["gpu_uuids"])
    i = _gpu_of(marker["worker"]["gpu_uuids"][0])
    assert a / b == pytest.approx(BASE_W[i] / BASE_W[i + 1], rel=0.03)
    assert a + b == pytest.approx(marker["energy_j"], rel=1e-6)
    for u, j in marker["energy_j_counter_by_gpu"].items():  # each GPU's window vs its own counter
        assert per[u] == pytest.approx(j, rel=0.03)


@pytest.mark.fake_gpu(devices=4, device_names=["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3",
                                                "NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-80GB"])
def test_gpus_of_two_models_run_the_grid_once_per_model(fake_gpu, tmp_path):
    out = tmp_path / "mixed"
    cfg = sweep.load_config(None, {"models": "arch:tiny", "tasks": "synthetic:max_words=24", "samples": 2,
                                   "max_new_tokens": 4, "ner": "heuristic", "idle_s": 0.1, "batch_sizes": "1,2",
                                   "gpus": "all", "out": str(out)})
    plan = sweep.prepare(cfg)
    assert len(plan.cells) == 4 and {c.gpu_model for c in plan.cells} == {"NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"}
    assert all(c.cell_id.endswith("|" + c.gpu_model) for c in plan.cells)
    assert main(["--models", "arch:tiny", "--tasks", "synthetic:max_words=24", "--samples", "2", "--max-new-tokens", "4",
                 "--ner", "heuristic", "--idle-s", "0.1", "--batch-sizes", "1,2", "--gpus", "all", "--out", str(out),
                 "-q"]) == 0
    req, man = _read(out)
    assert sorted(man["gpu_models"]) == ["NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"]
    assert len(req) == 8
    for _, r in req.iterrows():  # every cell ran on a GPU of its own model
        assert r["cell_id"].endswith("|" + r["gpu_name"])
        assert (_gpu_of(r["gpu_uuid"]) >= 2) == (r["gpu_name"] == "NVIDIA A100-SXM4-80GB")
    # a resume must run on the same GPU models
    assert main(["--resume", str(out), "--gpus", "0,1", "-q"]) == 2


def test_the_scheduler_keeps_a_worker_on_its_model_and_clock_point():
    cp = [sweep.ClockPoint(1980), sweep.ClockPoint(1500)]
    cells = [sweep.Cell(i, m, "t", c, 1, 0) for i, (m, c) in enumerate(
        [("a", cp[0]), ("a", cp[1]), ("b", cp[0]), ("b", cp[1]), ("a", cp[1])])]
    w = _WorkerState(0, model="b", clock=cp[1])
    assert _choose(w, cells, set()) is cells[3]          # its model and clock point
    w.clock = cp[0]
    assert _choose(w, [cells[0], cells[3]], set()) is cells[3]   # its model
    fresh = _WorkerState(1)
    assert _choose(fresh, cells, {"a"}) is cells[2]      # a model no other worker holds
    gm = [sweep.Cell(0, "a", "t", cp[0], 1, 0, gpu_model="X")]
    assert _choose(fresh, gm, set()) is None             # not for a GPU of another model


@pytest.mark.fake_gpu(devices=4)
def test_bad_parallel_settings_are_clear_errors(fake_gpu, tmp_path, capsys, monkeypatch):
    cases = {
        ("--gpus", "0,7"): "GPU 7 is not visible",
        ("--gpus", "all", "--gpus-per-model", "3"): "do not split into groups of 3",
        ("--gpus-per-model", "2"): "--gpus-per-model needs --gpus",
        ("--gpus", "all", "--engine", "continuous"): "the continuous engine runs on one GPU",
        ("--ray", "nowhere"): "expected auto, local",
    }
    for extra, msg in cases.items():
        assert main([*SMALL, *extra, "--out", str(tmp_path / "x")]) == 2, extra
        assert msg in capsys.readouterr().err, extra
    # without Ray installed (hidden here), --ray says how to install it
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main([*SMALL, "--ray", "--out", str(tmp_path / "x")]) == 2
    assert "pip install 'llm_dvfs[ray]'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
