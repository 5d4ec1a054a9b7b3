"""What the CLI prints of stored text: no terminal escapes, no spreadsheet formulas, one-line
errors for impossible times."""

from __future__ import annotations

import pytest

from llmrouter.cli import CliError, csv_cell, parse_time, shown


def test_control_characters_are_shown_escaped() -> None:
    assert shown("ok\x1b[31mred\nnext\x00") == "ok\\x1b[31mred\\x0anext\\x00"
    assert shown("plain ünïcode ☃") == "plain ünïcode ☃"


@pytest.mark.parametrize("cell", ["=HYPERLINK(1)", "+1", "-1+1", "@SUM(A1)", "\tx"])
def test_formula_cells_are_quoted(cell: str) -> None:
    assert csv_cell(cell) == "'" + cell


def test_other_cells_are_kept() -> None:
    assert csv_cell("fake/ok") == "fake/ok" and csv_cell(-3) == -3


@pytest.mark.parametrize("text", ["99999999999d", "yesterday", "2026-13-01", "9" * 30 + "w"])
def test_impossible_times_are_one_line_errors(text: str) -> None:
    with pytest.raises(CliError, match="is not a date"):
        parse_time(text, future=True)


def test_durations_and_dates() -> None:
    assert parse_time("2027-01-01", future=True) == 1798761600
    assert parse_time("2027-01-01T01:00+01:00", future=False) == 1798761600
    assert abs(parse_time("1d", future=True) - parse_time("2d", future=False) - 3 * 86400) <= 1
