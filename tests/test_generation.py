"""Generation as Hugging Face and lm-evaluation-harness do it: the checkpoint's generation_config
(several EOS ids), task stop sequences with the stop reason and tokens per row, the opt-in chat
template, --model-args pass-through and the revision pinned per row and in the manifest."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from llm_dvfs.errors import ConfigError  # noqa: E402
from llm_dvfs.schema import to_frame  # noqa: E402
from llm_dvfs.workload.model_args import parse_model_args  # noqa: E402
from llm_dvfs.workload.models import load_model  # noqa: E402
from llm_dvfs.workload.runner import GenerationSettings, Runner, _batch_seed  # noqa: E402
from llm_dvfs.workload.stopping import STOP_REASONS  # noqa: E402
from llm_dvfs.workload.tasks import get_task  # noqa: E402

MAX_NEW = 12
# sampled decoding over the near-uniform logits of random weights gives varied tokens (greedy
# repeats one); each batch is seeded from (seed, cell id, batch), so two runs of one cell draw
# the same tokens up to where one of them stops
SAMPLED = GenerationSettings(max_new_tokens=MAX_NEW, decoding="sampled", seed=3)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LLM_DVFS_CACHE", str(tmp_path_factory.getbasetemp() / "llm_dvfs_cache"))


@pytest.fixture
def tiny():
    # function scope: tests change its generation config
    return load_model("arch:tiny", device="cpu", seed=0)


@pytest.fixture(scope="module")
def synthetic():
    task = get_task("synthetic:max_words=24")
    return task, task.samples(1, 0)


class _StopTask:
    """A task with no metric whose stop strings a test chooses."""

    name, metric, scoring = "stoptest", "", "none"

    def __init__(self, stop):
        self.stop = tuple(stop)


def _run(lm, task, samples, settings=SAMPLED, cell_id="c", batch_size=1):
    return to_frame("requests", Runner(lm, None, settings).run(
        task, samples, batch_size=batch_size, cell_id=cell_id, context={"task": task.name}, warmup=0).requests)


def _generated_ids(lm, samples, settings=SAMPLED, cell_id="c"):
    """Token ids per row of the draw the runner makes for ``samples`` as one batch of cell
    ``cell_id`` (same seed, same encoding, same generate arguments), with nothing to stop it
    but the generation config's EOS ids."""
    r = Runner(lm, None, settings, token_timing=False)
    inputs, _ = r.encode([s.prompt for s in samples])
    torch.manual_seed(_batch_seed(settings.seed, cell_id, 0))
    with torch.inference_mode():
        out = lm.model.generate(**inputs, **r.generate_kwargs())
    return out[:, inputs["input_ids"].shape[1]:].tolist()


def _full_draw(lm, samples, cell_id="c"):
    """Set the generation config's EOS ids to two ids the draw for ``samples`` never makes, and
    return (the draw's ids per row, those two ids). The draw does not depend on the EOS ids
    (nothing masks them without a fixed output length), so a draw cut short by one of them is
    the same draw as far as it went: pick two others and draw again."""
    unused = [4094, 4095]
    while True:
        lm.model.generation_config.eos_token_id = unused
        rows = _generated_ids(lm, samples, cell_id=cell_id)
        seen = {t for r in rows for t in r}
        if all(len(r) == MAX_NEW for r in rows):
            return rows, unused
        unused = [t for t in range(4095, 0, -1) if t not in seen][:2]


def _first_new(ids, start=2, avoid=()):
    """The first position >= start whose token does not occur before it (nor in ``avoid``)."""
    return next(i for i in range(start, len(ids)) if ids[i] not in ids[:i] and ids[i] not in avoid)


def test_generation_config_eos_ids_all_stop_generation(tiny, synthetic):
    task, samples = synthetic
    lm = tiny
    gc = lm.model.generation_config
    assert gc.eos_token_id == lm.tokenizer.eos_token_id == 0
    # 1. the draw with EOS ids that never come: the whole sequence
    (ids,), unused = _full_draw(lm, samples)
    assert len(ids) == MAX_NEW and not set(unused) & set(ids)
    full = _run(lm, _StopTask(()), samples)
    assert full["tokens_out"].tolist() == [MAX_NEW] and full["stop_reason"].tolist() == ["max_new_tokens"]
    assert full["output_text"][0] == lm.tokenizer.decode(ids, skip_special_tokens=True)  # the same draw
    # 2. the second of two EOS ids is the token drawn at position p (its first occurrence):
    # generation ends there, whatever the tokenizer's one EOS (0) is
    p = _first_new(ids, avoid=[0])
    gc.eos_token_id = [unused[0], ids[p]]
    df = _run(lm, _StopTask(()), samples)
    assert df["stop_reason"].tolist() == ["eos"]
    assert df["tokens_out"].tolist() == [p + 1] and p + 1 < MAX_NEW
    assert df["output_text"][0] == lm.tokenizer.decode(ids[: p + 1], skip_special_tokens=True)


