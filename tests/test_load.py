"""Load schedules and the driver (workload/load.py): statistics, trace files, achieved load."""
from __future__ import annotations

import concurrent.futures
import math
import threading
import time

import numpy as np
import pytest

from llm_dvfs.errors import ConfigError
from llm_dvfs.workload.load import ClosedLoop, OpenLoop, TraceArrivals, drive

# --- schedules ----------------------------------------------------------------------------------


def test_poisson_arrivals_have_the_rate_and_cv_of_a_poisson_process():
    rate = 40.0
    a = OpenLoop(rate, 10_001, seed=11).arrivals_s()
    gaps = np.diff(a)
    assert a[0] == 0.0 and gaps.size == 10_000 and np.all(gaps >= 0)
    # mean gap 1/rate (standard error 1 %), coefficient of variation 1 (s.e. ~1.4 %)
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.06)
    # memoryless: P(gap > mean) = 1/e (s.e. 0.5 %); arrivals per 1 s bin: variance = mean
    assert np.mean(gaps > 1 / rate) == pytest.approx(math.exp(-1), abs=0.02)
    counts = np.bincount(a.astype(int))[:-1]
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.2)


def test_poisson_arrivals_are_reproducible_by_seed():
    np.testing.assert_array_equal(OpenLoop(5.0, 100, seed=3).arrivals_s(), OpenLoop(5.0, 100, seed=3).arrivals_s())
    assert not np.array_equal(OpenLoop(5.0, 100, seed=3).arrivals_s(), OpenLoop(5.0, 100, seed=4).arrivals_s())
    assert OpenLoop(5.0, 1).arrivals_s().tolist() == [0.0]
    assert OpenLoop(2.0, 10, seed=1).describe() == {"kind": "open", "arrival_rate_rps": 2.0, "n": 10, "seed": 1}
    for bad in (dict(rate_rps=0, n=1), dict(rate_rps=math.inf, n=1), dict(rate_rps=1.0, n=0),
                dict(rate_rps=1.0, n=2.5), dict(rate_rps=1.0, n=2, seed="x")):
        with pytest.raises(ConfigError):
            OpenLoop(**bad)
    for bad in (dict(concurrency=0, n=1), dict(concurrency=2, n=0), dict(concurrency=True, n=3)):
        with pytest.raises(ConfigError):
            ClosedLoop(**bad)


