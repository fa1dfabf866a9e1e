"""The result schema: the one place where measurements become typed tables and Parquet files.

Every table a run writes (``requests``, ``tokens``, ``power``, in the run directory and in its
``cells/`` parts) has its columns declared here, once, as :class:`Column` rows: name, type, unit,
description and what a null means. From that one table come

- the pandas dtypes of :func:`to_frame` (nullable: ``string``, ``Int64``, ``Float64``,
  ``boolean``), so that a value that was not measured is ``<NA>``, never a sentinel such as
  ``-1`` or ``False``;
- the pyarrow schema of :func:`arrow_schema`, with ``{"unit": ..., "description": ...,
  "null": ...}`` metadata on every field, which :func:`write_parquet` writes and any Parquet
  reader sees (missing values are Parquet nulls);
- the docs' column table (README, docs/sweep.md).

Writers call :func:`to_frame` and :func:`write_parquet`; readers call :func:`read_parquet` or
:func:`conform` (CSV). Input features are the columns whose names start with
:data:`FEATURE_PREFIX`; the known ones are declared in :data:`FEATURE_COLUMNS`, others are kept
as nullable floats.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

FEATURE_PREFIX = "feat_"


@dataclass(frozen=True)
class Column:
    """One declared column. ``type`` is a key of :data:`TYPES`; ``unit`` is empty for text and
    identifiers, ``"1"`` for dimensionless ratios; ``null`` says what a null value means (empty:
    the column is never null)."""

    name: str
    type: str
    unit: str
    description: str
    null: str = ""


#: type name -> (pyarrow type, pandas nullable dtype). Every type can hold a null.
TYPES: dict[str, tuple[pa.DataType, str]] = {
    "string": (pa.string(), "string"),
    "int64": (pa.int64(), "Int64"),
    "float64": (pa.float64(), "Float64"),
    "bool": (pa.bool_(), "boolean"),
}

_NO_ENERGY = "not measured (no GPU or no power source: energy_method none)"


def _table(*cols: Column) -> dict[str, Column]:
    out = {c.name: c for c in cols}
    assert len(out) == len(cols), "duplicate column"
    for c in cols:
        assert c.type in TYPES, (c.name, c.type)
    return out


def _cell_table(cell_id_description: str, *cols: Column) -> dict[str, Column]:
    """A table a run writes: its first column is always ``cell_id`` (the run directory keeps one
    part per cell and a resume replaces a cell's rows by it), then ``cols``."""
    return _table(Column("cell_id", "string", "", cell_id_description), *cols)


C = Column
# One row per column, in the order of the written table.
REQUEST_COLUMNS: dict[str, Column] = _cell_table(
    "model|task|clock point|batch size|repeat; stable across resumes",
    C("request_id", "string", "", "cell_id|sample id|position; unique in a run"),
    C("model", "string", "", "model spec as given (hub id, path or arch:NAME)"),
    C("revision", "string", "", "commit the weights were loaded at (hub cache), else as requested",
      "arch: and local models (nothing to pin)"),
    C("weights", "string", "", "pretrained | random", "not known (an endpoint's model)"),
    C("dtype", "string", "", "torch dtype of the weights", "not known (an endpoint's model)"),
    C("task", "string", "", "task name in this run"),
    C("sample_id", "string", "", "the task's id of the sample"),
    C("repeat", "int64", "", "measurement repeat of the cell, from 0"),
    C("batch_size", "int64", "requests", "requests per generate() call", "served traffic (no fixed batch)"),
    C("batch_index", "int64", "", "position of this request in its batch", "served traffic"),
    C("engine", "string", "", "generate (lock-step batches) | continuous (HF continuous batching) | endpoint "
      "(an OpenAI-compatible server)", "not recorded (llm_dvfs.lm_eval rows, or a run written before served "
      "traffic existed)"),
    C("arrival_rate_rps", "float64", "requests/s", "served open loop: the load's mean arrival rate (Poisson "
      "rate, or a trace's mean)", "closed loop or lock-step"),
    C("concurrency", "int64", "requests", "served closed loop: the load's number of users", "open loop or lock-step"),
    C("load_phase", "string", "", "served traffic: warmup | measured | cooldown (warm-up and cool-down requests are "
      "served and attributed, and left out of the statistics)", "lock-step"),
    C("device", "string", "", "torch device of the model: cuda:N or cpu", "not known (an endpoint's model)"),
    C("gpu_name", "string", "", "name of the measured GPU", "no GPU measured"),
    C("gpu_uuid", "string", "", "UUID of the measured GPU (a model over several GPUs: their UUIDs, comma-"
      "separated); a parallel sweep's rows come from many", "no GPU measured, or a run written before parallel sweeps"),
    C("host", "string", "", "host name of the machine that ran the request", "a run written before parallel sweeps"),
    C("sm_mhz_requested", "float64", "MHz", "requested SM clock", "as found: not changed (observe mode)"),
    C("mem_mhz_requested", "float64", "MHz", "requested memory clock", "as found: not changed"),
    C("power_limit_w_requested", "float64", "W", "requested power limit", "as found: not changed"),
    C("sm_mhz_observed", "float64", "MHz", "median SM clock polled during the request",
      "not observed (no GPU, or the clock could not be read)"),
    C("mem_mhz_observed", "float64", "MHz", "median memory clock polled during the request",
      "not observed (no GPU, or the clock could not be read)"),
    C("clock_event_reasons", "int64", "bitmask", "OR of the NVML clock-event (throttle) bits seen during "
      "the request (llm_dvfs.clocks.decode_clock_event_reasons)", "not read (no GPU, or not supported)"),
    C("tokens_in", "int64", "tokens", "prompt tokens (unpadded)", "not known (an endpoint that reports no usage)"),
    C("tokens_out", "int64", "tokens", "generated tokens"),
    C("stop_reason", "string", "", "eos | stop_string | max_new_tokens: what ended the request's generation; "
      "served traffic also stop (an endpoint's: EOS or a stop sequence), error, cancelled",
      "not generated (log-likelihood tasks) or not known"),
    C("error", "string", "", "served traffic: why the request failed (its tokens before the failure are kept)",
      "the request did not fail"),
    C("ttft_s", "float64", "s", "time to first token", "no token marks"),
    C("tpot_s", "float64", "s", "time per output token after the first", "no token marks, or < 2 tokens"),
    C("latency_s", "float64", "s", "duration of the request's batch; served traffic: end - arrival"),
    C("t_arrival_s", "float64", "s", "served traffic: arrival, host monotonic time",
      "not served traffic (lock-step batches)"),
    C("t_start_s", "float64", "s", "served traffic: admission to a batch (arrival when the engine does not say)",
      "not served traffic"),
    C("t_end_s", "float64", "s", "served traffic: result returned / stream closed", "not served traffic"),
    C("queue_s", "float64", "s", "t_start_s - t_arrival_s", "admission unknown or not served traffic"),
    C("energy_j", "float64", "J", "energy of the request (its share of the batch, or of the engine steps it "
      "shared)", _NO_ENERGY),
    C("prefill_energy_j", "float64", "J", "energy up to the first token", _NO_ENERGY + " or no token marks"),
    C("decode_energy_j", "float64", "J", "energy after the first token", _NO_ENERGY + " or no token marks"),
    C("j_per_token", "float64", "J/token", "energy_j / tokens_out", _NO_ENERGY + " or no output token"),
    C("avg_power_w", "float64", "W", "average power over the request", _NO_ENERGY),
    C("idle_power_w", "float64", "W", "idle baseline of this clock point", "no baseline measured (no GPU, "
      "or idle_s 0)"),
    C("active_energy_j", "float64", "J", "energy_j - idle_power_w * latency_s (share of the batch)",
      "no energy or no idle baseline"),
    C("energy_j_counter", "float64", "J", "hardware energy-counter delta over the batch, split evenly",
      "no energy counter read"),
    C("energy_method", "string", "", "buffer | instant | counter | average | none (no energy); served traffic: "
      "engine_steps | token_timestamps (docs/attribution.md)"),
    C("quality_metric", "string", "", "accuracy | acc_norm | rougeL_f1_diff | ...", "the task has no metric"),
    C("quality", "float64", "1", "the task's metric for this answer", "no metric, or not scored"),
    C("quality_valid", "bool", "", "True: a real score; False: meaningless (random weights)",
      "no quality value to judge"),
    C("prompt", "string", "", "the prompt text"),
    C("output_text", "string", "", "the generated text"),
)

TOKEN_COLUMNS: dict[str, Column] = _cell_table(
    "cell of the request",
    C("request_id", "string", "", "request of the token"),
    C("token_index", "int64", "", "0 = first generated token (ends prefill)"),
    C("phase", "string", "", "prefill | decode"),
    C("t_start_s", "float64", "s", "start of the token's interval, host monotonic time"),
    C("t_end_s", "float64", "s", "end of the token's interval, host monotonic time"),
    C("energy_j", "float64", "J", "energy attributed to the token", _NO_ENERGY),
)

POWER_COLUMNS: dict[str, Column] = _cell_table(
    "cell whose window the sample lies in",
    C("t_s", "float64", "s", "sample time, host monotonic"),
    C("device", "int64", "", "GPU index (CUDA ordinal, as --gpu takes it)"),
    C("power_w", "float64", "W", "power sample (zero-order hold until the next)"),
    C("source", "string", "", "buffer | instant | average"),
)

#: The input features of :func:`llm_dvfs.workload.features.compute_features` (definitions there).
FEATURE_COLUMNS: dict[str, Column] = _table(
    C("feat_chars", "float64", "characters", "characters (Unicode code points)"),
    C("feat_words", "float64", "words", "words"),
    C("feat_tokens", "float64", "tokens", "tokens of the model's tokenizer", "no tokenizer"),
    C("feat_sentences", "float64", "sentences", "sentences"),
    C("feat_char_entropy_bits", "float64", "bit/character", "entropy of the characters", "empty prompt"),
    C("feat_token_entropy_bits", "float64", "bit/token", "entropy of the token ids", "empty prompt or no tokenizer"),
    C("feat_type_token_ratio", "float64", "1", "distinct words / words", "no words"),
    C("feat_mean_word_len", "float64", "characters", "mean characters per word", "no words"),
    C("feat_digit_ratio", "float64", "1", "digit characters / characters", "empty prompt"),
    C("feat_punct_ratio", "float64", "1", "punctuation characters / characters", "empty prompt"),
    C("feat_ne_density", "float64", "1", "named-entity mentions / words", "ner off, or no words"),
)
del C

SCHEMAS: dict[str, dict[str, Column]] = {
    "requests": REQUEST_COLUMNS,
    "tokens": TOKEN_COLUMNS,
    "power": POWER_COLUMNS,
}


def feature_columns(df: pd.DataFrame) -> list[str]:
    """Names of the input-feature columns present in ``df``."""
    return [c for c in df.columns if c.startswith(FEATURE_PREFIX)]


def _feature_column(name: str) -> Column:
    return FEATURE_COLUMNS.get(name) or Column(name, "float64", "", "input feature of the prompt", "not defined")


def columns(kind: str, extra: Iterable[str] = ()) -> list[Column]:
    """The declared columns of ``kind`` then, for ``requests``, the feature columns in ``extra``.

    Raises:
        KeyError: unknown table kind.
    """
    cols = list(SCHEMAS[kind].values())
    if kind == "requests":
        cols += [_feature_column(n) for n in extra if n.startswith(FEATURE_PREFIX) and n not in SCHEMAS[kind]]
    return cols


def _isna(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and v != v)


def _parse_bool(v: Any) -> Any:
    if _isna(v):
        return None
    if isinstance(v, str):  # CSV text; anything else unreadable is null, not False
        return {"true": True, "false": False, "1": True, "0": False, "1.0": True, "0.0": False}.get(
            v.strip().lower())
    return bool(v)


def _cast(values: Any, type_name: str) -> Any:
    """``values`` (list, array or Series) as the pandas nullable dtype of ``type_name``.

    None, NaN and ``<NA>`` become ``<NA>``, and so does a value that cannot be read as the type
    (text in a number column, 2.5 in an integer column). Text booleans (CSV) ``true``/``false``/
    ``1``/``0`` are parsed. Columns already in the target dtype are returned as they are (the
    large tables are conformed on every consolidation).
    """
    dtype = TYPES[type_name][1]
    s = values if isinstance(values, pd.Series) else pd.Series(
        values, dtype=None if isinstance(values, np.ndarray) else object)
    if str(s.dtype) == dtype:
        return s.array
    if type_name == "string":
        return s.astype(object).where(s.notna(), None).astype("string").array
    if type_name == "bool":
        if pd.api.types.is_bool_dtype(s.dtype):
            return s.astype("boolean").array
        return pd.array([_parse_bool(v) for v in s.to_list()], dtype="boolean")
    if s.dtype == object:
        s = pd.to_numeric(s.where(s.notna(), np.nan).map(lambda v: np.nan if isinstance(v, bool) else v),
                          errors="coerce")
    if type_name == "int64":
        if pd.api.types.is_integer_dtype(s.dtype):
            return s.astype("Int64").array
        v = pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        v = np.where(np.isfinite(v) & (v == np.round(v)), v, np.nan)
        return pd.array(v, dtype="Float64").astype("Int64")
    return pd.array(pd.to_numeric(s, errors="coerce").to_numpy(dtype="float64", na_value=np.nan), dtype="Float64")


def to_frame(kind: str, rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Build a table of ``kind`` (requests | tokens | power) from row dicts.

    Declared columns come first in schema order, with nullable dtypes; a key a row lacks, None
    and NaN all become ``<NA>`` (missing is null, never a sentinel). Feature columns (``feat_*``,
    requests only) are kept, as ``Float64``, after them in name order. Any other undeclared key is
    an error: a typo in a writer must not silently create a column.

    Raises:
        KeyError: unknown table kind.
        ValueError: a row has a key that is neither declared nor a feature.
    """
    schema = SCHEMAS[kind]
    rows = list(rows)
    extra: set[str] = set()
    for r in rows:
        for k in r:
            if k not in schema and k not in extra:
                if kind == "requests" and k.startswith(FEATURE_PREFIX):
                    extra.add(k)
                else:
                    raise ValueError(f"column {k!r} is not in the {kind} schema (llm_dvfs/schema.py)")
    return _typed_frame(columns(kind, sorted(extra)), lambda name: [r.get(name) for r in rows], len(rows))


def _typed_frame(cols: list[Column], values_of: Callable[[str], Any], n: int) -> pd.DataFrame:
    """``n`` rows with ``cols`` in order, each ``values_of(name)`` cast to its nullable dtype."""
    return pd.DataFrame({c.name: _cast(values_of(c.name), c.type) for c in cols}, index=pd.RangeIndex(n))


def empty(kind: str) -> pd.DataFrame:
    """An empty, typed table of ``kind``."""
    return to_frame(kind, [])


def conform(kind: str, df: pd.DataFrame, notes: Optional[list[str]] = None, source: str = "") -> pd.DataFrame:
    """``df`` (read from Parquet or CSV, or concatenated from parts) with every declared column
    of ``kind`` in schema order and dtype, then its feature columns, then anything else it had.

    A declared column that ``df`` lacks is added as all ``<NA>`` (and named in ``notes`` when
    given); a value that cannot be read as the column's type becomes ``<NA>``.
    """
    cols = columns(kind, feature_columns(df))
    missing = [c.name for c in cols if c.name not in df.columns]
    if missing and notes is not None:
        notes.append(f"{source or kind} lacks column(s) {', '.join(missing)}; treated as missing values.")
    n = len(df)
    out = _typed_frame(cols, lambda name: df[name] if name in df.columns else [None] * n, n)
    for c in df.columns:
        if c not in out.columns:
            out[c] = df[c].to_numpy()
    out.attrs = dict(df.attrs)
    return out


def arrow_schema(kind: str, extra: Iterable[str] = ()) -> pa.Schema:
    """The pyarrow schema of ``kind`` (plus the feature columns in ``extra``), with ``unit``,
    ``description`` and ``null`` (what a null means) as field metadata, and the table's kind as
    schema metadata ``llm_dvfs.table``."""
    fields = [pa.field(c.name, TYPES[c.type][0], nullable=True,
                       metadata={"unit": c.unit, "description": c.description, "null": c.null})
              for c in columns(kind, extra)]
    return pa.schema(fields, metadata={"llm_dvfs.table": kind})


def to_arrow(kind: str, df: pd.DataFrame) -> pa.Table:
    """``df`` as a pyarrow Table of :func:`arrow_schema` (conformed first: see :func:`conform`;
    columns outside the schema are dropped). The pandas metadata records the nullable dtypes, so
    ``pandas.read_parquet`` gives ``<NA>`` back."""
    df = conform(kind, df)
    sch = arrow_schema(kind, feature_columns(df))
    df = df[sch.names]
    table = pa.Table.from_pandas(df, schema=sch, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[b"llm_dvfs.table"] = kind.encode()
    return table.replace_schema_metadata(meta)


def write_parquet(kind: str, df: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write ``df`` as a Parquet file of ``kind`` (:func:`to_arrow`). Not atomic by itself: wrap
    it in :func:`llm_dvfs.atomic.atomic_write_with`. Raises ``OSError`` on a write failure."""
    pq.write_table(to_arrow(kind, df), path)


def read_parquet(kind: str, path: str | os.PathLike[str], notes: Optional[list[str]] = None) -> pd.DataFrame:
    """A Parquet file of ``kind`` as a DataFrame in schema dtypes (:func:`conform`), nulls as ``<NA>``.

    Raises:
        OSError / pyarrow.ArrowInvalid: the file cannot be read.
    """
    return conform(kind, pq.read_table(path).to_pandas(), notes, os.path.basename(os.fspath(path)))


def numeric_view(df: pd.DataFrame) -> pd.DataFrame:
    """A shallow copy of ``df`` whose nullable float columns are numpy ``float64`` (null → NaN),
    for numpy arithmetic; integer, boolean and text columns keep their nullable dtypes."""
    out = df.copy(deep=False)
    for c in out.columns:
        if isinstance(out[c].dtype, pd.Float64Dtype):
            out[c] = out[c].to_numpy(dtype="float64", na_value=np.nan)
    return out


def markdown_table(kind: str) -> str:
    """The column table of ``kind`` as Markdown (column, type, unit, description, null means),
    the one in README.md and docs/sweep.md."""
    lines = ["| column | type | unit | description | null means |", "|---|---|---|---|---|"]
    for c in columns(kind):
        lines.append(f"| `{c.name}` | {c.type} | {c.unit or '–'} | {c.description.replace('|', chr(92) + '|')} | "
                     f"{c.null.replace('|', chr(92) + '|') or 'never null'} |")
    return "\n".join(lines)


__all__ = ["FEATURE_PREFIX", "Column", "TYPES", "REQUEST_COLUMNS", "TOKEN_COLUMNS", "POWER_COLUMNS",
           "FEATURE_COLUMNS", "SCHEMAS", "feature_columns", "columns", "to_frame", "empty", "conform",
           "arrow_schema", "to_arrow", "write_parquet", "read_parquet", "numeric_view", "markdown_table"]
