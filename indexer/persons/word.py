"""The user's word about persons, kept apart from the derived clustering: what every recluster obeys.

Tables (kept by indexer/store/word.py): ``word`` maps a face id to what the user said of that face (tied to a
person, confirmed, never these persons, ignored); ``names`` maps a person id to the name the user gave it (an empty
name is a removed one); ``history`` lists the edits in order, each with the previous values of every key it wrote,
so ``undo`` restores the word exactly. Only an edit writes these tables, one transaction per edit.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from indexer.store.lmdb_store import FaceStore
from indexer.store.records import from_u64, pack, u64


@dataclass(frozen=True)
class FaceWord:
    """What the user said of one face."""

    person: int | None = None            # tied to this person: it stays with it through every recluster
    confirmed: bool = False              # the user placed it there (move, name, merge of confirmed faces)
    not_persons: tuple[int, ...] = ()    # never these persons (remove)
    ignored: bool = False                # not a person worth keeping (a stranger, a poster)

    def is_empty(self) -> bool:
        return self == FaceWord()

    def to_dict(self) -> dict[str, Any]:
        return {"person": self.person, "confirmed": self.confirmed, "not": list(self.not_persons),
                "ignored": self.ignored}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaceWord:
        return cls(d.get("person"), bool(d.get("confirmed")), tuple(d.get("not", ())), bool(d.get("ignored")))


@dataclass
class Word:
    """What the user said: of faces (all of them, or those read so far when ``read`` is set) and names."""

    faces: dict[int, FaceWord] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)   # person id -> name ("" = the user removed the name)
    read: Callable[[int], FaceWord] | None = field(default=None, repr=False)

    def of(self, face_id: int) -> FaceWord:
        if face_id not in self.faces and self.read is not None:
            self.faces[face_id] = self.read(face_id)
        return self.faces.get(face_id, FaceWord())

    def about(self, face_ids: Iterable[int]) -> dict[int, FaceWord]:
        """The word on ``face_ids`` (faces nothing was said of left out)."""
        return {f: w for f in face_ids if not (w := self.of(f)).is_empty()}


def load_word(store: FaceStore, txn) -> Word:
    """The whole word (a full recluster obeys all of it)."""
    word = Word(names=_names(store, txn))
    for face_id, said in store.face_words(txn):
        word.faces[face_id] = FaceWord.from_dict(said)
    return word


def lazy_word(store: FaceStore, txn) -> Word:
    """The names, and the word on each face read when first asked for (an edit reads only the faces it touches)."""
    def read(face_id: int) -> FaceWord:
        said = store.face_word(txn, face_id)
        return FaceWord() if said is None else FaceWord.from_dict(said)

    return Word(names=_names(store, txn), read=read)


def faces_kept_out_of(store: FaceStore, txn, person: int) -> list[int]:
    """Faces the user said are not ``person`` (one pass over the word, not over the faces)."""
    return [face_id for face_id, said in store.face_words(txn) if person in said.get("not", ())]


def _names(store: FaceStore, txn) -> dict[int, str]:
    return dict(store.name_rows(txn))


class Edit:
    """One edit: writes the word inside the caller's transaction and remembers every previous value for undo."""

    def __init__(self, store: FaceStore, txn, op: str, args: dict[str, Any]) -> None:
        self.store, self.txn, self.op, self.args = store, txn, op, args
        self.undo: list[tuple[str, bytes, bytes | None]] = []
        self.persons: set[int] = set()   # persons the edit is about (an edit re-derives only what it touched)
        self.overrode: list[str] = []
        self._seen: set[tuple[str, bytes]] = set()

    def _write(self, table: str, key: bytes, value: bytes | None) -> None:
        old = self.store.put_word_key(self.txn, table, key, value)
        if (table, key) not in self._seen:  # the value before this edit, once per key
            self._seen.add((table, key))
            self.undo.append((table, key, old))

    def set_face(self, face_id: int, face: FaceWord) -> None:
        self._write("word", u64(face_id), None if face.is_empty() else pack(face.to_dict()))

    def update_face(self, word: Word, face_id: int, **changes: Any) -> FaceWord:
        face = replace(word.of(face_id), **changes)
        word.faces[face_id] = face
        self.set_face(face_id, face)
        return face

    def set_name(self, word: Word, person: int, name: str) -> None:
        word.names[person] = name
        self._write("names", u64(person), pack(name))

    def touched(self) -> tuple[set[int], set[int]]:
        """(faces, persons) whose word this edit wrote, with the persons it is about."""
        return touched_by(self.undo, self.persons)

    def commit(self) -> dict[str, Any]:
        """Append this edit to the history (in the same transaction); returns its entry without the undo data."""
        seq = self.store.get_meta("edit_seq", 0, self.txn) + 1
        self.store.put_meta(self.txn, "edit_seq", seq)
        entry = {"seq": seq, "time": time.time(), "op": self.op, "args": self.args, "overrode": self.overrode,
                 "undo": [[t, k, v] for t, k, v in self.undo]}
        self.store.append_history(self.txn, entry)
        return public_entry(entry)


def touched_by(undo: Iterable[Sequence[Any]], persons: Iterable[int] = ()) -> tuple[set[int], set[int]]:
    """(faces, persons) named by an edit's undo records (table, key, old value)."""
    faces = {from_u64(key) for table, key, _ in undo if table == "word"}
    return faces, {*persons, *(from_u64(key) for table, key, _ in undo if table == "names")}


def public_entry(entry: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in entry.items() if k != "undo"}
    out["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry["time"]))
    return out


def history(store: FaceStore, txn) -> list[dict[str, Any]]:
    return [public_entry(entry) for entry in store.history_entries(txn)]


def pop_last_edit(store: FaceStore, txn) -> dict[str, Any] | None:
    """Restore every key the last edit wrote to its previous value and drop the edit from the history."""
    entry = store.pop_history(txn)
    if entry is None:
        return None
    return {**public_entry(entry), "touched": touched_by(entry["undo"])}
