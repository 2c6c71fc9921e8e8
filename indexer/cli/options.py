"""What every command shares: --index/--config/--json/--weights, opening an index, printing results.

Library errors (``indexer.errors.FaceIndexError``) become one-line messages and exit status 1 (``FaceIndexGroup``);
bad arguments are click usage errors (exit 2).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import click

from indexer.config import CLUSTER_METHODS, Settings, load_settings, with_overrides
from indexer.errors import FaceIndexError

if TYPE_CHECKING:
    from indexer.library import FaceIndex

__all__ = ["CLUSTER_METHODS", "EngineOptions", "FaceIndexGroup", "emit", "engine_options", "fmt", "index_options",
           "json_option", "method_option", "open_index", "run", "weights_option"]


class FaceIndexGroup(click.Group):
    """Turns library errors (and a missing package) raised anywhere below into one line on stderr, exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FaceIndexError as exc:
            raise click.ClickException(str(exc)) from None
        except ModuleNotFoundError as exc:  # an environment short of a package: one line, never a traceback
            raise click.ClickException(
                f"the Python package {exc.name or exc} is not installed here; run `make install` "
                "(or `pip install -c requirements.lock -e .`) in faceindex's folder") from None


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


@dataclass(frozen=True)
class EngineOptions:
    """``ingest --engine ray``'s options, as ``FaceIndex.ingest_ray`` takes them."""

    address: str | None = None
    staging: str | None = None
    shard_size: int = 0


def engine_options(fn: Callable) -> Callable:
    """--engine, --address, --staging, --shard-size, passed as ``engine``: None for the local engine."""

    @click.option("--engine", "engine_name", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                  help="local: this process does everything; ray: Ray Data workers write shards that this process "
                       "merges (README: Scaling out).")
    @click.option("--address", default=None,
                  help="--engine ray: the cluster (HOST:PORT printed by `ray start --head`, or auto); default: a "
                       "local Ray started for this run.")
    @click.option("--staging", type=click.Path(file_okay=False), default=None,
                  help="--engine ray: folder for the workers' shards, on storage every node sees; default "
                       "INDEX/staging.")
    @click.option("--shard-size", type=click.IntRange(min=0), default=0,
                  help="--engine ray: files per shard (0: chosen from the cluster's size).")
    @functools.wraps(fn)
    def wrapper(*args: Any, engine_name: str, address: str | None, staging: str | None, shard_size: int,
                **kwargs: Any) -> Any:
        if engine_name == "local":
            if address or staging or shard_size:
                raise click.UsageError("--address, --staging and --shard-size go with --engine ray")
            return fn(*args, engine=None, **kwargs)
        return fn(*args, engine=EngineOptions(address, staging, shard_size), **kwargs)

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
