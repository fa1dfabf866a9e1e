"""Input features of prompts: the explanatory variables of the energy and latency analysis.

:func:`compute_features` returns one row per prompt with these float columns (names start with
:data:`llm_dvfs.schema.FEATURE_PREFIX`, so ``to_frame`` keeps them):

========================== =====================================================================
column                     definition
========================== =====================================================================
feat_chars                 characters (Unicode code points)
feat_words                 words: whitespace-separated tokens with leading and trailing
                           non-alphanumeric characters stripped, dropped when nothing remains
                           (``"(Paris),"`` → ``Paris``, ``"3.5"`` and ``"don't"`` are one word)
feat_tokens                tokens of the model's tokenizer, without special tokens (NaN when no
                           tokenizer is given)
feat_sentences             sentence ends (``.``/``!``/``?`` runs, optionally followed by closing
                           quotes or brackets, then whitespace or the end), plus one if text with
                           a letter or digit follows the last end; 0 for text without any
feat_char_entropy_bits     Shannon entropy of the character distribution, bits per character
feat_token_entropy_bits    Shannon entropy of the token-id distribution, bits per token (NaN
                           without tokenizer)
feat_type_token_ratio      distinct lowercased words / words
feat_mean_word_len         mean characters per word
feat_digit_ratio           decimal-digit characters / characters
feat_punct_ratio           punctuation characters / characters (Unicode category P*, plus the
                           ASCII symbols in ``string.punctuation`` such as ``$ + < = > ^ ` | ~``)
feat_ne_density            named-entity mentions / words, by the estimator chosen with ``ner``
========================== =====================================================================

Empty prompts give 0 for counts and NaN for ratios and entropies.

Named entities (``ner``):

* ``"nltk"`` (default): nltk's recommended pipeline — ``sent_tokenize``, ``word_tokenize``,
  ``pos_tag`` (averaged perceptron) and ``ne_chunk`` (maxent chunker, ACE multiclass); every
  chunk subtree (PERSON, ORGANIZATION, GPE, LOCATION, FACILITY, GSP, ...) is one mention. Needs
  nltk data; when missing, :class:`~llm_dvfs.errors.DataNotFound` names the ``nltk.download``
  packages. Costs milliseconds per prompt (see ``bench/features_speed.py``).
* ``"heuristic"``: a labelled fallback, chosen explicitly only — each maximal run of capitalised
  words that does not start a sentence or line is one mention (``I`` excluded; ``of, de, da, del,
  du, la, le, van, von`` may join two capitalised words; a run of two or more capitalised words at
  a sentence start counts too, a single one does not). Fast, no data, biased: misses
  sentence-initial single names, counts capitalised common words in titles.
* ``None``: ``feat_ne_density`` is NaN.

The estimator used is in ``df.attrs["ner_estimator"]`` (:func:`ner_estimator_name`); record it with
the results (e.g. the run manifest), since densities from different estimators are not comparable.
"""
from __future__ import annotations

import functools
import re
import string
import unicodedata
from collections import Counter
from typing import Any, Sequence

import numpy as np
import pandas as pd

from llm_dvfs import schema
from llm_dvfs.errors import ConfigError, DataNotFound
from llm_dvfs.schema import FEATURE_PREFIX

#: The feature columns, in order; their units and null meanings are declared in
#: :data:`llm_dvfs.schema.FEATURE_COLUMNS`.
FEATURE_COLUMNS: tuple[str, ...] = tuple(schema.FEATURE_COLUMNS)

NER_ESTIMATORS = {
    "nltk": "nltk-maxent-ne-chunker",
    "heuristic": "heuristic-capitalised-runs",
    None: "none",
}

# nltk resources the NER pipeline loads (nltk 3.9+ names), as (path for nltk.data.find, package)
NLTK_RESOURCES: tuple[tuple[str, str], ...] = (
    ("tokenizers/punkt_tab/english/", "punkt_tab"),
    ("taggers/averaged_perceptron_tagger_eng/", "averaged_perceptron_tagger_eng"),
    ("chunkers/maxent_ne_chunker_tab/english_ace_multiclass/", "maxent_ne_chunker_tab"),
    ("corpora/words", "words"),
)

# a word starts and ends with a letter or digit and contains no whitespace
_WORD_RE = re.compile(r"[^\W_](?:\S*[^\W_])?")
_SENT_END_RE = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_ALNUM_RE = re.compile(r"[^\W_]")
_ASCII_PUNCT = frozenset(string.punctuation)


def ner_estimator_name(ner: str | None) -> str:
    """Label of the entity estimator for ``ner`` (stored in ``df.attrs["ner_estimator"]``)."""
    if ner not in NER_ESTIMATORS:
        raise ConfigError(f"unknown ner estimator {ner!r}; use 'nltk', 'heuristic' or None")
    return NER_ESTIMATORS[ner]


