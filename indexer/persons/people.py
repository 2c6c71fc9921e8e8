"""Persons as the user sees them: list, show, a face's photo and thumbnail (read-only views for the CLI and the
web app). Each reads the person tables (store/persons.py) for what it shows: a page of persons, one person's
members, never every face."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from indexer.errors import NotFoundError
from indexer.persons.state import person_names, require_clustered
from indexer.persons.word import lazy_word
from indexer.store.lmdb_store import FaceStore
from indexer.store.persons import PersonRow


def _row(row: PersonRow, names: dict[int, str]) -> dict[str, Any]:
    cohesion = row.cohesion
    return {"id": row.person, "name": names.get(row.person, ""), "size": row.n,
            "cohesion": None if cohesion is None else round(cohesion, 4), "face": row.cover}


def people(store: FaceStore, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
    """Persons, largest first (ties by id): id, name, size, cohesion (mean similarity to the center) and ``face``,
    a face near the center (its picture). A page of the person tables: it costs the page, not the index."""
    with store.read() as txn:
        require_clustered(store, txn)
        names = person_names(store, txn)
        return [_row(r, names) for r in store.persons_by_size(txn, offset, limit)]


def people_page(store: FaceStore, show: str = "all", query: str = "", offset: int = 0,
                limit: int = 120) -> dict[str, Any]:
    """The People page: named persons first (largest first), then the unnamed ones by size; ``show`` keeps the
    named or the unnamed only, ``query`` matches a part of a name or an id (#12). Reads the named persons (the
    user named them: a few hundred) and one page of the rest."""
    with store.read() as txn:
        require_clustered(store, txn)
        names = person_names(store, txn)
        total = store.person_count(txn)
        named = sorted((_row(r, names) for r in store.person_rows(txn, names)), key=lambda r: (-r["size"], r["id"]))
        unnamed_total = total - len(named)
        query = query.strip()
        if query:
            wanted = int(query.lstrip("#")) if query.lstrip("#").isdigit() else None
            rows = [r for r in named if wanted is None and query.casefold() in r["name"].casefold()]
            if wanted is not None:
                row = store.person_row(wanted, txn)
                rows = [_row(row, names)] if row is not None else []
            rows = [r for r in rows if show == "all" or (show == "named") == bool(r["name"])]
            return {"rows": rows[offset:offset + limit], "total": len(rows), "persons": total,
                    "unnamed": unnamed_total}
        head = named if show != "unnamed" else []
        rows = head[offset:offset + limit]
        matched = len(head) + (unnamed_total if show != "named" else 0)
        if show != "named" and len(rows) < limit:
            rows += _unnamed(store, txn, names, max(0, offset - len(head)), limit - len(rows))
    return {"rows": rows, "total": matched, "persons": total, "unnamed": unnamed_total}


def _unnamed(store: FaceStore, txn, names: dict[int, str], skip: int, limit: int) -> list[dict[str, Any]]:
    """``limit`` unnamed persons by size after the first ``skip`` of them (named ones are passed over)."""
    out: list[dict[str, Any]] = []
    seen = 0
    for person in store.person_ids_by_size(txn):
        if len(out) >= limit:
            break
        if person in names:
            continue
        if seen >= skip and (row := store.person_row(person, txn)) is not None:
            out.append(_row(row, names))
        seen += 1
    return out


def named_people(store: FaceStore) -> list[dict[str, Any]]:
    """The named persons, largest first (the move targets a page offers)."""
    return people_page(store, "named", limit=1 << 30)["rows"]


def outline(store: FaceStore, cluster_id: int) -> dict[str, Any]:
    """One person without its face records: id, name, size, and each face as (face id, similarity, confirmed),
    most central first. Reads this person's members and the user's word on them, nothing else."""
    with store.read() as txn:
        require_clustered(store, txn)
        members = store.member_similarities(cluster_id, txn)
        if not members:
            raise NotFoundError(f"no person {cluster_id}; see `faceindex people list`")
        word = lazy_word(store, txn)
        faces = sorted(((f, s, word.of(f).confirmed) for f, s in members), key=lambda m: (-m[1], m[0]))
        name = person_names(store, txn).get(cluster_id, "")
    return {"id": cluster_id, "name": name, "size": len(faces), "confirmed": sum(c for _, _, c in faces),
            "faces": faces}


def face_rows(store: FaceStore, faces: Iterable[tuple[int, float, bool]]) -> list[dict[str, Any]]:
    """The records of ``faces`` (an outline's entries) as ``person`` shows them."""
    with store.read() as txn:
        records = [(store.get_face(f, txn), confirmed) for f, _, confirmed in faces]
    return [{**f.to_dict(), "confirmed": confirmed} for f, confirmed in records if f is not None]


def person(store: FaceStore, cluster_id: int, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
    """One person's faces, most central first (``offset``/``limit``: a page of them); ``confirmed`` marks those
    the user placed there."""
    shown = outline(store, cluster_id)
    page = shown["faces"][offset:None if limit is None else offset + limit]
    return {**shown, "faces": face_rows(store, page)}


def photo(store: FaceStore, face_id: int) -> dict[str, Any]:
    """The photo holding face ``face_id``: its path and size, and each of its faces with box, person and name.

    Only a photo the store records as holding that face is answered, so a caller serving the file serves only
    files the index knows."""
    with store.read() as txn:
        face = store.get_face(face_id, txn)
        record = store.get_file(face.path, txn) if face is not None else None
        if record is None or face_id not in record.face_ids:
            raise NotFoundError(f"no photo with face {face_id} in the index")
        names = person_names(store, txn)
        faces = [store.get_face(i, txn) for i in record.face_ids]
    return {"face_id": face_id, "path": record.path, "width": record.width, "height": record.height,
            "faces": [{"face_id": f.face_id, "box": f.box, "person": f.cluster, "name": names.get(f.cluster, "")}
                      for f in faces if f is not None]}


def thumbnail(store: FaceStore, face_id: int) -> bytes:
    """The stored JPEG thumbnail of a face."""
    with store.read() as txn:
        data = store.get_thumbnail(face_id, txn)
    if not data:
        raise NotFoundError(f"no thumbnail for face {face_id}")
    return data
