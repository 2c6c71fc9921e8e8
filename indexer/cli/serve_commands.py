"""``faceindex serve``: the local web app and JSON API (indexer/web), and the query shortcut through it."""

from __future__ import annotations

import json

import click

from indexer.cli.options import index_options, json_option, weights_option
from indexer.config import Settings


@click.command()
@index_options
@weights_option
@json_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. Anything but loopback lets other machines see and edit your persons.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True,
              help="Port to listen on (0: any free port; serve.json in the index says which).")
@click.option("--open", "open_browser", is_flag=True, help="Open the People page in a browser.")
@click.option("--max-upload-mb", type=click.IntRange(1, 1024), default=25, show_default=True,
              help="Largest photo a search accepts.")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="Torch threads per search (one photo: more rarely help, and slow down beside a daemon).")
def serve(settings: Settings, as_json: bool, host: str, port: int, open_browser: bool, max_upload_mb: int,
          threads: int) -> None:
    """A local web app to see, search and correct persons, and a JSON API (/api/...), until Ctrl-C.

    Edits go through the same library calls as `faceindex people`, so every recluster keeps them. The models stay
    loaded: `faceindex query IMAGE` on the same index uses this server while it runs. With --json, one line
    {"url", "host", "port", "pid"} on stdout once it listens (with --port 0: the port it got).
    """
    from indexer.web.server import is_loopback
    from indexer.web.server import serve as run_server

    if not is_loopback(host):
        click.echo(f"warning: listening on {host}: anyone who can reach this address can see your photos and "
                   "edit your persons (there is no login)", err=True)
    def listening(info: dict) -> None:
        if as_json:
            click.echo(json.dumps({k: info[k] for k in ("url", "host", "port", "pid")}))
        else:
            click.echo(f"faceindex serve: {info['url']} (Ctrl-C stops)", err=True)

    run_server(settings, host, port, open_browser=open_browser, max_upload_mb=max_upload_mb, threads=threads,
               on_listening=listening)


def query_via_server(settings: Settings, image: str, k: int, min_similarity: float | None) -> list | None:
    """``faceindex query IMAGE`` answered by a running `faceindex serve` of this index (warm models), or None."""
    from indexer.web.discovery import query_server

    answered = query_server(settings.index_path, image, k, min_similarity)
    if answered is None:
        return None
    results, info = answered
    click.echo(f"answered by faceindex serve (pid {info['pid']}, {info['url']}): models already loaded", err=True)
    return results
