"""What faceindex uses of facenet-pytorch beyond its public API is listed in indexer/models/facenet_api.py alone,
and is all there in the installed release."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from indexer.errors import DependencyError
from indexer.models import facenet_api

REPO = Path(__file__).resolve().parent.parent


def test_every_private_helper_and_network_attribute_we_use_exists():
    gone = facenet_api.missing()
    assert not gone, (f"this facenet-pytorch lacks {', '.join(gone)}, which faceindex uses; keep the version "
                      "requirements.lock pins, or port the callers listed in indexer/models/facenet_api.py")


def test_facenet_pytorchs_internals_are_imported_in_one_place():
    offenders = []
    for path in [*(REPO / "indexer").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("facenet_pytorch.models"):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"import facenet-pytorch's internals through indexer.models.facenet_api: {offenders}"


def test_a_helper_a_release_dropped_is_one_clear_error(monkeypatch):
    import facenet_pytorch.models.utils.detect_face as detect_face

    monkeypatch.delattr(detect_face, "rerec")
    with pytest.raises(DependencyError, match=r"no facenet_pytorch\.models\.utils\.detect_face\.rerec.*make install"):
        facenet_api.helper("rerec")
    assert facenet_api.missing() == [f"{facenet_api.DETECT_FACE}.rerec"]
