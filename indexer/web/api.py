"""The JSON API under /api/: the same library calls as the CLI, and the same shapes as its --json output.

GET  /api/people[?offset=&limit=]    people list --json (each row also names ``face``, its picture)
GET  /api/people/{id}[?offset=&limit=]  people show ID --json
POST /api/people/{id}/name           {"name": "Ada"}             people name ID NAME
POST /api/people/{id}/merge          {"other": 12}               people merge ID 12 (12 joins ID)
POST /api/people/{id}/remove         {"faces": [431, 432]}       people remove ID 431 432
POST /api/people/{id}/move           {"faces": [433]}            people move 433 --to ID
POST /api/faces/ignore               {"faces": [500], "ignored": true}   people ignore / unignore
POST /api/undo                       people undo
GET  /api/history                    people history --json
GET  /api/photos/{face_id}           the photo of a face: path, size, its faces and their persons
POST /api/search                     multipart: image, k, min_similarity   query IMAGE --json
GET  /api/status                     status --json
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from indexer.web.shared import (
    Backend,
    JSONResponse,
    as_int,
    call,
    face_ids,
    json_body,
    query_int,
    read_upload,
    search_options,
)


def _backend(request: Request) -> Backend:
    return request.app.state.backend


def _person_id(request: Request) -> int:
    return as_int(request.path_params["person"], "a person id")


async def people(request: Request) -> JSONResponse:
    offset = max(0, query_int(request, "offset", 0))
    limit = query_int(request, "limit", 0)
    return JSONResponse(await call(_backend(request).fi.people, offset, limit if limit > 0 else None))


async def person(request: Request) -> JSONResponse:
    offset = max(0, query_int(request, "offset", 0))
    limit = query_int(request, "limit", 0)
    return JSONResponse(await call(_backend(request).fi.person, _person_id(request), offset,
                                   limit if limit > 0 else None))


async def name(request: Request) -> JSONResponse:
    body = await json_body(request)
    if not isinstance(body.get("name"), str):
        return JSONResponse({"error": 'send {"name": "..."} (an empty name removes it)'}, status_code=400)
    return JSONResponse(await call(_backend(request).fi.name, _person_id(request), body["name"]))


async def merge(request: Request) -> JSONResponse:
    other = as_int((await json_body(request)).get("other"), "other")
    return JSONResponse(await call(_backend(request).fi.merge, _person_id(request), other))


async def remove(request: Request) -> JSONResponse:
    faces = face_ids((await json_body(request)).get("faces"))
    return JSONResponse(await call(_backend(request).fi.remove_faces, _person_id(request), faces))


async def move(request: Request) -> JSONResponse:
    faces = face_ids((await json_body(request)).get("faces"))
    return JSONResponse(await call(_backend(request).fi.move_faces, faces, _person_id(request)))


async def ignore(request: Request) -> JSONResponse:
    body = await json_body(request)
    ignored = body.get("ignored", True)
    if not isinstance(ignored, bool):
        return JSONResponse({"error": "ignored must be true or false"}, status_code=400)
    return JSONResponse(await call(_backend(request).fi.ignore_faces, face_ids(body.get("faces")), ignored))


async def undo(request: Request) -> JSONResponse:
    return JSONResponse(await call(_backend(request).fi.undo))


async def history(request: Request) -> JSONResponse:
    return JSONResponse(await call(_backend(request).fi.history))


async def photo(request: Request) -> JSONResponse:
    face = as_int(request.path_params["face"], "a face id", 0)
    return JSONResponse(await call(_backend(request).fi.photo, face))


async def search(request: Request) -> JSONResponse:
    form, data, suffix = await read_upload(request)
    k, min_similarity = search_options(form)
    return JSONResponse(await call(_backend(request).search, data, suffix, k, min_similarity))


async def status(request: Request) -> JSONResponse:
    return JSONResponse(await call(_backend(request).status))


routes = [
    Route("/api/people", people),
    Route("/api/people/{person:int}", person),
    Route("/api/people/{person:int}/name", name, methods=["POST"]),
    Route("/api/people/{person:int}/merge", merge, methods=["POST"]),
    Route("/api/people/{person:int}/remove", remove, methods=["POST"]),
    Route("/api/people/{person:int}/move", move, methods=["POST"]),
    Route("/api/faces/ignore", ignore, methods=["POST"]),
    Route("/api/undo", undo, methods=["POST"]),
    Route("/api/history", history),
    Route("/api/photos/{face:int}", photo),
    Route("/api/search", search, methods=["POST"]),
    Route("/api/status", status),
]
