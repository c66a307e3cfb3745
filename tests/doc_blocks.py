"""The fenced blocks of README.md and docs/*.md, with the docs-test mark written just above each.

A mark is an HTML comment on the line right before the opening fence:
``<!-- docs-test: skip (reason) -->`` (not run: long-running services, installs) or
``<!-- docs-test: services -->`` (run against PostgreSQL, Redis and running workers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARK = re.compile(r"<!--\s*docs-test:\s*(?P<kind>\S+?)\s*(?:\((?P<reason>[^)]*)\))?\s*-->")
FENCE = re.compile(r"^```(?P<lang>[\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    mark: str | None  # "skip", "services" or None
    reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: unclosed code block")
        mark = MARK.search(lines[i - 1]) if i > 0 else None
        found.append(
            Block(
                path=path,
                line=i + 1,
                lang=opening["lang"],
                text="\n".join(lines[i + 1 : end]) + "\n",
                mark=mark["kind"] if mark else None,
                reason=mark["reason"] if mark else None,
            )
        )
        i = end + 1
    return found


def stray_marks(path: Path) -> list[str]:
    """Marks that do not sit right above a block's opening fence (they would mark nothing)."""
    lines = path.read_text().splitlines()
    return [
        f"{path.relative_to(REPO)}:{n + 1}"
        for n, line in enumerate(lines)
        if MARK.search(line) and (n + 1 >= len(lines) or not FENCE.match(lines[n + 1]))
    ]
