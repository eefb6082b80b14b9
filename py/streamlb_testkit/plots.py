"""Charts for the HTML reports of the demo (tools/demo.py) and the bench (bench/report.py):
matplotlib figures rendered to inline SVG (text as paths, so a page needs no fonts and no
network), and HTML tables. Not imported by the kit's __init__ (matplotlib is slow to import):
`from streamlb_testkit import plots`."""

from __future__ import annotations

import html
import io
import re
from typing import Iterable, Sequence

from matplotlib.figure import Figure

# One colour per series (matplotlib's tab10, then tab10's light half of tab20).
COLORS = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
]


def color(index: int) -> str:
    return COLORS[index % len(COLORS)]


def figure(width_in: float = 8.0, height_in: float = 3.0) -> Figure:
    """A figure laid out by matplotlib (titles, labels and legends never overlap)."""
    return Figure(figsize=(width_in, height_in), layout="constrained")


def svg(fig: Figure) -> str:
    """The figure as an <svg> element to put inline in HTML."""
    out = io.StringIO()
    fig.savefig(out, format="svg", metadata={"Date": None})
    text = out.getvalue()
    return text[text.index("<svg"):]


def esc(value: object) -> str:
    return html.escape(str(value))


def html_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A plain HTML table; cells are escaped text."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def markdown_to_html(text: str) -> str:
    """Markdown tables (`| a | b |` lines with a `|---|` rule) as HTML tables, any other
    non-empty line as a paragraph; `code` spans become <code>."""

    def inline(cell: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(cell.strip()))

    def cells(line: str) -> list[str]:
        return line.strip().strip("|").split("|")

    parts: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|") and i + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip()):
            rows = [cells(line)]
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                i += 1
            head = "".join(f"<th>{inline(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            continue
        if line.strip():
            parts.append(f"<p>{inline(line)}</p>")
        i += 1
    return "\n".join(parts)


# Page style shared by the reports: tables that wrap instead of cutting columns off.
STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:1em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;font-size:13px;margin:8px 0}"
    "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}"
    "th{background:#f4f4f4}svg{display:block;margin:12px 0;max-width:100%;height:auto}"
    "code{background:#f4f4f4}"
)
