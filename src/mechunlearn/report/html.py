"""A static ``report.html`` beside a run's ``results.md``: the same tables, every figure
embedded, the config and the provenance, in one file a person can open and browse.

The Markdown stays the single source of the numbers; this module renders the subset of
Markdown the reports write (headings, paragraphs, pipe tables, bullet lists, fenced code,
``**bold**`` and ``code`` spans) and escapes everything else, so a label can never inject
markup. Figures are inlined as base64 PNGs and the style sheet is in the page: the file needs
no network and no other file.
"""

from __future__ import annotations

import base64
import html
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mechunlearn.io import atomic_write_text

_INLINE = re.compile(r"\*\*(.+?)\*\*|`([^`]+)`")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 78rem;
       padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.86rem; }
th, td { border: 1px solid #d0d0d7; padding: 0.25rem 0.5rem; text-align: left;
         vertical-align: top; }
th { background: #f1f1f5; } tr:nth-child(even) td { background: #fafafc; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #e3e3e8; }
figcaption { font-size: 0.85rem; color: #55555c; }
pre { background: #f6f6f8; padding: 0.75rem; overflow-x: auto; font-size: 0.8rem; }
nav a { margin-right: 1rem; }
.wide { overflow-x: auto; }
"""


def _inline(text: str) -> str:
    """Escape ``text`` and render ``**bold**`` and ```code``` spans."""
    out, last = [], 0
    for match in _INLINE.finditer(text):
        out.append(html.escape(text[last : match.start()]))
        bold, code = match.groups()
        out.append(
            f"<strong>{_inline(bold)}</strong>" if bold else f"<code>{html.escape(code)}</code>"
        )
        last = match.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _is_separator(line: str) -> bool:
    return bool(line.strip()) and all(re.fullmatch(r":?-{2,}:?", c) for c in _cells(line))


def _blocks(lines: list[str]) -> Iterator[str]:
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.startswith("```"):
            end = next(
                (j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines)
            )
            yield f"<pre><code>{html.escape(chr(10).join(lines[i + 1 : end]))}</code></pre>"
            i = end + 1
        elif m := re.match(r"(#{1,6}) (.*)", line):
            level = len(m.group(1))
            yield f"<h{level}>{_inline(m.group(2))}</h{level}>"
            i += 1
        elif line.lstrip().startswith("|") and i + 1 < len(lines) and _is_separator(lines[i + 1]):
            header = "".join(f"<th>{_inline(c)}</th>" for c in _cells(line))
            rows, i = [], i + 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                rows.append(
                    "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in _cells(lines[i])) + "</tr>"
                )
                i += 1
            body = "".join(rows)
            yield f'<div class="wide"><table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table></div>'
        elif re.match(r"\s*[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"\s*[-*] ", lines[i]):
                item = re.sub(r"^\s*[-*] ", "", lines[i])
                items.append(f"<li>{_inline(item)}</li>")
                i += 1
            yield f"<ul>{''.join(items)}</ul>"
        else:
            paragraph = []
            while (
                i < len(lines)
                and lines[i].strip()
                and not re.match(r"(#{1,6} |```|\s*[-*] |\s*\|)", lines[i])
            ):
                paragraph.append(lines[i].strip())
                i += 1
            if not paragraph:  # a stray table row without its separator: show it as text
                paragraph, i = [line.strip()], i + 1
            yield f"<p>{_inline(' '.join(paragraph))}</p>"


def markdown_to_html(text: str) -> str:
    """The HTML body of the Markdown subset the reports write (see the module docstring)."""
    return "\n".join(_blocks(text.splitlines()))


def _figures(folder: Path) -> list[str]:
    out = []
    for path in sorted((folder / "figures").glob("*.png")):
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        name = html.escape(path.name)
        out.append(
            f'<figure><img alt="{name}" src="data:image/png;base64,{data}">'
            f"<figcaption>{name}</figcaption></figure>"
        )
    return out


def _provenance(folder: Path) -> list[tuple[str, str]]:
    path = folder / "run.json"
    if not path.is_file():
        return []
    run: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    keys = ("name", "kind", "model", "seconds", "workers", "threads", "device", "mechunlearn",
            "torch", "python", "n_known")  # fmt: skip
    return [(k, str(run[k])) for k in keys if k in run]


def render_html(folder: str | Path, title: str | None = None) -> str:
    """The page of the run in ``folder``: results.md, figures, provenance and config."""
    folder = Path(folder)
    markdown = (folder / "results.md").read_text(encoding="utf-8")
    heading = re.search(r"^# (.+)$", markdown, re.MULTILINE)
    title = title or (heading.group(1).strip() if heading else folder.name)
    sections = [] if heading else [f"<h1>{html.escape(title)}</h1>"]
    sections.append(markdown_to_html(markdown))
    figures = _figures(folder)
    if figures:
        sections += ['<h2 id="figures">Figures</h2>', *figures]
    provenance = _provenance(folder)
    if provenance:
        rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in provenance
        )
        sections += ['<h2 id="provenance">Provenance</h2>', f"<table>{rows}</table>"]
    config = folder / "config.yaml"
    if config.is_file():
        text = html.escape(config.read_text(encoding="utf-8"))
        sections += ['<h2 id="config">Config</h2>', f"<pre><code>{text}</code></pre>"]
    nav = '<nav><a href="#figures">figures</a><a href="#provenance">provenance</a><a href="#config">config</a></nav>'
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{nav}\n" + "\n".join(sections) + "\n</body></html>\n"
    )


def write_html_report(folder: str | Path, title: str | None = None) -> Path:
    """Write ``report.html`` in ``folder`` (atomically) and return its path."""
    path = Path(folder) / "report.html"
    atomic_write_text(path, render_html(folder, title))
    return path
