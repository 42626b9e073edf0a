"""How reports are shown: the table's columns are the known report keys present, in their order."""

import math

from calib_trl.reports import format_table, json_safe


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
