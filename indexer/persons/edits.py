"""The user's edits of persons: name, merge, remove, move, ignore, unignore, undo (CLI and web app call these).

Each edit is one write transaction: it records the user's word (persons/word.py, with what it overrode and the
previous values for undo), then re-derives the persons it touched from it (persons/apply.py ``rederive_local``), so
what the user sees changes at once and every later recluster obeys the same word. An edit reads the faces of the
persons it names (the person tables' members), never the whole index. Contradictory edits: the later one wins, and
says what it overrode.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from indexer.config import ClusterSettings
from indexer.errors import ClusteringError, NotFoundError
from indexer.persons.apply import rederive_local
from indexer.persons.state import require_clustered
from indexer.persons.word import Edit, Word, faces_kept_out_of, history, lazy_word, pop_last_edit
from indexer.store.lmdb_store import FaceStore


def _edit(store: FaceStore, settings: ClusterSettings, op: str, args: dict[str, Any],
          change: Callable[[Edit, Word, Any], dict[str, Any]]) -> dict[str, Any]:
    """Run ``change`` as one edit: word written, the touched persons re-derived, history appended, in one
    transaction."""
    def write(txn) -> dict[str, Any]:
        require_clustered(store, txn)
        word = lazy_word(store, txn)
        edit = Edit(store, txn, op, args)
        result = change(edit, word, txn)
        faces, persons = edit.touched()
        rederive_local(store, txn, settings, faces, persons)
        return {**result, "edit": edit.commit(), "overrode": edit.overrode, "persons": store.person_count(txn)}

    return store.transact(write)


def _require_person(store: FaceStore, txn, edit: Edit, person: int) -> None:
    if store.person_row(person, txn) is None:
        raise NotFoundError(f"no person {person}; see `faceindex people list`")
    edit.persons.add(person)


def _faces_of(store: FaceStore, txn, person: int) -> list[int]:
    return [face_id for face_id, _ in store.member_similarities(person, txn)]


def _require_faces(store: FaceStore, txn, face_ids: Iterable[int]) -> dict[int, int]:
    """{face id: its current person} for faces that must exist."""
    current = {}
    for face_id in face_ids:
        face = store.get_face(face_id, txn)
        if face is None:
            raise NotFoundError(f"no face {face_id}; see `faceindex people show ID`")
        current[face_id] = face.cluster
    return current


def name(store: FaceStore, settings: ClusterSettings, person: int, new_name: str) -> dict[str, Any]:
    """Name a person (empty: remove the name). Its faces become confirmed: the name stays with them."""
    new_name = new_name.strip()

    def change(edit: Edit, word: Word, txn) -> dict[str, Any]:
        _require_person(store, txn, edit, person)
        old = word.names.get(person, "")
        if old and old != new_name:
            edit.overrode.append(f"#{person} was named {old!r}")
        edit.set_name(word, person, new_name)
        if new_name:
            for face_id in _faces_of(store, txn, person):
                edit.update_face(word, face_id, person=person, confirmed=True)
        return {"id": person, "name": new_name}

    return _edit(store, settings, "name", {"id": person, "name": new_name}, change)


def merge(store: FaceStore, settings: ClusterSettings, keep: int, other: int) -> dict[str, Any]:
    """OTHER is the same person as KEEP: all their faces stay together under KEEP from now on."""
    if keep == other:
        raise ClusteringError("cannot merge a person with itself")

    def change(edit: Edit, word: Word, txn) -> dict[str, Any]:
        _require_person(store, txn, edit, keep)
        _require_person(store, txn, edit, other)
        members = _faces_of(store, txn, keep) + _faces_of(store, txn, other)
        for face_id in members:
            w = word.of(face_id)
            for gone in {keep, other} & set(w.not_persons):
                edit.overrode.append(f"face {face_id} was marked not #{gone}")
            edit.update_face(word, face_id, person=keep,
                             not_persons=tuple(p for p in w.not_persons if p not in (keep, other)))
        together = set(members)
        for face_id in faces_kept_out_of(store, txn, other):  # faces kept out of OTHER are kept out of KEEP now
            if face_id not in together:
                w = word.of(face_id)
                edit.update_face(word, face_id, not_persons=tuple(sorted({keep, *w.not_persons} - {other})))
        keep_name, other_name = word.names.get(keep, ""), word.names.get(other, "")
        if other_name:
            edit.set_name(word, other, "")
            if keep_name and keep_name != other_name:
                edit.overrode.append(f"#{other} was named {other_name!r}")
            elif not keep_name:
                edit.set_name(word, keep, other_name)
        return {"id": keep, "merged": other, "size": len(members), "name": keep_name or other_name}

    return _edit(store, settings, "merge", {"keep": keep, "other": other}, change)


def remove(store: FaceStore, settings: ClusterSettings, person: int, face_ids: list[int]) -> dict[str, Any]:
    """These faces are not PERSON: they leave it and never rejoin it."""
    def change(edit: Edit, word: Word, txn) -> dict[str, Any]:
        _require_person(store, txn, edit, person)
        current = _require_faces(store, txn, face_ids)
        for face_id in face_ids:
            w = word.of(face_id)
            if current[face_id] != person:
                raise ClusteringError(f"face {face_id} is not in #{person} (it is in #{current[face_id]})")
            if w.person == person:
                edit.overrode.append(f"face {face_id} was confirmed as #{person}")
            edit.update_face(word, face_id, not_persons=tuple(sorted({person, *w.not_persons})),
                             person=None if w.person == person else w.person,
                             confirmed=w.confirmed and w.person != person)
        return {"id": person, "removed": face_ids}

    return _edit(store, settings, "remove", {"id": person, "faces": face_ids}, change)


def move(store: FaceStore, settings: ClusterSettings, face_ids: list[int], person: int) -> dict[str, Any]:
    """These faces are PERSON: they are confirmed there and stay with it."""
    def change(edit: Edit, word: Word, txn) -> dict[str, Any]:
        _require_person(store, txn, edit, person)
        current = _require_faces(store, txn, face_ids)
        for face_id in face_ids:
            w = word.of(face_id)
            if person in w.not_persons:
                edit.overrode.append(f"face {face_id} was marked not #{person}")
            if w.ignored:
                edit.overrode.append(f"face {face_id} was ignored")
            if w.person is not None and w.person != person:
                edit.overrode.append(f"face {face_id} was confirmed as #{w.person}")
            edit.update_face(word, face_id, person=person, confirmed=True, ignored=False,
                             not_persons=tuple(p for p in w.not_persons if p != person))
        return {"id": person, "moved": face_ids, "from": current}

    return _edit(store, settings, "move", {"faces": face_ids, "to": person}, change)


def ignore(store: FaceStore, settings: ClusterSettings, face_ids: list[int], ignored: bool = True) -> dict[str, Any]:
    """Not a person worth keeping (or, ``ignored=False``, a person again): never assigned, never counted."""
    def change(edit: Edit, word: Word, txn) -> dict[str, Any]:
        _require_faces(store, txn, face_ids)
        for face_id in face_ids:
            w = word.of(face_id)
            if ignored and w.person is not None:
                edit.overrode.append(f"face {face_id} was confirmed as #{w.person}")
            untie = {"person": None, "confirmed": False} if ignored else {}
            edit.update_face(word, face_id, ignored=ignored, **untie)
        return {"ignored" if ignored else "unignored": face_ids}

    return _edit(store, settings, "ignore" if ignored else "unignore", {"faces": face_ids}, change)


def undo(store: FaceStore, settings: ClusterSettings) -> dict[str, Any]:
    """Take the last edit back: the user's word is restored exactly, and the persons derived from it again."""
    def write(txn) -> dict[str, Any]:
        require_clustered(store, txn)
        entry = pop_last_edit(store, txn) if store.has_table("history") else None
        if entry is None:
            raise ClusteringError("nothing to undo: no edits in the history")
        faces, persons = entry.pop("touched")
        rederive_local(store, txn, settings, faces, persons | _persons_in(entry["args"]))
        return {"undone": entry, "persons": store.person_count(txn)}

    return store.transact(write)


def _persons_in(args: dict[str, Any]) -> set[int]:
    """The persons an edit's arguments name (its history entry's ``args``)."""
    return {int(args[key]) for key in ("id", "keep", "other", "to") if isinstance(args.get(key), int)}


def edit_history(store: FaceStore) -> list[dict[str, Any]]:
    with store.read() as txn:
        return history(store, txn)
