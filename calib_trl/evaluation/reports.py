"""How calibration reports are shown and written: the metrics a table, a log or a model card shows, in one order, the
markdown table and JSON they become, and the escaping of the names (datasets, splits, tasks) that come from input files
and reach a table, a model card or a file name."""

from __future__ import annotations

import html
import math
import os
import re

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
    "entropy": "Answer entropy",
    "lm_nll": "LM NLL",
    "temperature": "Temperature",
}
"""
The report keys that tables, logs and model cards show, in the order they show them, with their display names: those
of `calibration_report` and `confidence_report` (for generated answers `accuracy` is the match rate, and `brier` and
`nll` are those of the answer's confidence), those that scoring adds (`answer_mass`, the full-vocabulary probability of
the option letters; `entropy`, the mean next-token entropy at generated answers' positions; `lm_nll`, the
language-modelling check), the temperature of a temperature-scaled report, and the accuracy lm-eval itself logged
(`calib-trl report --lm-eval`). A key shows wherever a report holds it.
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
    lines = [f"| {escape_markdown(label)} | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, report in rows.items():
        cells = [_format_cell(report.get(key), key) for key in keys]
        if report.get("temperature_at_bound") and "temperature" in keys:  # not an ordinary number: say so
            cells[keys.index("temperature")] += " (search bound)"
        lines.append(f"| {escape_markdown(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_cell(value, key: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"`{key}` must be a number, got {value!r}.")
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


# Characters that start markdown syntax inside a line: emphasis, strike-through, links and images (a `(` after an
# escaped `]` starts no link), code spans, table cells
# (an underscore inside a word, as in `ls_epsilon`, starts nothing in GitHub's markdown and is left as it is)
_MARKDOWN_SPECIAL = re.compile(r"([\\`*\[\]!|~])")


def escape_markdown(text) -> str:
    """
    `text` as literal text in a markdown table cell or paragraph: one line (newlines become spaces), HTML special
    characters as entities (no tag, script or autolink survives), and markdown's own syntax characters backslash-escaped
    (no link, image, code span, emphasis or table cell boundary can start from it). Names of datasets, splits, tasks
    and filters come from users' files and reach the reports and model cards through it.
    """
    text = " ".join(str(text).splitlines())
    text = html.escape(text, quote=True)
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def safe_filename(name: str, used: set[str] | None = None) -> str:
    """
    A file-name component made from a name taken from an input file (a task, a filter, a dataset): letters, digits,
    `.`, `_` and `-` only, other characters as `_`, never starting with a dot, so it cannot name another directory. With
    `used`, a name already taken gets a numbered suffix, and the result is added to `used`.
    """
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).lstrip(".") or "_"
    slug = slug[:120]
    if used is not None:
        base, n = slug, 2
        while slug in used:
            slug, n = f"{base}_{n}", n + 1
        used.add(slug)
    return slug


def path_inside(directory: str, filename: str) -> str:
    """`directory/filename`, refused (`ValueError`) unless it resolves inside `directory`."""
    root = os.path.realpath(directory)
    path = os.path.realpath(os.path.join(root, filename))
    if os.path.commonpath([root, path]) != root or path == root:
        raise ValueError(f"{filename!r} would be written outside {directory}; refusing it.")
    return path


def json_safe(value):
    """`value` with NaN and infinities replaced by `None`, so that it is valid JSON (AUROC is NaN when undefined)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
