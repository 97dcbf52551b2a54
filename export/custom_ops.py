"""The four `memmamba` custom ops of export/contract.py as ONNX nodes with model-local function bodies.

`emit` adds a node exactly as the contract table says (op_type, domain, input/output arity, typed attributes, plus
the string attributes `plugin_version` and `plugin_namespace` TensorRT's parser reads). `functions(act)` returns the
FunctionProtos whose bodies are the reference math of models/ops (scan.py, pool.py) in standard ONNX ops,
specialised to the graph's activation dtype: ONNX Runtime runs them, TensorRT's parser takes the registered plugin
instead (10.7 on; from 10.15 only for nodes that carry `plugin_namespace`, hence the attribute), and
`--flavor portable` inlines them (onnx.inliner). Per spec §9 the bodies compute exp, softplus, the scan's
accumulation and the softmax in fp32 whatever the activation dtype.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import AttributeProto, helper

from .contract import CUSTOM_OPS, DOMAIN, OPSET_VERSION, PLUGIN_NAMESPACE
from .onnx_builder import BOOL, FLOAT, INT32, INT64, OPSET, Builder, value_info

PLUGIN_VERSION_ATTR = "plugin_version"  # onnx-tensorrt: attrs.get<std::string>("plugin_version", "1")
# onnx-tensorrt (10.15 on) imports a node as a plugin before its local function only where the node has this
# attribute (or the parser's ENABLE_PLUGIN_OVERRIDE flag is set); it is also the namespace the lookup uses
PLUGIN_NAMESPACE_ATTR = "plugin_namespace"
_ATTR_KIND = {"int": AttributeProto.INT, "float": AttributeProto.FLOAT}


def emit(b: Builder, op_name: str, *inputs: str, **attrs) -> list[str]:
    """Add one custom node; returns its output names. Raises if the call does not fit the contract table."""
    op = CUSTOM_OPS[op_name]
    if len(inputs) != len(op.inputs):
        raise ValueError(f"{op_name} takes {len(op.inputs)} inputs ({[t.name for t in op.inputs]}), got {len(inputs)}")
    want = {a.name: a.kind for a in op.attributes}
    if set(attrs) != set(want):
        raise ValueError(f"{op_name} takes attributes {sorted(want)}, got {sorted(attrs)}")
    typed = {k: (int(v) if want[k] == "int" else float(v)) for k, v in attrs.items()}
    name = b.fresh(op_name)
    outs = [f"{name}:{t.name}" for t in op.outputs]
    tensorrt = {PLUGIN_VERSION_ATTR: op.version, PLUGIN_NAMESPACE_ATTR: PLUGIN_NAMESPACE}
    b.nodes.append(helper.make_node(op_name, list(inputs), outs, name=name, domain=DOMAIN, **typed, **tensorrt))
    return outs


# ---- function bodies -------------------------------------------------------------------------------------------------
def _function(name: str, b: Builder) -> onnx.FunctionProto:
    op = CUSTOM_OPS[name]
    return helper.make_function(DOMAIN, name, [t.name for t in op.inputs], [t.name for t in op.outputs], b.nodes,
                                [helper.make_opsetid("", OPSET)],
                                attributes=[a.name for a in op.attributes]
                                + [PLUGIN_VERSION_ATTR, PLUGIN_NAMESPACE_ATTR])


def _dt(b: Builder, dt: str, dt_bias: str) -> str:
    """fp32 dt + dt_bias, then softplus when the node's dt_softplus attribute is 1 (models.ops.scan)."""
    dt = b.op("Add", b.cast(dt, FLOAT), dt_bias)
    use_softplus = b.cast(b.attr_const("dt_softplus", AttributeProto.INT), BOOL)
    return b.where(use_softplus, b.op("Softplus", dt), dt)


