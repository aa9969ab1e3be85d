"""The reference pages stay true to the code: docs/config.md is what `python -m softar.docs` generates from the
config dataclasses, docs/cli.md names every command and flag the parser has, and the README keeps its two set-up
commands (the second one is what CI runs)."""

import argparse
from pathlib import Path

from softar.cli import build_parser
from softar.docs import CLI_PAGE, CONFIG_PAGE, cli_page, config_markdown

ROOT = Path(__file__).parent.parent


def test_the_config_reference_is_generated_from_the_dataclasses():
    assert (ROOT / CONFIG_PAGE).read_text(encoding="utf-8") == config_markdown(), \
        "docs/config.md is stale: run `python -m softar.docs` from the repository root"


def test_the_config_reference_describes_every_key():
    page = config_markdown()
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows)  # a meaning for every key
    assert "| `memory` | str (one of `'arithmetic'`, `'pause'`, `'write'`, `'rmt'`)" in page  # a registry's names


def test_the_cli_page_ends_with_every_flag_as_the_parser_has_it():
    page = (ROOT / CLI_PAGE).read_text(encoding="utf-8")
    assert page == cli_page(page), "docs/cli.md's flag tables are stale: run `python -m softar.docs`"
    subcommands = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    hand_written = page.split("## Every flag")[0]
    assert all(f"softar {name}" in hand_written for name in subcommands)  # and each has prose of its own


def test_the_readme_holds_the_two_setup_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    setup = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv && ")]
    assert len(setup) == 2 and setup[0].endswith("softar quickstart") and setup[1].endswith("python -m pytest")
    assert setup[1] in (ROOT / ".ci" / "run").read_text()
