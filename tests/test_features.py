"""features.py: every feature on hand-computed examples, NER estimators, the nltk-missing error."""
from __future__ import annotations

import math

import pytest

from llm_dvfs.workload import features
from llm_dvfs.errors import ConfigError, DataNotFound
from llm_dvfs.workload.features import FEATURE_COLUMNS, compute_features, heuristic_entities
from llm_dvfs.schema import FEATURE_PREFIX, to_frame


def H(counts):
    """Shannon entropy in bits of a list of counts, written out independently of features.py."""
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts)


def one(text, **kw):
    kw.setdefault("ner", None)
    return compute_features([text], **kw).iloc[0]


@pytest.fixture(scope="module")
def word_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers
    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "c": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_columns_and_prefix():
    df = compute_features(["x"], ner=None)
    assert list(df.columns) == list(FEATURE_COLUMNS)
    assert all(c.startswith(FEATURE_PREFIX) for c in df.columns)
    assert all(str(t) == "float64" for t in df.dtypes)


def test_counts_ratios_on_a_hand_computed_sentence():
    r = one("Hello, world! It's 2024.")
    assert r.feat_chars == 24
    assert r.feat_words == 4                      # Hello world It's 2024
    assert r.feat_sentences == 2                  # "!" + " " and the final "."
    assert r.feat_digit_ratio == pytest.approx(4 / 24)
    assert r.feat_punct_ratio == pytest.approx(4 / 24)   # , ! ' .
    assert r.feat_type_token_ratio == 1.0
    assert r.feat_mean_word_len == pytest.approx((5 + 5 + 4 + 4) / 4)
    # H1 e1 l3 o2 ,1 space3 w1 r1 d1 !1 I1 t1 '1 s1 2:2 0:1 4:1 .1
    assert r.feat_char_entropy_bits == pytest.approx(H([1, 1, 3, 2, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1, 1, 1]))
    assert math.isnan(r.feat_tokens) and math.isnan(r.feat_token_entropy_bits)  # no tokenizer
    assert math.isnan(r.feat_ne_density)  # ner=None


@pytest.mark.parametrize("text,bits", [("aaaa", 0.0), ("abab", 1.0), ("abcd", 2.0), ("aab", H([2, 1]))])
def test_char_entropy(text, bits):
    assert one(text).feat_char_entropy_bits == pytest.approx(bits)


def test_words_type_token_ratio_and_length():
    r = one("The cat and the hat")
    assert (r.feat_words, r.feat_type_token_ratio, r.feat_mean_word_len) == (5, 0.8, 3.0)
    r = one("(Paris), well-known -- don't 3.5%")
    assert r.feat_words == 4                      # Paris, well-known, don't, 3.5 ("--" is none)
    assert r.feat_mean_word_len == pytest.approx((5 + 10 + 5 + 3) / 4)


@pytest.mark.parametrize("text,n", [
    ("Pi is 3.14 today", 1),                      # a decimal point ends nothing
    ("Wait... what?! OK", 3),
    ('"Stop." He left.', 2),                      # closing quote after the full stop
    ("no punctuation at all", 1),
    ("line one\nline two.", 1),                   # newlines are not sentence ends
    ("!!!", 0),                                   # no letters or digits: no sentence
    ("", 0),
])
def test_sentences(text, n):
    assert one(text).feat_sentences == n


def test_punctuation_includes_ascii_symbols_and_unicode_punctuation():
    assert one("a+b=c").feat_punct_ratio == pytest.approx(2 / 5)
    assert one("\u00abHi\u00bb").feat_punct_ratio == pytest.approx(2 / 4)   # «Hi»
    assert one("x_y").feat_punct_ratio == pytest.approx(1 / 3)


def test_empty_prompt():
    r = one("", tokenizer=None)
    assert (r.feat_chars, r.feat_words, r.feat_sentences) == (0, 0, 0)
    for c in ("feat_char_entropy_bits", "feat_type_token_ratio", "feat_mean_word_len",
              "feat_digit_ratio", "feat_punct_ratio"):
        assert math.isnan(r[c])


def test_token_features_with_a_word_level_tokenizer(word_tokenizer):
    df = compute_features(["a b c a", "a a", ""], tokenizer=word_tokenizer, ner=None)
    assert list(df.feat_tokens) == [4, 2, 0]
    assert df.feat_token_entropy_bits[0] == pytest.approx(1.5)   # counts 2,1,1
    assert df.feat_token_entropy_bits[1] == 0.0
    assert math.isnan(df.feat_token_entropy_bits[2])


