"""What keeps other web sites and oversized uploads out of a server that can read and edit your persons.

A page on any site the user visits can make the browser send requests to 127.0.0.1. So:

- the Host header must name this server (loopback names, or the --host it was told), which defeats DNS rebinding
  (a hostile name that resolves to 127.0.0.1 makes the page same-origin with us, but its Host is that name);
- a request that can change something (any method but GET/HEAD/OPTIONS) from a browser must come from our own
  origin: the Origin header (or, without it, Sec-Fetch-Site) says where it came from; a request with neither is
  not from a browser (curl, scripts, ``faceindex query``) and is let through;
- HTML forms carry a token only our pages know (``form_token``), checked by the form handlers;
- a request body is cut off at ``max_body`` bytes (413), whether it says its length or not;
- every response forbids scripts and loads from elsewhere (Content-Security-Policy) and framing; its referrer
  policy is same-origin, not no-referrer, because under no-referrer Chromium sends ``Origin: null`` with our own
  forms, which would then be refused.
"""

from __future__ import annotations

import hmac
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
           (b"x-frame-options", b"DENY"), (b"referrer-policy", b"same-origin")]
# Leading bytes of the image formats the pipeline decodes (ingest.extensions): an upload must start with one.
_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"), (b"GIF87a", ".gif"), (b"GIF89a", ".gif"),
          (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))


class BodyTooLarge(Exception):
    pass


def image_suffix(head: bytes) -> str | None:
    """The file suffix of the image format ``head`` starts with, or None when it is no image we read."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return next((suffix for magic, suffix in _MAGIC if head.startswith(magic)), None)


def new_form_token() -> str:
    return secrets.token_urlsafe(32)


def token_ok(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def _host_name(host: str) -> str:
    """``host[:port]`` or ``[v6]:port`` -> the host name, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class Guard:
    """ASGI middleware applying the rules in this module's docstring before the app sees a request."""

    def __init__(self, app: ASGIApp, bind_host: str, max_body: int) -> None:
        self.app = app
        self.any_host = bind_host in WILDCARD_HOSTS
        self.hosts = {*LOOPBACK_HOSTS, bind_host.lower()}
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refuse(scope["method"], headers)
        if refusal is not None:
            return await _plain(send, 403, refusal)
        if int(headers.get("content-length") or 0) > self.max_body:
            return await _plain(send, 413, f"request body over {self.max_body} bytes")
        started = False

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        try:
            await self.app(scope, self._limited(receive), send_with_headers)
        except BodyTooLarge:
            if not started:
                await _plain(send, 413, f"request body over {self.max_body} bytes")

    def refuse(self, method: str, headers: dict[str, str]) -> str | None:
        """Why this request is refused (403), or None."""
        host = headers.get("host", "")
        if not self.any_host and _host_name(host) not in self.hosts:
            return "unexpected Host header: this server answers only under its own address"
        if method in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None:
            scheme, _, netloc = origin.partition("://")
            if origin == "null" or scheme not in ("http", "https") or netloc.lower() != host.lower():
                return "cross-origin request refused"
        elif headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return "cross-site request refused"
        return None

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def limited() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise BodyTooLarge
            return message

        return limited


async def _plain(send: Send, status: int, text: str) -> None:
    body = json.dumps({"error": text}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *HEADERS]})
    await send({"type": "http.response.body", "body": body})
