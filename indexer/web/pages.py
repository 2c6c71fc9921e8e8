"""The HTML pages: People, Person, Photo, Search, Status, and the forms that edit persons.

Each handler parses, makes one library call, renders a template (autoescaped); an edit answers with a redirect to
the page to look at next (POST-redirect-GET) and says what it did, and what it overrode, on that page.
"""

from __future__ import annotations

import mimetypes
from dataclasses import replace
from pathlib import Path
from typing import Any

from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Route

from indexer.errors import ClusteringError, NotFoundError
from indexer.web import views
from indexer.web.shared import Backend, as_int, call, checked_form, query_int, read_upload, render, search_options

PEOPLE_PER_PAGE = 120  # one screen of thumbnails; the page costs the same at 10 or 10,000 persons
FACES_PER_PAGE = 96
NAMED_IN_LIST = 500    # named persons offered as move targets on a Person page


def _backend(request: Request) -> Backend:
    return request.app.state.backend


async def home(request: Request) -> Response:
    return RedirectResponse("/people", status_code=302)


async def people(request: Request) -> Response:
    show = request.query_params.get("show", "all")
    show = show if show in views.SHOW else "all"
    query = request.query_params.get("q", "")
    number = max(1, query_int(request, "page", 1))
    try:
        answer = await call(_backend(request).fi.people_page, show, query, (number - 1) * PEOPLE_PER_PAGE,
                            PEOPLE_PER_PAGE)
    except ClusteringError as exc:  # a new index: say what to do, on the page the user opened
        return render(request, "people.html", title="People", page=None, show=show, q=query, notice=str(exc))
    page = views.page_of(answer["rows"], number, PEOPLE_PER_PAGE, answer["total"])
    return render(request, "people.html", title="People", page=page, show=show, q=query, notice=None,
                  persons=answer["persons"], unnamed=answer["unnamed"])


async def person(request: Request) -> Response:
    pid = request.path_params["person"]
    fi = _backend(request).fi
    shown = await call(fi.outline, pid)
    confirmed, suggested = views.split_faces(shown["faces"])
    confirmed = views.paginate(confirmed, query_int(request, "cpage", 1), FACES_PER_PAGE)
    suggested = views.paginate(suggested, query_int(request, "spage", 1), FACES_PER_PAGE)
    confirmed = replace(confirmed, items=await call(fi.face_rows, confirmed.items))
    suggested = replace(suggested, items=await call(fi.face_rows, suggested.items))
    merge_q = request.query_params.get("merge_q", "")
    named = [r for r in (await call(fi.people_page, "named", "", 0, NAMED_IN_LIST + 1))["rows"]
             if r["id"] != pid][:NAMED_IN_LIST]
    found = (await call(fi.people_page, "all", merge_q, 0, 21))["rows"] if merge_q.strip() else []
    return render(request, "person.html", title=shown["name"] or f"Person #{pid}", person=shown,
                  confirmed=confirmed, suggested=suggested, merge_q=merge_q,
                  candidates=views.candidates(found, merge_q, pid), named=named)


def _local(target: Any, default: str) -> str:
    """A page of this site to go back to (a form's ``back`` field): a local path only, never another site."""
    ok = isinstance(target, str) and target.startswith("/") and not target.startswith(("//", "/\\"))
    return target if ok else default


def _done(request: Request, text: str, result: dict[str, Any], to: str) -> RedirectResponse:
    """After an edit: remember what it did for the next page, and send the browser there (303: GET it)."""
    _backend(request).flash = {"text": text, "overrode": result.get("overrode", []), "undo": True}
    return RedirectResponse(to, status_code=303)


async def name(request: Request) -> Response:
    form = await checked_form(request)
    pid = request.path_params["person"]
    result = await call(_backend(request).fi.name, pid, str(form.get("name") or ""))
    text = f"#{pid} is now named {result['name']}" if result["name"] else f"#{pid} has no name now"
    return _done(request, text, result, _local(form.get("back"), f"/people/{pid}"))


