"""The Ray backend (``--ray local``) on a local Ray cluster of 4 emulated GPUs: the rows of the
1-GPU sweep, each measured on the GPU it names; an actor killed mid-cell. Needs Ray (the
``llm_dvfs[ray]`` extra; .ci/run installs it for this file). Without Ray, ``--ray`` is tested in
tests/test_parallel.py."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pandas as pd
import pytest

pytest.importorskip("ray")

from conftest import assert_emulated_nvml  # noqa: E402
from llm_dvfs.run import main  # noqa: E402
from test_parallel import (BASE_W, DETERMINISTIC, LONGER, SMALL, _check_per_gpu_power, _gpu_of, _powers,  # noqa: E402
                           _pristine, _read, _wait, _workers)


@pytest.mark.changes_clocks
@pytest.mark.fake_gpu(devices=4)
def test_ray_local_cluster_gives_the_rows_of_one_gpu(fake_gpu, tmp_path):
    assert_emulated_nvml()
    _powers(fake_gpu)
    args = [*SMALL, "--clocks", "1980,1500", "--batch-sizes", "1,2", "--allow-clock-changes", "-q"]
    assert main([*args, "--gpus", "0", "--out", str(tmp_path / "one")]) == 0
    assert main([*args, "--ray", "local", "--out", str(tmp_path / "ray")]) == 0
    assert _pristine(fake_gpu, 10.0)
    one, _ = _read(tmp_path / "one")
    ray_rows, man = _read(tmp_path / "ray")
    cols = DETERMINISTIC + sorted(c for c in one.columns if c.startswith("feat_"))
    pd.testing.assert_frame_equal(ray_rows[cols], one[cols])
    _check_per_gpu_power(ray_rows)  # each actor measured the GPU Ray assigned it, and only that one
    assert sorted(_gpu_of(w["gpu_uuids"][0]) for w in man["workers"]) == [0, 1, 2, 3]
    assert {w["host"] for w in man["workers"]} == {os.uname().nodename} == set(ray_rows["host"])
    assert man["status"] == "complete" and man["config"]["ray"] == "local"
    assert len(BASE_W) == 4


@pytest.mark.changes_clocks
@pytest.mark.fake_gpu(devices=4)
def test_a_ray_actor_killed_mid_cell_is_run_again_elsewhere(fake_gpu, tmp_path):
    assert_emulated_nvml()
    _powers(fake_gpu)
    out = tmp_path / "run"
    args = [a for a in LONGER if a not in ("--gpus", "all")] + ["--ray", "local"]
    proc = subprocess.Popen([sys.executable, "-m", "llm_dvfs.run", *args, "--out", str(out)],
                            stdout=(tmp_path / "out.log").open("w"), stderr=subprocess.STDOUT)
    try:
        _wait(lambda: len(_workers(out)) == 4, proc, "4 ready actors", timeout_s=300)
        started = re.compile(r"cell (\d+) started on worker (\d) ")
        _wait(lambda: started.search((out / "run.log").read_text()), proc, "a started cell")
        m = started.search((out / "run.log").read_text())
        victim = next(w for w in _workers(out) if w["worker"] == int(m.group(2)))
        os.kill(victim["pid"], signal.SIGKILL)
        assert proc.wait(300) == 0, (tmp_path / "out.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    log = (out / "run.log").read_text()
    died = re.search(rf"worker {victim['worker']} \(GPU \d on .*\) died during cell (\S+) .*re-queued", log)
    assert died, log[-3000:]
    req, man = _read(out)
    assert len(req) == 24 and req["request_id"].is_unique and man["cells_done"] == 6
    rerun = req[req["cell_id"] == died.group(1)]
    assert len(rerun) == 4 and victim["gpu_uuids"][0] not in set(rerun["gpu_uuid"])
    assert _pristine(fake_gpu)  # the killed actor's watchdog restored its GPU
    _check_per_gpu_power(req)
