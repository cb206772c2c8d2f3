"""Every committed result says how it was made: the command line, and the commit of the code that
ran it (in its environment block, or in the environment of every report it embeds)."""

import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parent.parent / "results"
FILES = sorted(RESULTS.rglob("*.json"))


def _commits(node) -> list[str]:
    """Every environment.git.commit in a document, at any depth."""
    found = []
    if isinstance(node, dict):
        git = (node.get("environment") or {}).get("git") if isinstance(node.get("environment"), dict) else None
        if isinstance(git, dict) and git.get("commit"):
            found.append(git["commit"])
        for value in node.values():
            found += _commits(value)
    elif isinstance(node, list):
        for value in node:
            found += _commits(value)
    return found


def test_there_are_results():
    assert FILES


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(RESULTS)))
def test_each_result_names_its_command_and_commit(path):
    report = json.loads(path.read_text())
    assert isinstance(report.get("command"), str) and report["command"], f"{path.name}: no command"
    commits = _commits(report)
    assert commits and all(len(c) == 40 for c in commits), f"{path.name}: no commit recorded"
