"""Tasks: where prompts come from and how the quality of an answer is scored.

Four tasks, by name (:func:`list_tasks`):

=============  ===========================  ==================  =======================  ==========
name           Hugging Face dataset          split (default)     quality metric           scoring
=============  ===========================  ==================  =======================  ==========
``synthetic``  — (generated offline)          —                   none                     none
``boolq``      ``google/boolq``              validation          ``accuracy``             generate
``hellaswag``  ``Rowan/hellaswag``           validation          ``acc_norm``             loglik
``truthfulqa`` ``truthfulqa/truthful_qa``    validation          ``rougeL_f1_diff``       generate
               (config ``generation``)
=============  ===========================  ==================  =======================  ==========

``scoring`` tells a runner how to obtain what :meth:`Task.score` needs:

* ``generate``: the generated text (only the new tokens, decoded).
* ``loglik``: the log-likelihood of each of ``sample.choices`` after ``sample.prompt``, from
  :func:`sample_logliks` (one batched forward pass; run it outside measured windows).
* ``none``: no metric; :meth:`Task.score` returns NaN.

A task is chosen with a spec string ``NAME[:key=value,...]`` or a dict, e.g.
``"boolq:file=dev.jsonl,question=q,passage=p,answer=a"`` reads a local JSONL/CSV/Parquet file
whose columns ``q``, ``p``, ``a`` hold the question, passage and answer (see :func:`get_task`).

Hugging Face datasets are loaded lazily, through ``datasets.load_dataset``; when they are neither
cached nor downloadable, :class:`~llm_dvfs.errors.DataNotFound` says how to get them.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .configs import textgen
from .errors import ConfigError, DataNotFound


# --------------------------------------------------------------------------------------------
# samples and metrics
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sample:
    """One request's input and what it is scored against.

    Attributes:
        sample_id: stable id (the dataset's id column, else ``task/split/row``).
        prompt: the text given to the model (template applied).
        reference: the gold answer text (``"yes"``/``"no"`` for BoolQ, the best answer for
            TruthfulQA, the gold ending for HellaSwag), or None.
        choices: continuations scored by log-likelihood (HellaSwag endings with their leading
            space; BoolQ ``(" no", " yes")``), else empty.
        label: index of the gold choice, or None.
        metadata: task-specific extras (TruthfulQA ``correct_answers``/``incorrect_answers``,
            the synthetic generator's parameters, ...).
    """
    sample_id: str
    prompt: str
    reference: str | None = None
    choices: tuple[str, ...] = ()
    label: int | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LoglikResult:
    """Log-likelihood of one continuation: ``loglik`` is the sum of natural-log probabilities of
    its ``n_tokens`` tokens; ``is_greedy`` is True when every one was the argmax token."""
    loglik: float
    n_tokens: int
    is_greedy: bool = False


_WORD_RE = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """Tokens as ROUGE sees them: lowercase alphanumeric runs (everything else separates)."""
    return _WORD_RE.findall(text.lower())


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l_f1(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts (longest common subsequence of :func:`rouge_tokens`).

    ``P = lcs/len(candidate)``, ``R = lcs/len(reference)``, ``F1 = 2PR/(P+R)``; 0.0 when either
    side has no tokens or nothing is shared. No stemming, no stopword removal.
    """
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    if not c or not r:
        return 0.0
    lcs = _lcs_len(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def _logliks(values: Sequence[Any]) -> list[float]:
    out = []
    for v in values:
        out.append(float(v.loglik if isinstance(v, LoglikResult) else v))
    return out


def _argmax(xs: Sequence[float]) -> int:
    # first maximum, like numpy.argmax
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


# --------------------------------------------------------------------------------------------
# data sources
# --------------------------------------------------------------------------------------------
def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    try:
        import pandas as pd
        if v is pd.NA:
            return True
    except ImportError:  # pragma: no cover
        pass
    return False


def _as_list(v: Any) -> list[str]:
    """A list of strings from a list/array, a JSON list string, or a '; '-separated string
    (the format of the original TruthfulQA.csv)."""
    if v is None:
        return []
    if isinstance(v, str):
        s = v.strip()
        if s.startswith("["):
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                parsed = None
            if isinstance(parsed, list):
                return [str(x) for x in parsed if not _is_missing(x)]
        return [p.strip() for p in s.split(";") if p.strip()]
    try:
        return [str(x) for x in list(v) if not _is_missing(x)]
    except TypeError:
        return [str(v)]


def _read_table(path: Path) -> list[dict[str, Any]]:
    import pandas as pd
    if not path.is_file():
        raise DataNotFound(f"task data file {str(path)!r} does not exist")
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    try:
        if suffix in (".jsonl", ".jsonl.gz", ".ndjson"):
            df = pd.read_json(path, lines=True, dtype=False)
        elif suffix in (".json", ".json.gz"):
            try:
                df = pd.read_json(path, lines=True, dtype=False)
            except ValueError:
                df = pd.read_json(path, dtype=False)
        elif suffix in (".csv", ".csv.gz"):
            df = pd.read_csv(path, keep_default_na=False, na_values=[""])
        elif suffix in (".tsv", ".tsv.gz"):
            df = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""])
        elif suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            raise ConfigError(f"task data file {str(path)!r}: unknown format {path.suffix!r}; "
                              "use .jsonl, .json, .csv, .tsv or .parquet")
    except (ValueError, OSError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"task data file {str(path)!r} could not be read: {e}") from e
    return df.to_dict(orient="records")


def _hub_hint(dataset_id: str, config: str | None, task: str, fields: Sequence[str]) -> str:
    cfg = f" (config {config!r})" if config else ""
    example = ",".join(f"{f}=COLUMN" for f in fields)
    return (f"dataset {dataset_id!r}{cfg} is not available: run once with internet access so that "
            f"`datasets` caches it (then HF_DATASETS_OFFLINE=1 works), or fetch it with "
            f"`huggingface-cli download --repo-type dataset {dataset_id}` (or `hf download "
            f"{dataset_id} --repo-type dataset`), or use a local JSONL/CSV/Parquet file: "
            f"--task '{task}:file=PATH,{example}'")


def _load_hub(dataset_id: str, config: str | None, split: str, task: str,
              fields: Sequence[str]) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a declared dependency of [hf]
        raise DataNotFound("the `datasets` package is needed for hub tasks: pip install datasets; "
                           + _hub_hint(dataset_id, config, task, fields)) from e
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split) if config \
            else datasets.load_dataset(dataset_id, split=split)
    except OSError as e:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, HTTP errors
        raise DataNotFound(_hub_hint(dataset_id, config, task, fields)
                           + f" [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from e
    except ValueError as e:  # e.g. unknown split
        raise ConfigError(f"dataset {dataset_id!r}: {e}") from e
    return [dict(r) for r in ds]


# --------------------------------------------------------------------------------------------
# tasks
# --------------------------------------------------------------------------------------------
class Task:
    """A source of prompts with a template and a quality metric.

    Attributes:
        name: task name (``boolq``, ``hellaswag``, ``truthfulqa``, ``synthetic``).
        metric: metric name written to results' ``quality_metric`` ("" when the task has none).
        scoring: ``"generate"`` | ``"loglik"`` | ``"none"`` (see module doc).
        template: ``str.format`` template over the task's fields.
        stop: strings after which generated text is irrelevant to the metric (a runner may stop
            generation there; :meth:`score` cuts there anyway).
        dataset_id, dataset_config, split: the hub source (None for file and synthetic tasks).
        file: the local data file, or None.
        columns: canonical field -> column name in the source.
    """
    name: str = ""
    metric: str = ""
    scoring: str = "none"
    default_template: str = "{text}"
    stop: tuple[str, ...] = ()
    dataset_id: str | None = None
    dataset_config: str | None = None
    default_split: str = "validation"
    fields: tuple[str, ...] = ()          # canonical fields; all required unless in optional_fields
    optional_fields: tuple[str, ...] = ("id",)

    def __init__(self, *, file: str | Path | None = None, columns: Mapping[str, str] | None = None,
                 split: str | None = None, template: str | None = None,
                 dataset: str | None = None, dataset_config: str | None = None) -> None:
        self.file = Path(file).expanduser() if file is not None else None
        self.columns = {f: f for f in self.fields + self.optional_fields}
        for k, v in (columns or {}).items():
            if k not in self.columns:
                raise ConfigError(f"task {self.name}: unknown field {k!r} in column mapping; "
                                  f"fields: {', '.join(self.columns)}")
            self.columns[k] = v
        self.split = split or self.default_split
        self.template = template if template is not None else self.default_template
        if dataset is not None:
            self.dataset_id = dataset
        if dataset_config is not None:
            self.dataset_config = dataset_config
        self._records: list[dict[str, Any]] | None = None

    # -- data ----------------------------------------------------------------------------------
    def source(self) -> str:
        """Where the samples come from, for the manifest."""
        if self.file is not None:
            return str(self.file)
        cfg = f"/{self.dataset_config}" if self.dataset_config else ""
        return f"hf:{self.dataset_id}{cfg}:{self.split}"

    def _raw_records(self) -> list[dict[str, Any]]:
        if self.file is not None:
            return _read_table(self.file)
        assert self.dataset_id is not None
        return _load_hub(self.dataset_id, self.dataset_config, self.split, self.name, self.fields)

    def records(self) -> list[dict[str, Any]]:
        """Rows with canonical field names; rows missing a required field are dropped.

        Raises:
            DataNotFound: the dataset or file is not available (message says how to get it).
            ConfigError: a mapped column does not exist, or no row survives.
        """
        if self._records is not None:
            return self._records
        raw = self._raw_records()
        present = set(raw[0]) if raw else set()
        for f in self.fields + self.optional_fields:
            col = self.columns[f]
            # required fields must exist; optional ones only when mapped explicitly
            needed = (f in self.fields and not self._column_optional(f, present)) or col != f
            if raw and needed and col not in present and "|" not in col:
                raise ConfigError(f"task {self.name}: column {col!r} (for field {f!r}) not in "
                                  f"{self.source()}; columns: {', '.join(map(str, sorted(present)))}")
        out = []
        for i, row in enumerate(raw):
            rec: dict[str, Any] = {"_row": i}
            ok = True
            for f in self.fields + self.optional_fields:
                v = self._field_value(row, f)
                if _is_missing(v) if not isinstance(v, (list, tuple)) else len(v) == 0:
                    if f in self.fields and not self._column_optional(f, present):
                        ok = False
                        break
                    v = None
                rec[f] = v
            if ok:
                out.append(rec)
        if not out:
            raise ConfigError(f"task {self.name}: no usable samples in {self.source()} "
                              f"({len(raw)} rows, none with all of {', '.join(self.fields)})")
        self._records = out
        return out

    def _column_optional(self, f: str, present: set) -> bool:
        return False

    def _field_value(self, row: Mapping[str, Any], f: str) -> Any:
        col = self.columns[f]
        if "|" in col and col not in row:  # several columns -> one list field (e.g. endings)
            return [row.get(c) for c in col.split("|") if not _is_missing(row.get(c))]
        return row.get(col)

    def samples(self, limit: int | None = None, seed: int | None = 0) -> list[Sample]:
        """Up to ``limit`` samples (all when None).

        ``seed`` None keeps file order; an int draws a seeded random order (the first ``k``
        samples of a larger limit are the same as those of limit ``k``).

        Raises:
            ConfigError: ``limit`` < 1 or nothing usable in the data.
            DataNotFound: data not available.
        """
        if limit is not None and int(limit) < 1:
            raise ConfigError(f"sample limit must be >= 1, got {limit}")
        recs = self.records()
        order = list(range(len(recs)))
        if seed is not None:
            random.Random(f"{self.name}/{seed}").shuffle(order)
        if limit is not None:
            order = order[: int(limit)]
        return [self.make_sample(recs[i]) for i in order]

    def sample_id(self, rec: Mapping[str, Any]) -> str:
        if rec.get("id") is not None:
            return str(rec["id"])
        where = self.file.stem if self.file is not None else self.split
        return f"{self.name}/{where}/{rec['_row']}"

    def make_sample(self, rec: Mapping[str, Any]) -> Sample:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- scoring -------------------------------------------------------------------------------
    def score(self, sample: Sample, output: "str | Sequence[float] | Sequence[LoglikResult]") -> float:
        """Quality of one answer (NaN when the task has no metric)."""
        return float("nan")

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for a run manifest."""
        return {"task": self.name, "source": self.source(), "metric": self.metric,
                "scoring": self.scoring, "template": self.template,
                "columns": {k: v for k, v in self.columns.items() if k != v}}

    def __repr__(self) -> str:
        return f"<Task {self.name} from {self.source()}>"


class BoolQTask(Task):
    """BoolQ yes/no question answering (Clark et al., 2019), prompt as in lm-evaluation-harness.

    Scored by generation: the first word of the generated text must be ``yes`` or ``no`` (case and
    leading punctuation ignored) and match the answer; anything else scores 0. Given the two
    log-likelihoods of ``sample.choices`` = (" no", " yes") instead, the larger one is the answer.
    """
    name = "boolq"
    metric = "accuracy"
    scoring = "generate"
    default_template = "{passage}\nQuestion: {question}\nAnswer:"
    stop = ("\n",)
    dataset_id = "google/boolq"
    fields = ("question", "passage", "answer")

    def make_sample(self, rec: Mapping[str, Any]) -> Sample:
        q = str(rec["question"]).strip()
        if not q.endswith("?"):
            q += "?"
        ans = _parse_bool(rec["answer"], self.name)
        prompt = self.template.format(passage=str(rec["passage"]).strip(), question=q)
        return Sample(self.sample_id(rec), prompt, reference="yes" if ans else "no",
                      choices=(" no", " yes"), label=int(ans))

    def score(self, sample: Sample, output) -> float:
        if isinstance(output, str):
            m = re.match(r"[\W_]*(yes|no)\b", output.strip().lower())
            return float(m is not None and m.group(1) == sample.reference)
        lls = _logliks(output)
        return float(_argmax(lls) == sample.label)


def _parse_bool(v: Any, task: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)) and v in (0, 1):
        return bool(v)
    s = str(v).strip().lower()
    if s in ("true", "yes", "1", "y", "t"):
        return True
    if s in ("false", "no", "0", "n", "f"):
        return False
    # numpy bools
    try:
        import numpy as np
        if isinstance(v, np.bool_):
            return bool(v)
    except ImportError:  # pragma: no cover
        pass
    raise ConfigError(f"task {task}: answer {v!r} is not a yes/no value")


def _hellaswag_preprocess(text: str) -> str:
    # the same clean-up as lm-evaluation-harness' hellaswag task
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    text = text.replace("  ", " ")
    return text


class HellaSwagTask(Task):
    """HellaSwag commonsense sentence completion (Zellers et al., 2019).

    The prompt is ``"{activity_label}: {ctx}"`` (activity label optional), cleaned as in
    lm-evaluation-harness; ``choices`` are the four endings with a leading space. Scored by
    log-likelihood only: ``acc_norm`` = 1 when the ending with the highest log-likelihood per
    character of the ending (``loglik / len(choice)``) is the gold one.

    The context comes from ``ctx`` or, when the data has them (the hub dataset does), from
    ``ctx_a`` + " " + capitalised ``ctx_b`` like the harness. ``endings`` may be a list column, a
    JSON list string, or several columns joined with ``|`` in the mapping (``endings=e0|e1|e2|e3``).
    """
    name = "hellaswag"
    metric = "acc_norm"
    scoring = "loglik"
    default_template = "{activity_label}: {ctx}"
    dataset_id = "Rowan/hellaswag"
    fields = ("ctx", "endings", "label")
    optional_fields = ("id", "activity_label", "ctx_a", "ctx_b")

    def _column_optional(self, f: str, present: set) -> bool:
        # ctx may be given as ctx_a + ctx_b instead (the hub dataset has all three)
        return f == "ctx" and self.columns["ctx_a"] in present and self.columns["ctx_b"] in present

    def make_sample(self, rec: Mapping[str, Any]) -> Sample:
        explicit_ctx = self.columns["ctx"] != "ctx" and rec.get("ctx") is not None
        if not explicit_ctx and rec.get("ctx_a") is not None and rec.get("ctx_b") is not None:
            ctx = str(rec["ctx_a"]) + " " + str(rec["ctx_b"]).capitalize()
        else:
            ctx = str(rec["ctx"])
        label_txt = rec.get("activity_label")
        if label_txt is None and "{activity_label}" in self.template:
            tmpl = self.template.replace("{activity_label}: ", "").replace("{activity_label}", "")
        else:
            tmpl = self.template
        prompt = _hellaswag_preprocess(tmpl.format(ctx=ctx, activity_label=label_txt or ""))
        endings = _as_list(rec["endings"])
        if len(endings) < 2:
            raise ConfigError(f"task {self.name}: sample {self.sample_id(rec)} has {len(endings)} "
                              "ending(s); need at least 2")
        try:
            label = int(rec["label"])
        except (TypeError, ValueError):
            raise ConfigError(f"task {self.name}: label {rec['label']!r} is not an integer") from None
        if not 0 <= label < len(endings):
            raise ConfigError(f"task {self.name}: label {label} out of range for {len(endings)} endings")
        choices = tuple(" " + _hellaswag_preprocess(e) for e in endings)
        return Sample(self.sample_id(rec), prompt, reference=choices[label].strip(),
                      choices=choices, label=label,
                      metadata={"activity_label": label_txt} if label_txt else {})

    def score(self, sample: Sample, output) -> float:
        if isinstance(output, str):
            raise TypeError("hellaswag is scored by log-likelihood: pass "
                            "sample_logliks(model, tokenizer, sample), not generated text")
        lls = _logliks(output)
        if len(lls) != len(sample.choices):
            raise ValueError(f"{len(lls)} log-likelihoods for {len(sample.choices)} choices")
        norm = [ll / max(1, len(c)) for ll, c in zip(lls, sample.choices)]
        return float(_argmax(norm) == sample.label)

    def score_details(self, sample: Sample, output) -> dict[str, float]:
        """``{"acc": raw argmax correct, "acc_norm": length-normalised argmax correct}``."""
        lls = _logliks(output)
        return {"acc": float(_argmax(lls) == sample.label), "acc_norm": self.score(sample, output)}


TRUTHFULQA_PRIMER = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain."
)
"""The six-shot "QA prompt" of the TruthfulQA paper (Lin et al., 2021), as used by evaluation harnesses."""


class TruthfulQATask(Task):
    """TruthfulQA, generation setting (Lin et al., 2021).

    Prompt: the six-shot QA primer (``shots=6``, default) or none (``shots=0``), then
    ``"Q: {question}\\nA:"``. Score (``rougeL_f1_diff``, in [-1, 1]): the generated answer's first
    line, ROUGE-L F1 against the closest correct answer minus against the closest incorrect one, as
    the harness' ``rougeL_diff`` (correct answers include the best answer and, as in the harness,
    "I have no comment."). Positive = closer to a true answer. :meth:`score_details` also gives
    ``rougeL_max_correct``, ``rougeL_max_incorrect`` and ``rougeL_acc`` (diff > 0).
    """
    name = "truthfulqa"
    metric = "rougeL_f1_diff"
    scoring = "generate"
    default_template = "Q: {question}\nA:"
    stop = ("\n\n", "\nQ:")
    dataset_id = "truthfulqa/truthful_qa"
    dataset_config = "generation"
    fields = ("question", "best_answer", "correct_answers", "incorrect_answers")

    def __init__(self, *, shots: int = 6, **kw: Any) -> None:
        super().__init__(**kw)
        if int(shots) not in (0, 6):
            raise ConfigError(f"truthfulqa: shots must be 0 or 6, got {shots}")
        self.shots = int(shots)

    def make_sample(self, rec: Mapping[str, Any]) -> Sample:
        q = str(rec["question"]).strip()
        prompt = self.template.format(question=q)
        if self.shots:
            prompt = TRUTHFULQA_PRIMER + "\n\n" + prompt
        best = str(rec["best_answer"]).strip()
        correct = _as_list(rec["correct_answers"])
        if best not in correct:
            correct.insert(0, best)
        if "I have no comment." not in correct:
            correct.append("I have no comment.")
        incorrect = _as_list(rec["incorrect_answers"])
        return Sample(self.sample_id(rec), prompt, reference=best,
                      metadata={"correct_answers": tuple(correct),
                                "incorrect_answers": tuple(incorrect)})

    @staticmethod
    def answer_text(output: str) -> str:
        """The part of generated text that is scored: its first non-empty line."""
        for line in output.strip().splitlines():
            if line.strip():
                return line.strip()
        return ""

    def score_details(self, sample: Sample, output: str) -> dict[str, float]:
        if not isinstance(output, str):
            raise TypeError("truthfulqa is scored on generated text")
        ans = self.answer_text(output)
        best_c = max((rouge_l_f1(ans, r) for r in sample.metadata["correct_answers"]), default=0.0)
        best_i = max((rouge_l_f1(ans, r) for r in sample.metadata["incorrect_answers"]), default=0.0)
        return {"rougeL_max_correct": best_c, "rougeL_max_incorrect": best_i,
                "rougeL_f1_diff": best_c - best_i, "rougeL_acc": float(best_c > best_i)}

    def score(self, sample: Sample, output) -> float:
        return self.score_details(sample, output)["rougeL_f1_diff"]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "shots": self.shots}


class SyntheticTask(Task):
    """Prompts generated offline, deterministic by seed, spanning controlled input features.

    Sample ``i`` of seed ``s`` depends only on ``(s, i)`` (so a larger limit extends a smaller
    one). Each draws, independently:

    * a length, log-uniform in ``[min_words, max_words]`` words (default 16..1024), exact;
    * a vocabulary fraction, log-uniform in [0.02, 1] (low = repetitive text: low token entropy
      and type-token ratio);
    * a digit rate, 0 for half of the samples, else uniform in (0, ``max_digit_rate``]
      (numbers, years, percentages and codes: raises character entropy and digit ratio);
    * a named-entity density, uniform in [0, ``max_entity_density``] entities per word (people,
      places, organisations from the shipped name lists).

    The drawn values are in ``sample.metadata``. No quality metric.
    """
    name = "synthetic"
    metric = ""
    scoring = "none"
    default_template = "{text}"
    fields = ()
    optional_fields = ()

    def __init__(self, *, min_words: int = 16, max_words: int = 1024,
                 max_entity_density: float = 0.25, max_digit_rate: float = 0.2,
                 template: str | None = None, **kw: Any) -> None:
        if kw:
            raise ConfigError(f"synthetic: unknown option(s) {', '.join(sorted(kw))}; options: "
                              "min_words, max_words, max_entity_density, max_digit_rate, template")
        super().__init__(template=template)
        self.min_words, self.max_words = int(min_words), int(max_words)
        if not 1 <= self.min_words <= self.max_words:
            raise ConfigError(f"synthetic: need 1 <= min_words <= max_words, got "
                              f"{self.min_words}..{self.max_words}")
        self.max_entity_density = float(max_entity_density)
        self.max_digit_rate = float(max_digit_rate)
        if not 0 <= self.max_entity_density <= 0.5:
            raise ConfigError("synthetic: max_entity_density must be in [0, 0.5]")
        if not 0 <= self.max_digit_rate <= 1:
            raise ConfigError("synthetic: max_digit_rate must be in [0, 1]")

    def source(self) -> str:
        return "generated"

    def records(self) -> list[dict[str, Any]]:  # pragma: no cover - not used
        raise ConfigError("the synthetic task has no records; use samples()")

    def samples(self, limit: int | None = None, seed: int | None = 0) -> list[Sample]:
        """``limit`` generated samples (default 100)."""
        n = 100 if limit is None else int(limit)
        if n < 1:
            raise ConfigError(f"sample limit must be >= 1, got {limit}")
        seed = 0 if seed is None else int(seed)
        return [self._sample(seed, i) for i in range(n)]

    def _sample(self, seed: int, i: int) -> Sample:
        rng = random.Random(f"synthetic/{seed}/{i}")
        lo, hi = math.log(self.min_words), math.log(self.max_words + 1)
        n_words = min(self.max_words, max(self.min_words, int(math.exp(rng.uniform(lo, hi)))))
        vocab_fraction = math.exp(rng.uniform(math.log(0.02), 0.0))
        digit_rate = 0.0 if rng.random() < 0.5 else rng.uniform(0.0, self.max_digit_rate)
        entity_density = rng.uniform(0.0, self.max_entity_density)
        text, info = textgen.generate_text(rng, n_words, vocab_fraction=vocab_fraction,
                                           entity_density=entity_density, digit_rate=digit_rate)
        meta = {"n_words": n_words, "vocab_fraction": round(vocab_fraction, 4),
                "digit_rate": round(digit_rate, 4),
                "entity_density_target": round(entity_density, 4),
                "n_entities": info["n_entities"], "entity_density": info["entity_density"]}
        return Sample(f"synthetic/{seed}/{i}", self.template.format(text=text), metadata=meta)

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "source": "generated", "metric": "", "scoring": "none",
                "template": self.template, "min_words": self.min_words,
                "max_words": self.max_words, "max_entity_density": self.max_entity_density,
                "max_digit_rate": self.max_digit_rate}


_TASKS: dict[str, type[Task]] = {
    "synthetic": SyntheticTask,
    "boolq": BoolQTask,
    "hellaswag": HellaSwagTask,
    "truthfulqa": TruthfulQATask,
}
_ALIASES = {"truthful_qa": "truthfulqa", "truthfulqa-gen": "truthfulqa", "google/boolq": "boolq",
            "rowan/hellaswag": "hellaswag", "truthfulqa/truthful_qa": "truthfulqa"}
DEFAULT_TASK = "synthetic"


def list_tasks() -> list[str]:
    """Task names accepted by :func:`get_task` (the default, ``synthetic``, first)."""
    return list(_TASKS)


def parse_task_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``"name:key=value,key=value"`` into ``(name, options)`` (values stay strings).

    A value may contain ``=``; commas separate options, so values cannot contain commas (use the
    dict form of :func:`get_task` for such values).
    """
    name, _, rest = spec.partition(":")
    opts: dict[str, Any] = {}
    if rest.strip():
        for part in rest.split(","):
            if not part.strip():
                continue
            k, eq, v = part.partition("=")
            if not eq:
                raise ConfigError(f"task spec {spec!r}: option {part!r} is not key=value")
            opts[k.strip()] = v.strip()
    return name.strip().lower(), opts


