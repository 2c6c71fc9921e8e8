"""What the pages and the API share: the Backend (the one open index), running library calls off the event loop,
JSON as the CLI prints it, and the templates (Jinja2, autoescape on).

The server holds ONE ``FaceIndex`` opened for edits (LMDB allows one environment per process; each request reads
in a fresh transaction, so it sees what the daemon or the command line committed meanwhile). Edits go through the
library's edit methods, exactly as the CLI's do, so every recluster keeps them. The models and the FAISS index are
not thread-safe: searches and status take ``Backend.lock``; everything else runs concurrently.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import jinja2
from markupsafe import Markup
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

from indexer.display import display
from indexer.errors import ClusteringError
from indexer.web.security import image_suffix, new_form_token, token_ok

if TYPE_CHECKING:
    from indexer.library import FaceIndex

log = logging.getLogger("faceindex.web")


class Backend:
    """The open index and what requests share: the lock around models and FAISS, the form token, one flash."""

    def __init__(self, fi: FaceIndex) -> None:
        self.fi = fi
        self.lock = threading.Lock()
        self.form_token = new_form_token()
        self.flash: dict[str, Any] | None = None

    def warm_up(self) -> None:
        """Load the models and the FAISS index now (in the background at start), not on the first search."""
        try:
            with self.lock:
                self.fi.models()
                self.fi.vectors.catch_up()
            log.info("models loaded: searches cost model time only")
        except Exception as exc:  # the first search reports it to the user as its own error
            log.warning("could not load the models ahead of the first search: %s", exc)

    def search(self, data: bytes, suffix: str, k: int, min_similarity: float | None) -> list[dict[str, Any]]:
        with tempfile.NamedTemporaryFile(suffix=suffix, prefix="faceindex-search-") as tmp:
            tmp.write(data)
            tmp.flush()
            with self.lock:
                return self.fi.query(image=tmp.name, k=k, min_similarity=min_similarity)

    def status(self) -> dict[str, Any]:
        with self.lock:
            return self.fi.status()

    def names(self) -> dict[int, str]:
        """Person id -> name ("" when unnamed) for labelling matches; empty before the first clustering."""
        try:
            return {r["id"]: r["name"] for r in self.fi.people_page("named", limit=1 << 30)["rows"]}
        except ClusteringError:
            return {}


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking library call off the event loop."""
    return await run_in_threadpool(fn, *args)


class JSONResponse(Response):
    """JSON as the CLI's --json prints it: ASCII, so a file name's undecodable bytes travel as \\udcXX escapes."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, default=_json_default, ensure_ascii=True).encode()


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _shown(value: Any) -> Any:
    """Every {{ value }} of text passes here before it is escaped: undecodable bytes become U+FFFD, control
    characters their escapes, so no file name or person name can break the page or its encoding."""
    return display(value) if isinstance(value, str) and not isinstance(value, Markup) else value


@cache
def templates() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("indexer.web", "templates"), autoescape=True,
                             finalize=_shown, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env


def render(request: Request, name: str, status_code: int = 200, **context: Any) -> HTMLResponse:
    backend: Backend = request.app.state.backend
    flash, backend.flash = backend.flash, None
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    page = templates().get_template(name).render(token=backend.form_token, flash=flash, here=here,
                                                 **context)
    return HTMLResponse(page, status_code=status_code)




# ---------------------------------------------------------------------------------------------- request parsing
def as_int(value: Any, what: str, lo: int = -(2**63), hi: int = 2**63 - 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise HTTPException(400, f"{what} must be a whole number, not {str(value)[:40]!r}") from None
    if not lo <= number <= hi:
        raise HTTPException(400, f"{what} must be between {lo} and {hi}")
    return number


def query_int(request: Request, name: str, default: int, lo: int = 0, hi: int = 2**31) -> int:
    value = request.query_params.get(name)
    return default if value in (None, "") else as_int(value, name, lo, hi)


async def checked_form(request: Request) -> FormData:
    """An HTML form's fields, after checking the token only this server's pages carry (403 without it)."""
    form = await request.form(max_files=1, max_fields=2000)
    backend: Backend = request.app.state.backend
    if not token_ok(backend.form_token, form.get("token") if isinstance(form.get("token"), str) else None):
        raise HTTPException(403, "missing or stale form token: reload the page and try again")
    return form


async def json_body(request: Request) -> dict[str, Any]:
    """A JSON object body; 415 for another content type (which also keeps out plain HTML forms), 400 if invalid."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send a JSON object with Content-Type: application/json")
    try:
        body = json.loads(await request.body())
    except ValueError:
        raise HTTPException(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def face_ids(values: Any) -> list[int]:
    if not isinstance(values, list) or not values:
        raise HTTPException(400, "faces must be a non-empty list of face ids")
    return [as_int(v, "a face id", 0) for v in values]


async def read_upload(request: Request) -> tuple[FormData, bytes, str]:
    """The form of a search (``image`` and its other fields), the photo's bytes and its file suffix.

    The photo must be an image format the pipeline reads, by its leading bytes (not its name or claimed type); the
    body size is capped by the guard, and again here, so an upload never fills the disk."""
    form = await request.form(max_files=1, max_fields=10)
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise HTTPException(400, "no photo: send it as the multipart field 'image'")
    claimed = (upload.content_type or "").lower()
    if claimed and not claimed.startswith("image/") and claimed != "application/octet-stream":
        raise HTTPException(415, f"{claimed} is not an image type")
    limit = request.app.state.max_upload_bytes
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(413, f"photo over {limit >> 20} MiB")
    suffix = image_suffix(data[:16])
    if suffix is None:
        raise HTTPException(415, "not an image this index reads (JPEG, PNG, WebP, GIF, BMP, TIFF)")
    return form, data, suffix


def search_options(form: FormData) -> tuple[int, float | None]:
    """k (1-100, default 10) and min_similarity (a cosine, optional) of a search form."""
    k = as_int(form.get("k") or 10, "k", 1, 100)
    raw = form.get("min_similarity")
    if raw in (None, ""):
        return k, None
    try:
        min_similarity = float(str(raw))
    except ValueError:
        raise HTTPException(400, "min_similarity must be a number") from None
    if not -1.0 <= min_similarity <= 1.0:
        raise HTTPException(400, "min_similarity must be a cosine in [-1, 1]")
    return k, min_similarity
