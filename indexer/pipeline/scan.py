"""Which files are candidates: regular image files under the given roots, hidden and temporary files left out.

Only regular files are candidates: a FIFO, socket or device named ``x.jpg``, a folder named ``x.jpg`` and a broken or
looping symlink are skipped without being opened (a FIFO would block a reader until someone writes to it). A folder
that cannot be listed is skipped with a warning. The walk is iterative, so depth is no limit.
"""

from __future__ import annotations

import fnmatch
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from indexer.errors import NotFoundError

log = logging.getLogger("faceindex.scan")


def ignored(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def scan(paths: Iterable[str | Path], extensions: tuple[str, ...], ignore: tuple[str, ...] = ()) -> Iterator[str]:
    """Absolute paths of image files under ``paths`` (files or folders, recursive, sorted).

    Symlinked folders are not followed (a link could lead out of the tree or into a cycle); symlinked files are
    followed only when they resolve inside one of the given roots.
    """
    for root in paths:
        root = Path(root).expanduser()
        if not root.exists():
            raise NotFoundError(f"{root} does not exist")
        root = root.absolute()
        if root.is_dir():
            yield from _walk(str(root), root.resolve(), extensions, ignore)
        elif root.is_file():
            yield str(root)
        else:
            log.warning("skipped %r: not a regular file or folder", str(root))


def _walk(top: str, real_root: Path, extensions: tuple[str, ...], ignore: tuple[str, ...]) -> Iterator[str]:
    """Depth-first, files of a folder before its subfolders, names sorted: the order ``os.walk`` gave."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            log.warning("skipped folder %r: %s", folder, exc.strerror or exc)
            continue
        subfolders = []
        for entry in entries:
            if ignored(entry.name, ignore):
                continue
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(entry.path)
            elif Path(entry.name).suffix.lower() in extensions and _regular_inside(entry, real_root):
                yield entry.path
        stack.extend(reversed(subfolders))


def _regular_inside(entry: os.DirEntry, real_root: Path) -> bool:
    """A regular file (symlinks followed), and for a symlink one that resolves inside the root."""
    try:
        if not entry.is_file():  # False for FIFOs, sockets, devices, folders, broken and looping links
            return False
        return not entry.is_symlink() or Path(entry.path).resolve().is_relative_to(real_root)
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, on Pythons where resolve() raises it
        return False
