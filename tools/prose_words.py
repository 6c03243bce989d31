"""Count the words of a write-up, all and prose only (reproducible before/after numbers).

    python tools/prose_words.py report/LAB4.md [more.md ...]

Prose is what :func:`lab_utils.report.writeup.prose_lines` keeps: every line
outside tables, headings, figures, code blocks and HTML (anchors); a bullet
counts, its words are sentences a reader reads.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lab_utils.report.writeup import prose_lines


def counts(text: str) -> dict:
    return {"bytes": len(text.encode()), "words": len(text.split()),
            "prose_words": sum(len(line.split()) for line in prose_lines(text))}


if __name__ == "__main__":
    for name in sys.argv[1:] or ["report/LAB4.md"]:
        c = counts(Path(name).read_text())
        print(f"{name}: {c['bytes']} bytes, {c['words']} words, {c['prose_words']} prose words")
