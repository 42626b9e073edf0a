"""Helpers shared by the benchmark scripts: the results folder and the README sections they fill in."""

from __future__ import annotations

import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def save_json(name: str, payload: dict, indent: int | None = 2) -> str:
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=indent)
    return path


def write_readme_section(section: str, device: str, text: str) -> None:
    """Replace the text between `<!-- {section}:{device}:start -->` and its end marker in benchmarks/README.md."""
    path = os.path.join(HERE, "README.md")
    start, end = f"<!-- {section}:{device}:start -->", f"<!-- {section}:{device}:end -->"
    content = open(path).read() if os.path.exists(path) else ""
    block = f"{start}\n{text.strip()}\n{end}"
    if start in content and end in content:
        content = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, content, flags=re.S)
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(content)
