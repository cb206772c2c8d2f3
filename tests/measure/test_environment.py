"""What every report records of where it ran: the commit the code came from, read from the checkout
(environment.py lives two folders below it; after the move into subpackages it looked one too few
up, and every report said `git: null`)."""

import subprocess
from pathlib import Path

import pytest

from randbp_cli.measure.environment import environment

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="not a git checkout")
def test_the_report_names_the_commit_the_code_came_from():
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    git = environment()["git"]
    assert git is not None and git["commit"] == head and isinstance(git["dirty"], bool)
