"""Every trojan-guard / trojan-forensics command in the README, the reference and operations docs parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from guard.cli import build_parser as guard_parser
from offline.cli import build_parser as forensics_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "docs" / "operations.md", ROOT / "docs" / "reference.md", ROOT / "README.md"]
PARSERS = {"trojan-guard": guard_parser, "trojan-forensics": forensics_parser}


def _commands() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), flags=re.S):
            for line in block.splitlines():
                line = line.split("#")[0].strip()
                words = shlex.split(line)
                if words and Path(words[0]).name in PARSERS:
                    found.append((doc.name, line))
    return found


@pytest.mark.parametrize(("doc", "line"), [
    pytest.param(doc, line, marks=[pytest.mark.torch] if "trojan-forensics" in line.split()[0] else [])
    for doc, line in _commands()])  # trojan-forensics' parser offers the attacks' flags: it loads them (torch)
def test_documented_command_parses(doc: str, line: str) -> None:
    words = shlex.split(line)
    try:
        PARSERS[Path(words[0]).name]().parse_args(words[1:])
    except SystemExit as exc:
        pytest.fail(f"{doc}: '{line}' is not accepted (exit {exc.code})")


def test_the_docs_hold_commands_to_check() -> None:
    assert len(_commands()) >= 10


def test_every_relative_link_in_the_docs_resolves() -> None:
    """README, docs/ and docs/lab/ link to files that exist (the docs moved once; a stale link is a dead end)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert len(pages) >= 10
    assert broken == []
    index = (ROOT / "docs" / "index.md").read_text()
    assert all(p.name in index for p in pages if p.parent.name in ("docs", "lab") and p.name != "index.md")
