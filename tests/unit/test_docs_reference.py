"""docs/cli.md and docs/configuration.md are what the generator makes from the parser and the models now: a new
flag, field, default or description without `python -m cluster.tools.gen_docs` fails here."""

import sys

import pytest

from cluster.tools.gen_docs import DOCS, HELP_PYTHON, cli_reference, config_reference


def test_configuration_reference_is_current():
    assert (DOCS / "configuration.md").read_text() == config_reference(), \
        "docs/configuration.md is stale: run python -m cluster.tools.gen_docs"


def test_cli_reference_is_current(monkeypatch):
    if sys.version_info[:2] != HELP_PYTHON:
        pytest.skip(f"docs/cli.md holds Python {HELP_PYTHON}'s argparse layout")
    monkeypatch.setenv("COLUMNS", "37")  # the generator fixes the width: the terminal's must not matter
    assert (DOCS / "cli.md").read_text() == cli_reference(), "docs/cli.md is stale: run python -m cluster.tools.gen_docs"


def test_every_command_and_field_is_in_the_reference():
    from cluster.cli import build_parser
    from cluster.tools.gen_docs import MODELS, _commands

    cli, config = cli_reference(), config_reference()
    assert all(f"## `{title}`" in cli for title, _ in _commands(build_parser()))
    assert {"run", "bench", "eval", "calibrate", "serve", "generate", "config"} <= {
        title.split()[-1] for title, _ in _commands(build_parser())}
    assert all(f"| `{name}` |" in config for model in MODELS for name in model.model_fields)
