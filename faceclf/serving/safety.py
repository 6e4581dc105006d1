"""Model-file safety, checked before any onnxruntime session exists: the sha256 the registry vouched
for, and external-data locations that must stay inside the model's folder."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import onnx


def check_sha256(data: bytes, expected: str, what: str) -> None:
    """Refuse ``data`` unless its sha256 is ``expected`` (64 hex digits): the file is not the one the registry vouched for."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", expected):
        raise ValueError(f"expected sha256 {expected!r} is not 64 hexadecimal digits")
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        raise ValueError(f"{what} has sha256 {actual}, but {expected.lower()} was expected; refusing to load it")


def _graph_tensors(graph: "onnx.GraphProto") -> Iterator["onnx.TensorProto"]:
    """Every tensor a graph holds: initializers, sparse initializers and node attributes, subgraphs included."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: "onnx.NodeProto") -> Iterator["onnx.TensorProto"]:
    """Tensors in a node's attributes (Constant values, If/Loop/Scan bodies, ...)."""
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors):
            yield from (sparse.values, sparse.indices)
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            yield from _graph_tensors(sub)


def model_tensors(proto: "onnx.ModelProto") -> Iterator["onnx.TensorProto"]:
    """Every tensor of a model, including those inside its local functions."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _outside_problem(location: str, folder: Path) -> str | None:
    """Why an external-data ``location`` is not a file inside ``folder``, or None when it is."""
    if not location:
        return "is empty"
    unified = location.replace("\\", "/")  # ORT on Windows splits on both; be as strict everywhere
    if os.path.isabs(unified) or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive:
        return "is an absolute path"
    target = (folder / unified).resolve()  # resolves '..' and symlinks alike
    if not target.is_relative_to(folder.resolve()):
        return f"resolves to {str(target)!r}, outside the model's folder {str(folder.resolve())!r}"
    return None


def check_external_data(proto: "onnx.ModelProto", path: Path) -> bool:
    """Refuse a model whose tensors point at files outside its own folder; True when it uses external data.

    Checked on the parsed proto (nothing is read from the locations), so a crafted model cannot make
    onnxruntime open an arbitrary file such as ../../secret.bin or /etc/shadow.
    """
    import onnx

    folder = path.resolve().parent
    uses_external = False
    for tensor in model_tensors(proto):
        entries = {e.key: e.value for e in tensor.external_data}
        if tensor.data_location != onnx.TensorProto.EXTERNAL and not entries:
            continue
        uses_external = True
        location = entries.get("location", "")
        problem = _outside_problem(location, folder)
        if problem:
            raise ValueError(f"ONNX model {str(path)!r}: tensor {tensor.name!r} has external data location "
                             f"{location!r}, which {problem}; refusing to load it (expected a file inside {str(folder)!r})")
    return uses_external


def session_source(path: Path, expected_sha256: str | None) -> bytes | str:
    """What onnxruntime may open: the checked bytes, or the path when (in-folder) external data must be found.

    Runs every check before any onnxruntime session exists: the sha256 (when expected) and the
    external-data locations of the parsed model.
    """
    import onnx
    from google.protobuf.message import DecodeError

    data = path.read_bytes()
    if expected_sha256 is not None:
        check_sha256(data, expected_sha256, f"ONNX model {str(path)!r}")
    try:
        proto = onnx.load_model_from_string(data)  # the graph only: external data is never read here
    except DecodeError as e:
        raise ValueError(f"{str(path)!r} is not an ONNX model (cannot parse it: {e})") from None
    return str(path) if check_external_data(proto, path) else data
