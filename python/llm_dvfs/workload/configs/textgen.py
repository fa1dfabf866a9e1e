"""Deterministic English-like text: the offline tokenizer's corpus and the synthetic task's prompts.

Everything here is generated from the word lists in ``text/words.json``, the names in
``text/entities.json`` and the hand-written passages in ``text/passages.txt`` (written for this
package; public domain). No randomness escapes: every function takes a ``random.Random``.

The generator produces whitespace-separated words, so ``len(text.split())`` counts exactly the words
asked for, and it can steer three properties that input-feature studies care about:

* vocabulary richness (``vocab_fraction``: the share of each word list that may be drawn, which
  moves token entropy and type-token ratio),
* digit and code density (``digit_rate``: share of slots that become numbers, years or codes such as
  ``XK-4821``, which moves character entropy and the digit ratio),
* named-entity density (``entity_density``: target entities per word; names of people, places and
  organisations, possibly several words long).
"""
from __future__ import annotations

import bisect
import functools
import json
import random
from dataclasses import dataclass
from importlib import resources
from itertools import accumulate

_PACKAGE = "llm_dvfs.workload.configs"


def read_text(*parts: str) -> str:
    """Text of a file shipped in ``llm_dvfs/configs`` (``read_text("text", "passages.txt")``)."""
    return resources.files(_PACKAGE).joinpath(*parts).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def load_json(*parts: str) -> dict:
    """Parsed JSON file shipped in ``llm_dvfs/configs`` (cached; do not mutate the result)."""
    return json.loads(read_text(*parts))


def _past(v: str) -> str:
    if v.endswith("e"):
        return v + "d"
    if v.endswith("y") and v[-2] not in "aeiou":
        return v[:-1] + "ied"
    if _doubles(v):
        return v + v[-1] + "ed"
    return v + "ed"


def _doubles(v: str) -> bool:
    # short consonant-vowel-consonant verbs double the last letter: stop -> stopped
    return (len(v) <= 4 and len(v) >= 3 and v[-1] not in "aeiouwxy" and v[-2] in "aeiou"
            and v[-3] not in "aeiou")


def _third(v: str) -> str:
    if v in ("be",):
        return "is"
    if v == "have":
        return "has"
    if v.endswith(("s", "sh", "ch", "x", "z", "o")):
        return v + "es"
    if v.endswith("y") and v[-2] not in "aeiou":
        return v[:-1] + "ies"
    return v + "s"


_IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "people": "people",
    "foot": "feet", "tooth": "teeth", "mouse": "mice", "sheep": "sheep", "fish": "fish",
    "deer": "deer", "life": "lives", "wife": "wives", "knife": "knives", "leaf": "leaves",
    "wolf": "wolves", "shelf": "shelves", "thief": "thieves", "half": "halves", "self": "selves",
    "criteria": "criteria", "data": "data", "phenomenon": "phenomena", "thesis": "theses",
    "analysis": "analyses", "crisis": "crises", "diagnosis": "diagnoses", "hypothesis": "hypotheses",
    "species": "species", "series": "series", "news": "news", "police": "police", "cattle": "cattle",
    "hero": "heroes", "potato": "potatoes", "tomato": "tomatoes", "volcano": "volcanoes",
}


def plural(n: str) -> str:
    """English plural of a noun (regular rules plus the common irregular ones)."""
    if n in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[n]
    if n.endswith(("s", "sh", "ch", "x", "z")):
        return n + "es"
    if n.endswith("y") and n[-2:-1] not in ("a", "e", "i", "o", "u"):
        return n[:-1] + "ies"
    return n + "s"


def _ing(v: str) -> str:
    if v == "be":
        return "being"
    if v.endswith("ie"):
        return v[:-2] + "ying"
    if v.endswith("e") and not v.endswith("ee"):
        return v[:-1] + "ing"
    if _doubles(v):
        return v + v[-1] + "ing"
    return v + "ing"


