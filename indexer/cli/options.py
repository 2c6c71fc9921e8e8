"""What every command shares: --index/--config/--json/--weights, opening an index, printing results.

Library errors (``indexer.errors.FaceIndexError``) become one-line messages and exit status 1 (``FaceIndexGroup``);
bad arguments are click usage errors (exit 2).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from indexer.config import CLUSTER_METHODS, Settings, load_settings, with_overrides
from indexer.errors import FaceIndexError

if TYPE_CHECKING:
    from indexer.library import FaceIndex

__all__ = ["CLUSTER_METHODS", "FaceIndexGroup", "emit", "fmt", "index_options", "json_option", "method_option",
           "open_index", "run", "weights_option"]


class FaceIndexGroup(click.Group):
    """Turns library errors raised anywhere below into one line on stderr and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FaceIndexError as exc:
            raise click.ClickException(str(exc)) from None


def index_options(fn: Callable) -> Callable:
    """--index and --config, resolved into a Settings object passed as ``settings``."""

    @click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                  help="config.toml to read (default: $FACEINDEX_CONFIG, ./config.toml, ~/.config/faceindex/).")
    @click.option("--index", "index_dir", type=click.Path(file_okay=False), default=None,
                  help="Index folder (default: index_dir in config.toml).")
    @functools.wraps(fn)
    def wrapper(*args: Any, config_file: str | None, index_dir: str | None, **kwargs: Any) -> Any:
        try:
            settings = load_settings(config_file, index_dir)
        except FaceIndexError as exc:
            raise click.ClickException(str(exc)) from None
        return fn(*args, settings=settings, **kwargs)

    return wrapper


def json_option(fn: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")(fn)


def weights_option(fn: Callable) -> Callable:
    """--weights, applied to the settings (so the command receives ``settings`` only)."""

    @click.option("--weights", default=None,
                  help="Embedder weights: auto, vggface2, casia-webface or a .pt/.npz path.")
    @functools.wraps(fn)
    def wrapper(*args: Any, weights: str | None, settings: Settings, **kwargs: Any) -> Any:
        return fn(*args, settings=with_overrides(settings, "embedder", weights=weights), **kwargs)

    return wrapper


def method_option(fn: Callable) -> Callable:
    return click.option("--method", type=click.Choice(CLUSTER_METHODS), default=None,
                        help="Clustering method (default: cluster.method in config).")(fn)


def open_index(settings: Settings, mode: str = "read", command: str = "ingest") -> FaceIndex:
    """Open the index in ``mode`` (read | edit | write); imported here so `--help` loads no library."""
    from indexer.library import FaceIndex, OpenMode

    return FaceIndex(settings, OpenMode(mode), command=command)


def run(settings: Settings, call: Callable[[FaceIndex], Any], as_json: bool, text: Callable[[Any], str],
        mode: str = "read") -> Any:
    """Most commands: open the index, make the one library call, print its result; returns the result."""
    with open_index(settings, mode) as fi:
        result = call(fi)
    emit(result, as_json, text)
    return result


def emit(obj: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    click.echo(json.dumps(obj, indent=2, default=_json_default) if as_json else text(obj))


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"
