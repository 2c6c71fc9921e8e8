"""A self-contained static HTML gallery of clusters: one page, inline CSS, thumbnails beside it, no scripts.

The page must open from file:// on a machine without network, so nothing is fetched from a CDN and nothing runs:
a Content-Security-Policy forbids scripts and remote loads outright, as a second line behind escaping every file
name, path and person name with ``html.escape`` (users name persons, and photos can be named anything).
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNASSIGNED = -1
THUMBS_DIR = "thumbs"
_THUMB_NAME = re.compile(r"^\d+\.jpg$")

CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f6f7f9;color:#222}
header,section{margin:16px auto;max-width:1200px;padding:12px 20px;background:#fff;border-radius:8px;
 box-shadow:0 1px 3px rgba(0,0,0,.08)}
h1{font-size:22px;margin:4px 0 8px}h2{font-size:17px;margin:2px 0 6px}
table.summary td{padding:2px 14px 2px 0}.muted{color:#666}.note{color:#8a5a00}
.plots{display:flex;flex-wrap:wrap;gap:10px;margin-top:10px}
.plots img{height:300px;width:auto;max-width:100%;border:1px solid #ddd}
nav .chip{display:inline-block;margin:0 14px 2px 0;white-space:nowrap}
.grid{display:flex;flex-wrap:wrap;gap:6px}
.grid figure{margin:0;width:96px;font-size:11px;text-align:center;color:#555}
img.face{width:96px;height:96px;object-fit:cover;border-radius:4px;display:block;background:#ddd}
section.unassigned{background:#fbfbf4}
"""
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


def esc(value: object) -> str:
    """Text or attribute value made inert; quotes too, since every attribute is double-quoted."""
    return html.escape(str(value), quote=True)


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
            name = f"{int(face.face_id)}.jpg"
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
    rows = [
        ("faces", f"{n_faces:,}"),
        ("clusters", f"{n_clusters:,}"),
        ("unassigned faces", f"{n_unassigned:,}"),
        ("thumbnails shown", f"{n_shown:,}"),
        ("silhouette", _score(metrics.get("silhouette"))),
        ("Davies-Bouldin", _score(metrics.get("davies_bouldin"))),
        ("Calinski-Harabasz", _score(metrics.get("calinski_harabasz"), 1)),
        ("projection sample", f"{projection.get('sample', 0):,} of {projection.get('of', n_faces):,} faces"),
    ]
    out = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        '<header id="summary">',
        f"<h1>{esc(title)}</h1>",
        '<table class="summary">',
        *(f"<tr><td>{esc(k)}</td><td><b>{esc(v)}</b></td></tr>" for k, v in rows),
        "</table>",
        '<div class="plots">',
        *(f'<a href="{esc(rel)}"><img class="plot" src="{esc(rel)}" alt="{esc(name)} plot"></a>'
          for name, rel in plots.items()),
        "</div>",
        *(f'<p class="note">{esc(name)}: skipped ({esc(why)})</p>' for name, why in skipped.items()),
        _nav(sections),
        "</header>",
    ]
    for section in sections:
        out.extend(_section(section, thumbs))
    out.extend(["</body>", "</html>", ""])
    return "\n".join(out)


def _nav(sections: list[ClusterSection]) -> str:
    links = "\n".join(f'<span class="chip"><a href="#{_anchor(s.cluster)}">{esc(s.title)}</a> '
                      f'<span class="muted">({s.size:,})</span></span>' for s in sections)
    return f"<nav><p>{links}</p></nav>" if links else '<p class="muted">No faces.</p>'


def _anchor(cluster: int) -> str:
    return "unassigned" if cluster == UNASSIGNED else f"cluster-{int(cluster)}"


def _section(section: ClusterSection, thumbs: dict[int, str]) -> list[str]:
    cls = ' class="unassigned"' if section.cluster == UNASSIGNED else ""
    facts = [f"{section.size:,} faces"]
    if math.isfinite(section.cohesion):
        facts.append(f"cohesion {section.cohesion:.3f}")
    if len(section.shown) < section.size:
        how = "first by face id" if section.cluster == UNASSIGNED else "a spread of similarities to the center"
        facts.append(f"showing {len(section.shown):,} of {section.size:,} ({how})")
    out = [f'<section id="{_anchor(section.cluster)}"{cls}>',
           f"<h2>{esc(section.title)}</h2>",
           f'<p class="muted">{esc(" · ".join(facts))}</p>',
           '<div class="grid">']
    for face in section.shown:
        name = Path(face.path).name
        caption = f"{face.similarity:.2f}" if math.isfinite(face.similarity) else f"id {face.face_id}"
        tip = f"face {face.face_id} · {face.path}"
        img = (f'<img class="face" src="{esc(thumbs[face.face_id])}" alt="{esc(name)}" loading="lazy">'
               if face.face_id in thumbs else '<span class="face-missing">no thumbnail</span>')
        uri = photo_uri(face.path)
        if uri:
            img = f'<a href="{esc(uri)}" title="{esc(tip)}">{img}</a>'
        out.append(f'<figure title="{esc(tip)}">{img}<figcaption>{esc(caption)}</figcaption></figure>')
    out.extend(["</div>", "</section>"])
    return out


def _score(value: object, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)
    return f"{number:.{digits}f}" if math.isfinite(number) else "n/a"
