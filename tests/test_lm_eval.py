"""lm-evaluation-harness integration: harness tasks from local files on arch:tiny, measured.

The tasks are built here (a JSONL and a task YAML each, in a temporary directory) and loaded
with ``TaskManager(include_path=...)``: nothing is downloaded. lm-eval is optional; without it
only the import test runs.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from llm_dvfs.errors import ConfigError

MAX_GEN = 8
# The random arch:tiny model (seed 0) repeats its prompt's last token: a prompt ending in " is"
# generates " is is is ...", so it meets the stop sequence "is is is" after 3 tokens, while a
# prompt ending in ":" never does and runs to MAX_GEN (the test checks both against a reference).
GEN_DOCS = [{"question": "The capital of France is", "answer": "Paris"},
            {"question": "Q: What is 2 plus 2?\nA:", "answer": "4"},
            {"question": "The colour of the sky is", "answer": "blue"}]
MC_DOCS = [{"question": f"Question {i}: which colour is the sky?", "choices": ["blue", "green", "red"],
            "label": 0} for i in range(3)]
UNTIL = ["is is is", "\n\n"]


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, lm_eval):
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_DOCS))
    (d / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in GEN_DOCS))
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (d / "ld_mc.yaml").write_text(
        "task: ld_mc\n" + common.format(d / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
          "doc_to_target: '{{label}}'\nmetric_list:\n  - metric: acc\n")
    (d / "ld_gen.yaml").write_text(
        "task: ld_gen\n" + common.format(d / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
          f"generation_kwargs:\n  until: {json.dumps(UNTIL)}\n  max_gen_toks: {MAX_GEN}\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")
    return d


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _evaluate(lm_eval, task_dir, model, model_args=None):
    from lm_eval.tasks import TaskManager

    import llm_dvfs.lm_eval
    llm_dvfs.lm_eval.register()
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["ld_mc", "ld_gen"],
                                   task_manager=TaskManager(include_path=str(task_dir)))


def _n_requests(samples) -> int:
    return sum(len(s["arguments"]) for s in samples)


def test_importing_llm_dvfs_does_not_import_lm_eval():
    code = ("import sys, llm_dvfs, llm_dvfs.lm_eval; import llm_dvfs.lm_eval.record; "
            "assert 'lm_eval' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gen_settings_read_lm_eval_kwargs():
    from llm_dvfs.lm_eval.stopping import gen_settings

    until, n, kw = gen_settings({"until": "\n", "max_new_tokens": 5, "temperature": 0.0}, 256, "<eos>")
    assert until == ["\n", "<eos>"] and n == 5
    assert kw == {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    until, n, kw = gen_settings({"max_gen_toks": 7, "max_tokens": 9, "temperature": 0.7, "top_p": 0.9}, 256, None)
    assert until == [] and n == 7 and kw == {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    assert gen_settings({}, 256, None)[1] == 256
    with pytest.raises(ConfigError, match="until"):
        gen_settings({"until": 3}, 256, None)
    with pytest.raises(ConfigError, match="max_gen_toks"):
        gen_settings({"max_gen_toks": 0}, 256, None)


def test_harness_tasks_from_local_files(lm_eval, task_dir, tmp_path, offline):
    import torch

    from llm_dvfs.workload.models import load_model
    from llm_dvfs.workload.scoring import choice_logliks

    out = tmp_path / "run"
    res = _evaluate(lm_eval, task_dir, "llm_dvfs-hf",
                    f"pretrained=arch:tiny,dtype=float32,device=cpu,batch_size=2,out={out}")
    # the harness scored both tasks itself
    assert "acc,none" in res["results"]["ld_mc"] and "exact_match,none" in res["results"]["ld_gen"]
    df = pd.read_parquet(out / "requests.parquet")
    samples = res["samples"]
    # one row per harness request, with the harness's task names and doc ids
    assert len(df) == _n_requests(samples["ld_mc"]) + _n_requests(samples["ld_gen"]) == 9 + 3
    assert df.groupby("task").size().to_dict() == {"ld_mc": 9, "ld_gen": 3}
    assert sorted(df.loc[df["task"] == "ld_mc", "sample_id"].unique()) == ["0", "1", "2"]
    assert df["request_id"].is_unique and (df["batch_size"] == 2).all()
    assert (df["tokens_in"] > 0).all() and (df["latency_s"] > 0).all()
    # CPU: time only, energies missing, nothing crashed
    assert (df["energy_method"] == "none").all() and df["energy_j"].isna().all()
    mc, gen = df[df["task"] == "ld_mc"], df[df["task"] == "ld_gen"]
    assert (mc["tokens_out"] == 0).all() and (gen["tokens_out"] > 0).all()
    assert (gen["ttft_s"] > 0).all()

    lm = load_model("arch:tiny", dtype="float32", device="cpu", seed=0)
    tok = lm.tokenizer
    # loglikelihood: the harness got what a direct, unbatched scoring gives
    for s in samples["ld_mc"]:
        ctx = s["arguments"][0][0]
        conts = [a[1] for a in s["arguments"]]
        ref = choice_logliks(lm.model, tok, ctx, conts)
        got = [r[0][0] for r in s["resps"]]
        assert got == pytest.approx([r.loglik for r in ref], abs=1e-4)

    # generate_until: each prompt stopped right where the stop sequence completed
    by_doc = {int(r.sample_id): r for r in gen.itertuples()}
    stopped = 0
    for s in samples["ld_gen"]:
        row = by_doc[s["doc_id"]]
        ids = tok(row.prompt, return_tensors="pt")
        with torch.inference_mode():
            full = lm.model.generate(**ids, max_new_tokens=MAX_GEN, do_sample=False, pad_token_id=tok.pad_token_id)
        ref = full[0, ids["input_ids"].shape[1]:].tolist()
        k = next((k for k in range(1, len(ref) + 1) if any(u in tok.decode(ref[:k]) for u in UNTIL)), len(ref))
        assert row.tokens_out == k
        assert row.output_text == tok.decode(ref[:k], skip_special_tokens=True)
        resp = s["resps"][0][0]
        assert resp == row.output_text.split(UNTIL[0])[0].split(UNTIL[1])[0]
        assert not any(u in resp for u in UNTIL)
        if k < MAX_GEN:
            stopped += 1
            assert any(row.output_text.endswith(u) for u in UNTIL)  # nothing generated after the stop
    assert stopped == 2  # the two " is" prompts; the ':' prompt ran to max_gen_toks
    # one token row per generated token
    toks = pd.read_parquet(out / "tokens.parquet")
    assert len(toks) == gen["tokens_out"].sum()

    m = json.loads((out / "manifest.json").read_text())
    assert m["engine"] == "lm_eval" and m["lm_eval_version"] == lm_eval.__version__
    assert m["model"]["model"] == "arch:tiny" and m["tasks"] == ["ld_gen", "ld_mc"]
    assert m["status"] == "complete" and m["energy_available"] is False
    totals = m["lm_eval"]["tasks"]
    assert totals["ld_mc"]["requests"] == 9 and totals["ld_mc"]["docs"] == 3
    assert totals["ld_mc"]["request_types"] == ["loglikelihood"]
    assert totals["ld_gen"]["tokens_out"] == int(gen["tokens_out"].sum())
    assert totals["ld_gen"]["energy_j"] is None and totals["ld_gen"]["busy_s"] > 0
    assert (out / "requests.csv").is_file() and (out / "power.parquet").is_file()


def test_launcher_runs_lm_evals_command_line(lm_eval, task_dir, tmp_path, offline, capsys):
    from llm_dvfs.lm_eval.__main__ import main

    out = tmp_path / "run"
    rc = main(["--tasks", "ld_mc", "--include_path", str(task_dir), "--limit", "2",
               "--model_args", f"pretrained=arch:tiny,device=cpu,batch_size=4,out={out}"])
    assert rc == 0
    df = pd.read_parquet(out / "requests.parquet")
    # --model defaulted to llm_dvfs-hf; batch_size in --model_args beat the CLI's default of 1
    assert len(df) == 2 * 3 and (df["batch_size"] == 4).all()
    assert "ld_mc" in capsys.readouterr().out  # lm-eval's own results table


def test_rolling_and_repeated_requests_called_directly(lm_eval, tmp_path):
    from lm_eval.api.instance import Instance

    from llm_dvfs.lm_eval.model import LlmDvfsLM
    from llm_dvfs.workload.scoring import choice_logliks

    out = tmp_path / "run"
    lm = LlmDvfsLM(pretrained="arch:tiny", dtype="float32", device="cpu", batch_size=2, out=str(out),
                   max_length=16, warmup=0)
    long = ("The river begins as a thin stream high in the hills and runs down past the town to the sea, "
            "where the boats wait for the tide and the gulls circle over the harbour wall.")
    short = "A short line."
    n_long = len(lm.tokenizer(long)["input_ids"])
    assert n_long > 2 * 16  # three or more rolling windows of 16 tokens
    ll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0, ("ppl", i, 1))
                                   for i, t in enumerate([long, short])])
    # a text inside one window is scored from the BOS/EOS token, like an empty context
    assert ll[1] == pytest.approx(choice_logliks(lm.model, lm.tokenizer, "", [short])[0].loglik, abs=1e-4)
    assert math.isfinite(ll[0]) and ll[0] < ll[1]
    # a task that repeats a request, asked twice: distinct request ids, one cell per call
    same = Instance("loglikelihood", {}, ("Hello", " world"), 0, ("mc", 0, 2))
    first = lm.loglikelihood([same, same])
    again = lm.loglikelihood([same])
    # (float32 rows of one batch may differ in the last bits)
    assert [r[0] for r in first + again] == pytest.approx([first[0][0]] * 3, abs=1e-5)
    df = pd.read_parquet(out / "requests.parquet")
    assert df.groupby("task").size().to_dict() == {"ppl": 2, "mc": 3} and df["request_id"].is_unique
    ppl = df[df["task"] == "ppl"].set_index("sample_id")
    assert ppl.loc["0", "tokens_in"] >= n_long and ppl.loc["0", "tokens_out"] == 0
    assert sorted(df.loc[df["task"] == "mc", "cell_id"].str.rsplit("|", n=1).str[1]) == ["r0", "r0", "r1"]
    assert sorted(df.loc[df["task"] == "mc", "repeat"]) == [0, 0, 1]
    m = json.loads((out / "manifest.json").read_text())
    assert m["lm_eval"]["tasks"]["ppl"]["request_types"] == ["loglikelihood_rolling"]
    assert m["lm_eval"]["tasks"]["mc"]["requests"] == 3 and m["cells_done"] == 3


def test_bad_model_args(lm_eval, tmp_path):
    from llm_dvfs.lm_eval.model import LlmDvfsLM

    with pytest.raises(ConfigError, match="unknown model argument"):
        LlmDvfsLM.create_from_arg_string("pretrained=arch:tiny,batchsize=4")
    with pytest.raises(ConfigError, match="auto"):
        LlmDvfsLM.create_from_arg_string("pretrained=arch:tiny,batch_size=auto")
    with pytest.raises(ConfigError, match="pretrained"):
        LlmDvfsLM.create_from_arg_string("device=cpu")
    (tmp_path / "x").write_text("")
    with pytest.raises(ConfigError, match="not an empty directory"):
        LlmDvfsLM.create_from_arg_string(f"pretrained=arch:tiny,device=cpu,out={tmp_path}")


@pytest.mark.native
def test_energy_per_request_with_emulated_gpu(lm_eval, task_dir, tmp_path, offline, fake_gpu):
    from llm_dvfs.lm_eval.model import LlmDvfsLM
    from llm_dvfs.meter.monitor import PowerMonitor

    fake_gpu.set_power_w(300.0)
    out = tmp_path / "run"
    with PowerMonitor(devices=[0]) as mon:
        lm = LlmDvfsLM(pretrained="arch:tiny", dtype="float32", device="cpu", batch_size=2, out=str(out),
                       monitor=mon, idle_s=0.2)
        _evaluate(lm_eval, task_dir, lm)
    df = pd.read_parquet(out / "requests.parquet")
    assert (df["energy_method"] == "buffer").all() and (df["energy_j"] > 0).all()
    assert np.allclose(df["idle_power_w"], 300.0, rtol=0.02)
    # loglikelihood: a batch's window energy is split in proportion to tokens_in
    mc = df[df["task"] == "ld_mc"]
    for _, b in mc.groupby("latency_s"):
        per_token = b["energy_j"] / b["tokens_in"]
        assert np.allclose(per_token, per_token.iloc[0])
        assert b["energy_j"].sum() == pytest.approx(300.0 * b["latency_s"].iloc[0], rel=0.05)
    # generate_until: attributed per step; prefill + decode is the request's energy
    gen = df[df["task"] == "ld_gen"]
    assert np.allclose(gen["prefill_energy_j"] + gen["decode_energy_j"], gen["energy_j"])
    toks = pd.read_parquet(out / "tokens.parquet")
    assert np.allclose(toks.groupby("request_id")["energy_j"].sum().loc[gen["request_id"]], gen["energy_j"])
    # per task totals are the sums of their requests; the cells' window energies agree
    m = json.loads((out / "manifest.json").read_text())
    assert m["energy_available"] is True and m["gpus"][0]["name"]
    for task, g in df.groupby("task"):
        assert m["lm_eval"]["tasks"][task]["energy_j"] == pytest.approx(g["energy_j"].sum())
    cells = [json.loads(p.read_text()) for p in (out / "cells").glob("*.json")]
    mc_cell = next(c for c in cells if c["task"] == "ld_mc")
    assert mc_cell["energy_j"] == pytest.approx(mc["energy_j"].sum())
    assert math.isfinite(mc_cell["busy_s"]) and len(pd.read_parquet(out / "power.parquet")) > 0
    # the sweep's report reads a harness run directory
    from llm_dvfs.report import main as report_main

    assert report_main([str(out), "--no-html", "--n-boot", "100"]) == 0
    summary = pd.read_csv(out / "report" / "summary.csv")
    assert set(summary["task"]) == {"ld_mc", "ld_gen"}
