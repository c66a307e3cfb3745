"""One static HTML page holding Table 1 (with the paired tests and cost) and the figures.

Self-contained apart from the PNG files next to it: no scripts, no external styles, every text
HTML-escaped. Open ``index.html`` in a browser or attach the folder to a paper's supplement.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from db.reports import RECALL_KS
from orchestrator.report import Report, table_blocks

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.85rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9rem; color: #444; }
.notes { font-size: 0.85rem; color: #444; }
"""


def render_page(
    report: Report, figures: Sequence[tuple[Path, str]], run_ids: Sequence[int], title: str | None = None
) -> str:
    """The page as a string; figures are (file next to the page, caption)."""
    title = title or (
        f"cvgl-rerank report: runs {', '.join(map(str, run_ids))}" if run_ids else "cvgl-rerank report"
    )
    e = html.escape
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{e(title)}</h1>",
    ]
    best = _best_recalls(report)
    for caption, headers, body, numeric in table_blocks(report.rows):
        parts.append(f"<table><caption>{e(caption)}</caption><thead><tr>")
        parts += [f'<th class="{"num" if i in numeric else ""}">{e(h)}</th>' for i, h in enumerate(headers)]
        parts.append("</tr></thead><tbody>")
        is_table1 = caption.startswith("Table 1")
        for row, cells in zip(report.rows if is_table1 else [None] * len(body), body, strict=True):
            parts.append("<tr>")
            for i, cell in enumerate(cells):
                text = e(cell)
                k_index = i - headers.index(f"R@{RECALL_KS[0]}") if is_table1 else -1
                if is_table1 and row is not None and 0 <= k_index < len(RECALL_KS):
                    if row.get(f"recall@{RECALL_KS[k_index]}") == best.get(RECALL_KS[k_index]):
                        text = f"<strong>{text}</strong>"  # the paper sets the best result in bold
                parts.append(f'<td class="{"num" if i in numeric else ""}">{text}</td>')
            parts.append("</tr>")
        parts.append("</tbody></table>")
    if report.notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in report.notes) + "</ul>")
    for path, caption in figures:
        parts.append(
            f'<figure><img src="{e(path.name)}" alt="{e(caption)}">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _best_recalls(report: Report) -> dict[int, float]:
    best: dict[int, float] = {}
    for k in RECALL_KS:
        values = [r[f"recall@{k}"] for r in report.rows if r.get(f"recall@{k}") is not None]
        if values:
            best[k] = max(values)
    return best


def write_page(
    out: Path, report: Report, figures: Sequence[tuple[Path, str]], run_ids: Sequence[int]
) -> Path:
    path = out / "index.html"
    path.write_text(render_page(report, figures, run_ids), encoding="utf-8")
    return path
