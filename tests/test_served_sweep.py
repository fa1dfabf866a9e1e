"""Served traffic through ``python -m llm_dvfs.run`` (issue 15): the continuous engine and an
OpenAI-compatible endpoint (tests/servers/openai_stub.py) on the emulated GPU: overlapping
requests, the energy accounting, the report's load figures, clear errors, resume."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from llm_dvfs.errors import ConfigError
from llm_dvfs.run import main

pytest.importorskip("transformers.generation.continuous_batching")

BASE = ["--tasks", "synthetic:max_words=24", "--max-new-tokens", "5", "--ner", "heuristic", "--idle-s", "0.2",
        "--warmup", "1", "-q"]
TINY = ["--models", "arch:tiny", *BASE]


def _read(run: Path) -> tuple[pd.DataFrame, dict]:
    return pd.read_parquet(run / "requests.parquet"), json.loads((run / "manifest.json").read_text())


def _markers(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((run / "cells").glob("*.json"))]


def _overlapping_pairs(req: pd.DataFrame) -> int:
    spans = list(zip(req["t_arrival_s"], req["t_end_s"]))
    return sum(1 for i, a in enumerate(spans) for b in spans[i + 1:] if a[0] < b[1] and b[0] < a[1])


def _check_accounting(req: pd.DataFrame, served: dict, rel: float = 0.01) -> None:
    """Σ request energies = the monitor's window energy - idle - unattributed (1 %)."""
    for cell_id, s in served.items():
        e = s["energy"]
        rows = req[req["cell_id"] == cell_id]
        total = float(rows["energy_j"].sum())
        assert total > 0
        expect = e["monitor_energy_j"] - e["idle_energy_j"] - e["unattributed_energy_j"]
        assert total == pytest.approx(expect, rel=rel), cell_id
        assert e["sum_check_rel"] < 1e-9 and e["monitor_rel_diff"] < rel


@pytest.fixture(scope="module")
def stub():
    from servers.openai_stub import ContinuousBackend, OpenAIStub

    from llm_dvfs.workload.continuous import ContinuousEngine
    from llm_dvfs.workload.models import load_model

    with ContinuousEngine(load_model("arch:tiny", device="cpu", seed=0)) as eng, \
            OpenAIStub(ContinuousBackend(eng), quiet=True) as s:
        yield s


