"""popalign_core.cli: the one entry point (`COMMANDS`), its help, its errors, `popalign losses`, and that the module
docstring documents every command."""

from __future__ import annotations

import dataclasses
import importlib
import json

import pytest

from popalign_core import cli


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: popalign COMMAND [options]")
    for name, (_, summary) in cli.COMMANDS.items():
        assert f"  {name:8s} {summary}" in out, name


def test_no_command_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "popalign: error: a command is required (see popalign --help)" in err and "commands:" in err


def test_unknown_command_names_it_and_the_valid_ones(capsys):
    assert cli.main(["trian"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"popalign: error: unknown command 'trian'; valid commands: {', '.join(cli.COMMANDS)}"
    )


def test_the_docstring_documents_every_command():
    lines = [ln for ln in cli.__doc__.splitlines() if ln.startswith("popalign ")]
    documented = {ln.split()[1] for ln in lines}
    assert documented == set(cli.COMMANDS)


@pytest.mark.parametrize("name", [k for k, (mod, _) in cli.COMMANDS.items() if mod])
def test_every_command_module_has_a_main(name):
    assert callable(importlib.import_module(cli.COMMANDS[name][0]).main)


def test_losses_json_is_the_registry_with_its_defaults(capsys):
    from popalign_core.train.losses import LOSSES, loss_config

    assert cli.main(["losses", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert list(table) == list(LOSSES)
    for name, row in table.items():
        assert row["defaults"] == dataclasses.asdict(loss_config(name))
        assert row["pairwise"] == LOSSES[name].pairwise and row["summary"] == LOSSES[name].summary
        assert set(row["help"]) == set(row["defaults"])


def test_losses_table_prints_each_loss_and_its_parameters(capsys):
    from popalign_core.train.losses import LOSSES

    assert cli.main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in LOSSES:
        assert any(ln.startswith(f"{name:9s} ") for ln in out.splitlines()), name
    assert "    beta = " in out


def test_debug_flag_before_the_command_is_passed_on(capsys):
    # `popalign --debug CMD ...` is `popalign CMD ... --debug` (tracebacks instead of one-line errors)
    assert cli.main(["--debug", "losses", "--json"]) == 0
    assert "popalign" in json.loads(capsys.readouterr().out)