def test_trace_files_csv_and_json_lines(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("request,arrival_s,prompt\nq0,0.0,x\n\nq1,0.25,y\n# a comment\nq2,0.25,z\nq3,1.5,w\n")
    t = TraceArrivals.from_file(f)
    assert t.times_s == (0.0, 0.25, 0.25, 1.5) and t.n == 4 and t.source == str(f)
    assert t.rate_rps == pytest.approx(3 / 1.5)
    (tmp_path / "b.csv").write_text("0\n0.5\n2\n")
    assert TraceArrivals.from_file(tmp_path / "b.csv").times_s == (0.0, 0.5, 2.0)
    (tmp_path / "c.csv").write_text("seconds\n1\n2\n")
    assert TraceArrivals.from_file(tmp_path / "c.csv").times_s == (1.0, 2.0)
    (tmp_path / "d.jsonl").write_text('{"t_s": 0.1, "id": 1}\n{"t_s": 0.2}\n\n{"t_s": 3}\n')
    assert TraceArrivals.from_file(tmp_path / "d.jsonl").times_s == (0.1, 0.2, 3.0)
    (tmp_path / "e.jsonl").write_text("0\n1.5\n")
    assert TraceArrivals.from_file(tmp_path / "e.jsonl").arrivals_s().tolist() == [0.0, 1.5]
    (tmp_path / "f.txt").write_text('{"arrival_s": 2}\n')  # sniffed as JSON lines
    assert TraceArrivals.from_file(tmp_path / "f.txt").times_s == (2.0,)


@pytest.mark.parametrize("name, text, match", [
    ("unsorted.csv", "arrival_s\n0\n2\n1\n", r"line 4: arrival time 1.0 is before the previous one \(2.0\)"),
    ("negative.csv", "0\n-1\n", "line 2: arrival time -1.0 is negative"),
    ("nan.csv", "arrival_s\n0\nnan\n", "line 3: arrival time nan is not finite"),
    ("inf.jsonl", '{"t_s": 0}\n{"t_s": Infinity}\n', "line 2: arrival time inf is not finite"),
    ("text.csv", "arrival_s\n0\nsoon\n", "line 3: 'soon' is not a number of seconds"),
    ("columns.csv", "a,b\n1,2\n", "line 1: no arrival time column"),
    ("short.csv", "x,arrival_s\n1,0\n2\n", "line 3: 1 fields"),
    ("badjson.jsonl", '{"t_s": 0}\n{"t_s": \n', "line 2: not JSON"),
    ("nokey.jsonl", '{"when": 0}\n', "line 1: no arrival time key"),
    ("bool.jsonl", '{"t_s": true}\n', "line 1: True is not a number"),
    ("empty.csv", "\n# nothing\n", "no arrival times"),
    ("header_only.csv", "arrival_s\n", "no arrival times"),
])
def test_trace_file_errors_name_the_line(tmp_path, name, text, match):
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        TraceArrivals.from_file(f)
    assert name in str(e.value)


def test_trace_errors_for_missing_files_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        TraceArrivals.from_file(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="sorted"):
        TraceArrivals((1.0, 0.5))
    with pytest.raises(ConfigError, match="no arrival"):
        TraceArrivals(())


# --- the driver ---------------------------------------------------------------------------------


def sleeper(service_s, log=None):
    def submit(i):
        if log is not None:
            log.append((i, threading.get_ident()))
        time.sleep(service_s)
        return {"i": i}
    return submit


def test_closed_loop_keeps_the_requested_concurrency():
    res = drive(ClosedLoop(4, 160), sleeper(0.02), warmup_requests=8, cooldown_requests=8)
    assert [r.ok for r in res.records] == [True] * 160
    assert res.results[7] == {"i": 7}
    assert res.mean_concurrency == pytest.approx(4.0, rel=0.05)
    service = np.median([r.t_done_s - r.t_issued_s for r in res.records])
    assert res.completed_rps == pytest.approx(4 / service, rel=0.1)
    assert res.arrived_rps == pytest.approx(4 / service, rel=0.1)
    assert len(res.measured) == 160 - 16 and res.lateness_s == {}
    assert res.summary()["kind"] == "closed" and res.summary()["concurrency"] == 4


def test_open_loop_issues_at_the_arrival_times_and_reaches_the_rate():
    sched = OpenLoop(100.0, 300, seed=5)
    res = drive(sched, sleeper(0.03), warmup_s=0.2, cooldown_s=0.2)
    planned = sched.arrivals_s()
    base = res.records[0].t_scheduled_s
    lo, hi = res.window_s[0] - base, res.window_s[1] - base
    expected = np.count_nonzero((planned >= lo) & (planned < hi)) / (hi - lo)
    assert res.arrived_rps == pytest.approx(expected, rel=0.05)
    assert res.lateness_s["p50"] < 0.005
    # Little's law: time-averaged concurrency = arrival rate x time in system
    w = np.mean([res.records[i].t_done_s - res.records[i].t_issued_s for i in res.measured])
    assert res.mean_concurrency == pytest.approx(res.arrived_rps * w, rel=0.1)
    assert res.completed_rps == pytest.approx(res.arrived_rps, rel=0.15)


def test_warmup_and_cooldown_by_time_are_excluded():
    sched = TraceArrivals(tuple(0.05 * k for k in range(21)))
    res = drive(sched, sleeper(0.01), warmup_s=0.225, cooldown_s=0.225)
    phases = [r.phase for r in res.records]
    assert phases == ["warmup"] * 5 + ["measured"] * 11 + ["cooldown"] * 5
    assert res.measured == list(range(5, 16))
    t0, t1 = res.window_s
    assert t0 == pytest.approx(res.t_first_s + 0.225) and t1 == pytest.approx(res.t_last_issue_s - 0.225)
    assert res.arrived_rps == pytest.approx(11 / (t1 - t0))


def test_warmup_and_cooldown_by_request_count_are_excluded():
    res = drive(ClosedLoop(1, 20), sleeper(0.002), warmup_requests=3, cooldown_requests=2)
    assert res.measured == list(range(3, 18))
    assert res.window_s == (res.records[3].t_issued_s, res.records[18].t_issued_s)
    # one user: never more than one in flight
    assert res.mean_concurrency == pytest.approx(1.0, rel=0.05)
    with pytest.raises(ConfigError, match="none of the 5"):
        drive(ClosedLoop(1, 5), sleeper(0), warmup_requests=3, cooldown_requests=2)
    with pytest.raises(ConfigError, match="whole"):
        drive(TraceArrivals((0.0, 1.0)), sleeper(0), warmup_s=0.6, cooldown_s=0.5)
    # closed loop: a time-based exclusion that leaves nothing is reported, not raised
    res = drive(ClosedLoop(2, 4), sleeper(0.001), warmup_s=10.0)
    assert res.measured == [] and res.problems and math.isnan(res.mean_concurrency)


def test_failed_requests_are_kept_and_stop_on_error_stops_issuing():
    def flaky(i):
        if i == 5:
            raise RuntimeError("server went away")
        time.sleep(0.001)
        return i

    res = drive(ClosedLoop(2, 20), flaky)
    assert res.failed == [5] and isinstance(res.records[5].error, RuntimeError)
    assert res.results[5] is None and res.results[6] == 6
    sched = TraceArrivals(tuple(0.01 * k for k in range(40)))
    stopped = drive(sched, flaky, stop_on_error=True)
    assert stopped.stopped and "request 5 failed" in stopped.stopped
    assert any(r.phase == "not_issued" for r in stopped.records)
    assert stopped.records[-1].result is None and math.isnan(stopped.records[-1].t_issued_s)


def test_future_results_and_bounded_in_flight():
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=8)
    try:
        res = drive(OpenLoop(500.0, 40, seed=1), lambda i: pool.submit(lambda: (time.sleep(0.01), i)[1]))
    finally:
        pool.shutdown()
    assert res.results == list(range(40))
    seen, lock, peak = [0], threading.Lock(), [0]

    def counted(i):
        with lock:
            seen[0] += 1
            peak[0] = max(peak[0], seen[0])
        time.sleep(0.02)
        with lock:
            seen[0] -= 1

    res = drive(TraceArrivals((0.0,) * 12), counted, max_in_flight=3)
    assert peak[0] == 3
    assert res.lateness_s["max"] > 0.03  # arrivals waited for a free worker, and that is recorded
    done = []
    drive(ClosedLoop(3, 9), sleeper(0.001), on_done=lambda r: done.append(r.index))
    assert sorted(done) == list(range(9))