def test_checkpoint_generation_config_is_kept(tiny, synthetic, tmp_path):
    """A local checkpoint whose generation_config.json lists two EOS ids (as Llama-3 instruct's
    does) keeps both; generation stops at the second."""
    task, samples = synthetic
    (ids,), (a, _) = _full_draw(tiny, samples)
    p = _first_new(ids, avoid=[0])
    d = tmp_path / "ckpt"
    tiny.model.generation_config.eos_token_id = [a, ids[p]]
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == [a, ids[p]]
    lm = load_model(str(d), device="cpu")
    assert lm.model.generation_config.eos_token_id == [a, ids[p]]
    assert lm.tokenizer.eos_token_id == 0                # the tokenizer has one EOS, unchanged
    assert lm.describe()["eos_token_id"] == [a, ids[p]]  # the manifest says what stops generation
    df = _run(lm, _StopTask(()), samples)
    assert df["stop_reason"].tolist() == ["eos"] and df["tokens_out"].tolist() == [p + 1]


def test_task_stop_string_ends_generation_where_the_text_completes_it(tiny, synthetic):
    task, samples = synthetic
    (ids,), _ = _full_draw(tiny, samples)
    pieces = [tiny.tokenizer.decode([i]) for i in ids]
    # a stop string: the letters of a token from position 3 on that the text before it lacks
    k, stop = next((i, pieces[i].strip()) for i in range(3, len(ids))
                   if pieces[i].strip().isalpha() and pieces[i].strip() not in "".join(pieces[:i]))
    # expected by plain string search (independent of transformers' tensor matching): the first
    # prefix of the generated text that contains the stop string
    expected = next(n for n in range(1, len(ids) + 1) if stop in "".join(pieces[:n]))
    assert expected == k + 1 < MAX_NEW
    df = _run(tiny, _StopTask((stop,)), samples)
    assert df["stop_reason"].tolist() == ["stop_string"]
    assert df["tokens_out"].tolist() == [expected]
    assert df["output_text"][0] == tiny.tokenizer.decode(ids[:expected], skip_special_tokens=True)
    # stop sequences off, or a fixed output length: the same draw runs to max_new_tokens
    off = _run(tiny, _StopTask((stop,)), samples, dataclasses.replace(SAMPLED, stop_sequences=False))
    fixed = _run(tiny, _StopTask((stop,)), samples, dataclasses.replace(SAMPLED, fixed_output_length=True))
    assert off["tokens_out"].tolist() == fixed["tokens_out"].tolist() == [MAX_NEW]
    assert off["stop_reason"].tolist() == fixed["stop_reason"].tolist() == ["max_new_tokens"]


def test_stop_reason_and_tokens_per_row_in_a_batch(tiny):
    """Rows of one batch that end differently: the EOS row is padded after its end, and neither
    the pad nor the other row's steps count as its tokens; the token rows agree."""
    task = get_task("synthetic:max_words=24")
    samples = task.samples(2, 0)
    (ids0, ids1), (a, _) = _full_draw(tiny, samples, cell_id="b")
    p = _first_new(ids0, avoid=ids1)
    tiny.model.generation_config.eos_token_id = [ids0[p], a]
    res = Runner(tiny, None, SAMPLED).run(_StopTask(()), samples, batch_size=2, cell_id="b",
                                         context={"task": "t"}, warmup=0)
    df = to_frame("requests", res.requests)
    assert df["stop_reason"].tolist() == ["eos", "max_new_tokens"]
    assert df["tokens_out"].tolist() == [p + 1, MAX_NEW]
    tok = to_frame("tokens", res.tokens)
    assert tok.groupby("request_id").size().loc[df["request_id"]].tolist() == [p + 1, MAX_NEW]
    assert df["revision"].isna().all()  # random weights: no commit to record, null not made up


