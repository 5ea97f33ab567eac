"""report.md and report.html from plain content (sections of text, tables and PNG figures), so the
benchmark, the demo and users build reports the same way.

The Markdown links figures relative to the report folder; the HTML embeds them (base64), so the one
file can be mailed or archived and still shows everything. Text is escaped in HTML, never interpreted.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crossdiff.atomic import write_text

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #222; line-height: 1.45; }
h1, h2 { font-weight: 600; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: 1rem 0; font-size: .9rem; }
caption { text-align: left; padding-bottom: .3rem; color: #555; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; }
th { background: #f3f3f3; text-align: left; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1rem 0; } img { max-width: 100%; } figcaption { color: #555; font-size: .9rem; }
"""


@dataclass(frozen=True)
class Table:
    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, caption: str = "") -> Table:
        """Rows of dicts; `columns` picks and orders the keys (default: the first record's)."""
        keys = list(columns) if columns is not None else list(records[0]) if records else []
        return cls(keys, [[record.get(key) for key in keys] for record in records], caption)


@dataclass(frozen=True)
class Section:
    title: str
    text: str = ""  # paragraphs separated by blank lines
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[Path, str]] = field(default_factory=list)  # (PNG file, caption)


def format_value(value: Any) -> str:
    """Numbers with four significant digits, missing values as 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_report(folder: Path, title: str, sections: Sequence[Section], intro: str = "") -> tuple[Path, Path]:
    """Write folder/report.md and folder/report.html; figures stay where they are (linked / embedded)."""
    folder = Path(folder)
    markdown, page = folder / "report.md", folder / "report.html"
    write_text(markdown, _markdown(folder, title, sections, intro))
    write_text(page, _html(title, sections, intro))
    return markdown, page


def _paragraphs(text: str) -> list[str]:
    return [part.strip() for part in text.strip().split("\n\n") if part.strip()]


def _markdown(folder: Path, title: str, sections: Sequence[Section], intro: str) -> str:
    lines = [f"# {title}", "", *(f"{p}\n" for p in _paragraphs(intro))]
    for section in sections:
        lines += [f"## {section.title}", "", *(f"{p}\n" for p in _paragraphs(section.text))]
        for table in section.tables:
            if table.caption:
                lines += [f"*{table.caption}*", ""]
            lines.append("| " + " | ".join(table.columns) + " |")
            lines.append("|" + "---|" * len(table.columns))
            lines += ["| " + " | ".join(format_value(v).replace("|", "\\|") for v in row) + " |" for row in table.rows]
            lines.append("")
        for figure, caption in section.figures:
            lines += [f"![{caption}]({Path(os.path.relpath(figure, folder)).as_posix()})", "", f"*{caption}*", ""]
    return "\n".join(lines).rstrip() + "\n"


def _html(title: str, sections: Sequence[Section], intro: str) -> str:
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>", *(f"<p>{html.escape(p)}</p>" for p in _paragraphs(intro)),
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{html.escape(p)}</p>" for p in _paragraphs(section.text)]
        parts += [_html_table(table) for table in section.tables]
        for figure, caption in section.figures:
            data = base64.b64encode(Path(figure).read_bytes()).decode("ascii")
            parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_table(table: Table) -> str:
    caption = f"<caption>{html.escape(table.caption)}</caption>" if table.caption else ""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    rows = []
    for row in table.rows:
        cells = "".join(
            f'<td class="number">{html.escape(format_value(v))}</td>' if isinstance(v, (int, float)) and not isinstance(v, bool)
            else f"<td>{html.escape(format_value(v))}</td>"
            for v in row
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table>{caption}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
