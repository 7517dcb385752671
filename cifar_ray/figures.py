"""The report's rendering helpers: matplotlib set up for files only, figures saved atomically, and
values from a results folder turned into inert Markdown. Used by report.py and report_sections.py."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from cifar_ray.files import atomic_write

MD_ESCAPES = {"\\": "\\\\", "&": "&amp;", "<": "&lt;", ">": "&gt;", "|": "\\|", "`": "\\`", "[": "\\[",
              "]": "\\]", "*": "\\*", "\r": " ", "\n": " "}


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    matplotlib.rcParams["text.parse_math"] = False  # labels carry the folder's values: `$` is just a dollar
    import matplotlib.pyplot as plt

    return plt


def md(value) -> str:
    """A value from the results folder as inert Markdown text: no table breaks, code spans, links,
    HTML or line breaks of its own."""
    return "".join(MD_ESCAPES.get(ch, ch) for ch in format_cell(value))


def save_figure(fig, path: Path) -> Path:
    """Into a new file renamed over `path`: a link planted there is replaced, never written through."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    pyplot().close(fig)
    return path


def format_cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(df: pd.DataFrame) -> str:
    head = "| " + " | ".join(md(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(md(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows])
