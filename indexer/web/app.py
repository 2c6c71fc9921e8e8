"""The web app: the routes of ``pages`` (HTML) and ``api`` (JSON) over one open index, library errors as HTTP
statuses (as the CLI turns them into one-line messages), all behind the guard of ``security``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from indexer.errors import (
    ClusteringError,
    FaceIndexError,
    ImageError,
    IndexLockedError,
    IndexMismatchError,
    NotFoundError,
)
from indexer.web import api, pages
from indexer.web.security import Guard
from indexer.web.shared import Backend, JSONResponse, render

if TYPE_CHECKING:
    from indexer.library import FaceIndex

STATUS_OF = ((NotFoundError, 404), (ImageError, 400), (ClusteringError, 409), (IndexLockedError, 409),
             (IndexMismatchError, 409), (FaceIndexError, 400))


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


async def library_error(request: Request, exc: Exception) -> Response:
    status = next(code for kind, code in STATUS_OF if isinstance(exc, kind))
    if _wants_json(request):
        return JSONResponse({"error": str(exc)}, status_code=status)
    return render(request, "error.html", status_code=status, title="Error", message=str(exc))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if _wants_json(request):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
    return render(request, "error.html", status_code=exc.status_code, title=str(exc.status_code), message=exc.detail)


def create_app(fi: FaceIndex, bind_host: str = "127.0.0.1", max_upload_bytes: int = 25 << 20) -> Guard:
    """The ASGI app over an open index, behind the guard of ``security``; ``app.state.backend`` is the Backend."""
    from importlib.resources import files

    static = StaticFiles(directory=str(files("indexer.web") / "static"))
    app = Starlette(routes=[*pages.routes, *api.routes, Mount("/static", static, name="static")],
                    exception_handlers={FaceIndexError: library_error, HTTPException: http_error})
    app.state.backend = Backend(fi)
    app.state.max_upload_bytes = max_upload_bytes
    guard = Guard(app, bind_host, max_upload_bytes + (64 << 10))  # room for the multipart framing and fields
    guard.state = app.state  # type: ignore[attr-defined]
    return guard
