"""How calibration reports are shown and written: the metrics a table, a log or a model card shows, in one order, and
the markdown table and JSON they become."""

from __future__ import annotations

import math

REPORT_METRICS = {
    "n": "Rows",
    "accuracy": "Accuracy",
    "lm_eval": "lm-eval's accuracy",
    "mean_confidence": "Mean confidence",
    "ece": "ECE",
    "ece_equal_mass": "ECE (equal-mass bins)",
    "smooth_ece": "Smooth ECE",
    "cw_ece": "Class-wise ECE",
    "mce": "MCE",
    "brier": "Brier",
    "nll": "NLL",
    "auroc": "AUROC",
    "answer_mass": "Answer mass",
    "lm_nll": "LM NLL",
    "temperature": "Temperature",
}
"""
The report keys that tables, logs and model cards show, in the order they show them, with their display names: those
of `calibration_report`, and those that multiple-choice scoring adds (`answer_mass`, the full-vocabulary probability of
the option letters; `lm_nll`, the language-modelling check), the temperature of a temperature-scaled report, and the
accuracy lm-eval itself logged (`calib-trl report --lm-eval`). A key shows wherever a report holds it.
"""


def report_keys(reports) -> list[str]:
    """The keys of `REPORT_METRICS` that at least one of `reports` holds (not as `None`), in `REPORT_METRICS` order."""
    reports = list(reports)
    return [key for key in REPORT_METRICS if any(report.get(key) is not None for report in reports)]


def format_table(rows: dict[str, dict], label: str = "") -> str:
    """
    A markdown table of reports, one row per named report (`{row name: report}`), with a column for each key of
    `REPORT_METRICS` that any row holds: the `calib-trl` command, the examples and the model cards all use it.
    """
    keys = report_keys(rows.values())
    lines = [f"| {label} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, report in rows.items():
        cells = [_format_cell(report.get(key)) for key in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def json_safe(value):
    """`value` with NaN and infinities replaced by `None`, so that it is valid JSON (AUROC is NaN when undefined)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
