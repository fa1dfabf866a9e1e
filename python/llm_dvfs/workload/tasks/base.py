"""Task base: :class:`Sample`, :class:`LoglikResult`, :class:`Task`, and the registry behind
:func:`get_task` (the task table and spec forms are in :mod:`llm_dvfs.workload.tasks`)."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from llm_dvfs.errors import ConfigError
from llm_dvfs.workload.tasks.loaders import is_missing, load_hub, read_table


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
        stop: stop sequences, as lm-evaluation-harness' ``until``: generation of a request ends
            once its text completes one of them (the runner passes them to ``generate`` as stop
            strings; the text after them is never scored, so tokens spent there are wasted
            energy). Empty = run to EOS or max_new_tokens.
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
            return read_table(self.file)
        assert self.dataset_id is not None
        return load_hub(self.dataset_id, self.dataset_config, self.split, self.name, self.fields)

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
                if is_missing(v) if not isinstance(v, (list, tuple)) else len(v) == 0:
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
            return [row.get(c) for c in col.split("|") if not is_missing(row.get(c))]
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
                "scoring": self.scoring, "template": self.template, "stop": list(self.stop),
                "columns": {k: v for k, v in self.columns.items() if k != v}}

    def __repr__(self) -> str:
        return f"<Task {self.name} from {self.source()}>"


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------
# filled by register_task (the package's __init__ registers the shipped tasks, so this module
# needs none of the concrete task modules, which import it)
_TASKS: dict[str, type[Task]] = {}
_ALIASES = {"truthful_qa": "truthfulqa", "truthfulqa-gen": "truthfulqa", "google/boolq": "boolq",
            "rowan/hellaswag": "hellaswag", "truthfulqa/truthful_qa": "truthfulqa"}
DEFAULT_TASK = "synthetic"


def register_task(name: str, cls: type[Task]) -> None:
    """Make ``cls`` available to :func:`get_task` as ``name`` (listed in registration order)."""
    _TASKS[name] = cls


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
    if name == "synthetic":
        typed: dict[str, Any] = {}
        for k, v in opts.items():
            if k in ("min_words", "max_words"):
                typed[k] = _to_num(int, k, v)
            elif k in ("max_entity_density", "max_digit_rate"):
                typed[k] = _to_num(float, k, v)
            else:
                typed[k] = v
        return cls(**typed)
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
        elif k == "shots" and name == "truthfulqa":
            kw["shots"] = _to_num(int, k, v)
        elif k in cls.fields + cls.optional_fields:
            columns[k] = str(v)
        else:
            allowed = ["file", "split", "dataset", "config", "template"] + \
                (["shots"] if name == "truthfulqa" else []) + list(cls.fields + cls.optional_fields)
            raise ConfigError(f"task {name}: unknown option {k!r}; options: {', '.join(allowed)}")
    return cls(columns=columns, **kw)


def _to_num(typ: Callable[[Any], Any], key: str, v: Any) -> Any:
    try:
        return typ(v)
    except (TypeError, ValueError):
        raise ConfigError(f"option {key}={v!r} is not a{'n integer' if typ is int else ' number'}") from None


__all__ = ["Sample", "LoglikResult", "Task", "get_task", "list_tasks", "parse_task_spec",
           "register_task", "DEFAULT_TASK"]