def test_token_features_with_a_transformers_tokenizer(tmp_path_factory, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setenv("LLM_DVFS_CACHE", str(tmp_path_factory.getbasetemp() / "llm_dvfs_cache"))
    from llm_dvfs.workload.models import build_offline_tokenizer
    tok = build_offline_tokenizer(4096)
    text = "The river begins as a thin stream high in the hills."
    r = one(text, tokenizer=tok)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert r.feat_tokens == len(ids)
    counts = [ids.count(i) for i in set(ids)]
    assert r.feat_token_entropy_bits == pytest.approx(H(counts))
    # the raw `tokenizers` object gives the same numbers
    assert one(text, tokenizer=tok.backend_tokenizer).feat_tokens == len(ids)
    # a padded batch call leaves padding on in the shared engine; counts must not include it
    tok(["a", text + " " + text], padding=True)
    df = compute_features(["a", text], tokenizer=tok, ner=None)
    assert list(df.feat_tokens) == [1, len(ids)]
    assert compute_features([text], tokenizer=tok, ner=None).attrs["tokenizer"] == tok.name_or_path


@pytest.mark.parametrize("text,n", [
    ("Yesterday Maria Lopez flew from New York to Paris with the United Nations team.", 4),
    ("He works at the Bank of England today.", 1),
    ("I think Paris is nice.", 1),
    ("Paris is big. London is bigger.", 0),       # a lone capitalised word opening a sentence
    ("Question: is it?\nAnswer: yes", 0),          # line starts count as sentence starts
    ("We met Anna, Ben and Carl.", 3),
    ("The United Nations met.", 1),                # >= 2 capitalised words at a start: a name
])
def test_heuristic_entities(text, n):
    assert heuristic_entities(text) == n


def test_heuristic_density_and_estimator_label():
    text = "Yesterday Maria Lopez flew from New York to Paris with the United Nations team."
    df = compute_features([text, ""], ner="heuristic")
    assert df.feat_words[0] == 14
    assert df.feat_ne_density[0] == pytest.approx(4 / 14)
    assert math.isnan(df.feat_ne_density[1])
    assert df.attrs["ner_estimator"] == "heuristic-capitalised-runs"
    assert compute_features(["x"], ner=None).attrs["ner_estimator"] == "none"


def test_unknown_ner_estimator():
    with pytest.raises(ConfigError, match="ner"):
        compute_features(["x"], ner="spacy")


def test_missing_nltk_data_names_the_downloads(tmp_path, monkeypatch):
    nltk = pytest.importorskip("nltk")
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    features._nltk_pipeline.cache_clear()
    try:
        with pytest.raises(DataNotFound) as ei:
            compute_features(["Maria lives in Paris."])   # nltk is the default estimator
    finally:
        features._nltk_pipeline.cache_clear()
    msg = str(ei.value)
    for pkg in ("punkt_tab", "averaged_perceptron_tagger_eng", "maxent_ne_chunker_tab", "words"):
        assert f"nltk.download('{pkg}')" in msg
    assert "ner='heuristic'" in msg


def _nltk_ready() -> bool:
    try:
        features.check_nltk_data()
        return True
    except (DataNotFound, ImportError):
        return False


@pytest.mark.skipif(not _nltk_ready(), reason="nltk data not installed")
def test_nltk_entities_when_data_present():
    df = compute_features(["Maria Lopez works for the United Nations in Geneva.",
                           "the cat sat on the mat."], ner="nltk")
    assert df.attrs["ner_estimator"] == "nltk-maxent-ne-chunker"
    assert df.feat_ne_density[0] >= 2 / 9
    assert df.feat_ne_density[1] == 0.0


def test_features_go_through_the_result_schema():
    rows = features.feature_rows(["Hello, world! It's 2024."], ner="heuristic")
    table = to_frame("requests", [{"request_id": "r1", **rows[0]}])
    assert table.loc[0, "feat_words"] == 4.0
    assert set(FEATURE_COLUMNS) <= set(table.columns)


def test_nltk_counting_with_a_stub_pipeline(monkeypatch):
    pytest.importorskip("nltk")
    from nltk.tree import Tree

    class Tagger:
        def tag(self, tokens):
            return [(t, "NNP" if t[:1].isupper() else "NN") for t in tokens]

    class Chunker:
        def parse(self, tagged):
            # every NNP becomes its own PERSON chunk, as ne_chunk returns them
            return Tree("S", [Tree("PERSON", [wt]) if wt[1] == "NNP" else wt for wt in tagged])

    stub = (lambda text: [s for s in text.split(". ") if s],
            lambda sent, preserve_line=False: sent.replace(".", " .").split(),
            Tagger(), Chunker())
    monkeypatch.setattr(features, "_nltk_pipeline", lambda: stub)
    df = compute_features(["Anna met Ben. they left.", "nothing here"], ner="nltk")
    assert df.feat_ne_density[0] == pytest.approx(2 / 5)
    assert df.feat_ne_density[1] == 0.0
    assert df.attrs["ner_estimator"] == "nltk-maxent-ne-chunker"