@functools.lru_cache(maxsize=4096)
def _char_class(ch: str) -> tuple[bool, bool]:
    """(is decimal digit, is punctuation) of one character."""
    return ch.isdecimal(), (ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P"))


def _entropy_bits(counts: Sequence[int]) -> float:
    c = np.fromiter(counts, dtype=np.float64)
    n = c.sum()
    if n <= 0:
        return float("nan")
    p = c / n
    h = float(-(p * np.log2(p)).sum())
    return h + 0.0 if h > 0 else 0.0  # no negative zero


def _words(text: str) -> list[str]:
    return _WORD_RE.findall(text)


def _sentences(text: str) -> int:
    if not _ALNUM_RE.search(text):
        return 0
    last_end = 0
    n = 0
    for m in _SENT_END_RE.finditer(text):
        n += 1
        last_end = m.end()
    if _ALNUM_RE.search(text, last_end):
        n += 1
    return n


def _token_ids(prompts: Sequence[str], tokenizer: Any) -> list[list[int]]:
    raw = getattr(tokenizer, "backend_tokenizer", None)  # a transformers fast tokenizer's engine
    if raw is None and hasattr(tokenizer, "encode_batch") and not hasattr(tokenizer, "batch_decode"):
        raw = tokenizer                                  # a `tokenizers.Tokenizer` itself
    if raw is not None:
        if raw.padding is not None or raw.truncation is not None:
            # transformers leaves padding/truncation switched on in the shared engine after a
            # padded call; counts must be of the prompt alone, so encode with a clean copy
            from tokenizers import Tokenizer
            raw = Tokenizer.from_str(raw.to_str())
            raw.no_padding()
            raw.no_truncation()
        # straight to the Rust batch encoder (parallel, no per-prompt Python objects)
        return [e.ids for e in raw.encode_batch(list(prompts), add_special_tokens=False)]
    enc = tokenizer(list(prompts), add_special_tokens=False)
    return list(enc["input_ids"])


# --------------------------------------------------------------------------------------------
# named entities
# --------------------------------------------------------------------------------------------
_JOINERS = frozenset({"of", "de", "da", "del", "du", "la", "le", "van", "von"})


def heuristic_entities(text: str) -> int:
    """Named-entity mentions by the capitalisation heuristic (see module doc)."""
    count = 0
    run = 0            # capitalised words in the current run
    run_initial = False
    pending_joiner = False
    prev_end = 0
    first = True
    for m in _WORD_RE.finditer(text):
        w = m.group()
        gap = text[prev_end:m.start()]
        prev_end = m.end()
        initial = first or bool(re.search(r"[.!?\n]", gap))
        first = False
        contiguous = not initial and gap.strip() == ""
        is_cap = w[0].isupper() and not (w == "I" or w.startswith("I'") or w.startswith("I\u2019"))
        if run and not contiguous:
            count += _close_run(run, run_initial)
            run, pending_joiner = 0, False
        if is_cap:
            if run == 0:
                run_initial = initial
            run += 1
            pending_joiner = False
        elif run and w in _JOINERS and not pending_joiner:
            pending_joiner = True  # "Bank of England": keep the run open for one joiner
        else:
            if run:
                count += _close_run(run, run_initial)
            run, pending_joiner = 0, False
    if run:
        count += _close_run(run, run_initial)
    return count


def _close_run(run: int, initial: bool) -> int:
    # a lone capitalised word at a sentence start is just a sentence start
    return 0 if (initial and run < 2) else 1


def check_nltk_data() -> None:
    """Raise DataNotFound naming every missing nltk resource and the download command."""
    try:
        import nltk
    except ImportError as e:
        raise DataNotFound("named-entity features with ner='nltk' need nltk: pip install nltk, "
                           "then download its data (see llm_dvfs.features.NLTK_RESOURCES), or "
                           "pass ner='heuristic' / ner=None") from e
    missing = []
    for path, package in NLTK_RESOURCES:
        try:
            nltk.data.find(path)
        except LookupError:
            missing.append(package)
    if missing:
        calls = "; ".join(f"nltk.download({p!r})" for p in missing)
        raise DataNotFound(
            f"nltk data missing for named-entity features: {', '.join(missing)}. Fetch it with "
            f"python -c \"import nltk; {calls}\" (or `python -m nltk.downloader "
            f"{' '.join(missing)}`; set NLTK_DATA to use another directory), or choose "
            "ner='heuristic' (capitalisation heuristic, labelled as such) or ner=None")


@functools.lru_cache(maxsize=1)
def _nltk_pipeline():
    check_nltk_data()
    from nltk.chunk import ne_chunker
    from nltk.tag import PerceptronTagger
    from nltk.tokenize import sent_tokenize, word_tokenize
    tagger = PerceptronTagger()
    chunker = ne_chunker()  # loading the maxent model is slow; do it once
    return sent_tokenize, word_tokenize, tagger, chunker


def nltk_entities(text: str) -> int:
    """Named-entity mentions found by nltk's ``ne_chunk`` (DataNotFound without nltk data)."""
    sent_tokenize, word_tokenize, tagger, chunker = _nltk_pipeline()
    from nltk.tree import Tree
    n = 0
    for sent in sent_tokenize(text):
        tokens = word_tokenize(sent, preserve_line=True)
        if not tokens:
            continue
        tree = chunker.parse(tagger.tag(tokens))
        n += sum(1 for t in tree if isinstance(t, Tree))
    return n


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------
def compute_features(prompts: Sequence[str], tokenizer: Any = None,
                     ner: str | None = "nltk") -> pd.DataFrame:
    """One row of ``feat_*`` columns per prompt (see module doc for definitions).

    Args:
        prompts: the texts.
        tokenizer: a ``transformers`` tokenizer or a ``tokenizers.Tokenizer``; None gives NaN
            token features.
        ner: ``"nltk"`` | ``"heuristic"`` | None.

    Returns:
        DataFrame indexed 0..n-1 with :data:`FEATURE_COLUMNS` (float64);
        ``attrs["ner_estimator"]`` and ``attrs["tokenizer"]`` say how it was computed.

    Raises:
        ConfigError: unknown ``ner``.
        DataNotFound: ``ner="nltk"`` without the nltk data (checked before any work).
    """
    est = ner_estimator_name(ner)
    prompts = ["" if p is None else str(p) for p in prompts]
    if ner == "nltk":
        _nltk_pipeline()  # fail fast, with the download instructions
    n = len(prompts)
    chars = np.fromiter((len(p) for p in prompts), dtype=np.float64, count=n)
    words = np.zeros(n)
    sentences = np.zeros(n)
    char_h = np.full(n, np.nan)
    ttr = np.full(n, np.nan)
    mwl = np.full(n, np.nan)
    digits = np.zeros(n)
    punct = np.zeros(n)
    for i, text in enumerate(prompts):
        ws = _words(text)
        nw = len(ws)
        words[i] = nw
        if nw:
            ttr[i] = len(set(map(str.lower, ws))) / nw
            mwl[i] = sum(map(len, ws)) / nw
        sentences[i] = _sentences(text)
        if text:
            cnt = Counter(text)
            char_h[i] = _entropy_bits(cnt.values())
            d = p = 0
            for ch, k in cnt.items():
                is_d, is_p = _char_class(ch)
                d += k if is_d else 0
                p += k if is_p else 0
            digits[i], punct[i] = d, p
    with np.errstate(invalid="ignore", divide="ignore"):
        digit_ratio = np.where(chars > 0, digits / np.where(chars > 0, chars, 1), np.nan)
        punct_ratio = np.where(chars > 0, punct / np.where(chars > 0, chars, 1), np.nan)

    tokens = np.full(n, np.nan)
    tok_h = np.full(n, np.nan)
    tok_name = None
    if tokenizer is not None:
        tok_name = str(getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__)
        if n:
            for i, ids in enumerate(_token_ids(prompts, tokenizer)):
                tokens[i] = len(ids)
                tok_h[i] = _entropy_bits(Counter(ids).values()) if ids else np.nan

    ne = np.full(n, np.nan)
    if ner is not None:
        count = nltk_entities if ner == "nltk" else heuristic_entities
        for i, text in enumerate(prompts):
            if words[i]:
                ne[i] = count(text) / words[i]

    df = pd.DataFrame({
        FEATURE_PREFIX + "chars": chars,
        FEATURE_PREFIX + "words": words,
        FEATURE_PREFIX + "tokens": tokens,
        FEATURE_PREFIX + "sentences": sentences,
        FEATURE_PREFIX + "char_entropy_bits": char_h,
        FEATURE_PREFIX + "token_entropy_bits": tok_h,
        FEATURE_PREFIX + "type_token_ratio": ttr,
        FEATURE_PREFIX + "mean_word_len": mwl,
        FEATURE_PREFIX + "digit_ratio": digit_ratio,
        FEATURE_PREFIX + "punct_ratio": punct_ratio,
        FEATURE_PREFIX + "ne_density": ne,
    }, columns=list(FEATURE_COLUMNS)).astype("float64")
    df.attrs["ner_estimator"] = est
    df.attrs["tokenizer"] = tok_name
    return df


def feature_rows(prompts: Sequence[str], tokenizer: Any = None,
                 ner: str | None = "nltk") -> list[dict[str, float]]:
    """:func:`compute_features` as a list of dicts, ready to merge into request rows."""
    df = compute_features(prompts, tokenizer=tokenizer, ner=ner)
    return [{k: float(v) for k, v in row.items()} for row in df.to_dict(orient="records")]


__all__ = ["compute_features", "feature_rows", "FEATURE_COLUMNS", "NER_ESTIMATORS",
           "NLTK_RESOURCES", "ner_estimator_name", "heuristic_entities", "nltk_entities",
           "check_nltk_data"]
