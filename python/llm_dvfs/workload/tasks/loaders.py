"""Where task rows come from: local JSONL/CSV/TSV/Parquet files, or the Hugging Face hub
(through ``datasets.load_dataset``, with a hint on how to get a dataset that is missing)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from llm_dvfs.errors import ConfigError, DataNotFound


def is_missing(v: Any) -> bool:
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


def as_list(v: Any) -> list[str]:
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
                return [str(x) for x in parsed if not is_missing(x)]
        return [p.strip() for p in s.split(";") if p.strip()]
    try:
        return [str(x) for x in list(v) if not is_missing(x)]
    except TypeError:
        return [str(v)]


def read_table(path: Path) -> list[dict[str, Any]]:
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


def hub_hint(dataset_id: str, config: str | None, task: str, fields: Sequence[str]) -> str:
    cfg = f" (config {config!r})" if config else ""
    example = ",".join(f"{f}=COLUMN" for f in fields)
    return (f"dataset {dataset_id!r}{cfg} is not available: run once with internet access so that "
            f"`datasets` caches it (then HF_DATASETS_OFFLINE=1 works), or fetch it with "
            f"`huggingface-cli download --repo-type dataset {dataset_id}` (or `hf download "
            f"{dataset_id} --repo-type dataset`), or use a local JSONL/CSV/Parquet file: "
            f"--task '{task}:file=PATH,{example}'")


def load_hub(dataset_id: str, config: str | None, split: str, task: str,
              fields: Sequence[str]) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a declared dependency of [hf]
        raise DataNotFound("the `datasets` package is needed for hub tasks: pip install datasets; "
                           + hub_hint(dataset_id, config, task, fields)) from e
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split) if config \
            else datasets.load_dataset(dataset_id, split=split)
    except OSError as e:  # ConnectionError, FileNotFoundError, DatasetNotFoundError, HTTP errors
        raise DataNotFound(hub_hint(dataset_id, config, task, fields)
                           + f" [{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}]") from e
    except ValueError as e:  # e.g. unknown split
        raise ConfigError(f"dataset {dataset_id!r}: {e}") from e
    return [dict(r) for r in ds]
