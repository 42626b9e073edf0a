"""How reports are shown: the table's columns are the known report keys present, in their order."""

import math
import os
import re

import pytest

from calib_trl.evaluation.reports import format_table, json_safe, path_inside, safe_filename


def test_format_table_shows_the_known_keys_present_in_order():
    rows = {
        "a": {"ece": 0.25, "n": 40, "answer_mass": 0.5, "unknown_key": 1.0, "n_bins": 10},
        "b": {"accuracy": 0.75, "ece": None, "n": 8},
    }
    header, rule, row_a, row_b = format_table(rows, label="run").splitlines()
    assert header == "| run | n | accuracy | ece | answer_mass |"
    assert rule.count("---") == 5
    assert row_a == "| a | 40 |  | 0.2500 | 0.5000 |"
    assert row_b == "| b | 8 | 0.7500 |  |  |"


def test_json_safe_turns_non_finite_numbers_into_null():
    value = {"auroc": math.nan, "rows": [1.0, math.inf, -math.inf], "n": 3, "name": "x"}
    assert json_safe(value) == {"auroc": None, "rows": [1.0, None, None], "n": 3, "name": "x"}


def test_row_names_are_escaped_and_cells_must_be_numbers():
    table = format_table({"a|b\n<img src=x onerror=y>": {"n": 3, "ece": 0.1}})
    header, _, row = table.splitlines()
    assert "<img" not in row and "&lt;img" in row
    assert len(re.findall(r"(?<!\\)\|", row)) == len(re.findall(r"(?<!\\)\|", header))
    with pytest.raises(ValueError, match="`ece` must be a number, got 'high'"):
        format_table({"run": {"ece": "high"}})


@pytest.mark.parametrize(
    ("name", "expected"),
    [("x/../../../../tmp/PWNED", "x_.._.._.._.._tmp_PWNED"), ("..hidden", "hidden"), ("a b\\c", "a_b_c"), ("", "_")],
)
def test_safe_filename_keeps_names_to_one_path_component(name, expected, tmp_path):
    assert safe_filename(name) == expected
    assert os.path.dirname(path_inside(str(tmp_path), safe_filename(name))) == os.path.realpath(tmp_path)


def test_safe_filename_tells_colliding_names_apart_and_path_inside_refuses_escapes(tmp_path):
    used = set()
    assert [safe_filename(n, used) for n in ("a/b", "a:b", "a_b")] == ["a_b", "a_b_2", "a_b_3"]
    with pytest.raises(ValueError, match="outside"):
        path_inside(str(tmp_path), "../escape.png")
