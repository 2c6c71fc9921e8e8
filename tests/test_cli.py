"""The command line as a contract: help everywhere, config validation, one-line errors."""

from __future__ import annotations

import click
import numpy as np
import pytest
from click.testing import CliRunner

from indexer.cli import main
from indexer.config import Settings, load_settings
from indexer.errors import ConfigError
from tests.conftest import REPO


def all_commands(group: click.Group, prefix: tuple[str, ...] = ()):
    for name, cmd in group.commands.items():
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from all_commands(cmd, prefix + (name,))


def test_every_command_has_help_text():
    runner = CliRunner()
    commands = list(all_commands(main))
    assert {"ingest", "watch", "query", "status", "cluster", "assign", "export", "report", "people", "models",
            "eval"} <= {path[0] for path, _ in commands}
    for path, cmd in commands:
        assert cmd.help and len(cmd.help.strip()) > 20, f"{' '.join(path)} has no help"
        result = runner.invoke(main, [*path, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


def test_commands_that_touch_an_index_take_index_config_and_json():
    for path, cmd in all_commands(main):
        if isinstance(cmd, click.Group) or path[0] == "models":
            continue
        names = {opt for p in cmd.params for opt in p.opts}
        assert {"--index", "--config", "--json"} <= names, f"{' '.join(path)} lacks a shared option"


def test_repository_config_equals_the_built_in_defaults():
    assert load_settings(REPO / "config.toml") == Settings()


@pytest.mark.parametrize("text,message", [
    ("[detector]\nmin_prob = 2.0\n", "min_prob"),
    ("[detector]\nmin_porb = 0.5\n", "unknown setting [detector] min_porb"),
    ("[cluster]\nmethod = 'magic'\n", "cluster.method"),
    ("[ingest]\ndecode_workers = 'two'\n", "must be int"),
    ("[[broken toml", "not valid TOML"),
])
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_settings(path)
    result = CliRunner().invoke(main, ["status", "--config", str(path)])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and result.output.count("\n") == 1


def test_missing_index_and_missing_file_are_one_line_errors(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["status", "--index", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "no index at" in result.output
    result = runner.invoke(main, ["query", "--index", str(tmp_path), str(tmp_path / "missing.jpg")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(main, ["query", "--index", str(tmp_path)])
    assert result.exit_code == 2 and "either IMAGE or --face-id" in result.output


def test_cli_method_names_match_the_library():
    from indexer.cli.options import CLUSTER_METHODS
    from indexer.cluster import METHODS, cluster_identities

    assert CLUSTER_METHODS is METHODS  # one list, imported by config, CLI and the algorithms
    x = np.eye(4, 512, dtype=np.float32)
    for method in METHODS:  # and every listed name runs
        labels = cluster_identities(x, method, **({"k": 2} if method == "kmeans" else {}))
        assert len(labels) == 4