# ---------------------------------------------------------------------------------------------
def test_continuous_closed_loop_run_and_report(fake_gpu, tmp_path, capsys):
    """The issue's CPU 'done when': overlapping requests, energies that add up, load figures."""
    from llm_dvfs.analysis.build import build_report

    fake_gpu.set_power_w(300.0)
    out = tmp_path / "run"
    rc = main([*TINY, "--engine", "continuous", "--concurrency", "1,4", "--samples", "16", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    req, man = _read(out)
    assert len(req) == 32 and req["request_id"].is_unique
    assert set(req["engine"]) == {"continuous"} and sorted(set(req["concurrency"])) == [1, 4]
    assert req["batch_size"].isna().all() and req["arrival_rate_rps"].isna().all()
    assert (req["energy_method"] == "engine_steps").all() and req["error"].isna().all()
    c4 = req[req["concurrency"] == 4]
    assert _overlapping_pairs(c4) > 10 and _overlapping_pairs(req[req["concurrency"] == 1]) == 0
    assert (c4["queue_s"] >= 0).all() and (c4["t_start_s"] >= c4["t_arrival_s"]).all()
    assert (req["tokens_out"] == 5).all() and (req["stop_reason"] == "max_new_tokens").all()
    assert set(req["load_phase"]) <= {"warmup", "measured", "cooldown"}
    _check_accounting(req, man["served"])
    s4 = next(v for k, v in man["served"].items() if "|c4|" in k)
    assert s4["achieved"]["mean_concurrency"] == pytest.approx(4, rel=0.25)
    assert s4["engine_info"]["step_source"] == "scheduler" and s4["steps"] > 0
    assert man["config"]["resolved_engine"] == "continuous"
    # the measured weighting is the default, and the run says where it comes from
    w = s4["energy"]["weights"]
    assert (w["prefill_per_token"], w["decode_per_token"]) == (0.31, 1.0) and "measured: H200" in w["source"]
    tok = pd.read_parquet(out / "tokens.parquet")
    assert len(tok) == req["tokens_out"].sum()
    per_req = tok.groupby("request_id")["energy_j"].sum()
    assert per_req.to_numpy() == pytest.approx(req.set_index("request_id").loc[per_req.index, "energy_j"].to_numpy())
    # the report: load figures and the sum-check line
    rep = build_report(out, n_boot=50)
    assert {"load_energy", "load_latency"} <= set(rep.figures)
    html = (out / "report" / "report.html").read_text()
    assert "Served traffic" in html and "sum check" in html
    load = pd.read_csv(out / "report" / "served_load.csv")
    assert sorted(load["load"]) == [1.0, 4.0] and (load["ttft_s_p99"] >= load["ttft_s_p50"]).all()


def test_endpoint_run_against_the_stub(fake_gpu, faults, tmp_path, capsys):
    fake_gpu.set_power_w(250.0)
    out = tmp_path / "ep"
    rc = main([*BASE, "--endpoint", faults.url, "--concurrency", "3", "--samples", "9", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    req, man = _read(out)
    assert len(req) == 9 and set(req["engine"]) == {"endpoint"}
    assert (req["energy_method"] == "token_timestamps").all()
    assert (req["model"] == "llm_dvfs-stub/arch:tiny").all() and req["weights"].isna().all()
    assert req["queue_s"].isna().all()  # a server does not say when it admitted a request
    assert _overlapping_pairs(req) > 0 and (req["tokens_out"] == 5).all()
    _check_accounting(req, man["served"])
    assert man["endpoint"]["version"].startswith("llm_dvfs-openai-stub")
    assert any("endpoint mode" in n for n in man["notes"])
    from llm_dvfs.analysis.build import build_report

    assert "load_latency" in build_report(out, n_boot=20).figures


def test_bad_endpoint_urls_are_clear_errors_before_any_work(fake_gpu, tmp_path, capsys):
    for url, msg in (("ftp://x/v1", "must start with http"), ("http://127.0.0.1:9/v1", "cannot connect")):
        out = tmp_path / "bad"
        assert main([*BASE, "--endpoint", url, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert msg in err and "Traceback" not in err
        assert not out.exists()
    for args, msg in ((["--concurrency", "4"], "need --engine continuous or --endpoint"),
                      (["--engine", "continuous", "--concurrency", "2", "--arrival-rate", "1"], "one kind of load"),
                      (["--engine", "continuous", "--batch-sizes", "4"], "--batch-sizes applies to --engine generate"),
                      (["--engine", "continuous", "--samples", "4", "--warmup-requests", "2",
                        "--cooldown-requests", "2"], "leave none of the 4")):
        assert main([*TINY, *args, "--out", str(tmp_path / "x")]) == 2
        assert msg in capsys.readouterr().err


def test_server_dies_mid_run_keeps_finished_requests_and_resume_reruns_the_cell(fake_gpu, tmp_path, capsys):
    from servers.openai_stub import ContinuousBackend, Faults, OpenAIStub

    from llm_dvfs.workload.continuous import ContinuousEngine
    from llm_dvfs.workload.models import load_model

    eng = ContinuousEngine(load_model("arch:tiny", device="cpu", seed=0)).start()
    # request 1 is the clock point's warm-up; the 4th of the cell dies after 2 chunks and takes
    # the server down with it
    stub = OpenAIStub(ContinuousBackend(eng), faults=Faults(die_after=2, stop_server=True, on_requests={5}),
                      quiet=True).start()
    port = stub.port
    out = tmp_path / "dies"
    try:
        rc = main([*BASE, "--endpoint", stub.url, "--concurrency", "1", "--samples", "6", "--request-timeout-s", "20",
                   "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and "Traceback" not in err
        assert "stopped answering" in err and "--resume" in err and "3 of 6 requests finished" in err
        req, man = _read(out)
        assert len(req) == 6 and (req["error"].isna()).sum() == 3
        # the 4th lost its stream after 2 chunks; later ones were refused (or reset while it died)
        assert req["error"].str.contains("connection lost mid-stream after 2", na=False).sum() == 1
        assert req["tokens_out"].tolist()[:4] == [5, 5, 5, 2]
        assert man["status"] == "failed" and _markers(out)[0]["aborted"]
        # the server comes back on the same port: --resume measures the aborted cell again
        stub = OpenAIStub(ContinuousBackend(eng), port=port, quiet=True).start()
        assert main(["--resume", str(out), "-q"]) == 0
        req, man = _read(out)
        assert len(req) == 6 and req["error"].isna().all() and man["status"] == "complete"
        assert "aborted" not in _markers(out)[0]
    finally:
        stub.stop()
        eng.stop()


def test_malformed_streams_fail_the_run_with_the_line(fake_gpu, faults, tmp_path, capsys):
    out = tmp_path / "mal"
    faults.faults = type(faults.faults)(malformed_after=1, on_requests=set(range(faults.requests_seen + 2, faults.requests_seen + 100)))
    rc = main([*BASE, "--endpoint", faults.url, "--concurrency", "2", "--samples", "4", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "every request failed" in err and "malformed stream line" in err and "Traceback" not in err
    req, _ = _read(out)
    assert len(req) == 4 and req["error"].str.contains("malformed stream line").all()
    assert (req["tokens_out"] == 1).all()  # the chunk before the bad line is kept
    # the report of a run with no successful request: a clear error naming the cause and the fix
    from llm_dvfs.cli import main as cli

    assert cli(["report", str(out)]) == 2
    err = capsys.readouterr().err
    assert "nothing to report" in err and "all 4 request(s) failed" in err and "malformed stream line" in err
    assert f"--resume {out}" in err and "Traceback" not in err


def test_one_malformed_stream_is_a_row_with_its_error(fake_gpu, faults, tmp_path, capsys):
    out = tmp_path / "one"
    faults.faults = type(faults.faults)(malformed_after=2, on_requests={faults.requests_seen + 3})
    rc = main([*BASE, "--endpoint", faults.url, "--concurrency", "1", "--samples", "4", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    req, man = _read(out)
    assert req["error"].notna().sum() == 1 and "malformed" in req["error"].dropna().iloc[0]
    assert any("1 of 4 requests failed" in n for n in man["notes"])


def test_poisson_arrivals_are_reproducible_by_seed(fake_gpu, tmp_path):
    from llm_dvfs.sweep.served import LoadLevel, arrival_seed

    lv = LoadLevel("rate", 40.0)
    a = lv.schedule(8, 3, 0).arrivals_s()
    assert a.tolist() == lv.schedule(8, 3, 0).arrivals_s().tolist()
    assert a.tolist() != lv.schedule(8, 4, 0).arrivals_s().tolist()
    assert a.tolist() != lv.schedule(8, 3, 1).arrivals_s().tolist()  # repeats: other arrivals
    assert arrival_seed(3, 0) == arrival_seed(3, 0)
    runs = []
    for k in range(2):
        out = tmp_path / f"r{k}"
        assert main([*TINY, "--engine", "continuous", "--arrival-rate", "40", "--seed", "3", "--samples", "8",
                     "--out", str(out)]) == 0
        req, man = _read(out)
        assert req["arrival_rate_rps"].eq(40.0).all() and req["concurrency"].isna().all()
        (marker,) = _markers(out)
        runs.append(marker["served"]["arrivals_planned_s"])
        offsets = (req["t_arrival_s"] - req["t_arrival_s"].min()).to_numpy()
        assert offsets == pytest.approx(a, abs=0.05)  # the requests arrived as planned
    assert runs[0] == runs[1] == pytest.approx(a.tolist())


def test_resume_skips_finished_served_cells(fake_gpu, tmp_path, capsys):
    out = tmp_path / "res"
    assert main([*TINY, "--engine", "continuous", "--concurrency", "1,2", "--samples", "4", "--out", str(out)]) == 0
    before, _ = _read(out)
    markers = sorted((out / "cells").glob("*.json"))
    assert len(markers) == 2
    keep = json.loads(markers[0].read_text())["cell_id"]
    markers[1].unlink()  # as if interrupted during the second cell
    capsys.readouterr()
    assert main(["--resume", str(out), "-q"]) == 0
    printed = capsys.readouterr().out
    assert "1 cell(s) run, 1 already done" in printed
    after, man = _read(out)
    assert len(after) == 8 and man["status"] == "complete"
    same = before[before["cell_id"] == keep].reset_index(drop=True)
    assert same["t_arrival_s"].tolist() == after[after["cell_id"] == keep].reset_index(drop=True)["t_arrival_s"].tolist()


def test_served_settings_in_a_config_file(tmp_path):
    from llm_dvfs import sweep

    f = tmp_path / "s.toml"
    f.write_text('engine = "continuous"\nconcurrency = [1, 4, 16]\nwarmup_requests = 2\ncooldown_s = 0.5\n')
    cfg = sweep.load_config(f)
    assert cfg.engine == "continuous" and cfg.concurrency == [1, 4, 16] and cfg.warmup_requests == 2
    cfg = sweep.load_config(None, {"endpoint": "http://localhost:8000", "arrival_rate": "0.5,2"})
    assert cfg.arrival_rate == [0.5, 2.0]
    with pytest.raises(ConfigError, match="engine: expected one of generate, continuous, endpoint"):
        sweep.config_from_mapping({"engine": "vllm"})
    with pytest.raises(ConfigError, match="must start with http"):
        sweep.config_from_mapping({"endpoint": "localhost:8000"})
    with pytest.raises(ConfigError, match="arrival rates must be > 0"):
        sweep.config_from_mapping({"arrival_rate": "0"})


def test_arrival_trace_and_dry_run(fake_gpu, tmp_path, capsys):
    trace = tmp_path / "arrivals.csv"
    trace.write_text("arrival_s\n0.0\n0.01\n0.03\n0.05\n0.08\n0.10\n")
    args = [*TINY, "--engine", "continuous", "--arrival-trace", str(trace), "--samples", "8"]
    assert main([*args, "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    assert "load levels: trace-arrivals.csv" in capsys.readouterr().out and not (tmp_path / "dry").exists()
    out = tmp_path / "tr"
    assert main([*args, "--out", str(out)]) == 0
    req, man = _read(out)
    assert len(req) == 6  # the first min(samples, arrivals) samples
    assert req["arrival_rate_rps"].eq(50.0).all() and req["concurrency"].isna().all()
    assert req["cell_id"].str.contains("|continuous|trace-arrivals.csv|", regex=False).all()
    (s,) = man["served"].values()
    assert s["load"]["arrivals"] == 6 and s["schedule"]["kind"] == "trace"
    bad = tmp_path / "bad.csv"
    bad.write_text("t_s\n0.0\n0.5\n0.2\n")
    assert main([*TINY, "--engine", "continuous", "--arrival-trace", str(bad), "--out", str(tmp_path / "b")]) == 2
    assert "line 4" in capsys.readouterr().err


def test_continuous_engine_requests_end_at_the_task_stop_sequences():
    """Continuous batching has no stop strings: the cell cancels a request once its streamed
    text completes one, and records it as generate's stop strings would (a fake engine here)."""
    import threading
    import time

    from llm_dvfs.sweep.served import _Continuous
    from llm_dvfs.workload.serving import RequestHandle, ServeRequest, TokenEvent, failed_request, now_s

    class Engine:
        running = True

        def submit(self, req, stream=False):
            h = RequestHandle(req, now_s())
            h.set_cancel(lambda: h.resolve(failed_request(req, h.t_submit_s, "cancelled", stop_reason="cancelled",
                                                          token_times_s=[e.t_s for e in h.events()])))

            def run():
                for k, piece in enumerate(["Yes", ".", "\n", "And", " more"]):
                    if h.cancelled:
                        return
                    h.push_token(TokenEvent(k, now_s(), k, piece))
                    time.sleep(0.01)

            threading.Thread(target=run, daemon=True).start()
            return h

    eng = object.__new__(_Continuous)
    eng.engine, eng.stops, eng.timeout_s, eng.longest = Engine(), (".\n",), 5.0, 2
    rec = eng.serve(ServeRequest(prompt="Q?", request_id="a"))
    assert rec.stop_reason == "stop_string" and rec.n_output_tokens == 3 and rec.token_times_s.size == 3
    assert rec.extra["output_text"] == "Yes.\n" and "error" not in rec.extra


def test_cache_sized_to_the_cell():
    """The continuous engine's KV cache holds what can be in flight, not the GPU's free memory."""
    from llm_dvfs.sweep.served import CACHE_MARGIN_TOKENS, LoadLevel, cache_tokens_for

    prompts = [10, 50, 30, 20, 40, 5]
    per = 50 + 16 + CACHE_MARGIN_TOKENS
    assert cache_tokens_for(LoadLevel("concurrency", 4), prompts, 16) == 4 * per
    assert cache_tokens_for(LoadLevel("concurrency", 16), prompts, 16) == 6 * per  # never more than n
    assert cache_tokens_for(LoadLevel("rate", 2.0), prompts, 16) == 6 * per  # open loop: all may overlap


def test_cb_cache_tokens_reaches_the_engine(fake_gpu, tmp_path, capsys):
    out = tmp_path / "cache"
    rc = main([*TINY, "--engine", "continuous", "--concurrency", "2", "--samples", "4", "--cb-cache-tokens", "4096",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    (marker,) = _markers(out)
    cfg = marker["served"]["engine_info"]["cb_config"]
    blocks = cfg.get("num_blocks")
    page = cfg.get("page_size", cfg.get("block_size"))
    assert blocks * page == 4096
    assert main([*TINY, "--engine", "continuous", "--cb-cache-tokens", "0", "--out", str(tmp_path / "bad")]) == 2
    assert "cb_cache_tokens: must be >= 1, got 0" in capsys.readouterr().err
