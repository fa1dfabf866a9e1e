"""The result schema: the one place where measurements become DataFrame rows.

Every table a run writes (``requests``, ``tokens``, ``power``) has its columns declared here,
with units in the names. Writers call :func:`to_frame`; readers may rely on the column set.
Input features are the columns whose names start with :data:`FEATURE_PREFIX`.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd

FEATURE_PREFIX = "feat_"

# name -> pandas dtype. Order is the order of the written table.
REQUEST_COLUMNS: dict[str, str] = {
    "cell_id": "string",            # model|task|clock point|batch size|repeat, stable across resumes
    "request_id": "string",         # cell_id + sample id + position, unique in a run
    "model": "string",              # model spec as given (hub id, path or arch:NAME)
    "revision": "string",           # commit the weights were loaded at (hub cache), else as requested; NA for arch:/local
    "weights": "string",            # pretrained | random
    "dtype": "string",
    "task": "string",
    "sample_id": "string",
    "repeat": "int64",
    "batch_size": "int64",
    "batch_index": "int64",         # position of this request in its batch
    "device": "string",             # cuda:N or cpu
    "gpu_name": "string",
    "sm_mhz_requested": "float64",  # NaN = as found (observe mode)
    "mem_mhz_requested": "float64",
    "power_limit_w_requested": "float64",
    "sm_mhz_observed": "float64",   # median SM clock polled during the request
    "mem_mhz_observed": "float64",
    "clock_event_reasons": "int64", # OR of NVML clock-event (throttle) bits seen during the request
    "tokens_in": "int64",
    "tokens_out": "int64",
    "stop_reason": "string",        # eos | stop_string | max_new_tokens: what ended the request's generation
    "ttft_s": "float64",
    "tpot_s": "float64",
    "latency_s": "float64",
    "energy_j": "float64",
    "prefill_energy_j": "float64",
    "decode_energy_j": "float64",
    "j_per_token": "float64",       # energy_j / tokens_out
    "avg_power_w": "float64",
    "idle_power_w": "float64",      # idle baseline of this clock point
    "active_energy_j": "float64",   # energy_j - idle_power_w * latency_s (share of the batch)
    "energy_j_counter": "float64",  # hardware counter delta over the batch window, split evenly
    "energy_method": "string",      # buffer | instant | counter | average | none
    "quality_metric": "string",     # accuracy | rougeL_f1 | ... ; empty when the task has none
    "quality": "float64",
    "quality_valid": "bool",        # False for random weights: the metric is meaningless
    "prompt": "string",
    "output_text": "string",
}

TOKEN_COLUMNS: dict[str, str] = {
    "cell_id": "string",
    "request_id": "string",
    "token_index": "int64",         # 0 = first generated token (ends prefill)
    "phase": "string",              # prefill | decode
    "t_start_s": "float64",         # host monotonic time, s
    "t_end_s": "float64",
    "energy_j": "float64",
}

POWER_COLUMNS: dict[str, str] = {
    "cell_id": "string",
    "t_s": "float64",               # host monotonic time, s
    "device": "int64",
    "power_w": "float64",
    "source": "string",             # buffer | instant | average
}

SCHEMAS: dict[str, dict[str, str]] = {
    "requests": REQUEST_COLUMNS,
    "tokens": TOKEN_COLUMNS,
    "power": POWER_COLUMNS,
}

_MISSING = {"string": pd.NA, "float64": np.nan, "int64": -1, "bool": False}


def feature_columns(df: pd.DataFrame) -> list[str]:
    """Names of the input-feature columns present in ``df``."""
    return [c for c in df.columns if c.startswith(FEATURE_PREFIX)]


def to_frame(kind: str, rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Build a table of ``kind`` (requests | tokens | power) from row dicts.

    Declared columns come first in schema order, typed; missing values become NA/NaN (-1 for
    integer columns). Feature columns (``feat_*``) are kept, as float64, after them. Any other
    undeclared key is an error: a typo in a writer must not silently create a column.

    Raises:
        KeyError: unknown table kind.
        ValueError: a row has a key that is neither declared nor a feature.
    """
    schema = SCHEMAS[kind]
    rows = list(rows)
    extra: list[str] = []
    for r in rows:
        for k in r:
            if k not in schema and k not in extra:
                if kind == "requests" and k.startswith(FEATURE_PREFIX):
                    extra.append(k)
                else:
                    raise ValueError(f"column {k!r} is not in the {kind} schema (results.py)")
    data: dict[str, Any] = {}
    for col, dtype in schema.items():
        vals = [r.get(col, _MISSING[dtype]) for r in rows]
        vals = [_MISSING[dtype] if v is None else v for v in vals]
        data[col] = pd.array(vals, dtype=dtype) if dtype != "bool" else np.asarray(vals, dtype=bool)
    for col in sorted(extra):
        data[col] = np.asarray([r.get(col, np.nan) for r in rows], dtype="float64")
    return pd.DataFrame(data)


def empty(kind: str) -> pd.DataFrame:
    """An empty, typed table of ``kind``."""
    return to_frame(kind, [])