class _Pool:
    """A word list with Zipf-like weights (earlier entries are more frequent)."""

    def __init__(self, items: list, zipf_s: float = 1.0) -> None:
        self.items = list(items)
        self.zipf_s = zipf_s
        self.cum = list(accumulate(1.0 / (r + 1) ** zipf_s for r in range(len(self.items))))

    def restrict(self, fraction: float) -> "_Pool":
        k = max(3, min(len(self.items), round(fraction * len(self.items))))
        return _Pool(self.items[:k], self.zipf_s)

    def pick(self, rng: random.Random):
        x = rng.random() * self.cum[-1]
        return self.items[min(bisect.bisect_left(self.cum, x), len(self.items) - 1)]


@dataclass
class _Vocab:
    nouns: _Pool
    verbs: _Pool          # tuples (base, third, past, participle, ing)
    adjectives: _Pool
    adverbs: _Pool
    determiners: _Pool
    prepositions: _Pool
    conjunctions: _Pool
    numbers: _Pool
    persons_first: _Pool
    persons_last: _Pool
    places: _Pool
    orgs: _Pool


@functools.lru_cache(maxsize=64)
def _vocab(fraction: float, zipf_s: float = 1.0) -> _Vocab:
    w = load_json("text", "words.json")
    e = load_json("text", "entities.json")
    irregular = {b: (b, _third(b), p, pp, _ing(b)) for b, p, pp in w["verbs_irregular"]}
    regular = [(v, _third(v), _past(v), _past(v), _ing(v)) for v in w["verbs_regular"] if v not in irregular]
    # interleave so that the most frequent verbs (irregulars first in the list) stay at the top
    verbs = list(irregular.values())[:20] + regular[:60] + list(irregular.values())[20:] + regular[60:]
    full = _Vocab(
        nouns=_Pool(w["nouns"], zipf_s), verbs=_Pool(verbs, zipf_s),
        adjectives=_Pool(w["adjectives"], zipf_s), adverbs=_Pool(w["adverbs"], zipf_s), determiners=_Pool(["the", "a", "this", "that", "every", "some",
                                                        "each", "another", "no", "any"], 1.5),
        prepositions=_Pool(w["prepositions"]), conjunctions=_Pool(w["conjunctions"]),
        numbers=_Pool(w["numbers"]),
        persons_first=_Pool(e["first_names"], 0.5), persons_last=_Pool(e["surnames"], 0.5),
        places=_Pool(e["places"], 0.5), orgs=_Pool(e["organizations"], 0.5))
    if fraction >= 1.0:
        return full
    r = lambda p: p.restrict(fraction)  # noqa: E731
    return _Vocab(nouns=r(full.nouns), verbs=r(full.verbs), adjectives=r(full.adjectives),
                  adverbs=r(full.adverbs), determiners=full.determiners,
                  prepositions=full.prepositions, conjunctions=full.conjunctions,
                  numbers=r(full.numbers), persons_first=r(full.persons_first),
                  persons_last=r(full.persons_last), places=r(full.places), orgs=r(full.orgs))


_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"


