"""A small ONNX graph builder: named nodes, deduplicated constants, opset-17 helpers.

The export writes graphs node by node from the model's weights (no tracing), so every graph is exact for every
input and has no Python control flow baked in. Node names follow the model's structure ("layer3/mixer/MatMul_2")
so checker, ONNX Runtime and TensorRT messages point at a place in the model.
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17  # the lowest the issue allows: TensorRT 10.x on JetPack 6 and older ONNX Runtimes all read it

FLOAT, FLOAT16, INT32, INT64, BOOL = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64, \
    TensorProto.BOOL
NP_DTYPES = {FLOAT: np.float32, FLOAT16: np.float16, INT32: np.int32, INT64: np.int64, BOOL: np.bool_}
DTYPE_NAMES = {FLOAT: "float32", FLOAT16: "float16", INT32: "int32", INT64: "int64", BOOL: "bool"}


class Builder:
    """Collects the nodes (and, for a main graph, the initializers) of one graph, function body or subgraph.

    `prefix` keeps value names of nested bodies apart from the outer graph's (ONNX forbids shadowing)."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._scope: list[str] = []
        self._count: dict[str, int] = {}

    # ---- naming ------------------------------------------------------------------------------------------------
    def _unique(self, base: str) -> str:
        n = self._count.get(base, 0)
        self._count[base] = n + 1
        return base if n == 0 else f"{base}_{n}"

    def fresh(self, hint: str) -> str:
        return self._unique(self.prefix + "/".join(self._scope + [hint]))

    @contextmanager
    def scope(self, name: str):
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    # ---- nodes ---------------------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: str, n_out: int = 1, domain: str = "", outputs: list[str] | None = None,
           **attrs):
        """Add one node; returns its output name (or the list of names when n_out > 1)."""
        name = self.fresh(op_type)
        outs = outputs if outputs is not None else [name if n_out == 1 else f"{name}:{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def const(self, value, dtype: int) -> str:
        """A Constant node (allowed in function bodies and subgraphs, unlike initializers); one per value."""
        arr = np.asarray(value, dtype=NP_DTYPES[dtype])
        key = (dtype, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.nodes.append(helper.make_node("Constant", [], [name], name=name,
                                               value=numpy_helper.from_array(arr, name)))
            self._consts[key] = name
        return self._consts[key]

    def i64(self, *values) -> str:
        return self.const(list(values), INT64)

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def attr_const(self, attr: str, kind: int) -> str:
        """A Constant whose value is the enclosing function's attribute `attr` (a function body only)."""
        field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.FLOAT: "value_float"}[kind]
        name = self.fresh(attr)
        node = helper.make_node("Constant", [], [name], name=name)
        ref = helper.make_attribute_ref(field, kind)
        ref.ref_attr_name = attr
        node.attribute.append(ref)
        self.nodes.append(node)
        return name

    # ---- opset-17 helpers ------------------------------------------------------------------------------------------
    def cast(self, x: str, to: int) -> str:
        return self.op("Cast", x, to=to)

    def unsqueeze(self, x: str, *axes: int) -> str:
        return self.op("Unsqueeze", x, self.i64(*axes))

    def squeeze(self, x: str, *axes: int) -> str:
        return self.op("Squeeze", x, self.i64(*axes))

    def reduce_sum(self, x: str, axis: int, keepdims: bool = False) -> str:
        return self.op("ReduceSum", x, self.i64(axis), keepdims=int(keepdims))

    def reduce_max(self, x: str, axis: int, keepdims: bool = False) -> str:
        return self.op("ReduceMax", x, axes=[axis], keepdims=int(keepdims))      # axes is an attribute up to opset 17

    def reduce_mean(self, x: str, axis: int, keepdims: bool = False) -> str:
        return self.op("ReduceMean", x, axes=[axis], keepdims=int(keepdims))

    def slice(self, x: str, start: int, end: int, axis: int) -> str:
        return self.op("Slice", x, self.i64(start), self.i64(end), self.i64(axis))

    def split(self, x: str, sizes: list[int], axis: int) -> list[str]:
        out = self.op("Split", x, self.i64(*sizes), n_out=len(sizes), axis=axis)
        return out if isinstance(out, list) else [out]

    def reshape(self, x: str, shape: str | list[int]) -> str:
        return self.op("Reshape", x, shape if isinstance(shape, str) else self.i64(*shape))

    def dim(self, x: str, axis: int) -> str:
        """Size of one axis as an int64 [1] tensor."""
        return self.op("Shape", x, start=axis, end=axis + 1) if axis != -1 else self.op("Shape", x, start=-1)

    def silu(self, x: str) -> str:
        return self.op("Mul", x, self.op("Sigmoid", x))

    def where(self, cond: str, a: str, b: str) -> str:
        return self.op("Where", cond, a, b)


def value_info(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, list(shape))
