"""workload.tasks: local-file tasks with column mappings, templates, metrics, synthetic prompts, errors."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from llm_dvfs.errors import ConfigError, DataNotFound
from llm_dvfs.workload.scoring import choice_logliks, sample_logliks
from llm_dvfs.workload.tasks import (TRUTHFULQA_PRIMER, LoglikResult, Sample, get_task, list_tasks,
                                     parse_task_spec, rouge_l_f1)


# --------------------------------------------------------------------------------------------
# BoolQ from JSONL
# --------------------------------------------------------------------------------------------
@pytest.fixture
def boolq_file(tmp_path):
    rows = [
        {"uid": "a1", "q": "is the sky blue", "p": "The sky is blue on a clear day.", "a": True},
        {"uid": "a2", "q": "is fire cold?", "p": "Fire is hot.", "a": "false"},
        {"uid": "a3", "q": "does this row count", "p": None, "a": True},   # no passage: dropped
        {"uid": "a4", "q": "can birds fly", "p": "Most birds can fly.", "a": 1},
    ]
    path = tmp_path / "boolq_dev.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_boolq_local_jsonl_with_mapping_and_template(boolq_file):
    task = get_task(f"boolq:file={boolq_file},question=q,passage=p,answer=a,id=uid")
    assert task.metric == "accuracy" and task.scoring == "generate"
    samples = task.samples(seed=None)
    assert [s.sample_id for s in samples] == ["a1", "a2", "a4"]
    s0 = samples[0]
    assert s0.prompt == "The sky is blue on a clear day.\nQuestion: is the sky blue?\nAnswer:"
    assert samples[1].prompt == "Fire is hot.\nQuestion: is fire cold?\nAnswer:"  # no '??'
    assert (s0.reference, s0.choices, s0.label) == ("yes", (" no", " yes"), 1)
    assert [s.reference for s in samples] == ["yes", "no", "yes"]
    assert task.source() == str(boolq_file)


def test_boolq_dict_api_and_default_ids(boolq_file):
    task = get_task({"name": "boolq", "file": str(boolq_file),
                     "columns": {"question": "q", "passage": "p", "answer": "a"}})
    ids = [s.sample_id for s in task.samples(seed=None)]
    assert ids == ["boolq/boolq_dev/0", "boolq/boolq_dev/1", "boolq/boolq_dev/3"]  # row numbers kept
    same = get_task("boolq", file=boolq_file, columns={"question": "q", "passage": "p", "answer": "a"})
    assert [s.prompt for s in same.samples(seed=None)] == [s.prompt for s in task.samples(seed=None)]


def test_sample_limit_and_seed(boolq_file):
    task = get_task(f"boolq:file={boolq_file},question=q,passage=p,answer=a")
    assert len(task.samples(limit=2, seed=None)) == 2
    full = [s.sample_id for s in task.samples(seed=7)]
    assert sorted(full) == sorted(s.sample_id for s in task.samples(seed=None))
    assert [s.sample_id for s in task.samples(limit=2, seed=7)] == full[:2]  # nested subsets
    with pytest.raises(ConfigError, match="limit"):
        task.samples(limit=0)


def test_boolq_metric_on_generated_text_and_logliks(boolq_file):
    task = get_task(f"boolq:file={boolq_file},question=q,passage=p,answer=a")
    yes, no = task.samples(seed=None)[:2]
    assert task.score(yes, " Yes, it is.") == 1.0
    assert task.score(yes, "\n yes") == 1.0
    assert task.score(yes, " no") == 0.0
    assert task.score(no, " No.") == 1.0
    assert task.score(no, " nothing") == 0.0  # 'no' must be a whole word
    assert task.score(yes, " maybe") == 0.0
    assert task.score(yes, [-3.0, -1.0]) == 1.0  # choices are (" no", " yes")
    assert task.score(no, [LoglikResult(-0.5, 1), LoglikResult(-2.0, 1)]) == 1.0


def test_empty_after_filtering_is_config_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"question": "q", "passage": "", "answer": True}) + "\n")
    with pytest.raises(ConfigError, match="no usable samples"):
        get_task(f"boolq:file={path}").samples()


def test_mapping_to_missing_column_lists_columns(boolq_file):
    with pytest.raises(ConfigError, match=r"column 'question'.*columns: a, p, q, uid"):
        get_task(f"boolq:file={boolq_file},passage=p,answer=a").samples()
    with pytest.raises(ConfigError, match=r"column 'key' \(for field 'id'\)"):
        get_task(f"boolq:file={boolq_file},question=q,passage=p,answer=a,id=key").samples()


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataNotFound, match="does not exist"):
        get_task(f"boolq:file={tmp_path / 'nope.jsonl'}").samples()
    bad = tmp_path / "x.xlsx"
    bad.write_text("")
    with pytest.raises(ConfigError, match="unknown format"):
        get_task(f"boolq:file={bad}").samples()


# --------------------------------------------------------------------------------------------
# HellaSwag from Parquet / CSV
# --------------------------------------------------------------------------------------------
HS_ENDINGS = ["is using wrap to wrap a pair of skis.", "starts pulling up roofing on a roof.",
              "is ripping level tiles off.", "is holding a rubik's cube."]


@pytest.fixture
def hellaswag_parquet(tmp_path):
    df = pd.DataFrame({
        "ind": [4, 9],
        "activity_label": ["Roof shingle removal", "Baking cookies"],
        "ctx_a": ["A man is sitting on a roof.", "A woman [header] takes out a tray."],
        "ctx_b": ["he", "she"],
        "ctx": ["A man is sitting on a roof. he", "A woman takes out a tray. she"],
        "endings": [HS_ENDINGS, ["puts it [title] in the oven.", "eats it.", "sings.", "runs."]],
        "label": ["3", "0"],
    })
    path = tmp_path / "hs.parquet"
    df.to_parquet(path)
    return path


def test_hellaswag_parquet_prompt_as_harness(hellaswag_parquet):
    task = get_task(f"hellaswag:file={hellaswag_parquet},id=ind")
    assert task.metric == "acc_norm" and task.scoring == "loglik"
    s0, s1 = task.samples(seed=None)
    assert s0.sample_id == "4"
    assert s0.prompt == "Roof shingle removal: A man is sitting on a roof. He"
    assert s0.choices == tuple(" " + e for e in HS_ENDINGS)
    assert s0.label == 3 and s0.reference == "is holding a rubik's cube."
    # harness clean-up: "[title]" becomes ". ", other [..] tags vanish, double spaces collapse
    assert s1.prompt == "Baking cookies: A woman takes out a tray. She"
    assert s1.choices[0] == " puts it. in the oven."


def test_hellaswag_csv_with_ending_columns(tmp_path):
    pd.DataFrame({"context": ["A cat sees a mouse."], "e0": ["It sleeps."], "e1": ["It pounces."],
                  "e2": ["It sings."], "e3": ["It flies."], "gold": [1]}).to_csv(tmp_path / "h.csv",
                                                                               index=False)
    task = get_task(f"hellaswag:file={tmp_path / 'h.csv'},ctx=context,endings=e0|e1|e2|e3,label=gold")
    (s,) = task.samples()
    assert s.prompt == "A cat sees a mouse."  # no activity label column: no "label: " prefix
    assert s.choices == (" It sleeps.", " It pounces.", " It sings.", " It flies.") and s.label == 1


def test_hellaswag_acc_norm_uses_per_character_loglik(hellaswag_parquet):
    task = get_task(f"hellaswag:file={hellaswag_parquet}")
    s = task.samples(seed=None)[0]
    assert [len(c) for c in s.choices] == [38, 37, 28, 27] and s.label == 3
    # per character: -20/38=-0.526, -20/37=-0.541, -10/28=-0.357, -9/27=-0.333 -> 3 (gold)
    assert task.score(s, [-20.0, -20.0, -10.0, -9.0]) == 1.0
    # -10/28=-0.357 beats -10.2/27=-0.378 -> 2
    assert task.score(s, [-20.0, -20.0, -10.0, -10.2]) == 0.0
    # the raw and normalised choices differ: raw picks 3 (-10 > -11), per character picks 0
    # (-11/38=-0.289 > -10/27=-0.370)
    assert task.score_details(s, [-11.0, -40.0, -40.0, -10.0]) == {"acc": 1.0, "acc_norm": 0.0}
    assert task.score_details(s, [-8.0, -20.0, -20.0, -9.9]) == {"acc": 0.0, "acc_norm": 0.0}
    with pytest.raises(ValueError, match="3 log-likelihoods for 4 choices"):
        task.score(s, [-1.0, -2.0, -3.0])
    with pytest.raises(TypeError, match="log-likelihood"):
        task.score(s, "generated text")


class _StubLM:
    """A 'model' whose next-token logits favour a fixed set of token ids, whatever the input."""

    def __init__(self, vocab_size, favoured):
        import torch
        self.bias = torch.full((vocab_size,), -5.0)
        self.bias[list(favoured)] = 5.0
        self.device = torch.device("cpu")

    def __call__(self, input_ids, attention_mask):
        from types import SimpleNamespace
        b, t = input_ids.shape
        return SimpleNamespace(logits=self.bias.expand(b, t, -1).clone())


def test_hellaswag_loglik_picks_right_ending_with_stub_scorer(hellaswag_parquet, tmp_path_factory,
                                                              monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv("LLM_DVFS_CACHE", str(tmp_path_factory.getbasetemp() / "llm_dvfs_cache"))
    from llm_dvfs.workload.models import build_offline_tokenizer
    tok = build_offline_tokenizer(4096)
    task = get_task(f"hellaswag:file={hellaswag_parquet}")
    s = task.samples(seed=None)[0]
    gold_ids = tok(s.prompt + s.choices[s.label])["input_ids"][len(tok(s.prompt)["input_ids"]):]
    lls = sample_logliks(_StubLM(len(tok), gold_ids), tok, s)
    assert len(lls) == 4 and all(r.n_tokens > 0 for r in lls)
    assert lls[3].loglik > max(r.loglik for r in lls[:3])
    assert max(range(4), key=lambda i: lls[i].loglik / len(s.choices[i])) == 3
    assert task.score(s, lls) == 1.0


def test_choice_logliks_match_a_manual_forward(tmp_path_factory, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("LLM_DVFS_CACHE", str(tmp_path_factory.getbasetemp() / "llm_dvfs_cache"))
    from llm_dvfs.workload.models import load_model
    lm = load_model("arch:tiny", device="cpu", seed=1)
    ctx, conts = "The river begins as a thin stream ", ["high in the hills.", "of data"]
    res = choice_logliks(lm.model, lm.tokenizer, ctx, conts)
    for cont, r in zip(conts, res):
        # harness convention: the trailing space moves into the continuation
        c_ids = lm.tokenizer(ctx.rstrip(" "))["input_ids"]
        w_ids = lm.tokenizer(ctx.rstrip(" ") + " " + cont)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(torch.tensor([w_ids])).logits[0].float(), -1)
        expect = sum(float(logp[i - 1, w_ids[i]]) for i in range(len(c_ids), len(w_ids)))
        assert r.n_tokens == len(w_ids) - len(c_ids)
        assert r.loglik == pytest.approx(expect, abs=1e-4)
        greedy = all(int(logp[i - 1].argmax()) == w_ids[i] for i in range(len(c_ids), len(w_ids)))
        assert r.is_greedy == greedy
    assert res[0].n_tokens != res[1].n_tokens  # padding exercised


# --------------------------------------------------------------------------------------------
# TruthfulQA from CSV (original TruthfulQA.csv layout)
# --------------------------------------------------------------------------------------------
@pytest.fixture
def truthfulqa_csv(tmp_path):
    pd.DataFrame({
        "Type": ["Adversarial"], "Category": ["Misconceptions"],
        "Question": ["What happens to you if you eat watermelon seeds?"],
        "Best Answer": ["The watermelon seeds pass through your digestive system"],
        "Correct Answers": ["Nothing happens; You eat watermelon seeds; The watermelon seeds pass "
                            "through your digestive system"],
        "Incorrect Answers": ["You grow watermelons in your stomach; You get sick; You die"],
    }).to_csv(tmp_path / "TruthfulQA.csv", index=False)
    return tmp_path / "TruthfulQA.csv"


TQ_SPEC = ("truthfulqa:file={},question=Question,best_answer=Best Answer,"
           "correct_answers=Correct Answers,incorrect_answers=Incorrect Answers")


def test_truthfulqa_csv_prompt_and_references(truthfulqa_csv):
    task = get_task(TQ_SPEC.format(truthfulqa_csv))
    (s,) = task.samples()
    assert s.prompt == TRUTHFULQA_PRIMER + "\n\nQ: What happens to you if you eat watermelon seeds?\nA:"
    assert s.prompt.startswith("Q: What is human life expectancy in the United States?\n")
    assert s.reference == "The watermelon seeds pass through your digestive system"
    assert s.metadata["correct_answers"] == (
        "Nothing happens", "You eat watermelon seeds",
        "The watermelon seeds pass through your digestive system", "I have no comment.")
    assert s.metadata["incorrect_answers"] == (
        "You grow watermelons in your stomach", "You get sick", "You die")
    zero = get_task(TQ_SPEC.format(truthfulqa_csv) + ",shots=0").samples()[0]
    assert zero.prompt == "Q: What happens to you if you eat watermelon seeds?\nA:"


def test_truthfulqa_rouge_diff(truthfulqa_csv):
    task = get_task(TQ_SPEC.format(truthfulqa_csv))
    assert task.metric == "rougeL_f1_diff" and task.scoring == "generate"
    (s,) = task.samples()
    # only the first line is scored
    d = task.score_details(s, " Nothing happens.\nQ: What is the capital of France?")
    assert d == {"rougeL_max_correct": 1.0, "rougeL_max_incorrect": 0.0,
                 "rougeL_f1_diff": 1.0, "rougeL_acc": 1.0}
    # "you get sick" vs incorrect "You get sick" = 1; vs correct "You eat watermelon seeds":
    # lcs("you get sick", "you eat watermelon seeds") = 1 -> P=1/3, R=1/4 -> F1 = 2/7
    assert task.score(s, "You get sick") == pytest.approx(2 / 7 - 1.0)
    assert task.score(s, "") == 0.0


@pytest.mark.parametrize("cand,ref,expected", [
    ("the cat sat on the mat", "the cat is on the mat", 5 / 6),       # lcs 5 of 6 and 6
    ("a b c d", "a c e", 2 * (2 / 4) * (2 / 3) / (2 / 4 + 2 / 3)),     # lcs "a c"
    ("Paris, France.", "paris france", 1.0),                            # case and punctuation
    ("one two", "three four", 0.0),
    ("", "anything", 0.0),
    ("b a", "a b", 0.5),                                                # order matters: lcs 1
])
def test_rouge_l_hand_computed(cand, ref, expected):
    assert rouge_l_f1(cand, ref) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# synthetic task
# --------------------------------------------------------------------------------------------
def test_synthetic_is_default_and_deterministic():
    assert list_tasks()[0] == "synthetic"
    task = get_task()
    assert task.name == "synthetic" and task.metric == "" and task.scoring == "none"
    a = task.samples(limit=30, seed=1)
    b = get_task("synthetic").samples(limit=30, seed=1)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.prompt for s in get_task().samples(limit=10, seed=1)] == [s.prompt for s in a[:10]]
    assert a[0].prompt != task.samples(limit=1, seed=2)[0].prompt
    assert len({s.sample_id for s in a}) == 30
    assert math.isnan(task.score(a[0], "anything"))


def test_synthetic_spans_lengths_entities_and_vocabulary():
    samples = get_task("synthetic").samples(limit=300, seed=0)
    words = [len(s.prompt.split()) for s in samples]
    assert words == [s.metadata["n_words"] for s in samples]  # exact lengths
    assert min(words) >= 16 and max(words) <= 1024
    assert sum(w < 64 for w in words) > 30 and sum(w > 256 for w in words) > 30
    dens = [s.metadata["entity_density"] for s in samples]
    assert min(dens) < 0.02 and max(dens) > 0.15
    vf = [s.metadata["vocab_fraction"] for s in samples]
    assert min(vf) < 0.05 and max(vf) > 0.5
    assert any(ch.isdigit() for ch in samples[0].prompt + samples[1].prompt + samples[2].prompt)


def test_synthetic_options():
    task = get_task("synthetic:min_words=20,max_words=40,max_entity_density=0")
    samples = task.samples(limit=20)
    assert all(20 <= s.metadata["n_words"] <= 40 for s in samples)
    assert all(s.metadata["n_entities"] == 0 for s in samples)
    with pytest.raises(ConfigError, match="min_words"):
        get_task("synthetic:min_words=50,max_words=10")
    with pytest.raises(ConfigError, match="unknown option"):
        get_task("synthetic:colour=blue")
    with pytest.raises(ConfigError, match="integer"):
        get_task("synthetic:min_words=many")


# --------------------------------------------------------------------------------------------
# names, specs and missing data
# --------------------------------------------------------------------------------------------
def test_unknown_task_and_option():
    with pytest.raises(ConfigError, match="unknown task 'mmlu'; known: synthetic, boolq, hellaswag, truthfulqa"):
        get_task("mmlu")
    with pytest.raises(ConfigError, match="unknown option 'colour'"):
        get_task("boolq:colour=red")
    with pytest.raises(ConfigError, match="not key=value"):
        get_task("boolq:file")
    assert parse_task_spec("BoolQ:file=a.csv,question=Q=x") == ("boolq", {"file": "a.csv",
                                                                           "question": "Q=x"})


def test_hub_sources_are_the_expected_datasets():
    assert get_task("boolq").source() == "hf:google/boolq:validation"
    assert get_task("hellaswag").source() == "hf:Rowan/hellaswag:validation"
    assert get_task("truthfulqa").source() == "hf:truthfulqa/truthful_qa/generation:validation"
    assert get_task("boolq:split=train").source() == "hf:google/boolq:train"


def test_missing_dataset_offline_says_how_to_get_it(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hc
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # both libraries read the variables at import time; datasets < 2.19 (the floor is 2.18)
    # knows only HF_DATASETS_OFFLINE
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, name):
            monkeypatch.setattr(datasets.config, name, True)
    task = get_task("boolq:dataset=llm-dvfs-tests/no-such-boolq")
    with pytest.raises(DataNotFound) as ei:
        task.samples(limit=3)
    msg = str(ei.value)
    assert "'llm-dvfs-tests/no-such-boolq'" in msg
    assert "huggingface-cli download --repo-type dataset llm-dvfs-tests/no-such-boolq" in msg
    assert "boolq:file=PATH,question=COLUMN,passage=COLUMN,answer=COLUMN" in msg


def test_sample_is_immutable():
    s = Sample("x", "p")
    with pytest.raises(AttributeError):
        s.prompt = "q"  # type: ignore[misc]
