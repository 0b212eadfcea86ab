"""Markdown tables: the one way the reports, comparisons, tuning and time-to-accuracy pages
lay out a table."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def table_row(cells: Iterable[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown_table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]], columns: int | None = None) -> list[str]:
    """The table's lines: a header row (None: a blank one of `columns` cells, for a table of
    label/value pairs), the `|---|` rule, one line per row (cells shown with str())."""
    width = len(header) if header is not None else columns
    if width is None:
        raise ValueError("a table without a header needs its number of columns")
    head = table_row(header) if header is not None else "|" + " |" * width
    return [head, "|" + "---|" * width, *(table_row(row) for row in rows)]
