"""A report as a list of blocks, written as markdown (report.md) and as one self-contained HTML page
(report.html: styles in the page, the figure embedded as a data URI, no links to other files), so that it
survives being emailed. Numeric cells are right-aligned in tabular digits; long cells wrap inside the page."""
from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field

from flare_exp.reports.tables import md_table, numeric, numeric_columns

STYLE = ("body{font-family:Helvetica,Arial,sans-serif;font-size:15px;line-height:1.4;color:#222;max-width:64em;"
         "margin:1.5em auto;padding:0 1em}h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.25em;"
         "margin-top:1.8em;border-bottom:1px solid #ddd}.meta{color:#555;margin-top:0}table{border-collapse:"
         "collapse;margin:.6em 0 1em;max-width:100%;font-size:.92em}td,th{border:1px solid #ccc;padding:3px 6px;"
         "text-align:left;vertical-align:top;overflow-wrap:break-word}th{background:#f3f3f3}th.num{text-align:right}"
         "td.num{text-align:right;font-variant-numeric:tabular-nums;font-family:Menlo,Consolas,"
         "monospace}"
         "td.sub{padding-left:2em;color:#444}img{max-width:100%;height:auto}ul.caveats li{margin:.3em 0}.notes{color:#444;font-size:.92em}"
         "code{font-size:.95em}")


@dataclass
class Block:
    kind: str  # "h2", "p", "list", "notes", "table", "figure", "files"
    text: str = ""
    items: list = field(default_factory=list)
    header: list = field(default_factory=list)
    png: bytes = b""


def breakable(text: str) -> str:
    """Escaped text that may wrap after "_" and "/" (metric names, paths) rather than inside a word."""
    return re.sub(r"([_/])", r"\1<wbr>", html.escape(text))


def html_table(header: list[str], rows: list[list[str]]) -> str:
    right = numeric_columns(header, rows)

    def cell(tag, text, k):
        align = " class='num'" if right[k] or (tag == "td" and k > 0 and numeric(text)) else ""
        align = " class='sub'" if k == 0 and tag == "td" and text.startswith("  ") else align  # a row under one
        return f"<{tag}{align}>{breakable(text)}</{tag}>"

    return ("<table><tr>" + "".join(cell("th", h, k) for k, h in enumerate(header)) + "</tr>" +
            "".join("<tr>" + "".join(cell("td", c, k) for k, c in enumerate(r)) + "</tr>" for r in rows) +
            "</table>")


def to_html(title: str, meta: str, blocks: list[Block]) -> str:
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1><p class='meta'>{html.escape(meta)}</p>"]
    for b in blocks:
        if b.kind == "h2":
            parts.append(f"<h2>{html.escape(b.text)}</h2>")
        elif b.kind == "p":
            parts.append(f"<p>{html.escape(b.text)}</p>")
        elif b.kind in ("list", "notes"):
            kind = "caveats" if b.kind == "list" else "notes"
            parts.append(f"<ul class='{kind}'>" + "".join(f"<li>{html.escape(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            parts.append(html_table(b.header, b.items))
        elif b.kind == "figure":
            data = base64.b64encode(b.png).decode("ascii")
            parts.append(f"<p><img src='data:image/png;base64,{data}' alt='{html.escape(b.text)}'></p>")
        elif b.kind == "files":
            parts.append("<p class='notes'>" + html.escape(b.text) + "</p><ul class='notes'>" +
                         "".join(f"<li><code>{html.escape(i)}</code></li>" for i in b.items) + "</ul>")
    return "".join(parts) + "</body></html>\n"


def to_markdown(title: str, meta: str, blocks: list[Block], figure_file: str) -> str:
    lines = [f"# {title}", "", meta, ""]
    for b in blocks:
        if b.kind == "h2":
            lines += [f"## {b.text}", ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind in ("list", "notes"):
            lines += [*(f"- {i}" for i in b.items), ""]
        elif b.kind == "table":
            lines += md_table(b.header, b.items)
        elif b.kind == "figure":
            lines += [f"![{b.text}]({figure_file})", ""]
        elif b.kind == "files":
            lines += [b.text, "", *(f"- [{i}]({i})" for i in b.items), ""]
    return "\n".join(lines)
