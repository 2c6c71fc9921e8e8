"""A self-contained static HTML gallery of clusters: one page, inline CSS, thumbnails beside it, no scripts.

The page must open from file:// on a machine without network, so nothing is fetched from a CDN and nothing runs:
a Content-Security-Policy forbids scripts and remote loads outright, as a second line behind escaping every file
name, path and person name (users name persons, and photos can be named anything). The markup is the Jinja2
template ``templates/gallery.html``, rendered with autoescape on, so no value reaches the page unescaped; this module
only works out what to show.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

from indexer.display import display
from indexer.store.integrity import thumbnail_ok

log = logging.getLogger("faceindex.report")
UNASSIGNED = -1
THUMBS_DIR = "thumbs"
_THUMB_NAME = re.compile(r"^\d+\.jpg$")

# No scripts, nothing from the network: images only from this folder and the photos (file:).
CSP = "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class ReportFace:
    face_id: int
    path: str  # absolute path of the original photo
    box: tuple[float, float, float, float]
    cluster: int  # -1 = unassigned
    similarity: float  # cosine to its cluster center (nan when unassigned)
    thumbnail: bytes  # small JPEG (e.g. 96x96) of the face


@dataclass(frozen=True)
class ClusterSection:
    cluster: int
    title: str
    size: int
    cohesion: float  # mean similarity to the center over all members (nan for the unassigned)
    shown: list[ReportFace]


def select_shown(members: list[ReportFace], cap: int) -> list[ReportFace]:
    """At most ``cap`` members, most similar first.

    A large cluster shows an even spread over its similarity ranks (the most central face, the least central one,
    and evenly spaced ones between) rather than only its core: the outliers are where mistakes in a cluster show.
    Unassigned faces have no similarity and keep face-id order.
    """
    ordered = sorted(members, key=lambda f: (-_sim_key(f.similarity), f.face_id))
    if len(ordered) <= cap:
        return ordered
    if cap <= 0:
        return []
    if members and members[0].cluster == UNASSIGNED:
        return ordered[:cap]
    ranks = np.unique(np.linspace(0, len(ordered) - 1, cap).round().astype(int))
    return [ordered[int(r)] for r in ranks]


def _sim_key(similarity: float) -> float:
    return similarity if math.isfinite(similarity) else -math.inf


def plan_sections(faces: list[ReportFace], names: dict[int, str], cap: int) -> list[ClusterSection]:
    """Clusters largest first (ties by id), the unassigned faces last."""
    groups: dict[int, list[ReportFace]] = {}
    for face in faces:
        groups.setdefault(face.cluster, []).append(face)
    order = sorted((c for c in groups if c != UNASSIGNED), key=lambda c: (-len(groups[c]), c))
    if UNASSIGNED in groups:
        order.append(UNASSIGNED)
    sections = []
    for cluster in order:
        members = groups[cluster]
        sims = [f.similarity for f in members if math.isfinite(f.similarity)]
        cohesion = float(np.mean(sims)) if sims and cluster != UNASSIGNED else math.nan
        if cluster == UNASSIGNED:
            title = "Unassigned faces"
        elif names.get(cluster):
            title = f"{names[cluster]} (cluster #{cluster})"
        else:
            title = f"Cluster #{cluster}"
        sections.append(ClusterSection(cluster, title, len(members), cohesion, select_shown(members, cap)))
    return sections


def write_thumbnails(out_dir: Path, sections: list[ClusterSection]) -> dict[int, str]:
    """thumbs/<face_id>.jpg for every shown face with a thumbnail; returns face id -> relative path.

    Thumbnails of an earlier report into the same folder that are not shown now are removed, so the folder holds
    exactly what the page references (only files named like ours are touched).
    """
    thumbs = out_dir / THUMBS_DIR
    thumbs.mkdir(parents=True, exist_ok=True)
    written: dict[int, str] = {}
    for section in sections:
        for face in section.shown:
            if not face.thumbnail:
                continue
            if not thumbnail_ok(face.thumbnail):
                log.warning("face %d: stored thumbnail is damaged; shown without it", face.face_id)
                continue
            name = f"{int(face.face_id)}.jpg"
            # A plain write, not atomic_write: thumbnails are rewritten by every report, and the page naming them
            # is written (atomically) after them; thousands of fsyncs would buy nothing.
            (thumbs / name).write_bytes(face.thumbnail)
            written[face.face_id] = f"{THUMBS_DIR}/{name}"
    keep = {Path(p).name for p in written.values()}
    for old in thumbs.iterdir():
        if _THUMB_NAME.match(old.name) and old.name not in keep and old.is_file():
            old.unlink()
    return written


def photo_uri(path: str) -> str | None:
    """file:// URI of the original photo (percent-encoded by pathlib), or None for a path that is not absolute."""
    p = Path(path)
    return p.as_uri() if p.is_absolute() else None


