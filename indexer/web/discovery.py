"""How ``faceindex query`` finds a running ``faceindex serve`` and asks it, so a search costs model time only.

The server writes ``<index>/serve.json`` (pid, host, port) once it listens and removes it when it stops, like the
daemon's status file. A client reads it, checks that the pid lives, connects with a short timeout and posts the
photo to ``/api/search``; when any of that fails it says nothing and the caller loads the models itself. Standard
library only: the command line must not import a web framework to maybe skip one.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any

from indexer.errors import ImageError
from indexer.fsutil import atomic_write

log = logging.getLogger("faceindex")
SERVE_FILE = "serve.json"
CONNECT_TIMEOUT_S = 0.5  # a live local server accepts at once; a stale file must not delay the fallback
ANSWER_TIMEOUT_S = 600.0  # the server may still be loading its models (a cold start takes tens of seconds)


def write_serve_file(index_dir: str | Path, host: str, port: int) -> dict[str, Any]:
    info = {"pid": os.getpid(), "host": host, "port": port, "url": f"http://{_netloc(host, port)}/",
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write(Path(index_dir) / SERVE_FILE, json.dumps(info))
    return info


def remove_serve_file(index_dir: str | Path) -> None:
    """Remove the file if it is this process's (a second server on the same index may have replaced it)."""
    path = Path(index_dir) / SERVE_FILE
    if (read_serve_file(index_dir, check_alive=False) or {}).get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def read_serve_file(index_dir: str | Path, check_alive: bool = True) -> dict[str, Any] | None:
    """The running server's pid, host and port, or None (no file, a damaged one, or its process is gone)."""
    try:
        info = json.loads((Path(index_dir) / SERVE_FILE).read_text())
        pid, port = int(info["pid"]), int(info["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if check_alive and not _alive(pid):
        return None
    return {**info, "pid": pid, "port": port}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: not our server
        return False
    return True


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def query_server(index_dir: str | Path, image: str | Path, k: int,
                 min_similarity: float | None) -> tuple[list[dict[str, Any]], dict[str, Any]] | None:
    """``faceindex query IMAGE`` answered by the server of this index: (results, server info), or None when no
    server answers (the caller then searches itself). A photo the server cannot read raises ImageError, as a
    local search would."""
    info = read_serve_file(index_dir)
    if info is None:
        return None
    host = "127.0.0.1" if info["host"] in ("0.0.0.0", "") else "::1" if info["host"] == "::" else info["host"]
    fields = {"k": str(k)} | ({} if min_similarity is None else {"min_similarity": repr(min_similarity)})
    body, content_type = _multipart(fields, Path(image).read_bytes())
    conn = http.client.HTTPConnection(host, info["port"], timeout=CONNECT_TIMEOUT_S)
    try:
        conn.connect()
        conn.sock.settimeout(ANSWER_TIMEOUT_S)
        conn.request("POST", "/api/search", body, {"Content-Type": content_type})
        response = conn.getresponse()
        status, data = response.status, response.read()
    except (OSError, http.client.HTTPException) as exc:
        log.info("faceindex serve (pid %s) did not answer (%s); searching here", info["pid"], exc)
        return None
    finally:
        conn.close()
    if status == 200:
        return json.loads(data), info
    message = _error_message(data)
    if status == 400:
        raise ImageError(message)
    log.warning("faceindex serve answered %d (%s); searching here", status, message)
    return None


def _error_message(data: bytes) -> str:
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")


def _multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body with ``fields`` and the photo as ``image`` (its real name stays here: it may not
    even be UTF-8, and the server needs only the bytes)."""
    boundary = secrets.token_hex(16)
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query"\r\n'
                 "Content-Type: application/octet-stream\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
