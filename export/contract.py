"""The custom-op contract between `export --flavor plugins`, the Triton kernels and the TensorRT plugins.

One table, read by the exporter (node names, attributes, I/O order), by the plugin build (names, versions, field
names; tests check the C++ side against it) and by the docs (export/README.md). Every op lives in ONNX domain
`memmamba`, version 1, and is emitted with a model-local FunctionProto whose body is the reference math, so ONNX
Runtime runs the graph as is while TensorRT swaps in the plugin (its parser prefers a registered plugin over a local
function of the same name from 10.7 on, and from 10.15 for nodes with a `plugin_namespace` attribute, which every
node carries).

Dtype letters: "T" = the graph's activation dtype (float32 or float16); fixed dtypes are spelled out.
Shape symbols: B batch, T tokens, Di d_inner, N d_state, K pool slots, S slots read per query, M bank entries,
ds summary width, d model width.
"""
from __future__ import annotations

import dataclasses

DOMAIN = "memmamba"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = ""


@dataclasses.dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[str, ...]
    dtype: str  # "T", "float32" or "int32"


@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    kind: str          # "int" or "float": what the ONNX node carries; TensorRT's parser hands them on as
                       # PluginField kINT32 / kFLOAT32 with the same name
    doc: str


@dataclasses.dataclass(frozen=True)
class CustomOp:
    name: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    attributes: tuple[Attribute, ...]
    doc: str
    version: str = PLUGIN_VERSION


CUSTOM_OPS: dict[str, CustomOp] = {op.name: op for op in (
    CustomOp(
        "SelectiveScanChunk",
        inputs=(Tensor("x", ("B", "T", "Di"), "T"), Tensor("dt", ("B", "T", "Di"), "T"),
                Tensor("A", ("Di", "N"), "float32"), Tensor("B", ("B", "T", "N"), "T"),
                Tensor("C", ("B", "T", "N"), "T"), Tensor("D", ("Di",), "float32"),
                Tensor("z", ("B", "T", "Di"), "T"), Tensor("dt_bias", ("Di",), "float32"),
                Tensor("h0", ("B", "Di", "N"), "float32")),
        outputs=(Tensor("y", ("B", "T", "Di"), "T"), Tensor("h", ("B", "Di", "N"), "float32")),
        attributes=(Attribute("dt_softplus", "int", "1: dt = softplus(dt + dt_bias); 0: dt + dt_bias"),),
        doc="Selective scan over T tokens from state h0 (spec §6, §8): models.ops.scan.selective_scan_ref."),
    CustomOp(
        "SelectiveScanStep",
        inputs=(Tensor("x", ("B", "Di"), "T"), Tensor("dt", ("B", "Di"), "T"),
                Tensor("A", ("Di", "N"), "float32"), Tensor("B", ("B", "N"), "T"),
                Tensor("C", ("B", "N"), "T"), Tensor("D", ("Di",), "float32"),
                Tensor("z", ("B", "Di"), "T"), Tensor("dt_bias", ("Di",), "float32"),
                Tensor("h0", ("B", "Di", "N"), "float32")),
        outputs=(Tensor("y", ("B", "Di"), "T"), Tensor("h", ("B", "Di", "N"), "float32")),
        attributes=(Attribute("dt_softplus", "int", "as SelectiveScanChunk"),),
        doc="One decode token of the selective scan: models.ops.scan.selective_state_step_ref."),
    CustomOp(
        "NotePoolSweep",
        inputs=(Tensor("scores", ("B", "T"), "float32"), Tensor("prio0", ("B", "K"), "float32")),
        outputs=(Tensor("index", ("B", "T+1", "K"), "int32"), Tensor("prio", ("B", "K"), "float32")),
        attributes=(Attribute("insert_threshold", "float", "tau1 of spec §3, compared in fp32"),),
        doc="Replays the §3 priority replacement over T tokens (spec §8): index[b,t,j] names what slot j holds "
            "before token t (row T: after the last token): j' < K an initial slot, K+i token i, -1 empty. "
            "models.ops.pool.pool_sweep_ref."),
    CustomOp(
        "SparsePoolAttention",
        inputs=(Tensor("q", ("B", "T", "ds"), "T"), Tensor("keys", ("B", "M", "ds"), "T"),
                Tensor("values", ("B", "M", "d"), "T"), Tensor("index", ("B", "T", "S"), "int32")),
        outputs=(Tensor("o", ("B", "T", "d"), "T"),),
        attributes=(Attribute("num_heads", "int", "H of spec §4; scale 1/sqrt(ds/H)"),),
        doc="Each query attends over the S bank entries `index` names (-1: none; no entry gives 0), softmax in "
            "fp32 (spec §4, §5). models.ops.pool.pool_attention_ref."),
)}