async def merge(request: Request) -> Response:
    """This person is the same as ``into``: merged into it (``into`` keeps its id)."""
    form = await checked_form(request)
    pid = request.path_params["person"]
    into = as_int(form.get("into"), "the person to merge into", 0)
    result = await call(_backend(request).fi.merge, into, pid)
    return _done(request, f"merged #{pid} into #{into} ({result['size']} faces)", result, f"/people/{into}")


def _selected(form: FormData) -> list[int]:
    faces = [as_int(v, "a face id", 0) for v in form.getlist("face")]
    if not faces:
        raise HTTPException(400, "select one or more faces first")
    return faces


async def faces(request: Request) -> Response:
    """The Person page's face actions on the selected faces: remove, ignore, confirm (here) or move (elsewhere)."""
    form = await checked_form(request)
    pid = request.path_params["person"]
    selected, action, fi = _selected(form), form.get("action"), _backend(request).fi
    if action == "remove":
        result = await call(fi.remove_faces, pid, selected)
        return _done(request, f"removed {len(selected)} face(s) from #{pid}", result, f"/people/{pid}")
    if action == "ignore":
        result = await call(fi.ignore_faces, selected)
        return _done(request, f"{len(selected)} face(s) marked as not a person", result, f"/people/{pid}")
    if action in ("confirm", "move"):
        target = pid if action == "confirm" else as_int(str(form.get("to") or "").lstrip("#"), "the person", 0)
        result = await call(fi.move_faces, selected, target)
        return _done(request, f"{len(selected)} face(s) confirmed as #{target}", result, f"/people/{pid}")
    raise HTTPException(400, "unknown action")


async def undo(request: Request) -> Response:
    form = await checked_form(request)
    result = await call(_backend(request).fi.undo)
    _backend(request).flash = {"text": f"undid {result['undone']['op']} {result['undone']['args']}",
                               "overrode": [], "undo": False}
    return RedirectResponse(_local(form.get("back"), "/people"), status_code=303)


async def photo(request: Request) -> Response:
    face = request.path_params["face"]
    shown = await call(_backend(request).fi.photo, face)
    boxes = [{**f, **views.box_view(f["box"], shown["width"], shown["height"])} for f in shown["faces"]]
    return render(request, "photo.html", title=Path(shown["path"]).name, photo=shown, boxes=boxes)


async def photo_file(request: Request) -> Response:
    """The original photo of a stored face: only a file the store records, found by face id, never by a path."""
    shown = await call(_backend(request).fi.photo, request.path_params["face"])
    path = Path(shown["path"])
    if not path.is_file():
        raise NotFoundError("the photo is no longer on disk")
    kind = mimetypes.guess_type(path.name)[0] or ""
    return FileResponse(path, media_type=kind if kind.startswith("image/") else "application/octet-stream",
                        headers={"cache-control": "private, max-age=300"})


async def thumbnail(request: Request) -> Response:
    data = await call(_backend(request).fi.thumbnail, request.path_params["face"])
    # Face ids are never reused, so a face's thumbnail never changes.
    return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=86400"})


async def search(request: Request) -> Response:
    backend = _backend(request)
    if request.method == "GET":
        return render(request, "search.html", title="Search", results=None, names={})
    await checked_form(request)
    form, data, suffix = await read_upload(request)
    k, min_similarity = search_options(form)
    results = await call(backend.search, data, suffix, k, min_similarity)
    return render(request, "search.html", title="Search", results=results, names=await call(backend.names))


async def status(request: Request) -> Response:
    return render(request, "status.html", title="Status", status=await call(_backend(request).status))


routes = [
    Route("/", home),
    Route("/people", people),
    Route("/people/{person:int}", person),
    Route("/people/{person:int}/name", name, methods=["POST"]),
    Route("/people/{person:int}/merge", merge, methods=["POST"]),
    Route("/people/{person:int}/faces", faces, methods=["POST"]),
    Route("/undo", undo, methods=["POST"]),
    Route("/photo/{face:int}", photo),
    Route("/photos/{face:int}", photo_file),
    Route("/thumbs/{face:int}.jpg", thumbnail),
    Route("/search", search, methods=["GET", "POST"]),
    Route("/status", status),
]
