"""The custom-op contract (export/contract.py) is what the three sides agree on; check each side against it.

- The compiled plugin library (read through the harness, as TensorRT would): one creator per op in the namespaces
  "" and "memmamba", version "1", fields named like the ONNX attributes with the types TensorRT's parser passes,
  the dtype class of every input and output (supportsFormatCombination), output count, shapes and dtypes.
- What `memdeploy export --flavor plugins` emits: the custom nodes (domain, op_type, attributes, arity), each with
  its FunctionProto; and each emitted node builds in the plugin library from the fields the parser would pass.
"""
from __future__ import annotations

import itertools

import pytest

from memmamba_deploy.export import contract
from memmamba_deploy.export.contract import CUSTOM_OPS
from memmamba_deploy.plugin_harness import ATTRIBUTE_FIELD_TYPES, Harness, contract_fields

from test_plugins_aot import ATTRS, _io, _project_build  # one plugin build per test session


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    built, _ = _project_build(tmp_path_factory)
    h = Harness(built.harness, built.plugins)
    yield h
    h.close()


def test_contract_table_is_well_formed():
    assert contract.DOMAIN == "memmamba" and contract.PLUGIN_VERSION == "1"
    for name, op in CUSTOM_OPS.items():
        assert name == op.name and op.version == contract.PLUGIN_VERSION
        assert {t.dtype for t in op.inputs + op.outputs} <= {"T", "float32", "int32"}
        assert {a.kind for a in op.attributes} <= set(ATTRIBUTE_FIELD_TYPES)
        assert len({t.name for t in op.inputs}) == len(op.inputs)


def test_creators_match_the_contract(harness):
    creators = {(c.name, c.namespace): c for c in harness.creators()}
    want_ns = {contract.PLUGIN_NAMESPACE, contract.DOMAIN}
    assert set(creators) == {(n, ns) for n in CUSTOM_OPS for ns in want_ns}
    for (name, _), c in creators.items():
        assert c.version == CUSTOM_OPS[name].version
        assert c.fields == {a.name: ATTRIBUTE_FIELD_TYPES[a.kind] for a in CUSTOM_OPS[name].attributes}


@pytest.mark.parametrize("op", list(CUSTOM_OPS))
def test_dtype_classes_match_the_contract(harness, op):
    c = CUSTOM_OPS[op]
    tensors = c.inputs + c.outputs
    fields = contract_fields(op, ATTRS[op])
    for act in ("float32", "float16"):
        good = [act if t.dtype == "T" else t.dtype for t in tensors]
        assert harness.supports(op, good, len(c.inputs), fields)
        for pos, other in itertools.product(range(len(tensors)), ("float32", "float16", "int32")):
            if other != good[pos]:
                bad = list(good)
                bad[pos] = other
                assert not harness.supports(op, bad, len(c.inputs), fields), (op, tensors[pos].name, other)


@pytest.mark.parametrize("op", list(CUSTOM_OPS))
def test_outputs_match_the_contract_for_other_sizes(harness, op):
    sizes = dict(B=3, T=1, Di=32, N=4, K=5, S=5, M=9, ds=8, d=32)
    inputs, outputs = _io(op, "float16", sizes)
    p = harness.build(op, inputs, contract_fields(op, ATTRS[op]), len(outputs))
    assert p.outputs == outputs
    harness.release(p)


# ---- what export emits ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def plugins_export(tmp_path_factory):
    from memmamba_deploy.export import export_model
    import onnx
    import torch

    from memmamba_deploy.models import MemMambaConfig, MemMambaLM
    from memmamba_deploy.models.checkpoint import save_pretrained

    work = tmp_path_factory.mktemp("contract-export")
    torch.manual_seed(0)
    save_pretrained(MemMambaLM(MemMambaConfig.preset("tiny")), work / "ckpt")
    export_model(work / "ckpt", work / "out", flavor="plugins", dtype="fp32", force=True)
    return {p.stem: onnx.load(str(p)) for p in (work / "out").glob("*.onnx")}


