"""``llavakit serve`` flags → `ServeConfig`: model names, loopback by default, bad values refused with the fix."""

from __future__ import annotations

import pytest

from llavakit.cli.main import build_parser, main
from llavakit.cli.serve import config_from_args
from llavakit.errors import ConfigError
from llavakit.serving.config import ModelSpec, ServeConfig


def parse(*argv: str):
    argv = ["serve", *argv]
    return config_from_args(build_parser(argv).parse_args(argv))


def test_flags_become_the_config():
    config = parse(
        "--model", "demo=runs/demo/final", "--model", "runs/other/", "--api-key", "k", "--max-batch", "4"
    )
    assert config.models == (ModelSpec("demo", "runs/demo/final"), ModelSpec("other", "runs/other/"))
    assert config.host == "127.0.0.1" and config.port == 8000
    assert (config.api_key, config.max_batch, config.feature_cache_bytes) == ("k", 4, 512 * 1024**2)


def test_bad_values_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="unique"):
        parse("--model", "a=x", "--model", "a=y")
    with pytest.raises(ConfigError, match="NAME=DIR"):
        ModelSpec.parse("=x")
    with pytest.raises(ConfigError, match="max_batch"):
        ServeConfig(models=(ModelSpec("a", "x"),), max_batch=0)
    with pytest.raises(ConfigError, match="at least one"):
        ServeConfig(models=())


def test_help_explains_the_server(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model",
        "--api-key",
        "--allowed-local-media-path",
        "--allowed-media-domains",
        "--max-batch",
    ):
        assert flag in text
    assert "127.0.0.1" in text
