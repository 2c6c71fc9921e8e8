"""Run ``faceindex serve``: bind, announce in ``<index>/serve.json``, load the models in the background, run uvicorn
until SIGINT/SIGTERM, then withdraw the announcement."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading
import webbrowser
from collections.abc import Iterator
from contextlib import contextmanager

from indexer.config import Settings
from indexer.web.discovery import remove_serve_file, write_serve_file
from indexer.web.security import LOOPBACK_HOSTS

log = logging.getLogger("faceindex.web")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one). Bound here, before uvicorn starts, so the port is
    known (and announced) before the first request can arrive; early requests wait in the backlog."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8765, open_browser: bool = False,
          max_upload_mb: int = 25, threads: int = 1, on_listening=None) -> None:
    """Serve the index of ``settings`` until SIGINT/SIGTERM. ``on_listening(info)`` is told serve.json's content
    (url, host, port, pid) once bound.

    ``threads``: torch threads for a search. One by default: a search is one photo, and on this 2-core machine a
    one-face search took 0.26 s with one thread but 1.5-2.6 s with two while another process (a daemon, an
    ingest) kept one core busy; two threads fighting over one free core spin far more than they compute."""
    import torch
    import uvicorn

    from indexer.library import FaceIndex, OpenMode
    from indexer.web.app import create_app

    torch.set_num_threads(threads)
    with FaceIndex(settings, OpenMode.EDIT) as fi:
        sock = bind(host, port)
        try:
            bound_port = sock.getsockname()[1]
            app = create_app(fi, bind_host=host, max_upload_bytes=max_upload_mb << 20)
            threading.Thread(target=app.state.backend.warm_up, name="faceindex-warm-up", daemon=True).start()
            info = write_serve_file(fi.dir, host, bound_port)
            try:
                if on_listening is not None:
                    on_listening(info)
                if open_browser:
                    webbrowser.open(info["url"])
                config = uvicorn.Config(app, lifespan="off", access_log=False, log_level="warning",
                                        timeout_graceful_shutdown=5)
                with _exit_after_signal():
                    uvicorn.Server(config).run(sockets=[sock])
            finally:
                remove_serve_file(fi.dir)
        finally:
            sock.close()


@contextmanager
def _exit_after_signal() -> Iterator[None]:
    """uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler it found: let
    that be a clean exit (status 0, ``finally`` blocks run, serve.json withdrawn) rather than death by SIGTERM."""
    def leave(signum: int, frame: object) -> None:
        sys.exit(0)

    previous = {sig: signal.signal(sig, leave) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
