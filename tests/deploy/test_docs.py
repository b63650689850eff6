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


@pytest.mark.parametrize(("doc", "line"), _commands())
def test_documented_command_parses(doc: str, line: str) -> None:
    words = shlex.split(line)
    try:
        PARSERS[Path(words[0]).name]().parse_args(words[1:])
    except SystemExit as exc:
        pytest.fail(f"{doc}: '{line}' is not accepted (exit {exc.code})")


def test_the_docs_hold_commands_to_check() -> None:
    assert len(_commands()) >= 10