def _custom_nodes(model):
    return [n for n in model.graph.node if n.domain == contract.DOMAIN]


def test_export_emits_exactly_the_contract(plugins_export):
    import onnx

    seen = set()
    for graph, model in plugins_export.items():
        functions = {(f.domain, f.name) for f in model.functions}
        for node in _custom_nodes(model):
            assert node.op_type in CUSTOM_OPS, f"{graph}: {node.op_type} is not in the contract"
            op = CUSTOM_OPS[node.op_type]
            seen.add(node.op_type)
            assert (contract.DOMAIN, node.op_type) in functions, f"{graph}: {node.op_type} has no FunctionProto"
            assert len(node.input) == len(op.inputs) and len(node.output) == len(op.outputs)
            attrs = {a.name: a for a in node.attribute}
            for a in op.attributes:
                assert a.name in attrs, f"{graph}: {node.op_type} lacks attribute {a.name}"
                want = onnx.AttributeProto.INT if a.kind == "int" else onnx.AttributeProto.FLOAT
                assert attrs[a.name].type == want
            extra = set(attrs) - {a.name for a in op.attributes} - {"plugin_version", "plugin_namespace"}
            assert not extra, f"{graph}: {node.op_type} carries attributes the contract lacks: {extra}"
            if "plugin_version" in attrs:
                assert onnx.helper.get_attribute_value(attrs["plugin_version"]).decode() == op.version
    assert seen == set(CUSTOM_OPS), f"ops never emitted: {set(CUSTOM_OPS) - seen}"


def test_every_emitted_node_builds_in_the_plugin_library(plugins_export, harness):
    """Fields as onnx-tensorrt's loadFields makes them from the node, shapes from ONNX shape inference."""
    import onnx
    from onnx import helper, shape_inference

    dtypes = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.INT32: "int32"}
    for graph, model in plugins_export.items():
        inferred = shape_inference.infer_shapes(model)
        info = {v.name: v.type.tensor_type for v in list(inferred.graph.value_info) + list(inferred.graph.input)
                + list(inferred.graph.output)}
        for t in inferred.graph.initializer:
            info[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims)).tensor_type
        for node in _custom_nodes(model):
            assert all(n in info for n in node.input), f"{graph}: no inferred shape for an input of {node.name}"
            # symbolic extents (batch, T, bank length) are unknown to the build phase (symbolic=True, as TensorRT
            # sees them): they only need a value; the constant ones (Di, N, K, ds, d) are checked by the plugin
            shapes = [[d.dim_value if d.HasField("dim_value") else 2 for d in info[n].shape.dim] for n in node.input]
            inputs = [(dtypes[info[n].elem_type], tuple(s)) for n, s in zip(node.input, shapes)]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            p = harness.build(node.op_type, inputs, contract_fields(node.op_type, attrs), len(node.output),
                              node_name=node.name)
            harness.release(p)


def test_tensorrt_gets_the_custom_nodes_without_their_bodies(plugins_export, tmp_path):
    """memdeploy build hands TensorRT the graph minus the memmamba FunctionProtos, so every TensorRT version (the
    parser preferred a local function over a plugin before 10.7) maps each custom node to the plugin."""
    import onnx

    from memmamba_deploy.backends.trt_backend import plugin_only_graph

    for graph, model in plugins_export.items():
        path = tmp_path / f"{graph}.onnx"
        onnx.save(model, str(path))
        data, n_custom = plugin_only_graph(path)
        stripped = onnx.load_from_string(data)
        assert not [f for f in stripped.functions if f.domain == contract.DOMAIN]
        assert n_custom == len(_custom_nodes(model)) == len(_custom_nodes(stripped)) > 0
        assert len(stripped.graph.initializer) == len(model.graph.initializer)