def _selective_scan_step(act: int) -> onnx.FunctionProto:
    """selective_state_step_ref: h = exp(dt·A) ⊙ h0 + (dt·x) ⊗ B; y = (h·C + D·x) ⊙ SiLU(z)."""
    b = Builder()
    xf = b.cast("x", FLOAT)
    dt = _dt(b, "dt", "dt_bias")
    dA = b.op("Exp", b.op("Mul", b.unsqueeze(dt, -1), "A"))                                  # [B, Di, N]
    dBx = b.op("Mul", b.unsqueeze(b.op("Mul", dt, xf), -1), b.unsqueeze(b.cast("B", FLOAT), 1))
    b.op("Add", b.op("Mul", dA, "h0"), dBx, outputs=["h"])
    y = b.op("Add", b.reduce_sum(b.op("Mul", "h", b.unsqueeze(b.cast("C", FLOAT), 1)), -1), b.op("Mul", "D", xf))
    y = b.op("Mul", y, b.silu(b.cast("z", FLOAT)))
    b.op("Cast", y, to=act, outputs=["y"])
    return _function("SelectiveScanStep", b)


def _selective_scan_chunk(act: int) -> onnx.FunctionProto:
    """selective_scan_ref: the step recurrence over T tokens as one ONNX Scan (the recurrence is sequential);
    everything that does not depend on h is computed for all tokens outside the loop."""
    b = Builder()
    xf = b.cast("x", FLOAT)
    dt = _dt(b, "dt", "dt_bias")                                                                 # [B, T, Di]
    dtx = b.op("Mul", dt, xf)
    body = Builder(prefix="scan/")
    dA = body.op("Exp", body.op("Mul", body.unsqueeze("dt_t", -1), "A"))                       # A: outer scope
    h = body.op("Add", body.op("Mul", dA, "h_prev"),
                body.op("Mul", body.unsqueeze("dtx_t", -1), body.unsqueeze("B_t", 1)), outputs=["h_next"])
    body.op("ReduceSum", body.op("Mul", h, body.unsqueeze("C_t", 1)), body.i64(-1), keepdims=0, outputs=["hc_t"])
    graph = helper.make_graph(
        body.nodes, "selective_scan_body",
        [value_info("h_prev", FLOAT, ["B", "Di", "N"]), value_info("dt_t", FLOAT, ["B", "Di"]),
         value_info("dtx_t", FLOAT, ["B", "Di"]), value_info("B_t", FLOAT, ["B", "N"]),
         value_info("C_t", FLOAT, ["B", "N"])],
        [value_info("h_next", FLOAT, ["B", "Di", "N"]), value_info("hc_t", FLOAT, ["B", "Di"])])
    h_out, hc = b.op("Scan", "h0", dt, dtx, b.cast("B", FLOAT), b.cast("C", FLOAT), outputs=["h", b.fresh("hc")],
                     num_scan_inputs=4, scan_input_axes=[1, 1, 1, 1], scan_output_axes=[1], body=graph)
    y = b.op("Mul", b.op("Add", hc, b.op("Mul", "D", xf)), b.silu(b.cast("z", FLOAT)))
    b.op("Cast", y, to=act, outputs=["y"])
    return _function("SelectiveScanChunk", b)


def _note_pool_sweep() -> onnx.FunctionProto:
    """pool_sweep_ref: replay §3 over T tokens in an ONNX Scan. State (prio [B,K] fp32, slot [B,K] int32);
    each iteration emits the slots before its token. ArgMin keeps the first minimum (select_last_index=0)."""
    b = Builder()
    tau = b.attr_const("insert_threshold", AttributeProto.FLOAT)
    k_range = b.op("Range", b.const(0, INT64), b.squeeze(b.dim("prio0", 1), 0), b.const(1, INT64))      # [K] int64
    slot0 = b.where(b.op("GreaterOrEqual", "prio0", b.const(0.0, FLOAT)), b.cast(k_range, INT32), b.const(-1, INT32))
    token_ids = b.op("Add", b.op("Range", b.const(0, INT64), b.squeeze(b.dim("scores", 1), 0), b.const(1, INT64)),
                     b.squeeze(b.dim("prio0", 1), 0))                                           # K + t, t < T
    body = Builder(prefix="sweep/")
    j = body.op("ArgMin", "prio_prev", axis=1, keepdims=1, select_last_index=0)                 # [B, 1]
    a = body.unsqueeze("a_t", 1)                                                                # [B, 1]
    take = body.op("And", body.op("Greater", a, tau), body.op("Greater", a, body.op("GatherElements", "prio_prev", j,
                                                                                      axis=1)))
    hit = body.op("And", take, body.op("Equal", body.unsqueeze(k_range, 0), j))                  # [B, K]
    body.op("Where", hit, a, "prio_prev", outputs=["prio_next"])
    body.op("Where", hit, body.cast("token_t", INT32), "slot_prev", outputs=["slot_next"])
    body.op("Identity", "slot_prev", outputs=["slot_before"])
    graph = helper.make_graph(
        body.nodes, "note_pool_sweep_body",
        [value_info("prio_prev", FLOAT, ["B", "K"]), value_info("slot_prev", INT32, ["B", "K"]),
         value_info("a_t", FLOAT, ["B"]), value_info("token_t", INT64, [])],
        [value_info("prio_next", FLOAT, ["B", "K"]), value_info("slot_next", INT32, ["B", "K"]),
         value_info("slot_before", INT32, ["B", "K"])])
    _, slot_last, before = b.op("Scan", "prio0", slot0, "scores", token_ids,
                                outputs=["prio", b.fresh("slot_last"), b.fresh("slots_before")],
                                num_scan_inputs=2, scan_input_axes=[1, 0], scan_output_axes=[1], body=graph)
    b.op("Concat", before, b.unsqueeze(slot_last, 1), axis=1, outputs=["index"])                 # [B, T+1, K]
    return _function("NotePoolSweep", b)


