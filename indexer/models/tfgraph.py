"""Read the constant tensors of a frozen TensorFlow graph (a ``GraphDef`` protobuf) without TensorFlow or OpenCV.

A frozen graph is a protobuf message whose weights are ``Const`` nodes holding a ``TensorProto``. Only the few
fields needed for that are decoded here, straight from the protobuf wire format (varints and length-delimited
fields, https://protobuf.dev/programming-guides/encoding/); every other field is skipped by its wire type. Field
numbers are those of tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape,types}.proto:

    GraphDef      1 node (NodeDef, repeated)
    NodeDef       1 name, 2 op, 3 input (repeated), 5 attr (map<string, AttrValue>: entry 1 key, 2 value)
    AttrValue     6 type (DataType), 8 tensor (TensorProto)
    TensorProto   1 dtype, 2 tensor_shape, 4 tensor_content (raw little-endian), 5 float_val (packed or not),
                  7 int_val
    TensorShape   2 dim (repeated Dim: 1 size)

A damaged or foreign file raises ``GraphFormatError`` with what was wrong; nothing here raises anything else.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# TensorFlow DataType enum values (types.proto) this reader decodes, and their little-endian numpy types.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),   # DT_FLOAT
    2: np.dtype("<f8"),   # DT_DOUBLE
    3: np.dtype("<i4"),   # DT_INT32
    9: np.dtype("<i8"),   # DT_INT64
}
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
MAX_GRAPH_BYTES = 1 << 30  # a GraphDef is capped at 2 GiB by protobuf itself; ours is 94 MB


class GraphFormatError(ValueError):
    """The bytes are not a frozen TensorFlow graph this reader can decode."""


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str] = field(default_factory=list)
    tensor: np.ndarray | None = None  # the value of a Const node


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise GraphFormatError("a varint runs past the end of its message")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise GraphFormatError("a varint is longer than 10 bytes")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of each field of one message; LEN values are views into ``buf``."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise GraphFormatError("a field number of 0")
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise GraphFormatError("a length-delimited field runs past the end of its message")
            yield number, wire, buf[pos:pos + size]
            pos += size
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            if pos + size > end:
                raise GraphFormatError("a fixed-size field runs past the end of its message")
            yield number, wire, buf[pos:pos + size]
            pos += size
        else:  # 3 and 4 (groups) are not used by TensorFlow's protos; 6 and 7 do not exist
            raise GraphFormatError(f"wire type {wire} of field {number} is not one a GraphDef uses")


def _text(value: int | memoryview) -> str:
    if not isinstance(value, memoryview):
        raise GraphFormatError("a string field is not length-delimited")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise GraphFormatError("a name is not UTF-8") from None


def _shape(buf: memoryview) -> tuple[int, ...]:
    dims: list[int] = []
    for number, _, value in _fields(buf):
        if number == 2 and isinstance(value, memoryview):
            size = next((v for n, w, v in _fields(value) if n == 1 and w == _VARINT), 0)
            dims.append(int(size) - (1 << 64) if size >= 1 << 63 else int(size))  # int64 as two's complement
    if any(d < 0 for d in dims):
        raise GraphFormatError(f"a constant of unknown shape {dims}")
    return tuple(dims)


def _tensor(buf: memoryview) -> np.ndarray:
    dtype_code, shape, content = 0, (), None
    floats: list[float] = []
    ints: list[int] = []
    for number, wire, value in _fields(buf):
        if number == 1 and wire == _VARINT:
            dtype_code = int(value)  # type: ignore[arg-type]
        elif number == 2 and isinstance(value, memoryview):
            shape = _shape(value)
        elif number == 4 and isinstance(value, memoryview):
            content = bytes(value)
        elif number == 5 and isinstance(value, memoryview):
            if wire == _LEN:  # packed
                if len(value) % 4:
                    raise GraphFormatError("packed float_val is not a whole number of floats")
                floats.extend(struct.unpack(f"<{len(value) // 4}f", value))
            else:
                floats.append(struct.unpack("<f", value)[0])
        elif number == 7:
            if isinstance(value, memoryview):  # packed varints
                pos = 0
                while pos < len(value):
                    v, pos = _varint(value, pos)
                    ints.append(v - (1 << 64) if v >= 1 << 63 else v)
            else:
                ints.append(value - (1 << 64) if value >= 1 << 63 else value)
    if dtype_code not in DTYPES:
        raise GraphFormatError(f"a constant of TensorFlow dtype {dtype_code}, which this reader does not decode")
    dtype, count = DTYPES[dtype_code], int(np.prod(shape, dtype=np.int64))
    if content is not None:
        if len(content) != count * dtype.itemsize:
            raise GraphFormatError(f"a constant of shape {shape} holds {len(content)} bytes")
        return np.frombuffer(content, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    values = floats if dtype.kind == "f" else ints
    if len(values) == count:
        return np.asarray(values, dtype=dtype).reshape(shape)
    if len(values) == 1:  # TensorFlow stores a constant filled with one value as that value alone
        return np.full(shape, values[0], dtype=dtype)
    if not values and count == 0:
        return np.zeros(shape, dtype=dtype)
    raise GraphFormatError(f"a constant of shape {shape} holds {len(values)} values")


def _node(buf: memoryview) -> Node:
    node = Node(name="", op="")
    for number, _, value in _fields(buf):
        if number == 1:
            node.name = _text(value)
        elif number == 2:
            node.op = _text(value)
        elif number == 3:
            node.inputs.append(_text(value))
        elif number == 5 and isinstance(value, memoryview):
            key, attr = "", None
            for n, _, v in _fields(value):
                if n == 1:
                    key = _text(v)
                elif n == 2 and isinstance(v, memoryview):
                    attr = v
            if key == "value" and attr is not None:
                for n, _, v in _fields(attr):
                    if n == 8 and isinstance(v, memoryview):
                        node.tensor = _tensor(v)
    if not node.name or not node.op:
        raise GraphFormatError("a node without a name or an op")
    return node


def read_graph(data: bytes) -> list[Node]:
    """Every node of a serialised ``GraphDef``, in file order; Const nodes carry their tensor."""
    if not data:
        raise GraphFormatError("the file is empty")
    nodes = [_node(value) for number, _, value in _fields(memoryview(data))
             if number == 1 and isinstance(value, memoryview)]
    if not nodes:
        raise GraphFormatError("no graph nodes in it")
    return nodes


def load_graph(path: Path) -> list[Node]:
    """``read_graph`` of a file; OSError is the caller's to report."""
    if path.stat().st_size > MAX_GRAPH_BYTES:
        raise GraphFormatError(f"{path.stat().st_size} bytes, more than a GraphDef can hold")
    return read_graph(path.read_bytes())
