"""The report as one self-contained HTML page.

One file that can be mailed, attached to a ticket or opened from a cluster's scratch disk: the
figures are embedded as base64 ``data:`` URIs, the style sheet is inline, and nothing is fetched
from anywhere (no fonts, scripts or CDNs), so it renders offline and never goes stale against
files beside it.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from aimspax_like.analysis.figures import FigureFile
from aimspax_like.analysis.tables import Table

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0; color: #1d2330;
       background: #f6f7f9; line-height: 1.45; }
header { background: #1f3a5f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 22px; }
header p { margin: 0; opacity: 0.85; font-size: 14px; }
nav { padding: 10px 32px; background: #e8ecf2; font-size: 14px; }
nav a { margin-right: 16px; color: #1f3a5f; text-decoration: none; }
main { padding: 8px 32px 40px 32px; max-width: 1240px; }
section { background: #fff; border: 1px solid #dde2ea; border-radius: 6px; padding: 14px 20px; margin: 18px 0; }
h2 { font-size: 18px; margin: 4px 0 10px 0; color: #1f3a5f; }
h3 { font-size: 15px; margin: 14px 0 6px 0; }
pre { background: #f3f5f8; padding: 10px 12px; white-space: pre-wrap; font-size: 12.5px; border-radius: 4px; }
table { border-collapse: collapse; font-size: 13.5px; margin: 6px 0; }
th, td { border-bottom: 1px solid #e3e7ee; padding: 4px 12px; text-align: right; }
th { background: #eef2f7; }
td:first-child, th:first-child { text-align: left; }
table.kv td { text-align: left; }
p.note { font-size: 13px; color: #505a6b; margin: 4px 0 8px 0; }
figure { margin: 10px 0 22px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ee; }
figcaption { font-size: 13.5px; color: #333c4d; max-width: 1100px; }
.badge { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 13px; background: #ffffff33; }
"""


def data_uri(path: Path) -> str | None:
    """The PNG at ``path`` as a ``data:image/png;base64`` URI; None if unreadable or not a PNG."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if not data.startswith(PNG_MAGIC):
        return None
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def table_html(table: Table) -> str:
    esc = html.escape
    head = "" if not any(table.header) else "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in table.header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    parts = [f"<h3>{esc(table.title)}</h3>"]
    if table.rows:
        kind = "" if head else ' class="kv"'
        parts.append(f"<table{kind}>{head}{body}</table>")
    if table.note:
        parts.append(f'<p class="note">{esc(table.note)}</p>')
    return "\n".join(parts)


def figure_html(number: int | str, figure: FigureFile) -> str:
    uri = data_uri(figure.file)
    title = html.escape(figure.title)
    if uri is None:
        return f'<p class="note">Figure {number} ({title}) could not be read from {html.escape(str(figure.file))}.</p>'
    return (f'<figure><img src="{uri}" alt="{title}">'
            f"<figcaption><b>Figure {number}. {title}.</b> {html.escape(figure.caption)}</figcaption></figure>")


def page(title: str, subtitle: str, sections: list[tuple[str, str, str]]) -> str:
    """The whole page: ``sections`` are (anchor, heading, inner HTML), in order."""
    nav = "".join(f'<a href="#{anchor}">{html.escape(heading)}</a>' for anchor, heading, _ in sections)
    body = "\n".join(f'<section id="{anchor}"><h2>{html.escape(heading)}</h2>\n{inner}\n</section>'
                     for anchor, heading, inner in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1><p>{subtitle}</p></header>\n<nav>{nav}</nav>\n"
        f"<main>\n{body}\n</main>\n</body></html>\n"
    )
