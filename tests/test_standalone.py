"""The repository reads on its own: no comment points at documents outside it, and every
`docs/<file>.md#<section>` a comment points at exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).parents[1]
SCANNED = ["pirl", "pipeline", "tests", "manifests", "images", "docs", "README.md", "Makefile"]
OUTSIDE = re.compile(r"\.\./shared|shared/(spec|seed|reference|peers)/|spec §|[a-z]+\.md §")
# Files allowed to point outside (none since the VISSL peer comparison moved to tests/bench).
PENDING: set[str] = set()


def text_files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = REPO / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        files += [
            p
            for p in candidates
            if p.is_file()
            and p.suffix in {".py", ".md", ".yaml", ".yml", ".sh", ".txt", ""}
            and "schemas" not in p.relative_to(REPO).parts  # vendored third-party files
            and "__pycache__" not in p.parts
        ]
    return files


def test_no_comment_points_outside_the_repository():
    found = []
    for path in text_files():
        rel = str(path.relative_to(REPO))
        if rel in PENDING or rel == "tests/test_standalone.py":
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


def test_every_docs_section_pointed_at_exists():
    refs = set()
    for path in text_files():
        text = path.read_text(errors="replace")
        for doc, first, more in re.findall(r"docs/([\w-]+\.md)#([\w-]+)((?: and #[\w-]+)*)", text):
            for section in [first, *re.findall(r"#([\w-]+)", more)]:
                refs.add((doc, section))
    assert refs  # the notes are in use
    missing = []
    for doc, section in sorted(refs):
        headings = re.findall(r"^#+ (.+)$", (REPO / "docs" / doc).read_text(), re.M)
        if section not in {anchor(h) for h in headings}:
            missing.append(f"docs/{doc}#{section}")
    assert not missing, missing
