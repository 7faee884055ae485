"""Packaging: the extras never pin torch/transformers for users (a user's `pip install moe_ext[torch]`
keeps their torch); CI's pins live in constraints.txt, and .ci/run runs the README's test command."""
import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

PER_TIER = False  # no kernels here
ROOT = Path(__file__).resolve().parent.parent
PINNED = ("torch", "transformers")


def _extras():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _name(requirement):
    return re.split(r"[\s<>=!~\[;]", requirement, maxsplit=1)[0].lower()


@pytest.mark.parametrize("extra", sorted(_extras()))
def test_extras_do_not_pin_torch_or_transformers(extra):
    for requirement in _extras()[extra]:
        if _name(requirement) in PINNED:
            assert "==" not in requirement and "<" not in requirement, (extra, requirement)


def test_constraints_pin_what_ci_tests():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert set(PINNED) <= set(pins)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```\n(python3 -m venv[^\n]*)\n```", readme)
    assert len(commands) == 2, commands
    assert all("-c constraints.txt" in c for c in commands)
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
