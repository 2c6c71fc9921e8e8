"""The persons half of ``FaceIndex`` (library.py): reclusters, the views of persons and the edits, each a thin
call into ``indexer.persons`` (imported when first used: ``status`` and ``query`` never load them)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexer.config import Settings
    from indexer.store.lmdb_store import FaceStore
    from indexer.store.sync import SyncedIndex


class PersonsFacade:
    """Methods of ``FaceIndex`` about persons; they use its ``store``, ``settings`` and ``vectors``."""

    store: FaceStore
    settings: Settings
    vectors: SyncedIndex

    def cluster(self, method: str | None = None, k: int | str | None = None, threshold: float | None = None,
                local: bool = False) -> dict[str, Any]:
        """Recluster every face now; ``local``: only what changed since the last recluster (what the daemon runs,
        persons/local.py), with the index's own FAISS index for the neighbours of the new faces."""
        if local:
            from indexer.persons.local import local_recluster

            done = local_recluster(self.store, self.settings.cluster, self.vectors.index.search)
            return {"local": True, "fresh": 0, **(done or {})}
        from indexer.persons.recluster import recluster

        return recluster(self.store, self.settings.cluster, method, k, threshold)

    # Persons as the user sees them (persons/people.py): each reads the person tables for what it shows.
    def people(self, offset: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Persons, largest first: a page of the person tables."""
        return self._people_module().people(self.store, offset, limit)

    def people_page(self, show: str = "all", query: str = "", offset: int = 0, limit: int = 120) -> dict[str, Any]:
        """The People page's persons: named first, ``show`` all/named/unnamed, ``query`` a name part or #id."""
        return self._people_module().people_page(self.store, show, query, offset, limit)

    def person(self, cluster_id: int, offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        return self._people_module().person(self.store, cluster_id, offset, limit)

    def outline(self, cluster_id: int) -> dict[str, Any]:
        """One person's faces as (face id, similarity, confirmed), most central first; ``face_rows`` reads a page."""
        return self._people_module().outline(self.store, cluster_id)

    def face_rows(self, faces: list[tuple[int, float, bool]]) -> list[dict[str, Any]]:
        return self._people_module().face_rows(self.store, faces)

    @staticmethod
    def _people_module() -> Any:
        from indexer.persons import people

        return people

    def photo(self, face_id: int) -> dict[str, Any]:
        """The photo of a stored face: path, size, and its faces with their persons."""
        return self._people_module().photo(self.store, face_id)

    def thumbnail(self, face_id: int) -> bytes:
        return self._people_module().thumbnail(self.store, face_id)

    def name(self, cluster_id: int, name: str) -> dict[str, Any]:
        return self._edits().name(self.store, self.settings.cluster, cluster_id, name)

    def merge(self, keep: int, other: int) -> dict[str, Any]:
        return self._edits().merge(self.store, self.settings.cluster, keep, other)

    def remove_faces(self, cluster_id: int, face_ids: list[int]) -> dict[str, Any]:
        return self._edits().remove(self.store, self.settings.cluster, cluster_id, face_ids)

    def move_faces(self, face_ids: list[int], cluster_id: int) -> dict[str, Any]:
        return self._edits().move(self.store, self.settings.cluster, face_ids, cluster_id)

    def ignore_faces(self, face_ids: list[int], ignored: bool = True) -> dict[str, Any]:
        return self._edits().ignore(self.store, self.settings.cluster, face_ids, ignored)

    def undo(self) -> dict[str, Any]:
        return self._edits().undo(self.store, self.settings.cluster)

    def history(self) -> list[dict[str, Any]]:
        return self._edits().edit_history(self.store)

    @staticmethod
    def _edits() -> Any:
        from indexer.persons import edits

        return edits