def _sparse_pool_attention(act: int) -> onnx.FunctionProto:
    """pool_attention_ref: per query, H-head softmax attention (fp32) over the S bank entries `index` names."""
    b = Builder()
    heads = b.reshape(b.attr_const("num_heads", AttributeProto.INT), [1])
    valid = b.op("GreaterOrEqual", "index", b.const(0, INT32))                                 # [B, T, S]
    idx = b.unsqueeze(b.cast(b.op("Max", "index", b.const(0, INT32)), INT64), -1)             # [B, T, S, 1]
    keys = b.cast(b.op("GatherND", "keys", idx, batch_dims=1), FLOAT)                         # [B, T, S, ds]
    values = b.cast(b.op("GatherND", "values", idx, batch_dims=1), FLOAT)                     # [B, T, S, d]
    q = b.reshape(b.cast("q", FLOAT), b.op("Concat", b.i64(0, 0), heads, b.i64(1, -1), axis=0))   # [B, T, H, 1, c]
    split_heads = b.op("Concat", b.i64(0, 0, 0), heads, b.i64(-1), axis=0)
    k = b.op("Transpose", b.reshape(keys, split_heads), perm=[0, 1, 3, 4, 2])                  # [B, T, H, c, S]
    v = b.op("Transpose", b.reshape(values, split_heads), perm=[0, 1, 3, 2, 4])                # [B, T, H, S, dv]
    head_dim = b.cast(b.op("Div", b.dim("q", 2), heads), FLOAT)
    scale = b.op("Reciprocal", b.op("Sqrt", head_dim))
    logits = b.op("Mul", b.op("MatMul", q, k), scale)                                         # [B, T, H, 1, S]
    valid = b.unsqueeze(valid, 2, 3)                                                            # [B, T, 1, 1, S]
    # A finite fill instead of -inf: a query with no valid entry then needs no inf/NaN guard anywhere.
    masked = b.where(valid, logits, b.const(np.finfo(np.float32).min, FLOAT))
    e = b.where(valid, b.op("Exp", b.op("Sub", masked, b.reduce_max(masked, -1, keepdims=True))), b.const(0.0, FLOAT))
    den = b.reduce_sum(e, -1, keepdims=True)
    w = b.op("Div", e, b.where(b.op("Greater", den, b.const(0.0, FLOAT)), den, b.const(1.0, FLOAT)))
    o = b.reshape(b.op("MatMul", w, v), [0, 0, -1])                                           # [B, T, d]
    b.op("Cast", o, to=act, outputs=["o"])
    return _function("SparsePoolAttention", b)


_BODIES = {"SelectiveScanChunk": _selective_scan_chunk, "SelectiveScanStep": _selective_scan_step,
           "NotePoolSweep": lambda act: _note_pool_sweep(), "SparsePoolAttention": _sparse_pool_attention}


def functions(act: int, ops=tuple(CUSTOM_OPS)) -> list[onnx.FunctionProto]:
    """The FunctionProtos of the custom ops `ops` (default: all) for a graph of activation dtype `act`."""
    return [_BODIES[name](act) for name in CUSTOM_OPS if name in set(ops)]


def opset_imports() -> list[onnx.OperatorSetIdProto]:
    return [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, OPSET_VERSION)]