def render_html(*, title: str, sections: list[ClusterSection], thumbs: dict[int, str], metrics: dict,
                plots: dict[str, str], skipped: dict[str, str], n_faces: int, projection: dict) -> str:
    n_clusters = sum(1 for s in sections if s.cluster != UNASSIGNED)
    n_unassigned = sum(s.size for s in sections if s.cluster == UNASSIGNED)
    n_shown = sum(len(s.shown) for s in sections)
    summary = [
        ("faces", f"{n_faces:,}"),
        ("clusters", f"{n_clusters:,}"),
        ("unassigned faces", f"{n_unassigned:,}"),
        ("thumbnails shown", f"{n_shown:,}"),
        ("silhouette", _score(metrics.get("silhouette"))),
        ("Davies-Bouldin", _score(metrics.get("davies_bouldin"))),
        ("Calinski-Harabasz", _score(metrics.get("calinski_harabasz"), 1)),
        ("projection sample", f"{projection.get('sample', 0):,} of {projection.get('of', n_faces):,} faces"),
    ]
    page = _template().render(title=display(title), csp=CSP, summary=summary, plots=plots, skipped=skipped,
                              sections=[_section_view(s, thumbs) for s in sections])
    # markupsafe writes quotes as &#34; / &#39;, html.escape (which built this page before) as &quot; / &#x27;.
    # The same characters to a browser; kept as they were so pages stay byte-identical across the change. Safe to
    # rewrite blindly: an "&" in any value is itself escaped to "&amp;", so these sequences only come from escaping.
    return page.replace("&#34;", "&quot;").replace("&#39;", "&#x27;")


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("indexer.report", "templates"),
        autoescape=True,  # every value is user data (file names, person names): escaped unless proven otherwise
        undefined=jinja2.StrictUndefined,  # a misspelt field fails loudly instead of rendering empty
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
    )
    return env.get_template("gallery.html")


def _anchor(cluster: int) -> str:
    return "unassigned" if cluster == UNASSIGNED else f"cluster-{int(cluster)}"


def _section_view(section: ClusterSection, thumbs: dict[int, str]) -> dict[str, Any]:
    """What the template shows of one section: plain text only, the template escapes all of it."""
    facts = [f"{section.size:,} faces"]
    if math.isfinite(section.cohesion):
        facts.append(f"cohesion {section.cohesion:.3f}")
    if len(section.shown) < section.size:
        how = "first by face id" if section.cluster == UNASSIGNED else "a spread of similarities to the center"
        facts.append(f"showing {len(section.shown):,} of {section.size:,} ({how})")
    faces = [{
        "name": display(Path(face.path).name),
        "tip": f"face {face.face_id} · {display(face.path)}",
        "caption": f"{face.similarity:.2f}" if math.isfinite(face.similarity) else f"id {face.face_id}",
        "thumb": thumbs[face.face_id] if face.face_id in thumbs else None,
        "uri": photo_uri(face.path),
    } for face in section.shown]
    return {"anchor": _anchor(section.cluster), "unassigned": section.cluster == UNASSIGNED,
            "title": display(section.title),
            "size": f"{section.size:,}", "facts": " · ".join(facts), "faces": faces}


def _score(value: object, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.{digits}f}" if math.isfinite(number) else "n/a"
