"""One static HTML page holding the report's tables (``render.table_blocks``) and the figures.

Self-contained apart from the PNG files next to it: no scripts, no external styles, every text
HTML-escaped. Readable at any width: each table sits in its own box that scrolls sideways when
the table is wider than the page, and long cells (run settings) wrap, so the page itself never
scrolls sideways. Open ``index.html`` in a browser or attach the folder to a paper's supplement.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from orchestrator.reporting.render import Block, header_lines, table_blocks
from orchestrator.reporting.rows import Report

LONG_CELL = 40  # characters: longer cells wrap instead of widening their column

STYLE = """
*, *::before, *::after { box-sizing: border-box; }
body { font-family: system-ui, sans-serif; margin: 0 auto; padding: 1.25rem 1.5rem; max-width: 1280px;
       color: #222; line-height: 1.4; overflow-wrap: anywhere; }
h1 { font-size: 1.5rem; margin: 0 0 1rem; }
.notes { font-size: 0.85rem; color: #444; padding-left: 1.2rem; }
figure { margin: 1.25rem 0 1.75rem; }
figcaption { font-size: 0.9rem; color: #444; margin-bottom: 0.35rem; }
figure.table figcaption { font-weight: 600; color: #222; }
.scroll { overflow-x: auto; width: fit-content; max-width: 100%; border: 1px solid #e4e4e4; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top;
         white-space: nowrap; overflow-wrap: normal; }
th { background: #f6f6f6; }
td.long { white-space: normal; overflow-wrap: anywhere; min-width: 18rem; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
figure.plot img { display: block; max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def render_page(report: Report, figures: Sequence[tuple[Path, str]], title: str | None = None) -> str:
    """The page as a string; figures are (file next to the page, caption)."""
    run_ids = [r.run_id for r in report.runs]
    if title is None:
        runs = f"run{'s' if len(run_ids) > 1 else ''} {', '.join(map(str, run_ids))}"
        title = f"cvgl-rerank report: {runs}" if run_ids else "cvgl-rerank report"
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    notes = header_lines(report)
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    blocks = table_blocks(report) if report.runs or report.baselines or report.retrieval else []
    if not blocks:
        parts.append("<p>No runs or candidate sets stored yet.</p>")
    parts += [_table(block) for block in blocks]
    for path, caption in figures:
        parts.append(
            f'<figure class="plot"><figcaption>{e(caption)}</figcaption>'
            f'<a href="{e(path.name)}"><img src="{e(path.name)}" alt="{e(caption)}"></a></figure>'
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _table(block: Block) -> str:
    e = html.escape

    def cls(i: int, text: str = "") -> str:
        names = (["num"] if i in block.numeric else []) + (["long"] if len(text) > LONG_CELL else [])
        return f' class="{" ".join(names)}"' if names else ""

    head = "".join(f"<th{cls(i)}>{e(h)}</th>" for i, h in enumerate(block.headers))
    body = []
    for r, cells in enumerate(block.body):
        tds = []
        for c, cell in enumerate(cells):
            text = e(cell)
            if (r, c) in block.bold:
                text = f"<strong>{text}</strong>"  # the paper sets the best result in bold
            tds.append(f"<td{cls(c, cell)}>{text}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    # The caption outside the scrolling box: it wraps at the page's width, not the table's.
    return (
        f'<figure class="table"><figcaption>{e(block.caption)}</figcaption><div class="scroll">'
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div></figure>"
    )


def write_page(out: Path, report: Report, figures: Sequence[tuple[Path, str]]) -> Path:
    path = out / "index.html"
    path.write_text(render_page(report, figures), encoding="utf-8")
    return path
