"""The command line: every subcommand's --help renders and documents every option of its config."""

from __future__ import annotations

import dataclasses

import pytest

from earlyfusion.cli import COMMANDS, _load, main


@pytest.mark.parametrize("words,cfg_ref", [(w, c) for w, _, c, _ in COMMANDS], ids=[" ".join(w) for w, *_ in COMMANDS])
def test_every_subcommand_help_documents_every_option(capsys, words, cfg_ref):
    with pytest.raises(SystemExit) as e:
        main([*words, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(_load(cfg_ref)):
        if f.init:
            assert "--" + f.name.replace("_", "-") in out, f.name


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for words, *_ in COMMANDS:
        assert words[0] in out
