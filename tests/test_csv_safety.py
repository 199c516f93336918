"""`analytics.csv_safety`: OWASP's CSV-injection rule, on text cells only (the report CSVs and the
dashboard's statement download both go through it; see test_report_jobs and test_dashboard)."""

from __future__ import annotations

import doctest
from datetime import date
from decimal import Decimal

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analytics import csv_safety
from analytics.csv_safety import csv_safe, write_csv

FORMULAS = ["=cmd|' /C calc'!A0", "+1", "-x", "-1", "@SUM(1)", "\tx", "\rx"]
HARMLESS = ["acme", "a=b", "a-b", " =x", "'=x", "", "\nx", "1"]


def test_the_module_examples_hold():
    assert doctest.testmod(csv_safety).failed == 0


@pytest.mark.parametrize("value", FORMULAS)
def test_a_text_cell_starting_like_a_formula_gets_a_leading_quote(value):
    assert csv_safe(pl.DataFrame({"tenant": [value]}))["tenant"].to_list() == [f"'{value}"]


@pytest.mark.parametrize("value", HARMLESS)
def test_other_text_is_left_as_it_is(value):
    assert csv_safe(pl.DataFrame({"tenant": [value]}))["tenant"].to_list() == [value]


def test_nulls_stay_null_and_other_types_are_never_touched():
    frame = pl.DataFrame(
        {"tenant": ["-x", None], "amount": [Decimal("-1.50"), None], "count": [-3, None], "ratio": [-0.5, None],
         "day": [date(2025, 3, 1), None], "closed": [True, None]},
        schema_overrides={"amount": pl.Decimal(18, 2)})
    safe = csv_safe(frame)
    assert safe["tenant"].to_list() == ["'-x", None]
    assert_frame_equal(safe.drop("tenant"), frame.drop("tenant"), check_exact=True)
    assert write_csv(frame) == "tenant,amount,count,ratio,day,closed\n'-x,-1.50,-3,-0.5,2025-03-01,true\n,,,,,\n"


def test_categorical_and_enum_columns_are_text_too():
    values = ["=1+1", "acme"]
    frame = pl.DataFrame({"c": values, "e": values}).with_columns(pl.col("c").cast(pl.Categorical),
                                                                   pl.col("e").cast(pl.Enum(values)))
    assert csv_safe(frame).rows() == [("'=1+1", "'=1+1"), ("acme", "acme")]


def test_it_is_idempotent_and_leaves_the_input_alone():
    frame = pl.DataFrame({"tenant": FORMULAS + HARMLESS})
    once = csv_safe(frame)
    assert_frame_equal(csv_safe(once), once)
    assert frame["tenant"].to_list() == FORMULAS + HARMLESS


def test_write_csv_writes_to_a_file_or_returns_text(tmp_path):
    frame = pl.DataFrame({"tenant": ["@SUM(1)"]})
    assert write_csv(frame, tmp_path / "out.csv") is None
    assert (tmp_path / "out.csv").read_text() == write_csv(frame) == "tenant\n'@SUM(1)\n"
