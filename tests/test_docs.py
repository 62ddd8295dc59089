"""The repository documents itself: citations point at docs/ pages and headings that exist here, never elsewhere.

A citation is written ``docs/<page>.md "<Heading>"`` in docstrings, comments and YAML (the quotes may be escaped
inside a Python string), or as a Markdown link ``docs/<page>.md#<anchor>``. Every page named must exist, and every
heading or anchor must be one of that page's headings.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SUFFIXES = (".py", ".md", ".yaml")
# Design notes that live outside this repository; built from parts so this file does not match itself.
OUTSIDE = re.compile(
    "|".join([*(re.escape(name + ".md") for name in ("METHOD", "ARCHITECTURE", "USERS")), re.escape("..") + "/shared"])
)
PAGE = re.compile(r"docs/([\w.-]+)\.md\b")
SECTION = re.compile(r'docs/([\w.-]+)\.md \\?"([^"\\\n]+)\\?"')
ANCHOR = re.compile(r"docs/([\w.-]+)\.md#([\w-]+)")
METHOD_SECTIONS = (
    "Token pipeline",
    "Policies",
    "Slot layout",
    "The Skip-FFN layer",
    "Masking ablation",
    "KV removal",
    "Costs",
    "Peers",
)


def repository_files() -> list[Path]:
    """The repository's own .py, .md and .yaml files: tracked or new, never ignored ones (runs, data, venvs)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the repository's own files cannot be told from generated ones")
    return [ROOT / name for name in listed if name.endswith(SUFFIXES) and (ROOT / name).is_file()]


@cache
def headings(page: str) -> tuple[str, ...]:
    """The Markdown headings of docs/<page>.md, without their leading #s."""
    text = (DOCS / f"{page}.md").read_text()
    return tuple(m.group(1) for m in re.finditer(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE))


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def broken_citations(text: str) -> list[str]:
    """Every citation in ``text`` whose page or heading does not exist, as written."""
    broken = [m.group(0) for m in PAGE.finditer(text) if not (DOCS / f"{m.group(1)}.md").is_file()]
    for m in SECTION.finditer(text):
        page, heading = m.groups()
        if (DOCS / f"{page}.md").is_file() and heading not in headings(page):
            broken.append(m.group(0))
    for m in ANCHOR.finditer(text):
        page, name = m.groups()
        if (DOCS / f"{page}.md").is_file() and name not in {anchor(h) for h in headings(page)}:
            broken.append(m.group(0))
    return broken


def test_nothing_cites_notes_outside_the_repository() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in repository_files()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if OUTSIDE.search(line)
    ]
    assert not hits, "cite docs/ pages of this repository instead:\n" + "\n".join(hits)


def test_every_docs_citation_names_an_existing_page_and_heading() -> None:
    hits = [
        f"{path.relative_to(ROOT)}:{number}: {citation}"
        for path in repository_files()
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        for citation in broken_citations(line)
    ]
    assert not hits, "no such docs/ page or heading:\n" + "\n".join(hits)


def test_method_page_has_the_sections_others_cite() -> None:
    assert set(METHOD_SECTIONS) <= set(headings("method"))


def test_the_checks_catch_what_they_are_for() -> None:
    """The patterns are real: each kind of bad citation is found, and good ones pass. (The bad ones are built from
    parts, so this file itself passes the scan.)"""
    docs = "docs/"
    assert broken_citations(f'{docs}method.md "Costs" and {docs}design.md "Registry"') == []
    assert broken_citations(rf'caption ({docs}method.md \"Costs\")') == []
    assert broken_citations(f"[KV removal]({docs}method.md#kv-removal)") == []
    assert broken_citations(f'{docs}method.md "Cost"') == [f'{docs}method.md "Cost"']
    assert broken_citations(f"({docs}method.md#costs-and-more)") == [f"{docs}method.md#costs-and-more"]
    assert broken_citations(f'{docs}nowhere.md "Costs"') == [f"{docs}nowhere.md"]
    assert OUTSIDE.search("see " + "METHOD" + ".md section 2") and OUTSIDE.search("../" + "shared/design")
