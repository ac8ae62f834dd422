"""The ``beit3cap`` dispatcher: every listed command exists and answers --help; unknown ones exit 2."""

from __future__ import annotations

import importlib

import pytest

from beit3cap.cli import COMMANDS, main


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_listed_command_has_a_module_that_answers_help(name, capsys):
    assert callable(importlib.import_module(f"beit3cap.commands.{name}").main)
    with pytest.raises(SystemExit) as done:
        main([name, "--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_top_level_help_lists_the_commands_and_unknown_commands_exit_2(capsys):
    assert main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in COMMANDS)
    assert main(["smoke"]) == 2
    assert "unknown command 'smoke'" in capsys.readouterr().err
