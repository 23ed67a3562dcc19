"""Every `$ fedchain ...` command the README shows parses with today's command line, and the README's flow is the
one scripts/readme_flow.py runs (which regenerates its sample outputs), so neither can drift silently."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from fednode.ops.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
COMMANDS = [line[2:] for line in README.splitlines() if line.startswith("$ fedchain ")]


def argv(line: str) -> list[str]:
    """The arguments of a shown command line, without its comment, redirection and trailing `&`."""
    words = shlex.split(line, comments=True)
    words = words[:words.index(">")] if ">" in words else words
    return [w for w in words if w != "&"][1:]


def test_the_readme_shows_the_newcomer_flow():
    shown = {" ".join(argv(c)[:2]) for c in COMMANDS}
    for step in ("init fed", "stack up", "wallet new", "wallet fund", "chain deploy", "node join", "admin approve",
                 "aggregator run", "node run", "status --config", "audit --rpc", "adapter export", "generate --adapter"):
        assert step in shown, step
    flow = (ROOT / "scripts" / "readme_flow.py").read_text()
    for step in ("init", "wallet", "deploy", "join", "approve", "aggregator", "status", "audit", "export", "generate"):
        assert re.search(rf'"{step}"', flow), step


@pytest.mark.parametrize("line", COMMANDS)
def test_every_shown_command_parses(line):
    build_parser().parse_args(argv(line))
