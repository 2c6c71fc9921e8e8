"""Which files are candidates: image files under the given roots, hidden and temporary files left out."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from indexer.errors import NotFoundError


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
        if root.is_file():
            yield str(root)
            continue
        real_root = root.resolve()
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not ignored(d, ignore))
            for name in sorted(filenames):
                if ignored(name, ignore) or Path(name).suffix.lower() not in extensions:
                    continue
                full = os.path.join(dirpath, name)
                if os.path.islink(full) and not Path(full).resolve().is_relative_to(real_root):
                    continue
                yield full