def get_task(spec: "str | Mapping[str, Any]" = DEFAULT_TASK, **options: Any) -> Task:
    """The task named by ``spec``.

    Forms:

    * ``get_task("boolq")`` — the hub dataset (``split=`` to change the split);
    * ``get_task("boolq:file=dev.jsonl,question=q,passage=p,answer=a")`` — a local file; every
      ``field=column`` pair maps one of the task's fields to a column of the file (unmapped fields
      are looked up under their own name);
    * ``get_task({"name": "boolq", "file": "dev.jsonl", "columns": {"question": "q"}})`` or the
      same as keyword arguments: ``get_task("boolq", file=..., columns={...})``;
    * ``get_task("synthetic:min_words=32,max_words=256")``; ``truthfulqa:shots=0``.

    Fields: boolq ``question, passage, answer``; hellaswag ``ctx, endings, label`` (+ optional
    ``activity_label``, ``ctx_a``, ``ctx_b``); truthfulqa ``question, best_answer,
    correct_answers, incorrect_answers``; all: optional ``id``.
    Other options: ``file, split, dataset`` (another hub id), ``config`` (hub config),
    ``template`` (dict form only when it contains commas), truthfulqa ``shots``.

    Nothing is loaded until :meth:`Task.samples` is called.

    Raises:
        ConfigError: unknown task or option (the message lists the known ones).
    """
    if isinstance(spec, Mapping):
        opts = dict(spec)
        name = str(opts.pop("name", opts.pop("task", "")))
        name, more = parse_task_spec(name)
        opts = {**more, **opts}
    else:
        name, opts = parse_task_spec(str(spec))
    opts.update(options)
    name = _ALIASES.get(name, name)
    if name not in _TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(list_tasks())}")
    cls = _TASKS[name]
    if cls is SyntheticTask:
        typed: dict[str, Any] = {}
        for k, v in opts.items():
            if k in ("min_words", "max_words"):
                typed[k] = _to_num(int, k, v)
            elif k in ("max_entity_density", "max_digit_rate"):
                typed[k] = _to_num(float, k, v)
            else:
                typed[k] = v
        return SyntheticTask(**typed)
    columns = dict(opts.pop("columns", None) or {})
    kw: dict[str, Any] = {}
    for k, v in opts.items():
        if k == "file":
            kw["file"] = v
        elif k == "split":
            kw["split"] = v
        elif k == "dataset":
            kw["dataset"] = v
        elif k == "config":
            kw["dataset_config"] = v
        elif k == "template":
            kw["template"] = v
        elif k == "shots" and cls is TruthfulQATask:
            kw["shots"] = _to_num(int, k, v)
        elif k in cls.fields + cls.optional_fields:
            columns[k] = str(v)
        else:
            allowed = ["file", "split", "dataset", "config", "template"] + \
                (["shots"] if cls is TruthfulQATask else []) + list(cls.fields + cls.optional_fields)
            raise ConfigError(f"task {name}: unknown option {k!r}; options: {', '.join(allowed)}")
    return cls(columns=columns, **kw)