def _newline_model(lm):
    """``lm`` with a head that always predicts a newline token: the model's own generation, so
    only the task's stop string can end it before max_new_tokens."""
    lm = dataclasses.replace(lm, model=copy.deepcopy(lm.model))
    nl = lm.tokenizer.convert_tokens_to_ids("\u010a")      # byte-level BPE's "\n"
    assert lm.tokenizer.decode([nl]) == "\n"
    head = torch.nn.Linear(lm.model.config.hidden_size, lm.model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[nl] = 10.0
    lm.model.lm_head = head   # untied from the input embeddings, which stay as they were
    return lm


@pytest.mark.parametrize("kind", ["boolq", "truthfulqa"])
def test_boolq_and_truthfulqa_stop_at_the_newline(kind, tiny, tmp_path):
    if kind == "boolq":
        f = tmp_path / "bq.jsonl"
        f.write_text(json.dumps({"question": "is the sky blue", "passage": "The sky is blue.",
                                 "answer": True}) + "\n")
        task = get_task(f"boolq:file={f}")
    else:
        f = tmp_path / "tq.jsonl"
        f.write_text(json.dumps({"question": "Where is Paris?", "best_answer": "In France",
                                 "correct_answers": ["In France"],
                                 "incorrect_answers": ["In Spain"]}) + "\n")
        task = get_task(f"truthfulqa:file={f},shots=0")
    assert task.stop == ("\n",)
    lm = _newline_model(tiny)
    greedy = GenerationSettings(max_new_tokens=6)
    df = _run(lm, task, task.samples(None, None), greedy)
    assert df["output_text"].tolist() == ["\n"]
    assert df["tokens_out"].tolist() == [1] and df["stop_reason"].tolist() == ["stop_string"]
    # without the task's stop sequence the same model spends all six tokens
    off = _run(lm, task, task.samples(None, None), dataclasses.replace(greedy, stop_sequences=False))
    assert off["tokens_out"].tolist() == [6] and off["stop_reason"].tolist() == ["max_new_tokens"]
    assert off["output_text"].tolist() == ["\n" * 6]
    # and what follows the newline would never have been scored
    s = task.samples(None, None)[0]
    answer, more = (" yes", "\nno, no") if kind == "boolq" else (" In France", "\nQ: In Spain")
    assert task.score(s, answer + "\n") == task.score(s, answer + more) > 0


# --------------------------------------------------------------------------------------------
# chat template
# --------------------------------------------------------------------------------------------
CHAT = ("{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_apply_chat_template(tiny, synthetic):
    task, samples = synthetic
    with pytest.raises(ConfigError, match="has no chat template"):
        Runner(tiny, None, GenerationSettings(max_new_tokens=2, apply_chat_template=True))
    tok = copy.deepcopy(tiny.tokenizer)
    tok.chat_template = CHAT
    lm = dataclasses.replace(tiny, tokenizer=tok)
    st = GenerationSettings(max_new_tokens=2, apply_chat_template=True)
    df = _run(lm, task, samples, st)
    want = f"<|user|>{samples[0].prompt}<|end|><|assistant|>"
    assert df["prompt"].tolist() == [want]
    assert df["tokens_in"].tolist() == [len(tok(want, add_special_tokens=False)["input_ids"])]
    assert df["tokens_in"][0] > _run(lm, task, samples, GenerationSettings(max_new_tokens=2))["tokens_in"][0]


def test_chat_template_option_is_rejected_before_any_work_without_a_template(tmp_path, capsys):
    from llm_dvfs.run import main

    out = tmp_path / "run"
    rc = main(["--models", "arch:tiny", "--apply-chat-template", "--gpu", "none", "--ner", "heuristic",
               "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no chat template" in err and "--model-args tokenizer=" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# --model-args
# --------------------------------------------------------------------------------------------
def test_parse_model_args_like_lm_eval_with_json_values():
    got = parse_model_args('revision=0123,attn_implementation=sdpa,load_in_8bit=True,low_cpu_mem_usage=false,'
                           'max_memory_gb=12,scale=0.5,quantization_config={"load_in_4bit": true, '
                           '"bnb_4bit_quant_type": "nf4", "skip": ["a", "b"]},name="1e10",x=none')
    assert got == {"revision": "0123", "attn_implementation": "sdpa", "load_in_8bit": True,
                   "low_cpu_mem_usage": False, "max_memory_gb": 12, "scale": 0.5,
                   "quantization_config": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                           "skip": ["a", "b"]},
                   "name": "1e10", "x": None}
    assert parse_model_args({"attn_implementation": "eager"}) == {"attn_implementation": "eager"}
    assert parse_model_args("") == {} and parse_model_args(None) == {}
    for bad, msg in (("revision", "not key=value"), ("a=1,a=2", "given twice"),
                     ('q={"a": 1', "unbalanced"), ("q={a: 1}", "not valid JSON")):
        with pytest.raises(ConfigError, match=msg):
            parse_model_args(bad)


def test_model_args_reach_from_pretrained(tiny, tmp_path):
    d = tmp_path / "m"
    tiny.model.save_pretrained(d)
    tiny.tokenizer.save_pretrained(d)
    for impl in ("eager", "sdpa"):
        lm = load_model(str(d), device="cpu", model_args={"attn_implementation": impl})
        assert lm.model.config._attn_implementation == impl
        assert lm.model_args == {"attn_implementation": impl}
        assert lm.describe()["model_args"] == {"attn_implementation": impl}
    # a pass-through key goes to from_pretrained as given (here one that changes the dtype)
    lm = load_model(str(d), device="cpu", model_args={"dtype": "bfloat16"})
    assert lm.dtype == "bfloat16"
    # a local directory has no commit: the revision is the one asked for (here none)
    assert lm.revision is None
    # a JSON value arrives as the dict from_pretrained takes for a quantisation config (the
    # quantisation itself needs bitsandbytes and a GPU: the spy drops it before loading)
    import transformers

    real = transformers.AutoModelForCausalLM.from_pretrained.__func__
    seen = {}

    def spy(cls, *a, **kw):
        seen.update(kw)
        kw.pop("quantization_config")
        return real(cls, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    try:
        load_model(str(d), device="cpu", model_args=parse_model_args(
            'quantization_config={"load_in_4bit": true, "bnb_4bit_compute_dtype": "bfloat16"},'
            "low_cpu_mem_usage=true"))
    finally:
        mp.undo()
    assert seen["quantization_config"] == {"load_in_4bit": True, "bnb_4bit_compute_dtype": "bfloat16"}
    assert seen["low_cpu_mem_usage"] is True and seen["dtype"] == "auto"
    with pytest.raises(ConfigError, match="given twice"):
        load_model(str(d), device="cpu", revision="a", model_args={"revision": "b"})
    with pytest.raises(ConfigError, match="needs a pretrained checkpoint"):
        load_model("arch:tiny", device="cpu", model_args={"quantization_config": {"load_in_4bit": True}})
    built = load_model("arch:tiny", device="cpu", model_args={"attn_implementation": "eager"})
    assert built.model.config._attn_implementation == "eager"


def _fake_hub_cache(tiny, root, repo="llm-dvfs-tests/tiny", sha="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache holding ``repo`` at commit ``sha`` (branch main), as
    ``hf download`` leaves it: what offline loading resolves a revision against."""
    base = root / ("models--" + repo.replace("/", "--"))
    snap = base / "snapshots" / sha
    tiny.model.save_pretrained(snap)
    tiny.tokenizer.save_pretrained(snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(sha)
    return repo, sha


def test_sweep_pins_the_hub_revision_per_row_and_in_the_manifest(tiny, tmp_path):
    """``--model-args revision=main`` on a hub model: every row and the manifest record the
    commit main resolved to; ``--limit`` is ``--samples``; rows say why each request stopped."""
    cache = tmp_path / "hub"
    repo, sha = _fake_hub_cache(tiny, cache)
    out = tmp_path / "run"
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "LLM_DVFS_NVML_LIBRARY": str(tmp_path / "no-driver.so")}
    p = subprocess.run([sys.executable, "-m", "llm_dvfs.run", "--models", repo,
                        "--model-args", "revision=main,attn_implementation=eager",
                        "--tasks", "synthetic:max_words=16", "--limit", "2", "--max-new-tokens", "3",
                        "--ner", "heuristic", "--device", "cpu", "--gpu", "none", "--idle-s", "0",
                        "--warmup", "0", "--out", str(out), "-q"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    import pandas as pd

    req = pd.read_parquet(out / "requests.parquet")
    man = json.loads((out / "manifest.json").read_text())
    assert len(req) == 2                                   # --limit 2
    assert req["revision"].tolist() == [sha, sha]
    assert req["weights"].tolist() == ["pretrained"] * 2
    assert set(req["stop_reason"]) <= set(STOP_REASONS) and not req["stop_reason"].isna().any()
    m = man["models"][repo]
    assert m["revision"] == sha and m["revision_requested"] == "main"
    assert m["model_args"] == {"revision": "main", "attn_implementation": "eager"}
    assert man["config"]["model_args"] == {"revision": "main", "attn_implementation": "eager"}
    assert man["tasks"]["synthetic"]["stop"] == []
