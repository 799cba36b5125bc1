"""Every relative link in the README, docs/ and the examples' READMEs points at a file of the
repository, and every #anchor at a heading of that file (as GitHub makes anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("*.md")]
)
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    found = set()
    fenced = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("#") and not fenced:
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_point_at_files_and_headings_that_exist(page: Path) -> None:
    broken = []
    for match in _LINK.finditer(page.read_text()):
        link = match.group(1)
        if link.startswith(("http://", "https://", "mailto:")):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        if not path.exists() or ROOT.resolve() not in path.resolve().parents:
            broken.append(f"{link}: no such file in the repository")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{link}: no heading #{anchor}")
    assert not broken, broken


_TEST_FILE = re.compile(r"\b(test_\w+\.py)\b")
_TEST_NAME = re.compile(r"`(test_\w+)`")
_BENCHMARK = re.compile(r"\b(benchmarks/\w+\.py)\b")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_tests_and_benchmarks_a_page_names_exist(page: Path) -> None:
    """The guarantees table and the guides name the tests that back a claim: a renamed or
    removed test must not leave a claim pointing at nothing."""
    text = page.read_text()
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    missing = [f for f in _TEST_FILE.findall(text) if not (ROOT / "tests" / f).exists()]
    missing += [t for t in _TEST_NAME.findall(text) if not re.search(rf"def {t}\b", sources)]
    missing += [b for b in _BENCHMARK.findall(text) if not (ROOT / b).exists()]
    assert not missing, f"{page.name} names what does not exist: {missing}"
