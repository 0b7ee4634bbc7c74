"""The README's quickstart runs as written (in a fresh process, in an empty directory), and the
documentation holds together: the README stays a front door, and every relative link in it and
in docs/ reaches a file (and a heading, where it names one) that exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"

#: the README's hard length limit: details belong on the pages under docs/
MAX_README_LINES = 320

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[(?:[^\]\n]|\][^(\n])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def _quickstart() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _prose(text: str) -> str:
    """The text without fenced code blocks and code spans (links there are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _broken_links(page: Path) -> list[str]:
    broken = []
    for target in _LINK.findall(_prose(page.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):   # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    return broken


def test_quickstart_runs_as_written(tmp_path):
    code = _quickstart()
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "aoti_rt.memory device=" in r.stdout and "'hits'" in r.stdout
    assert (tmp_path / "lm.aoti" / "manifest.json").is_file()


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= MAX_README_LINES, (
        f"README.md has {n} lines (at most {MAX_README_LINES}): move details to a page under docs/ "
        "and link it")


def test_docs_has_pages():
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert len(pages) >= 3, f"docs/ has {pages}: the README links at least three pages there"


def test_relative_links_resolve():
    broken = {str(p.relative_to(ROOT)): b for p in _pages() if (b := _broken_links(p))}
    assert not broken, f"links to files or headings that do not exist: {broken}"


def test_link_checker_sees_broken_links(tmp_path):
    """The checker itself: a missing file, a missing heading and a link inside code are told apart."""
    (tmp_path / "other.md").write_text("# A page\n\n## Its section\n")
    page = tmp_path / "page.md"
    page.write_text("# Top\n\n[ok](other.md#its-section) [self](#top) [web](https://example.com)\n"
                    "[gone](missing.md) [bad anchor](other.md#no-such) `[code](missing2.md)`\n"
                    "```\n[fenced](missing3.md)\n```\n")
    assert _broken_links(page) == ["missing.md: no such file",
                                   "other.md#no-such: no heading with that anchor in other.md"]
