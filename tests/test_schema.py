"""The result schema (llm_dvfs.schema): one table of columns, nullable dtypes, Parquet with units."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from llm_dvfs import schema
from llm_dvfs.analysis.rundata import load_run

ROOT = Path(__file__).resolve().parents[1]


def test_every_column_is_declared_once_with_type_unit_and_description():
    for kind, cols in schema.SCHEMAS.items():
        assert cols, kind
        for name, c in cols.items():
            assert c.name == name and c.type in schema.TYPES and c.description, (kind, name)
    # the quantities carry their unit; what a float or int measurement's null means is said
    req = schema.REQUEST_COLUMNS
    assert {n: req[n].unit for n in ("energy_j", "latency_s", "sm_mhz_observed", "avg_power_w", "j_per_token",
                                     "clock_event_reasons")} == {
        "energy_j": "J", "latency_s": "s", "sm_mhz_observed": "MHz", "avg_power_w": "W", "j_per_token": "J/token",
        "clock_event_reasons": "bitmask"}
    assert req["clock_event_reasons"].null and req["quality_valid"].null and req["energy_j"].null
    assert list(schema.FEATURE_COLUMNS) == list(__import__("llm_dvfs.workload.features",
                                                           fromlist=["x"]).FEATURE_COLUMNS)


def test_to_frame_makes_missing_null_not_a_sentinel():
    df = schema.to_frame("requests", [
        {"cell_id": "c", "request_id": "r0", "energy_j": math.nan, "clock_event_reasons": None, "tokens_in": 5},
        {"cell_id": "c", "request_id": "r1", "energy_j": 2.5, "clock_event_reasons": 0x4, "quality_valid": False,
         "feat_chars": 12.0},
    ])
    assert list(df.columns[:len(schema.REQUEST_COLUMNS)]) == list(schema.REQUEST_COLUMNS)
    assert list(df.columns[len(schema.REQUEST_COLUMNS):]) == ["feat_chars"]
    assert str(df["clock_event_reasons"].dtype) == "Int64" and str(df["quality_valid"].dtype) == "boolean"
    assert str(df["energy_j"].dtype) == "Float64" and str(df["feat_chars"].dtype) == "Float64"
    assert df["clock_event_reasons"].iloc[0] is pd.NA and df["clock_event_reasons"].iloc[1] == 4
    assert df["energy_j"].iloc[0] is pd.NA and df["energy_j"].iloc[1] == 2.5   # NaN is null too
    assert df["quality_valid"].iloc[0] is pd.NA and df["quality_valid"].iloc[1] is np.False_  # known False stays
    assert df["tokens_in"].iloc[1] is pd.NA and df["feat_chars"].iloc[0] is pd.NA
    with pytest.raises(ValueError, match="'energy_J' is not in the requests schema"):
        schema.to_frame("requests", [{"energy_J": 1.0}])
    assert len(schema.empty("tokens")) == 0 and list(schema.empty("power").columns) == list(schema.POWER_COLUMNS)


def test_parquet_round_trip_keeps_nulls_dtypes_and_units(tmp_path):
    df = schema.to_frame("tokens", [
        {"cell_id": "c", "request_id": "r", "token_index": 0, "phase": "prefill", "t_start_s": 1.0,
         "t_end_s": 1.5, "energy_j": None},
        {"cell_id": "c", "request_id": "r", "token_index": 1, "phase": "decode", "t_start_s": 1.5,
         "t_end_s": 1.6, "energy_j": 0.25}])
    p = tmp_path / "tokens.parquet"
    schema.write_parquet("tokens", df, p)
    t = pq.read_table(p)
    assert t.schema.names == list(schema.TOKEN_COLUMNS)
    assert t.column("energy_j").to_pylist() == [None, 0.25]
    f = t.schema.field("t_end_s")
    assert f.metadata == {b"unit": b"s", b"description": schema.TOKEN_COLUMNS["t_end_s"].description.encode(),
                          b"null": b""}
    assert t.schema.metadata[b"llm_dvfs.table"] == b"tokens"
    back = pd.read_parquet(p)
    pd.testing.assert_frame_equal(back, df)
    assert back["energy_j"].iloc[0] is pd.NA
    # a frame of plain numpy dtypes (NaN, int64, bool) is conformed on the way out
    plain = pd.DataFrame({"cell_id": ["c"], "t_s": [0.0], "device": [0], "power_w": [np.nan], "source": ["buffer"]})
    schema.write_parquet("power", plain, tmp_path / "power.parquet")
    assert pq.read_table(tmp_path / "power.parquet").column("power_w").null_count == 1
    assert str(schema.read_parquet("power", tmp_path / "power.parquet")["device"].dtype) == "Int64"


def test_conform_reads_csv_text_and_unreadable_values_as_null():
    csv = pd.DataFrame({"quality_valid": ["True", "false", "", "maybe"], "repeat": ["1", "x", "", "2.5"],
                        "energy_j": ["1.5", "", "nan", "abc"], "model": ["m", None, "", "m"]})
    notes: list[str] = []
    out = schema.conform("requests", csv, notes, "requests.csv")
    assert out["quality_valid"].tolist() == [True, False, pd.NA, pd.NA]
    assert out["repeat"].tolist() == [1, pd.NA, pd.NA, pd.NA]
    assert out["energy_j"].tolist() == [1.5, pd.NA, pd.NA, pd.NA]
    assert out["model"].iloc[1] is pd.NA
    assert notes and "requests.csv lacks column(s) cell_id" in notes[0]
    assert out["cell_id"].isna().all()


def test_numeric_view_turns_null_floats_into_nan_only():
    df = schema.to_frame("requests", [{"energy_j": None, "clock_event_reasons": None, "quality_valid": None}])
    v = schema.numeric_view(df)
    assert v["energy_j"].dtype == np.float64 and math.isnan(v["energy_j"].iloc[0])
    assert str(v["clock_event_reasons"].dtype) == "Int64" and str(v["quality_valid"].dtype) == "boolean"
    assert str(df["energy_j"].dtype) == "Float64"  # the original is unchanged


def test_an_old_run_directorys_minus_one_reads_as_not_read(tmp_path):
    """Format 1 wrote clock_event_reasons = -1 ("not read"): the report must not see every throttle bit."""
    old = pd.DataFrame({"cell_id": ["c", "c"], "request_id": ["r0", "r1"], "model": ["m", "m"], "task": ["t", "t"],
                        "batch_size": [1, 1], "sm_mhz_requested": [np.nan, np.nan], "latency_s": [0.1, 0.2],
                        "clock_event_reasons": np.array([-1, 4], dtype="int64"), "quality_valid": [False, False]})
    old.to_parquet(tmp_path / "requests.parquet", index=False)   # as version 1 wrote it: plain pandas
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 1}))
    run = load_run(tmp_path)
    assert run.requests["clock_event_reasons"].tolist() == [pd.NA, 4]
    assert any("older format" in n for n in run.notes)


def test_readme_and_docs_carry_the_schema_tables():
    """The README's column tables are generated by schema.markdown_table: regenerate them when a
    column is added (``python -c "from llm_dvfs import schema; print(schema.markdown_table('requests'))"``)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for kind in schema.SCHEMAS:
        assert schema.markdown_table(kind) in readme, f"README.md: the {kind} table is out of date"