def _to_num(typ: Callable[[Any], Any], key: str, v: Any) -> Any:
    try:
        return typ(v)
    except (TypeError, ValueError):
        raise ConfigError(f"option {key}={v!r} is not a{'n integer' if typ is int else ' number'}") from None


# --------------------------------------------------------------------------------------------
# log-likelihood scoring
# --------------------------------------------------------------------------------------------
def choice_logliks(model: Any, tokenizer: Any, context: str,
                   continuations: Sequence[str]) -> list[LoglikResult]:
    """Log-likelihood of each continuation after ``context``, in one batched forward pass.

    Tokenisation follows lm-evaluation-harness: trailing spaces of the context move to the
    continuation; the continuation's tokens are those of ``tokenize(context + continuation)``
    beyond the length of ``tokenize(context)``. Special tokens (e.g. a BOS) are added as the
    tokenizer does by default; an empty context starts from BOS (or EOS). Sums are in nats,
    computed in float32.

    Args:
        model: a causal LM (``model(input_ids, attention_mask).logits``).
        tokenizer: its tokenizer.
        context: the prompt.
        continuations: candidate continuations (e.g. HellaSwag endings with a leading space).

    Returns:
        One :class:`LoglikResult` per continuation, in order.
    """
    import torch

    if not continuations:
        return []
    n_space = len(context) - len(context.rstrip(" "))
    if n_space:
        continuations = [context[-n_space:] + c for c in continuations]
        context = context[:-n_space]
    if context:
        ctx_ids = list(tokenizer(context)["input_ids"])
    else:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ctx_ids = [start]
    seqs, spans = [], []
    for c in continuations:
        if context:
            cont = list(tokenizer(context + c)["input_ids"])[len(ctx_ids):]
        else:
            cont = list(tokenizer(c, add_special_tokens=False)["input_ids"])
        if not cont:
            raise ValueError(f"continuation {c!r} has no tokens of its own after the context")
        seqs.append(ctx_ids + cont)
        spans.append((len(ctx_ids), len(cont)))
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = getattr(model, "device", None) or next(model.parameters()).device
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding: positions of real tokens stay 0..len-1
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    out = []
    for i, (start, n) in enumerate(spans):
        # logits at position p predict token p+1
        lp = torch.log_softmax(logits[i, start - 1: start - 1 + n].float(), dim=-1)
        target = ids[i, start: start + n].to(lp.device)
        tok_lp = lp.gather(-1, target[:, None])[:, 0]
        greedy = bool((lp.argmax(-1) == target).all())
        out.append(LoglikResult(float(tok_lp.sum()), n, greedy))
    return out


def sample_logliks(model: Any, tokenizer: Any, sample: Sample) -> list[LoglikResult]:
    """:func:`choice_logliks` of ``sample.choices`` after ``sample.prompt`` (for ``loglik`` tasks)."""
    if not sample.choices:
        raise ValueError(f"sample {sample.sample_id} has no choices to score")
    return choice_logliks(model, tokenizer, sample.prompt, sample.choices)


__all__ = ["Sample", "LoglikResult", "Task", "BoolQTask", "HellaSwagTask", "TruthfulQATask",
           "SyntheticTask", "get_task", "list_tasks", "parse_task_spec", "rouge_l_f1",
           "rouge_tokens", "choice_logliks", "sample_logliks", "TRUTHFULQA_PRIMER", "DEFAULT_TASK"]
