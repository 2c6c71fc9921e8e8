"""``faceindex people``: see, name and correct persons. Every edit is the user's word: each recluster obeys it.

The same rules as the other commands: parse, one library call, print (text or --json).
"""

from __future__ import annotations

from collections.abc import Callable

import click

from indexer.cli.options import fmt, index_options, json_option, run
from indexer.config import Settings


@click.group()
def people() -> None:
    """See, name and correct persons; every recluster keeps what you say here."""


def _page_options(fn):
    fn = click.option("--limit", type=click.IntRange(min=1), default=None,
                      help="Show at most this many (default: all).")(fn)
    return click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True,
                        help="Skip this many first.")(fn)


@people.command("list")
@_page_options
@index_options
@json_option
def people_list(offset: int, limit: int | None, settings: Settings, as_json: bool) -> None:
    """Persons, largest first, with their names, sizes and cohesion (mean similarity to the center); ignored
    faces left out. Reads one page of the person table: --offset/--limit cost what they show."""
    run(settings, lambda fi: fi.people(offset, limit), as_json, lambda rows: "\n".join(
        f"#{r['id']:<5} {r['size']:>6} faces  cohesion {fmt(r['cohesion'])}  {r['name']}" for r in rows))


@people.command("show")
@click.argument("cluster_id", type=int)
@_page_options
@index_options
@json_option
def people_show(cluster_id: int, offset: int, limit: int | None, settings: Settings, as_json: bool) -> None:
    """The faces of one person, most central first; [x] marks those you confirmed."""
    run(settings, lambda fi: fi.person(cluster_id, offset, limit), as_json, lambda r: "\n".join(
        [f"#{r['id']} {r['name'] or '(unnamed)'}: {r['size']} faces"]
        + [f"  {'[x]' if f['confirmed'] else '[ ]'} {f['similarity']:.3f}  #{f['face_id']:<6} {f['path']}"
           for f in r["faces"]]))


@people.command("name")
@click.argument("cluster_id", type=int)
@click.argument("name")
@index_options
@json_option
def people_name(cluster_id: int, name: str, settings: Settings, as_json: bool) -> None:
    """Name person ID (an empty NAME removes the name); its faces become confirmed and stay with it."""
    run(settings, lambda fi: fi.name(cluster_id, name), as_json, _edited("#{id} is now {name!r}"), mode="edit")


@people.command("merge")
@click.argument("keep", type=int)
@click.argument("other", type=int)
@index_options
@json_option
def people_merge(keep: int, other: int, settings: Settings, as_json: bool) -> None:
    """OTHER is the same person as KEEP: their faces stay together under KEEP from now on."""
    run(settings, lambda fi: fi.merge(keep, other), as_json,
        _edited("merged #{merged} into #{id} ({size} faces) {name}"), mode="edit")




def _edited(text: str) -> Callable[[dict], str]:
    """The text of an edit's result: what it did, then what it overrode."""
    def render(r: dict) -> str:
        return "\n".join([text.format(**r)] + [f"  overrode: {o}" for o in r["overrode"]])

    return render


@people.command("remove")
@click.argument("cluster_id", type=int)
@click.argument("face_ids", type=int, nargs=-1, required=True)
@index_options
@json_option
def people_remove(cluster_id: int, face_ids: tuple[int, ...], settings: Settings, as_json: bool) -> None:
    """These faces are not person ID: they leave it and never rejoin it."""
    run(settings, lambda fi: fi.remove_faces(cluster_id, list(face_ids)), as_json,
        _edited("removed {removed} from #{id}"), mode="edit")


@people.command("move")
@click.argument("face_ids", type=int, nargs=-1, required=True)
@click.option("--to", "cluster_id", type=int, required=True, help="The person these faces are.")
@index_options
@json_option
def people_move(face_ids: tuple[int, ...], cluster_id: int, settings: Settings, as_json: bool) -> None:
    """These faces are person --to ID: confirmed there, they stay with it."""
    run(settings, lambda fi: fi.move_faces(list(face_ids), cluster_id), as_json,
        _edited("moved {moved} to #{id}"), mode="edit")


@people.command("ignore")
@click.argument("face_ids", type=int, nargs=-1, required=True)
@index_options
@json_option
def people_ignore(face_ids: tuple[int, ...], settings: Settings, as_json: bool) -> None:
    """Not a person worth keeping (a stranger, a poster): never assigned, left out of lists, gallery and scores."""
    run(settings, lambda fi: fi.ignore_faces(list(face_ids)), as_json, _edited("ignored {ignored}"), mode="edit")


@people.command("unignore")
@click.argument("face_ids", type=int, nargs=-1, required=True)
@index_options
@json_option
def people_unignore(face_ids: tuple[int, ...], settings: Settings, as_json: bool) -> None:
    """Undo `people ignore` for these faces: they are clustered again."""
    run(settings, lambda fi: fi.ignore_faces(list(face_ids), ignored=False), as_json,
        _edited("unignored {unignored}"), mode="edit")


@people.command("undo")
@index_options
@json_option
def people_undo(settings: Settings, as_json: bool) -> None:
    """Take the last edit back (name, merge, remove, move, ignore, unignore)."""
    run(settings, lambda fi: fi.undo(), as_json,
        lambda r: f"undid edit {r['undone']['seq']}: {r['undone']['op']} {r['undone']['args']}", mode="edit")


@people.command("history")
@index_options
@json_option
def people_history(settings: Settings, as_json: bool) -> None:
    """The edits, oldest first (what `people undo` walks back)."""
    run(settings, lambda fi: fi.history(), as_json, lambda rows: "\n".join(
        f"{r['seq']:>4}  {r['time']}  {r['op']:<9} {r['args']}"
        + "".join(f"\n      overrode: {o}" for o in r["overrode"]) for r in rows) or "no edits yet")