class _SentenceMaker:
    """Builds sentences as lists of words, tracking how many words are entity words."""

    def __init__(self, rng: random.Random, vocab: _Vocab, entity_density: float, digit_rate: float):
        self.rng, self.v = rng, vocab
        self.entity_density, self.digit_rate = entity_density, digit_rate
        self.words = 0          # words emitted so far (all sentences)
        self.entities = 0       # entity mentions emitted so far

    # --- noun phrases -------------------------------------------------------------------------
    def entity(self) -> list[str]:
        rng, v = self.rng, self.v
        kind = rng.random()
        if kind < 0.4:
            name = [v.persons_first.pick(rng), v.persons_last.pick(rng)] if rng.random() < 0.7 \
                else [rng.choice(["Professor", "Captain", "Senator", "Judge"]), v.persons_last.pick(rng)]
        elif kind < 0.75:
            name = v.places.pick(rng).split()
        else:
            name = (["the"] if rng.random() < 0.5 else []) + v.orgs.pick(rng).split()
        self.entities += 1
        return name

    def want_entity(self, upcoming: int = 2) -> bool:
        # feedback control: add an entity whenever the running density is below target
        return self.entity_density > 0 and \
            self.entities < self.entity_density * (self.words + upcoming)

    def number(self) -> list[str]:
        rng = self.rng
        k = rng.random()
        if k < 0.3:
            return [str(rng.randint(2, 999))]
        if k < 0.5:
            return [str(rng.randint(1500, 2030))]
        if k < 0.7:
            return [f"{rng.uniform(0.1, 99.9):.1f}"]
        if k < 0.85:
            return [f"{rng.randint(1, 99)}%"]
        return ["".join(rng.choice(_CODE_ALPHABET) for _ in range(2)) + "-"
                + "".join(rng.choice("0123456789") for _ in range(rng.randint(3, 5)))]

    def noun_phrase(self, allow_entity: bool = True) -> list[str]:
        rng, v = self.rng, self.v
        if allow_entity and self.want_entity():
            return self.entity()
        if rng.random() < self.digit_rate:
            return self.number() + [plural(v.nouns.pick(rng))]
        many = rng.random() < 0.25
        np_ = [rng.choice(("the", "some", "many", "these", "those", "few"))] if many \
            else [v.determiners.pick(rng)]
        if rng.random() < 0.45:
            np_.append(v.adjectives.pick(rng))
        np_.append(plural(v.nouns.pick(rng)) if many else v.nouns.pick(rng))
        if np_[0] == "a" and np_[1][0] in "aeiou":
            np_[0] = "an"
        return np_

    # --- sentences ----------------------------------------------------------------------------
    def verb(self, form: int) -> str:
        return self.v.verbs.pick(self.rng)[form]

    def clause(self) -> list[str]:
        rng = self.rng
        subj = self.noun_phrase()
        form = rng.choice((1, 2, 2))  # present third person or past
        out = subj + ([self.v.adverbs.pick(rng)] if rng.random() < 0.15 else []) + [self.verb(form)]
        out += self.noun_phrase()
        if rng.random() < 0.5:
            out += [self.v.prepositions.pick(rng)] + self.noun_phrase()
        return out

    def sentence(self) -> list[str]:
        rng = self.rng
        k = rng.random()
        if k < 0.45:
            words = self.clause()
        elif k < 0.6:
            first = self.clause()
            first[-1] += ","
            words = first + [self.v.conjunctions.pick(rng)] + self.clause()
        elif k < 0.7:
            intro = ["in"] + (self.number() if rng.random() < max(self.digit_rate * 5, 0.3)
                              else self.noun_phrase())
            intro[-1] += ","
            words = intro + self.clause()
        elif k < 0.8:
            base = self.verb(0)
            words = ["did"] + self.noun_phrase() + [base if base != "be" else "see"] + self.noun_phrase()
            words[-1] += "?"
        elif k < 0.88:
            words = ["there", rng.choice(["are", "were"])] + self.number()[:1] + \
                [self.v.adjectives.pick(rng), plural(self.v.nouns.pick(rng)), self.v.prepositions.pick(rng)] \
                + self.noun_phrase()
        elif k < 0.92:
            who = self.noun_phrase()
            words = ['"' + (w := self.clause())[0]] + w[1:]
            words[-1] += ',"'
            words += who + ["said"]
        elif k < 0.965:
            words = self.noun_phrase() + [rng.choice(["is", "was"]), self.v.adverbs.pick(rng),
                                          self.v.adjectives.pick(rng)]
        else:
            j = rng.random()
            if j < 0.35:    # progressive
                words = self.noun_phrase() + [rng.choice(["is", "was"]), self.verb(4)] + self.noun_phrase()
            elif j < 0.7:   # perfect
                words = self.noun_phrase() + [rng.choice(["has", "had"]), self.verb(3)] + self.noun_phrase()
            else:           # passive
                words = self.noun_phrase() + ["was", self.verb(3), "by"] + self.noun_phrase()
        words = [w for w in words if w]
        if not words[-1].endswith(("?", '"', "!")):
            words[-1] += "."
        words[0] = words[0][:1].upper() + words[0][1:] if words[0][:1] != '"' \
            else '"' + words[0][1:2].upper() + words[0][2:]
        words = ["I" if w == "i" else w for w in words]
        self.words += len(words)
        return words


