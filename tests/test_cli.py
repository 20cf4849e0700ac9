"""The command line: every subcommand's --help renders and documents every option of its config (nested
configs flattened, each option once); usage errors are one line and exit status 2."""

from __future__ import annotations

import pytest

from earlyfusion.cli import COMMANDS, _load, _option_fields, build_parser, config_from_args, main


@pytest.mark.parametrize("words,cfg_ref", [(w, c) for w, _, c, _ in COMMANDS], ids=[" ".join(w) for w, *_ in COMMANDS])
def test_every_subcommand_help_documents_every_option(capsys, words, cfg_ref):
    with pytest.raises(SystemExit) as e:
        main([*words, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    options = out[out.index("options:"):]
    for _f, _tp, dest, flag, _docs in _option_fields(_load(cfg_ref)):
        assert f"  {flag}" in options, dest
        assert options.count(f"  {flag} ") + options.count(f"  {flag}\n") + options.count(f"  {flag},") == 1, flag


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for words, *_ in COMMANDS:
        assert words[0] in out


def test_nested_data_options_build_the_nested_config():
    from earlyfusion.training.data import DataConfig

    argv = ["train", "--data", "a", "b:0.5", "--reading-ratio", "0.5", "--no-reading-image-loss", "--image-tokenizer", "vq",
            "--vocab", "v", "--out", "o", "--context-len", "64"]
    ns = build_parser(argv).parse_args(argv)
    cfg = config_from_args(_load(ns._config), ns)
    assert cfg.data == DataConfig(sources=["a", "b:0.5"], reading_ratio=0.5)
    assert (cfg.context_len, cfg.dropout, cfg.micro_batch_size, cfg.out) == (64, None, None, "o")


@pytest.mark.parametrize("argv", [["train", "--bogus"], ["tokenizer", "train", "--data", "d", "--out", "o", "--steps", "x"],
                                  ["tokenizer", "eval", "--data", "d"], ["nope"]])
def test_usage_errors_are_one_line(capsys, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("earlyfusion: error: "), err


def test_help_takes_numbers_from_the_constants_it_describes(monkeypatch):
    """A help text names a constant ({NAME}) and shows its value: change the constant and the help follows."""
    import re

    from earlyfusion.cli import field_docs
    from earlyfusion.training import lm_config
    from earlyfusion.training.vq_train import RECIPE, VQTrainConfig

    docs = field_docs(lm_config.TrainConfig)
    assert f"Unset = {lm_config.SIZED_IMAGE_TOKEN_NOISE} when" in docs["image_token_noise"]
    assert f"more than {lm_config.MANY_PASSES} times" in docs["image_token_noise"]
    monkeypatch.setattr(lm_config, "MANY_PASSES", 7)
    assert "more than 7 times" in field_docs(lm_config.TrainConfig)["image_token_noise"]
    assert f"recipe, {RECIPE['steps']};" in field_docs(VQTrainConfig)["steps"]
    for cls in (lm_config.TrainConfig, VQTrainConfig):
        assert not [t for t in field_docs(cls).values() if re.search(r"\{[A-Z_]+", t)]
