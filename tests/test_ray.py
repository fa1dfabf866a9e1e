"""The Ray backend (``--ray local``) on a local Ray cluster of 4 emulated GPUs: the rows of the
1-GPU sweep, each measured on the GPU it names; an actor killed mid-cell. Needs Ray (the
``llm_dvfs[ray]`` extra; .ci/run installs it for this file). Without Ray, ``--ray`` is tested in
tests/test_parallel.py."""
from __future__ import annotations

import os

import pytest

pytest.importorskip("ray")

from conftest import assert_emulated_nvml  # noqa: E402
from test_parallel import (BASE_W, LONGER, _check_per_gpu_power, _gpu_of, _powers, _pristine,  # noqa: E402
                           _read, _sweep, kill_a_worker_mid_cell, rows_of_one_and_many)


@pytest.mark.changes_clocks
@pytest.mark.fake_gpu(devices=4)
def test_ray_local_cluster_gives_the_rows_of_one_gpu(fake_gpu, tmp_path):
    _, ray_rows, man = rows_of_one_and_many(fake_gpu, tmp_path, ["--ray", "local"], settle_s=10.0)
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
    proc = _sweep(args, out, tmp_path / "out.log")
    victim, died = kill_a_worker_mid_cell(out, proc, "4 ready actors", timeout_s=300)
    req, man = _read(out)
    assert len(req) == 24 and req["request_id"].is_unique and man["cells_done"] == 6
    rerun = req[req["cell_id"] == died.group(1)]
    assert len(rerun) == 4 and victim["gpu_uuids"][0] not in set(rerun["gpu_uuid"])
    assert _pristine(fake_gpu)  # the killed actor's watchdog restored its GPU
    _check_per_gpu_power(req)
