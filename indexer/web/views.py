"""What a page shows, worked out from the library's answers: pure functions (filter, order, page), no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SHOW = ("all", "unnamed", "named")


@dataclass(frozen=True)
class Page:
    items: list[Any]
    number: int   # 1-based, clamped to the pages there are
    pages: int
    total: int


def paginate(items: list[Any], number: int, per_page: int) -> Page:
    pages = max(1, math.ceil(len(items) / per_page))
    number = min(max(1, number), pages)
    return Page(items[(number - 1) * per_page:number * per_page], number, pages, len(items))


def page_of(items: list[Any], number: int, per_page: int, total: int) -> Page:
    """A page the library already cut (``items`` are page ``number`` of ``total``)."""
    pages = max(1, math.ceil(total / per_page))
    return Page(items, min(max(1, number), pages), pages, total)


def matches(row: dict[str, Any], query: str) -> bool:
    """A person matches ``query`` by a part of its name (any case) or by its id (``12`` or ``#12``)."""
    query = query.strip()
    if not query:
        return True
    if query.lstrip("#").isdigit():
        return row["id"] == int(query.lstrip("#"))
    return query.casefold() in row["name"].casefold()


def order_people(rows: list[dict[str, Any]], show: str = "all", query: str = "") -> list[dict[str, Any]]:
    """The People page's order: named persons first, each group largest first (ties by id); ``show`` keeps the
    unnamed or the named only, ``query`` those matching it."""
    kept = [r for r in rows if (show != "unnamed" or not r["name"]) and (show != "named" or r["name"])
            and matches(r, query)]
    return sorted(kept, key=lambda r: (not r["name"], -r["size"], r["id"]))


def candidates(rows: list[dict[str, Any]], query: str, exclude: int, limit: int = 20) -> list[dict[str, Any]]:
    """Persons to merge into: matching ``query``, not ``exclude``, named and large first."""
    if not query.strip():
        return []
    return [r for r in order_people(rows, "all", query) if r["id"] != exclude][:limit]


def split_faces(faces: list[Any]) -> tuple[list[Any], list[Any]]:
    """A person's faces: those the user placed there (confirmed), and those the clusterer suggested. A face is a
    record (``confirmed`` key) or an outline entry (face id, similarity, confirmed)."""
    def confirmed(face: Any) -> bool:
        return bool(face["confirmed"] if isinstance(face, dict) else face[2])

    return [f for f in faces if confirmed(f)], [f for f in faces if not confirmed(f)]


def box_view(box: list[float], width: int, height: int) -> dict[str, float]:
    """A face box as SVG rectangle attributes in the photo's pixel space (clipped to the photo)."""
    x1, y1, x2, y2 = (max(0.0, v) for v in box)
    if width and height:
        x2, y2 = min(x2, float(width)), min(y2, float(height))
    return {"x": round(x1, 1), "y": round(y1, 1), "w": round(max(0.0, x2 - x1), 1), "h": round(max(0.0, y2 - y1), 1)}
