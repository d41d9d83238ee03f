"""A report as data (sections of paragraphs, tables, figures and notes) and its two renderings.

The sections are built once (:mod:`cxrfactory.report.sections`) and rendered twice:

- :func:`render_html`: one self-contained page, every figure inline as a ``data:image/png``
  URI and the CSS in a ``<style>`` element, so the file can be mailed or opened offline;
- :func:`render_markdown`: GitHub-flavoured Markdown whose figures are files next to it
  (``figures/<name>.png``).

Text in paragraphs, notes and table cells may use two inline marks, ``**bold**`` and
```code```: Markdown keeps them, HTML turns them into ``<strong>`` and ``<code>``; everything
else is escaped.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Union

FIGURE_DIR = "figures"


@dataclass(frozen=True)
class Paragraph:
    """Explanatory prose."""

    text: str


@dataclass(frozen=True)
class Note:
    """Something the reader must notice: a missing input, a warning."""

    text: str


@dataclass(frozen=True)
class Bullets:
    """A short list (warnings, headline numbers)."""

    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    """A table with a caption above it: ``left`` text columns, then numbers."""

    caption: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    left: int = 1  # leading columns of text (left-aligned); the rest are numbers (right-aligned)

    def __post_init__(self) -> None:
        bad = [row for row in self.rows if len(row) != len(self.header)]
        if bad:
            raise ValueError(f"table {self.caption!r}: a row has {len(bad[0])} cells, "
                             f"the header {len(self.header)}")


@dataclass(frozen=True)
class Figure:
    """A PNG figure with a caption below it; ``name`` is its file name in ``figures/``."""

    name: str
    png: bytes
    caption: str

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.png", self.name):
            raise ValueError(f"figure file name {self.name!r} must be a plain *.png name")
        if not self.png.startswith(b"\x89PNG"):
            raise ValueError(f"figure {self.name!r} is not PNG data")


Block = Union[Paragraph, Note, Bullets, Table, Figure]


@dataclass(frozen=True)
class Section:
    """A titled part of the report, e.g. ``Table 1 FDD``."""

    title: str
    blocks: tuple[Block, ...]

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-")


@dataclass(frozen=True)
class Document:
    """The whole report: a title, a line under it, and the sections in reading order."""

    title: str
    subtitle: str
    sections: tuple[Section, ...]
    missing: tuple[str, ...] = field(default=())  # inputs not given or not found, one line each

    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: Georgia, 'Times New Roman', serif; color: #222; margin: 0 auto;
       max-width: 1180px; padding: 1.5em 2em 4em; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
.subtitle { color: #666; margin-top: 0; font-size: 0.95em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #ccc; padding-bottom: 0.15em; margin-top: 2em; }
nav { font-size: 0.9em; } nav a { margin-right: 1.1em; color: #245; }
p { max-width: 60em; }
.note { background: #fff7dc; border-left: 4px solid #e0b000; padding: 0.45em 0.8em;
        max-width: 60em; }
table { border-collapse: collapse; margin: 0.4em 0 1.4em; font-size: 0.88em;
        font-family: 'Helvetica Neue', Arial, sans-serif; }
caption { caption-side: top; text-align: left; font-weight: bold; padding-bottom: 0.35em;
          font-family: Georgia, serif; font-size: 1.05em; }
thead tr { border-top: 2px solid #222; border-bottom: 1px solid #222; }
tbody tr:last-child { border-bottom: 2px solid #222; }
th, td { padding: 0.22em 0.7em; text-align: right; white-space: nowrap; }
th.text, td.text { text-align: left; }
tbody tr:nth-child(even) { background: #f6f6f6; }
figure { margin: 0.5em 0 1.6em; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.92em; color: #333; max-width: 60em; margin-top: 0.3em; }
code { font-size: 0.9em; background: #f2f2f2; padding: 0 0.2em; }
"""


def _inline_html(text: str) -> str:
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)


def _block_html(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_inline_html(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">{_inline_html(block.text)}</p>'
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Table):
        def cell(tag: str, k: int, text: str) -> str:
            style = ' class="text"' if k < block.left else ""
            return f"<{tag}{style}>{_inline_html(text)}</{tag}>"

        head = "".join(cell("th", k, h) for k, h in enumerate(block.header))
        body = "".join("<tr>" + "".join(cell("td", k, c) for k, c in enumerate(row)) + "</tr>"
                       for row in block.rows)
        return (f"<table><caption>{_inline_html(block.caption)}</caption>"
                f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        alt = html.escape(block.caption.replace("**", "").replace("`", ""), quote=True)
        return (f'<figure><img src="data:image/png;base64,{data}" alt="{alt}">'
                f"<figcaption>{_inline_html(block.caption)}</figcaption></figure>")
    raise TypeError(f"unknown block {type(block).__name__}")


def render_html(doc: Document) -> str:
    """One self-contained HTML page: inline CSS, figures as base64 data URIs, no external links."""
    nav = " ".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in doc.sections)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{html.escape(doc.title)}</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(doc.title)}</h1>",
             f'<p class="subtitle">{_inline_html(doc.subtitle)}</p>', f"<nav>{nav}</nav>"]
    for section in doc.sections:
        parts.append(f'<h2 id="{section.anchor}">{html.escape(section.title)}</h2>')
        parts.extend(_block_html(block) for block in section.blocks)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Markdown


def _cell_md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or " "


def _block_md(block: Block, figure_dir: str) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, Note):
        return f"> **Note.** {block.text}"
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        lines = [f"**{block.caption}**", "",
                 "| " + " | ".join(_cell_md(h) for h in block.header) + " |",
                 "|" + "".join("---|" if k < block.left else "---:|" for k in range(len(block.header)))]
        lines += ["| " + " | ".join(_cell_md(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Figure):
        alt = block.caption.replace("**", "").replace("`", "").replace("[", "(").replace("]", ")")
        return f"![{alt}]({figure_dir}/{block.name})\n\n*{block.caption}*"
    raise TypeError(f"unknown block {type(block).__name__}")


def render_markdown(doc: Document, figure_dir: str = FIGURE_DIR) -> str:
    """GitHub-flavoured Markdown; figures are referenced as ``<figure_dir>/<name>``."""
    parts = [f"# {doc.title}", "", doc.subtitle, ""]
    for section in doc.sections:
        parts += [f"## {section.title}", ""]
        for block in section.blocks:
            parts += [_block_md(block, figure_dir), ""]
    return "\n".join(parts).rstrip() + "\n"