def generate_text(rng: random.Random, n_words: int, *, vocab_fraction: float = 1.0,
                  entity_density: float = 0.0, digit_rate: float = 0.0,
                  paragraph_sentences: int = 6, zipf_s: float = 1.0) -> tuple[str, dict]:
    """English-like text of exactly ``n_words`` whitespace-separated words.

    Args:
        rng: source of randomness (the text is a pure function of its state and the arguments).
        n_words: words wanted (>= 1).
        vocab_fraction: share (0, 1] of each word list that may be drawn; small values give
            repetitive text with low token entropy and type-token ratio.
        entity_density: target named-entity mentions per word (0 .. ~0.4); the generator steers
            towards it sentence by sentence.
        digit_rate: probability (0..1) that a noun phrase carries a number, year, percentage or code.
        paragraph_sentences: a blank line is inserted after about this many sentences.
        zipf_s: exponent of the rank-frequency law words are drawn by (1 = like natural text,
            near 0 = every listed word equally often).

    Returns:
        ``(text, info)`` with info ``{"n_words", "n_entities", "entity_density"}`` as generated
        (entity mentions cut off by the length limit are not counted).
    """
    if n_words < 1:
        raise ValueError("n_words must be >= 1")
    fraction = min(1.0, max(0.0, round(vocab_fraction, 3)))
    maker = _SentenceMaker(rng, _vocab(fraction, round(zipf_s, 3)), entity_density, digit_rate)
    sentences: list[list[str]] = []
    entity_marks: list[int] = []
    total = 0
    while total < n_words:
        before = maker.entities
        s = maker.sentence()
        sentences.append(s)
        entity_marks.append(maker.entities - before)
        total += len(s)
    # cut the last sentence to the exact length, closing it with a full stop
    excess = total - n_words
    if excess:
        last = sentences[-1][: len(sentences[-1]) - excess]
        last[-1] = last[-1].rstrip(',"?.') + "."
        sentences[-1] = last
    parts: list[str] = []
    for i, s in enumerate(sentences):
        parts.append(" ".join(s))
        if paragraph_sentences and (i + 1) % paragraph_sentences == 0 and i + 1 < len(sentences):
            parts.append("\n\n")
        else:
            parts.append(" ")
    text = "".join(parts).strip()
    # count entities in full sentences exactly; in the cut one, estimate by its surviving share
    n_ent = sum(entity_marks[:-1]) + (entity_marks[-1] if not excess else 0)
    if excess and entity_marks[-1]:
        n_ent += round(entity_marks[-1] * len(sentences[-1]) / (len(sentences[-1]) + excess))
    return text, {"n_words": n_words, "n_entities": int(n_ent), "entity_density": n_ent / n_words}


def _glossary() -> list[str]:
    """Every listed word in its common forms, so each can become one token."""
    w = load_json("text", "words.json")
    e = load_json("text", "entities.json")
    v = _vocab(1.0)
    lines = []
    for n in w["nouns"]:
        lines.append(f"{n} {plural(n)} {n.capitalize()}")
    for forms in v.verbs.items:
        lines.append(" ".join(dict.fromkeys(forms)) + " " + forms[0].capitalize())
    for a in w["adjectives"]:
        ly = a[:-1] + "ily" if a.endswith("y") else a + "ly"
        lines.append(f"{a} {ly} {a.capitalize()}")
    for a in w["adverbs"]:
        lines.append(f"{a} {a.capitalize()}")
    for k in ("first_names", "surnames", "places", "organizations"):
        lines.extend(e[k])
    # short documents, like the rest of the corpus
    return [", ".join(lines[i:i + 12]) + "." for i in range(0, len(lines), 12)]


def tokenizer_corpus() -> list[str]:
    return list(_tokenizer_corpus())


@functools.lru_cache(maxsize=1)
def _tokenizer_corpus() -> tuple[str, ...]:
    """Documents the offline BPE tokenizer is trained on (deterministic, ~300 KB of text).

    The hand-written passages (twice, so their words win merges like common English does) plus
    generated text over the whole word list with names, numbers and the task prompt formats.
    """
    passages = [p for p in read_text("text", "passages.txt").split("\n\n") if p.strip()]
    rng = random.Random(20240611)
    docs = passages * 2 + _glossary() * 2
    for i in range(700):
        # a flat word distribution so that every listed word is seen often enough to be merged
        text, _ = generate_text(rng, rng.randint(60, 160), entity_density=rng.choice((0.0, 0.05, 0.15)),
                                digit_rate=rng.choice((0.0, 0.05, 0.2)), zipf_s=0.3)
        docs.append(text)
    return tuple(docs)
