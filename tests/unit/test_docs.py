"""The docs hold together: relative links resolve inside the repository, the README stays short, no terminal
colour codes. Anchors (#...) are not checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 220
# Generated from the code by cluster/tools on another branch: they may be absent here, and links to them are allowed.
GENERATED_DOCS = {"docs/cli.md", "docs/configuration.md"}

# [text](target) and [text](target "title"); images too. Inline code spans are removed first.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
ANSI = re.compile("[\x1b\x9b]")  # ESC or CSI: the start of every terminal escape sequence
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # http:, https:, mailto:


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(path: Path) -> list[str]:
    text = CODE_SPAN.sub("", CODE_FENCE.sub("", path.read_text(encoding="utf-8")))
    return [target for target in LINK.findall(text) if not EXTERNAL.match(target) and not target.startswith("#")]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path):
    problems = []
    for target in relative_links(path):
        resolved = (path.parent / target.split("#", 1)[0]).resolve()
        try:
            in_repo = resolved.relative_to(ROOT).as_posix()
        except ValueError:
            problems.append(f"{target}: leaves the repository")
            continue
        if not resolved.exists() and in_repo not in GENERATED_DOCS:
            problems.append(f"{target}: {in_repo} does not exist")
    assert not problems, f"{path.relative_to(ROOT)}: " + "; ".join(problems)


def test_link_checker_sees_links():
    # Guards the regex: the README links into docs/, and one of those links must be found.
    assert "docs/architecture.md" in relative_links(ROOT / "README.md")


def test_readme_is_short():
    num_lines = len((ROOT / "README.md").read_text(encoding="utf-8").splitlines())
    assert num_lines <= README_MAX_LINES, f"README.md has {num_lines} lines; move detail into docs/"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_terminal_escape_codes(path):
    text = path.read_text(encoding="utf-8")
    match = ANSI.search(text)
    assert match is None, f"{path.relative_to(ROOT)}: terminal colour code near {text[match.start():][:40]!r}"
