"""The sweep and ``python -m llm_dvfs.run``: config, plan, clock points on the emulated GPU,
observe mode, resume after SIGKILL, the embedded default, and bad input."""
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

from fakes.fake_gpu import GRAPHICS_CLOCKS_MHZ, model_power_w
from llm_dvfs import sweep
from llm_dvfs.sweep.cells import _clock_not_held
from llm_dvfs.errors import ConfigError
from llm_dvfs.run import main

H100_SM = GRAPHICS_CLOCKS_MHZ[2619]

# a small, fast grid: arch:tiny, short synthetic prompts, few tokens
SMALL = ["--models", "arch:tiny", "--tasks", "synthetic:max_words=24", "--samples", "3",
         "--max-new-tokens", "6", "--ner", "heuristic", "--idle-s", "0.2", "--warmup", "1"]
DETERMINISTIC = ["cell_id", "request_id", "model", "weights", "task", "sample_id", "repeat", "batch_size",
                 "batch_index", "sm_mhz_requested", "tokens_in", "tokens_out", "prompt", "output_text"]


def _read(run: Path) -> tuple[pd.DataFrame, dict]:
    return pd.read_parquet(run / "requests.parquet"), json.loads((run / "manifest.json").read_text())


def _default_sigint() -> None:
    """preexec_fn: the child gets SIGINT's default disposition (a foreground process's), also when
    pytest was started with SIGINT ignored (a background job of a non-interactive shell, nohup)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_cells(run: Path, n: int, proc: subprocess.Popen, timeout_s: float = 240.0) -> None:
    """Wait until ``n`` cells of the sweep ``proc`` writes into ``run`` are finished."""
    deadline = time.monotonic() + timeout_s
    while len(list((run / "cells").glob("*.json"))) < n:
        assert proc.poll() is None, f"the sweep ended early (exit {proc.returncode})"
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def test_clock_specs_parse_and_resolve():
    assert sweep.parse_clock_spec("1980,1500,1200") == [1980, 1500, 1200]
    assert sweep.parse_clock_spec([1500, "1200", 1500]) == [1500, 1200]
    assert sweep.parse_clock_spec("all") == "all"
    assert sweep.parse_clock_spec("as-found") is None
    assert sweep.parse_clock_spec("1200:1500") == {"min": 1200, "max": 1500, "step": None}
    assert sweep.resolve_clocks(sweep.parse_clock_spec("1200:1260"), H100_SM, "clocks") == \
        [1260, 1245, 1230, 1215, 1200]
    assert sweep.resolve_clocks({"min": 1200, "max": 1980, "step": 390}, H100_SM, "clocks") == [1980, 1590, 1200]
    assert len(sweep.resolve_clocks("all", H100_SM, "clocks")) == 110
    with pytest.raises(ConfigError, match="1234 MHz is not supported.*nearest supported: 1230, 1245"):
        sweep.resolve_clocks([1980, 1234], H100_SM, "clocks")
    with pytest.raises(ConfigError, match="unsupported clock"):
        sweep.resolve_clocks({"min": 1200, "max": 1300, "step": 10}, H100_SM, "clocks")
    for bad in ("fast", "1500:1200", "1:2:3:4", "0"):
        with pytest.raises(ConfigError, match="clocks"):
            sweep.parse_clock_spec(bad)


def test_config_files_flags_and_typos(tmp_path):
    toml = tmp_path / "s.toml"
    toml.write_text('models = ["arch:tiny"]\nclocks = "1980,1200"\nbatch_sizes = [1, 8]\n'
                    'max_new_tokens = 12\nfixed_output_length = true\n')
    cfg = sweep.load_config(toml, {"max_new_tokens": "4", "on_busy_gpu": "refuse"})
    assert cfg.models == ["arch:tiny"] and cfg.clocks == [1980, 1200] and cfg.batch_sizes == [1, 8]
    assert cfg.max_new_tokens == 4 and cfg.fixed_output_length is True and cfg.on_busy_gpu == "refuse"
    yml = tmp_path / "s.yaml"
    yml.write_text("sweep:\n  tasks: [synthetic, 'boolq:file=x.jsonl']\n  mem-clocks: all\n  power_limits: 700,500\n")
    cfg = sweep.load_config(yml)
    assert cfg.tasks == ["synthetic", "boolq:file=x.jsonl"] and cfg.mem_clocks == "all"
    assert cfg.power_limits == [700.0, 500.0]
    # a task's options stay together on the command line
    assert sweep.config_from_mapping({"tasks": "boolq:file=a.jsonl,question=q,synthetic"}).tasks == \
        ["boolq:file=a.jsonl,question=q", "synthetic"]
    typo = tmp_path / "typo.toml"
    typo.write_text("max_new_token = 8\n")
    with pytest.raises(ConfigError, match=r"unknown setting 'max_new_token' \(did you mean 'max_new_tokens'\?\)"):
        sweep.load_config(typo)
    with pytest.raises(ConfigError, match="did you mean 'batch_sizes'"):
        sweep.config_from_mapping({"batch_size": 4})
    with pytest.raises(ConfigError, match="not valid TOML"):
        (tmp_path / "broken.toml").write_text("models = [\n")
        sweep.load_config(tmp_path / "broken.toml")
    with pytest.raises(ConfigError, match="decoding: expected one of greedy, sampled"):
        sweep.config_from_mapping({"decoding": "beam"})


def test_help_lists_every_setting_with_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key in sweep.FIELD_HELP:
        assert "--" + key.replace("_", "-") in out, key
    assert "examples:" in out and "--resume runs/dvfs" in out and "python -m llm_dvfs.report" in out


# ---------------------------------------------------------------------------------------------
# sweeps on the emulated GPU
# ---------------------------------------------------------------------------------------------
@pytest.mark.changes_clocks
def test_sweep_three_clock_points(fake_gpu, tmp_path, capsys):
    from conftest import assert_emulated_nvml

    assert_emulated_nvml()
    fake_gpu.set_power_w(300.0)
    out = tmp_path / "run"
    rc = main([*SMALL, "--clocks", "1980,1500,1200", "--allow-clock-changes", "--out", str(out), "-q"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert fake_gpu.is_pristine()  # restored after the sweep
    assert fake_gpu.call_count("nvmlDeviceSetGpuLockedClocks") == 3
    req, man = _read(out)
    assert len(req) == 9 and req["request_id"].is_unique
    assert man["status"] == "complete" and man["mode"] == "sweep" and man["cells_done"] == 3
    assert man["finished_at"] and man["started_at"] and "torch" in man["versions"]
    by_clock = req.groupby("sm_mhz_requested")
    assert sorted(by_clock.groups) == [1200.0, 1500.0, 1980.0]
    # requested and observed clocks per row; the emulated power follows the clock
    assert (req["sm_mhz_observed"] == req["sm_mhz_requested"]).all()
    power = by_clock["avg_power_w"].median()
    for f_mhz, p in power.items():
        assert p == pytest.approx(model_power_w(300.0, f_mhz), rel=0.03)
    assert power[1980.0] > power[1500.0] > power[1200.0]
    idle = by_clock["idle_power_w"].first()
    assert idle[1200.0] == pytest.approx(model_power_w(300.0, 1200.0), rel=0.03)
    assert (req["energy_method"] == "buffer").all() and (req["energy_j"] > 0).all()
    assert (req["clock_event_reasons"] >= 0).all()
    # features once per task, from unpadded prompts (the same count as the request's tokens_in)
    assert (req["feat_tokens"] == req["tokens_in"]).all()
    # the other tables
    assert pd.read_csv(out / "requests.csv")["request_id"].tolist() == req["request_id"].tolist()
    tok = pd.read_parquet(out / "tokens.parquet")
    assert len(tok) == req["tokens_out"].sum()
    pw = pd.read_parquet(out / "power.parquet")
    assert set(pw["cell_id"]) == set(req["cell_id"]) and (pw["power_w"] > 0).all()
    assert {c["label"] for c in man["config"]["clock_points"]} == {"sm1980", "sm1500", "sm1200"}
    assert all(r["settle"]["settled"] for r in man["clock_point_runs"])
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 3
    ref = summary[summary["is_reference"]]
    assert ref["clock_mhz"].tolist() == [1980.0]
    # the printed summary: one line per clock point, the change vs the highest clock, where to look
    assert "1500 MHz" in printed and "1200 MHz" in printed and "dE %" in printed
    assert f"python -m llm_dvfs.report {out}" in printed
    assert not list(out.glob(".*.tmp")) and not list((out / "cells").glob(".*.tmp"))


@pytest.mark.changes_clocks
def test_memory_clock_and_power_limit_points(fake_gpu, tmp_path, capsys):
    from conftest import assert_emulated_nvml

    assert_emulated_nvml()
    fake_gpu.set_power_w(600.0)
    out = tmp_path / "pl"
    rc = main([*SMALL, "--samples", "2", "--clocks", "1410", "--mem-clocks", "1593", "--power-limits", "700,250",
               "--allow-clock-changes", "--out", str(out), "-q"])
    assert rc == 0, capsys.readouterr().err
    assert fake_gpu.is_pristine()
    req, man = _read(out)
    assert [c["label"] for c in man["config"]["clock_points"]] == ["sm1410-mem1593-pl700W", "sm1410-mem1593-pl250W"]
    assert (req["mem_mhz_requested"] == 1593.0).all() and (req["mem_mhz_observed"] == 1593.0).all()
    p = req.groupby("power_limit_w_requested")["avg_power_w"].median()
    assert p[250.0] == pytest.approx(250.0, rel=0.03)  # the cap holds the power down
    assert p[700.0] > 300.0


def test_observe_mode_without_the_opt_in(fake_gpu, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("LLM_DVFS_ALLOW_CLOCK_CHANGES", raising=False)
    out = tmp_path / "obs"
    rc = main([*SMALL, "--clocks", "1500,1200", "--out", str(out), "-q"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "OBSERVE MODE" in captured.err + captured.out
    req, man = _read(out)
    assert man["mode"] == "observe" and len(man["config"]["clock_points"]) == 1
    assert any("--allow-clock-changes" in n for n in man["notes"])
    # nothing was requested, so there is nothing to settle to: no settle warning in observe mode
    assert not any("did not settle" in n for n in man["notes"])
    assert "did not settle" not in captured.err + captured.out
    assert [r["settle"]["settled"] for r in man["clock_point_runs"]] == [None]
    assert len(req) == 3 and req["sm_mhz_requested"].isna().all()
    assert (req["sm_mhz_observed"] == 1980.0).all()  # the GPU as found
    for setter in ("nvmlDeviceSetGpuLockedClocks", "nvmlDeviceSetApplicationsClocks",
                   "nvmlDeviceSetPowerManagementLimit", "nvmlDeviceSetMemoryLockedClocks"):
        assert fake_gpu.call_count(setter) == 0, setter


def test_busy_gpu_warn_and_refuse(fake_gpu, tmp_path, capsys):
    fake_gpu.set_processes([os.getpid()])  # this process itself does not count
    cfg = sweep.load_config(None, {"models": "arch:tiny", "out": str(tmp_path / "a"), "ner": "heuristic"})
    assert not any("other process" in n for n in sweep.prepare(cfg).notes)
    fake_gpu.set_processes([os.getpid(), 4242424])
    assert any("1 other process(es) use GPU 0 (pid 4242424" in n for n in sweep.prepare(cfg).notes)
    rc = main([*SMALL, "--on-busy-gpu", "refuse", "--out", str(tmp_path / "b")])
    assert rc == 2 and "pid 4242424" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


@pytest.mark.changes_clocks
def test_resume_after_sigkill_gives_the_same_rows(fake_gpu, tmp_path):
    fake_gpu.set_power_w(300.0)
    args = [*SMALL, "--clocks", "1980,1500,1200", "--batch-sizes", "1,2", "--idle-s", "0.5",
            "--allow-clock-changes", "-q"]
    killed = tmp_path / "killed"
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "llm_dvfs.run", *args, "--out", str(killed)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_for_cells(killed, 2, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
        log.close()
    done_before = {p.name: p.stat().st_mtime_ns for p in (killed / "cells").glob("*.json")}
    assert 2 <= len(done_before) < 6
    _, man = _read(killed)
    assert man["status"] == "running"  # it never got to say anything else
    # the watchdog of the killed process put the clocks back
    deadline = time.monotonic() + 10
    while not fake_gpu.is_pristine() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_gpu.is_pristine()
    # a sweep run needs the opt-in again; nothing changes when it is missing
    assert main(["--resume", str(killed), "-q"]) == 2
    assert main(["--resume", str(killed), "--samples", "5", "--allow-clock-changes", "-q"]) == 2
    assert main(["--resume", str(killed), "--allow-clock-changes", "-q"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (killed / "cells").glob("*.json")}
    assert len(after) == 6
    assert all(after[k] == v for k, v in done_before.items())  # finished cells were not rerun
    resumed, man = _read(killed)
    assert man["status"] == "complete" and len(man["resumes"]) == 1
    # an uninterrupted run of the same grid
    fresh = tmp_path / "fresh"
    assert main([*args, "--out", str(fresh)]) == 0
    ref, _ = _read(fresh)
    assert len(resumed) == len(ref) == 3 * 2 * 3
    cols = DETERMINISTIC + sorted(c for c in ref.columns if c.startswith("feat_"))
    pd.testing.assert_frame_equal(resumed[cols], ref[cols])
    assert pd.read_parquet(killed / "tokens.parquet")["request_id"].nunique() == len(ref)
    assert fake_gpu.is_pristine()


@pytest.mark.changes_clocks
def test_ctrl_c_restores_and_marks_the_run_interrupted(fake_gpu, tmp_path):
    out = tmp_path / "int"
    proc = subprocess.Popen([sys.executable, "-m", "llm_dvfs.run", *SMALL, "--samples", "2", "--clocks", "1980,1200",
                             "--batch-sizes", "1,2", "--idle-s", "0.5", "--allow-clock-changes", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_default_sigint)
    _wait_for_cells(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    printed, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, printed
    assert f"--resume {out} --allow-clock-changes" in printed
    _, man = _read(out)
    assert man["status"] == "interrupted" and 1 <= man["cells_done"] < 4
    assert fake_gpu.is_pristine()
    assert len(pd.read_parquet(out / "requests.parquet")) == 2 * man["cells_done"]


def test_cells_whose_clock_was_not_held_are_flagged():
    cp = sweep.ClockPoint(sm_mhz=1200)
    ok = pd.DataFrame({"sm_mhz_observed": [1200.0, 1215.0], "mem_mhz_observed": [2619.0, 2619.0]})
    assert _clock_not_held(cp, ok, 30.0) is None
    bad = pd.DataFrame({"sm_mhz_observed": [1200.0, 1980.0, 1980.0], "mem_mhz_observed": [2619.0] * 3})
    assert _clock_not_held(cp, bad, 30.0).startswith("2 of 3 requests ran at SM clocks other than the "
                                                            "requested 1200 MHz (observed 1980 MHz)")
    assert _clock_not_held(sweep.ClockPoint(), bad, 30.0) is None  # observe mode: nothing requested


def test_default_run_on_cpu_without_driver(no_nvml_driver, tmp_path):
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    p = subprocess.run([sys.executable, "-m", "llm_dvfs.run"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert f"python -m llm_dvfs.report {Path('runs') / run.name}" in p.stdout
    assert "energy is unavailable" in p.stdout + p.stderr
    req, man = _read(run)
    cpu = sweep.EMBEDDED_DEFAULT_CPU
    assert len(req) == cpu["samples"] * len(cpu["batch_sizes"])
    assert (req["model"] == sweep.DEFAULT_CPU_MODEL).all() and (req["device"] == "cpu").all()
    assert (req["energy_method"] == "none").all() and req["energy_j"].isna().all()
    assert (req["latency_s"] > 0).all() and req["ttft_s"].notna().all()
    assert req["feat_ne_density"].notna().all()  # the labelled heuristic estimator
    assert man["status"] == "complete" and man["energy_available"] is False and man["mode"] == "observe"
    assert "E/req J" in p.stdout  # the summary table


#: requests columns a run without a GPU cannot measure: null in the files, never a sentinel
NOT_MEASURED_ON_CPU = ["gpu_name", "sm_mhz_observed", "mem_mhz_observed", "clock_event_reasons", "energy_j",
                       "prefill_energy_j", "decode_energy_j", "j_per_token", "avg_power_w", "idle_power_w",
                       "active_energy_j", "energy_j_counter"]


def test_cpu_run_writes_nulls_with_the_schema_and_the_report_reads_them(no_nvml_driver, tmp_path, capsys):
    import pyarrow.parquet as pq

    from llm_dvfs.analysis.build import build_report
    from llm_dvfs.schema import REQUEST_COLUMNS

    out = tmp_path / "cpu"
    assert main([*SMALL, "--device", "cpu", "--out", str(out), "-q"]) == 0
    capsys.readouterr()
    t = pq.read_table(out / "requests.parquet")
    assert t.num_rows == 3
    # pyarrow sees nulls where nothing was measured (and the requested clocks: observe mode) ...
    for col in NOT_MEASURED_ON_CPU + ["sm_mhz_requested", "mem_mhz_requested", "power_limit_w_requested"]:
        assert t.column(col).null_count == 3, col
        assert t.column(col).to_pylist() == [None, None, None], col
    # ... the synthetic task has no metric: no quality, and its validity is unknown (null), not False
    for col in ("quality_metric", "quality", "quality_valid"):
        assert t.column(col).null_count == 3, col
    # what was measured is not null
    for col in ("cell_id", "request_id", "tokens_in", "tokens_out", "latency_s", "ttft_s", "energy_method"):
        assert t.column(col).null_count == 0, col
    assert t.column("energy_method").to_pylist() == ["none"] * 3
    # typed and documented by the schema: nullable int and bool, units and descriptions as field metadata
    sch = t.schema
    assert str(sch.field("clock_event_reasons").type) == "int64" and sch.field("clock_event_reasons").nullable
    assert str(sch.field("quality_valid").type) == "bool"
    for col, unit in (("energy_j", "J"), ("sm_mhz_observed", "MHz"), ("latency_s", "s"), ("avg_power_w", "W"),
                      ("clock_event_reasons", "bitmask"), ("j_per_token", "J/token"), ("feat_chars", "characters")):
        meta = sch.field(col).metadata
        assert meta[b"unit"] == unit.encode(), col
        assert meta[b"description"] and b"null" in meta
    assert sch.field("energy_j").metadata[b"description"] == REQUEST_COLUMNS["energy_j"].description.encode()
    assert sch.metadata[b"llm_dvfs.table"] == b"requests"
    # pandas reads <NA> in nullable dtypes: no -1 (all throttle bits), no False for "unknown"
    req = pd.read_parquet(out / "requests.parquet")
    assert str(req["clock_event_reasons"].dtype) == "Int64" and str(req["quality_valid"].dtype) == "boolean"
    assert str(req["energy_j"].dtype) == "Float64"
    assert all(v is pd.NA for v in req["clock_event_reasons"]) and all(v is pd.NA for v in req["quality_valid"])
    assert all(v is pd.NA for v in req["energy_j"]) and req[NOT_MEASURED_ON_CPU].isna().all().all()
    ints = req.select_dtypes("Int64")
    assert not (ints.fillna(0) < 0).any().any()
    # the other tables and the cell parts carry the schema too
    tok = pq.read_table(out / "tokens.parquet")
    assert tok.num_rows == int(req["tokens_out"].sum()) and tok.column("energy_j").null_count == tok.num_rows
    assert tok.schema.field("t_start_s").metadata[b"unit"] == b"s"
    pw = pq.read_table(out / "power.parquet")
    assert pw.num_rows == 0 and pw.schema.names == ["cell_id", "t_s", "device", "power_w", "source"]
    assert pw.schema.field("power_w").metadata[b"unit"] == b"W"
    part = next((out / "cells").glob("*.requests.parquet"))
    assert pq.read_table(part).column("clock_event_reasons").null_count == 3
    # the CSV copy writes nulls as empty fields
    csv = pd.read_csv(out / "requests.csv")
    assert csv["clock_event_reasons"].isna().all() and csv["quality_valid"].isna().all()
    # the report renders from it and does not read the nulls as throttling or as measured values
    rep = build_report(out, n_boot=50)
    assert (out / "report" / "report.html").is_file()
    assert pd.isna(rep.summary["clock_event_reasons"].iloc[0])
    assert not any("throttling" in c for c in rep.cannot_conclude)
    assert any("No energy was measured" in c for c in rep.cannot_conclude)
    assert "edp_vs_clock" not in rep.figures and "power_timeline" not in rep.figures  # nothing to draw
    assert str(rep.run.requests["clock_event_reasons"].dtype) == "Int64"


def test_writing_a_manifest_does_not_import_torch(tmp_path):
    """Versions come from importlib.metadata: writing a manifest in a fresh process imports no torch."""
    import importlib.metadata

    code = ("import json, sys\n"
            "from llm_dvfs.sweep.rundir import RunDir, versions\n"
            "rd = RunDir(sys.argv[1]); rd.create(); rd.write_manifest({'versions': versions()})\n"
            "print(json.dumps({'torch_imported': 'torch' in sys.modules,\n"
            "                  'transformers_imported': 'transformers' in sys.modules}))\n")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == {"torch_imported": False, "transformers_imported": False}
    v = json.loads((tmp_path / "run" / "manifest.json").read_text())["versions"]
    assert v["torch"] == importlib.metadata.version("torch")
    assert v["transformers"] == importlib.metadata.version("transformers")
    assert v["pyarrow"] == importlib.metadata.version("pyarrow") and v["scipy"] == importlib.metadata.version("scipy")
    import torch  # this process may import it: the recorded CUDA is the build's
    assert v["cuda"] == torch.version.cuda


# ---------------------------------------------------------------------------------------------
# bad input: a clear error before any GPU work, nothing written
# ---------------------------------------------------------------------------------------------
def _bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    empty = tmp_path / "empty.csv"
    empty.write_text("question,passage,answer\n")
    typo = tmp_path / "typo.toml"
    typo.write_text('models = ["arch:tiny"]\nsampels = 4\n')
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    return {
        "unknown model": (["--models", "arch:nope"], "unknown architecture 'arch:nope'"),
        "missing model dir": (["--models", "./no/such/model"], "does not exist"),
        "unknown task": (["--tasks", "boolqq"], "unknown task 'boolqq'"),
        "unsupported clock": (["--clocks", "1980,1234", "--allow-clock-changes"],
                              "1234 MHz is not supported by the GPU; nearest supported: 1230, 1245"),
        "unsupported memory clock": (["--mem-clocks", "2000"], "2000 MHz is not supported"),
        "power limit out of range": (["--power-limits", "900", "--allow-clock-changes"],
                                     "900 W is outside the range 200-700 W"),
        "unwritable output": (["--out", str(a_file / "run")], "not a directory"),
        "output not empty": (["--out", str(full)], "is not empty"),
        "empty dataset": (["--tasks", f"boolq:file={empty}"], "no usable samples"),
        "config typo": (["--config", str(typo)], "unknown setting 'sampels' (did you mean 'samples'?)"),
        "bad batch size": (["--batch-sizes", "0"], "batch_sizes: must be >= 1"),
        "bad clock syntax": (["--clocks", "fast"], "is not a clock in MHz"),
        "missing config": (["--config", str(tmp_path / "nope.toml")], "does not exist"),
        "missing resume dir": (["--resume", str(tmp_path / "never")], "not a run directory"),
    }


BAD = ["unknown model", "missing model dir", "unknown task", "unsupported clock", "unsupported memory clock",
       "power limit out of range", "unwritable output", "output not empty", "empty dataset", "config typo",
       "bad batch size", "bad clock syntax", "missing config", "missing resume dir"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_clear_error_before_any_work(case, fake_gpu, tmp_path, capsys):
    args, message = _bad_cases(tmp_path)[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    out = tmp_path / "run"
    if "--out" not in args and "--resume" not in args:
        args = [*args, "--out", str(out)]
    rc = main(["--ner", "heuristic", *args] if "--resume" not in args else args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err, err
    assert err.startswith("llm_dvfs.run: error:")
    # nothing written, no clock touched
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert fake_gpu.call_count("nvmlDeviceSetGpuLockedClocks") == 0
    assert fake_gpu.is_pristine()


def test_hub_model_not_cached_and_missing_nltk_data(tmp_path, capsys):
    out = tmp_path / "run"
    # a subprocess: huggingface_hub reads HF_HUB_OFFLINE when it is imported
    p = subprocess.run([sys.executable, "-m", "llm_dvfs.run", "--models", "no-such-org/no-such-model",
                        "--gpu", "none", "--ner", "heuristic", "--out", str(out)],
                       env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    # one error at once (workload/hub.py), no "Retrying in 8s" storm from huggingface_hub
    assert "'no-such-org/no-such-model' is not in the Hugging Face cache and HF_HUB_OFFLINE is set" in p.stderr
    assert "hf download no-such-org/no-such-model" in p.stderr and "Retry" not in p.stderr
    from llm_dvfs.workload.features import check_nltk_data
    try:
        check_nltk_data()
    except Exception:  # noqa: BLE001 - the data is missing here: the default --ner nltk must say so
        assert main(["--models", "arch:tiny", "--gpu", "none", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "nltk.download" in err and "--ner heuristic" in err
    assert not out.exists()


def test_dry_run_validates_and_writes_nothing(fake_gpu, tmp_path, capsys):
    out = tmp_path / "dry"
    assert main([*SMALL, "--clocks", "all", "--batch-sizes", "1,8", "--allow-clock-changes",
                 "--out", str(out), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "cells: 220 (660 measured requests)" in printed and "mode: sweep" in printed
    assert not out.exists()
