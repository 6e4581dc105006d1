"""The documentation: the generated configuration reference, the README's size and commands, the site build."""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from faceclf.cli import build_parser
from faceclf.config import option_flag
from faceclf.devtools import configdoc
from flows.params import SCORE_GROUPS, TRAIN_GROUPS

REPO = Path(__file__).resolve().parents[1]
# The README's two commands: CI runs them (.ci/run), so they stay exactly as they are.
DEMO_COMMAND = "python3 -m pip install -e . && faceclf demo"
TEST_COMMAND = "python3 -m pip install -e '.[dev,ray]' && python3 -m pytest"


def section_text(page: str, name: str) -> str:
    """The part of the rendered page under the heading '## name', up to the next such heading."""
    match = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", page, re.S | re.M)
    assert match, f"no section {name!r} in the configuration reference"
    return match.group(1)


def test_the_reference_names_every_field_of_every_section_with_its_default_and_help() -> None:
    page = configdoc.render()
    sections = configdoc.sections()
    assert set(TRAIN_GROUPS) | set(SCORE_GROUPS) <= set(sections)  # every flow parameter group is described
    for name, (cls, where) in sections.items():
        text = section_text(page, name)
        assert " ".join(where.split()) in " ".join(text.split()) and cls.__name__ in text
        for f in dataclasses.fields(cls):
            row = next((line for line in text.splitlines() if line.startswith(f"| `{f.name}` |")), None)
            assert row is not None, f"{name}.{f.name} is missing from the configuration reference"
            assert f"`{configdoc.format_default(configdoc.default_of(f))}`" in row, row
            if f.metadata.get("help"):
                assert " ".join(f.metadata["help"].split()).replace("|", "\\|") in row, row


def test_every_flag_in_the_reference_is_an_option_of_faceclf() -> None:
    """The flag column follows faceclf.cli's rule: every flag it names exists on some subcommand."""
    parser = build_parser()
    known: set[str] = set()
    stack = [parser]
    while stack:
        p = stack.pop()
        known.update(s for action in p._actions for s in action.option_strings)
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    flags = {option_flag(f) for cls, _ in configdoc.sections().values() for f in dataclasses.fields(cls)}
    flags.discard(None)
    assert flags and flags <= known, sorted(flags - known)
    assert "--no-amp" in flags and "--nproc-per-node" in flags


def test_the_readme_is_short_and_keeps_the_two_commands() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 250
    lines = [line.strip() for line in readme.splitlines()]
    assert DEMO_COMMAND in lines and TEST_COMMAND in lines


def test_no_hand_written_configuration_page() -> None:
    """The reference exists only in the built site: a copy in docs/pages would drift from faceclf/config.py."""
    assert not (REPO / "docs" / "pages" / "reference" / "configuration.md").exists()


def test_the_site_builds_strictly_with_the_generated_reference(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", "docs/mkdocs.yml", "-d",
                           str(site)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    reference = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "min_accuracy" in reference and "warm_max_new_share" in reference and "--nproc-per-node" in reference
    for page in ("guide", "runbook", "architecture", "performance", "quality"):
        assert (site / page / "index.html").is_file()
