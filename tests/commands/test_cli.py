"""The `kakeya` command: help for every subcommand, recipe listing, and errors as messages."""

from __future__ import annotations

import json

import pytest

from kakeyaturbo.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0 and "usage: kakeya " + command in capsys.readouterr().out


def test_no_command_prints_help(capsys):
    assert main([]) == 2 and "COMMAND" in capsys.readouterr().out


def test_recipes_list_and_show(capsys):
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert "kakeya-balanced" in listed and "turboquant-3" in listed and "v1.3-ppl" in listed
    assert main(["recipes", "kakeya-max"]) == 0
    assert json.loads(capsys.readouterr().out)["k"]["codec"] == "kakeya-v2"


def test_errors_are_reported_not_raised(capsys):
    assert main(["recipes", "no-such-recipe"]) == 1
    assert "ConfigError" in capsys.readouterr().err
