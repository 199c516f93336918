"""CSV exports safe to open in a spreadsheet: OWASP's rule against formula (CSV) injection.

A text cell that starts with `=`, `+`, `-`, `@`, tab or carriage return is read as a formula by
Excel, LibreOffice and Sheets, so a tenant named `=cmd|' /C calc'!A0` (from a JWT claim or
tenants.csv) would run when a manager opens the report. Every CSV Tollway writes therefore goes
through `csv_safe`, which prefixes such cells with a single quote. Only text columns are touched:
numbers, decimals (a negative amount stays `-1.50`), dates and booleans are written as they are,
and nulls stay null. The Parquet twins keep the exact values; this is for CSV only.

>>> csv_safe(pl.DataFrame({"tenant": ["=1+1", "acme", None], "n": [-1, 2, 3]})).rows()
[("'=1+1", -1), ('acme', 2), (None, 3)]
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

import polars as pl

#: A cell starting with one of these is read as a formula (OWASP "CSV Injection").
FORMULA_START = r"^[=+\-@\t\r]"


def neutralise(column: pl.Expr) -> pl.Expr:
    """`column` (text) with a `'` before every value that starts like a formula; nulls stay null."""
    return pl.when(column.str.contains(FORMULA_START)).then(pl.lit("'") + column).otherwise(column)


def csv_safe(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` with its text columns (String, Categorical, Enum) neutralised for CSV; other columns untouched."""
    text = [name for name, dtype in frame.schema.items()
            if dtype == pl.String or isinstance(dtype, (pl.Categorical, pl.Enum))]
    if not text:
        return frame
    return frame.with_columns(neutralise(pl.col(name).cast(pl.String)).alias(name) for name in text)


def write_csv(frame: pl.DataFrame, file: str | Path | IO[bytes] | None = None) -> str | None:
    """`frame` as CSV through `csv_safe`: into `file`, or returned as text when `file` is None."""
    return csv_safe(frame).write_csv(file)
