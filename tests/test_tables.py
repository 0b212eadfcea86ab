"""The one markdown-table helper every page uses (fedlora.tables)."""

import pytest

from fedlora.tables import markdown_table
from fedlora.tta import tta_markdown


def test_a_table_is_header_rule_and_rows():
    assert markdown_table(["a", "b"], [[1, None], ["x", ""]]) == ["| a | b |", "|---|---|", "| 1 | None |", "| x |  |"]
    assert markdown_table(None, [("rounds", 4)], columns=2) == ["| | |", "|---|---|", "| rounds | 4 |"]
    assert markdown_table(["only"], []) == ["| only |", "|---|"]
    with pytest.raises(ValueError):
        markdown_table(None, [])


def test_the_time_to_accuracy_table_has_a_speedup_column_only_with_a_reference():
    row = {"method": "fedit", "reached": True, "round": 2.0, "sim_seconds": 10.0, "wall_seconds": 30.0,
           "uplink_bytes": 2e6, "speedup": 1.5, "speedup_low": None, "paired_seeds": 1}
    without = tta_markdown([row], 0.5).splitlines()
    assert without[-1] == "| fedlora | True | 2.0 | 10.0 | 30 | 2.00 |".replace("fedlora", "fedit")
    assert without[-2] == "|---|---|---|---|---|---|"
    with_ref = tta_markdown([row], 0.5, reference="fedit").splitlines()
    assert with_ref[-1] == "| fedit | True | 2.0 | 10.0 | 30 | 2.00 | 1.50× (1) |"
