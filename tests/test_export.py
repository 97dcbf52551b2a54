"""memdeploy export: graphs, flavours, manifest, custom-op bodies, atomic writing, clear errors (issue 4)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, shape_inference

from conftest import make_model
from memmamba_deploy.export import ExportError, export_model
from memmamba_deploy.export import custom_ops
from memmamba_deploy.export.contract import CUSTOM_OPS, DOMAIN, PLUGIN_NAMESPACE
from memmamba_deploy.export.exporter import check_graph_file
from memmamba_deploy.export.manifest import sha256
from memmamba_deploy.export.onnx_builder import FLOAT, FLOAT16, INT32, Builder, value_info
from memmamba_deploy.models.checkpoint import CheckpointError, save_pretrained
from memmamba_deploy.models.ops import pool as pool_ops
from memmamba_deploy.models.ops import scan as scan_ops


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny shapes run fastest on one thread (and do not fight the other tests for the two CI cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """export(memory, flavor, dtype) -> OUT of a seeded tiny checkpoint, each exported once per session."""
    root = tmp_path_factory.mktemp("exports")
    done = {}

    def get(memory=True, flavor="portable", dtype="fp32", **kw):
        key = (memory, flavor, dtype, tuple(sorted(kw.items())))
        if key not in done:
            ckpt = root / f"ckpt-{memory}"
            if not ckpt.exists():
                save_pretrained(make_model(memory=memory), ckpt)
            done[key] = export_model(ckpt, root / f"out-{len(done)}", flavor=flavor, dtype=dtype,
                                     show_progress=False, **kw), root / f"out-{len(done)}"
        return done[key][1]
    return get


def _all_nodes(graph: onnx.GraphProto):
    """Nodes of a graph and of every subgraph (Scan/Loop bodies)."""
    for n in graph.node:
        yield n
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(a.g)


# ---- graphs ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", [True, False])
@pytest.mark.parametrize("flavor", ["portable", "plugins"])
def test_graphs_pass_the_full_checker_with_shape_inference(tiny_export, memory, flavor):
    out = tiny_export(memory=memory, flavor=flavor)
    for name in ("decode_step", "prefill"):
        path = out / f"{name}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        model = shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
        shapes = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
                  for o in model.graph.output}
        assert shapes["logits"] == ["batch", 256]
        assert shapes["new_ssm_state"] == [4, "batch", 128, 8]
        assert ("new_pool" in shapes) == memory
        ids = next(i for i in model.graph.input if i.name == "input_ids").type.tensor_type.shape.dim
        assert [d.dim_param or d.dim_value for d in ids] == ["batch", 1 if name == "decode_step" else "T"]
        assert model.opset_import[0].version >= 17


@pytest.mark.parametrize("memory", [True, False])
def test_portable_flavour_uses_standard_ops_only(tiny_export, memory):
    for name in ("decode_step", "prefill"):
        model = onnx.load(str(tiny_export(memory=memory, flavor="portable") / f"{name}.onnx"))
        assert not model.functions
        assert {n.domain for n in _all_nodes(model.graph)} == {""}
        assert {o.domain for o in model.opset_import} == {""}


def _expected_custom_nodes(config) -> dict[str, dict[str, int]]:
    L = config.n_layers
    reads = L + sum(config.is_cross_layer(l) for l in range(L)) if config.memory else 0
    step = {"SelectiveScanStep": L, "SparsePoolAttention": reads}
    pre = {"SelectiveScanChunk": L, "NotePoolSweep": L if config.memory else 0, "SparsePoolAttention": reads}
    return {"decode_step": {k: v for k, v in step.items() if v}, "prefill": {k: v for k, v in pre.items() if v}}


@pytest.mark.parametrize("memory", [True, False])
def test_plugins_flavour_holds_exactly_the_contract_nodes(tiny_export, memory):
    model_cfg = make_model(memory=memory).config
    out = tiny_export(memory=memory, flavor="plugins")
    for name, want in _expected_custom_nodes(model_cfg).items():
        model = onnx.load(str(out / f"{name}.onnx"))
        custom = [n for n in model.graph.node if n.domain]
        assert {n.domain for n in custom} == {DOMAIN}
        counts = {}
        for n in custom:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
            op = CUSTOM_OPS[n.op_type]
            assert len(n.input) == len(op.inputs) and len(n.output) == len(op.outputs), n.name
            attrs = {a.name: a for a in n.attribute}
            assert set(attrs) == {a.name for a in op.attributes} | {"plugin_version", "plugin_namespace"}, n.name
            for a in op.attributes:
                kind = onnx.AttributeProto.INT if a.kind == "int" else onnx.AttributeProto.FLOAT
                assert attrs[a.name].type == kind
            assert attrs["plugin_version"].type == onnx.AttributeProto.STRING
            assert attrs["plugin_version"].s.decode() == op.version
            # TensorRT >= 10.15 takes the plugin over the local function only for a node with this attribute
            assert attrs["plugin_namespace"].type == onnx.AttributeProto.STRING
            assert attrs["plugin_namespace"].s.decode() == PLUGIN_NAMESPACE
        assert counts == want
        functions = {(f.domain, f.name): f for f in model.functions}
        assert set(functions) == {(DOMAIN, op) for op in want}
        for op_name in want:
            f, op = functions[(DOMAIN, op_name)], CUSTOM_OPS[op_name]
            assert list(f.input) == [t.name for t in op.inputs] and list(f.output) == [t.name for t in op.outputs]
        # everything outside the custom nodes is standard ONNX
        assert {n.domain for n in model.graph.node if n.domain != DOMAIN} <= {""}
    # the node attributes carry the config's values
    step = onnx.load(str(out / "prefill.onnx"))
    sweep = [n for n in step.graph.node if n.op_type == "NotePoolSweep"]
    for n in sweep:
        assert helper.get_attribute_value(n.attribute[0]) == pytest.approx(model_cfg.insert_threshold)


# ---- the function bodies are the reference math ----------------------------------------------------------------------
def _run_custom_op(op_name: str, act: int, feeds: dict, inline: bool, **attrs) -> list[np.ndarray]:
    b = Builder()
    op = CUSTOM_OPS[op_name]
    outs = custom_ops.emit(b, op_name, *[t.name for t in op.inputs], **attrs)
    for o, t in zip(outs, op.outputs):
        b.op("Identity", o, outputs=["out_" + t.name])
    dtype = lambda t: act if t.dtype == "T" else {"float32": FLOAT, "int32": INT32}[t.dtype]  # noqa: E731
    graph = helper.make_graph(
        b.nodes, op_name, [value_info(t.name, dtype(t), feeds[t.name].shape) for t in op.inputs],
        [value_info("out_" + t.name, dtype(t), [f"d{i}" for i in range(len(t.shape))]) for t in op.outputs])
    model = helper.make_model(graph, opset_imports=custom_ops.opset_imports(), functions=custom_ops.functions(act),
                              ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    if inline:
        model = onnx.inliner.inline_local_functions(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _np(t, act=FLOAT):
    return t.numpy().astype(np.float16 if act == FLOAT16 else np.float32)


@pytest.mark.parametrize("inline", [False, True])
@pytest.mark.parametrize("softplus", [1, 0])
def test_selective_scan_bodies_match_reference(rng, inline, softplus):
    B, T, Di, N = 2, 7, 6, 3
    x, dt, z = (torch.randn(B, T, Di, generator=rng) for _ in range(3))
    Bm, Cm = (torch.randn(B, T, N, generator=rng) for _ in range(2))
    A = -torch.rand(Di, N, generator=rng) - 0.1
    D, dt_bias = torch.randn(Di, generator=rng), torch.randn(Di, generator=rng)
    h0 = torch.randn(B, Di, N, generator=rng)
    feeds = {k: v.numpy() for k, v in dict(x=x, dt=dt, A=A, B=Bm, C=Cm, D=D, z=z, dt_bias=dt_bias, h0=h0).items()}
    y, h = scan_ops.selective_scan_ref(x, dt, A, Bm, Cm, D, z, dt_bias, h0, dt_softplus=bool(softplus))
    got_y, got_h = _run_custom_op("SelectiveScanChunk", FLOAT, feeds, inline, dt_softplus=softplus)
    assert rel(got_y, y) <= 1e-5 and rel(got_h, h) <= 1e-5
    step = {k: (v[:, 0] if v.ndim == 3 and k not in ("h0",) else v) for k, v in feeds.items()}
    y1, h1 = scan_ops.selective_state_step_ref(h0, x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, z[:, 0], dt_bias,
                                               dt_softplus=bool(softplus))
    got_y, got_h = _run_custom_op("SelectiveScanStep", FLOAT, step, inline, dt_softplus=softplus)
    assert rel(got_y, y1) <= 1e-5 and rel(got_h, h1) <= 1e-5


def rel(a, b) -> float:
    from memmamba_deploy.metrics import rel_err
    return rel_err(torch.as_tensor(np.asarray(a, dtype=np.float32)), b)


@pytest.mark.parametrize("inline", [False, True])
def test_note_pool_sweep_body_replays_the_slot_rule(rng, inline):
    scores = torch.rand(3, 20, generator=rng)
    scores[0, 3] = scores[0, 5] = scores[0, 9] = 0.75                # exact ties: the earlier token keeps its slot
    scores[1, :8] = 0.8                                               # fills every slot, then ties with all of them
    scores[2] = 0.5                                                   # exactly tau1: never inserted (strict >)
    prio0 = torch.tensor([[-1.0, 0.6, -1.0, 0.6], [0.9, -1.0, -1.0, -1.0], [-1.0, -1.0, -1.0, -1.0]])
    index, prio = pool_ops.pool_sweep_ref(scores, prio0, 0.5)
    got_index, got_prio = _run_custom_op("NotePoolSweep", FLOAT, dict(scores=scores.numpy(), prio0=prio0.numpy()),
                                         inline, insert_threshold=0.5)
    assert got_index.dtype == np.int32 and got_index.shape == (3, 21, 4)
    np.testing.assert_array_equal(got_index, index.numpy())
    np.testing.assert_array_equal(got_prio, prio.numpy())


def test_decode_pool_insert_takes_the_first_least_slot():
    """The decode graph's §3 insert against pool_insert_ref, on ties (empty slots at -1, equal priorities) and
    scores at, below and above the threshold and the least priority."""
    from memmamba_deploy.export.graphs import GraphWriter

    model = make_model(memory=True)
    model_cfg = model.config
    K, ds = model_cfg.pool_size, 3
    writer = GraphWriter(model)
    b = Builder()
    new_pool, new_prio = writer._insert(b, "pool", "prio", "a", "s")
    b.op("Identity", new_pool, outputs=["new_pool"])
    b.op("Identity", new_prio, outputs=["new_prio"])
    graph = helper.make_graph(b.nodes, "insert", [value_info("pool", FLOAT, [None, K, ds]),
                                                  value_info("prio", FLOAT, [None, K]), value_info("a", FLOAT, [None]),
                                                  value_info("s", FLOAT, [None, ds])],
                              [value_info("new_pool", FLOAT, [None, K, ds]), value_info("new_prio", FLOAT, [None, K])],
                              initializer=b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    tau = model_cfg.insert_threshold
    prio = torch.full((8, K), -1.0)
    prio[1, : K // 2] = 0.9                         # the first empty slot is K // 2
    prio[2] = 0.7                                    # all tied: slot 0
    prio[3, 1::2] = 0.6                              # tied minima at 1, 3, ...: slot 1
    prio[3, 0::2] = 0.8
    prio[4] = torch.linspace(0.95, 0.9, K)          # the least is the last slot
    prio[5] = 0.7                                    # row 5: a below the least; row 6: a exactly tau, empty pool
    prio[7] = 0.7                                    # row 7: a equal to the least (strict >): kept out
    a = torch.tensor([0.99, 0.95, 0.75, 0.7, 0.91, 0.65, tau, 0.7])
    pool, s = torch.randn(8, K, ds), torch.randn(8, ds)
    got_pool, got_prio = sess.run(None, dict(pool=pool.numpy(), prio=prio.numpy(), a=a.numpy(), s=s.numpy()))
    want_pool, want_prio = pool_ops.pool_insert_ref(pool, prio, a, s, tau)
    np.testing.assert_array_equal(got_prio, want_prio.numpy())
    np.testing.assert_array_equal(got_pool, want_pool.numpy())
    assert (want_prio != prio).sum(1).tolist() == [1, 1, 1, 1, 1, 0, 0, 0]   # the cases do what they say
    assert want_prio[3, 1] == 0.7 and want_prio[1, K // 2] == 0.95


@pytest.mark.parametrize("act", [FLOAT, FLOAT16])
def test_sparse_pool_attention_body_matches_reference(rng, act):
    B, T, ds, d, M, S, H = 2, 5, 8, 12, 7, 6, 2
    q, keys, values = torch.randn(B, T, ds, generator=rng), torch.randn(B, M, ds, generator=rng), \
        torch.randn(B, M, d, generator=rng)
    index = torch.randint(-1, M, (B, T, S), generator=rng, dtype=torch.int32)
    index[0, 1] = -1                                                  # a query with no entry reads 0
    want = pool_ops.pool_attention_ref(q, keys, values, index, H)
    (got,) = _run_custom_op("SparsePoolAttention", act, dict(q=_np(q, act), keys=_np(keys, act),
                                                             values=_np(values, act), index=index.numpy()),
                            inline=False, num_heads=H)
    assert rel(got, want) <= (1e-5 if act == FLOAT else 1e-2)
    assert not got[0, 1].any()


def test_emit_refuses_calls_outside_the_contract():
    b = Builder()
    with pytest.raises(ValueError, match="takes 4 inputs"):
        custom_ops.emit(b, "SparsePoolAttention", "q", "k", num_heads=2)
    with pytest.raises(ValueError, match="attributes"):
        custom_ops.emit(b, "SparsePoolAttention", "q", "k", "v", "i", heads=2)


# ---- artifacts -------------------------------------------------------------------------------------------------------
def test_manifest_describes_the_export(tiny_export):
    out = tiny_export(memory=True, flavor="plugins")
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "memmamba-deploy-export" and m["format_version"] == 2
    assert m["flavor"] == "plugins" and m["dtype"] == "fp32" and m["opset"] >= 17
    assert m["config"] == make_model().config.to_dict()
    assert {s["name"]: s["initial"] for s in m["state"]} == {"conv_state": 0.0, "ssm_state": 0.0, "pool": 0.0,
                                                              "pool_prio": -1.0}
    assert {s["name"]: s["dtype"] for s in m["state"]}["ssm_state"] == "float32"
    step = m["graphs"]["decode_step"]
    assert [i["name"] for i in step["inputs"]] == ["input_ids", "conv_state", "ssm_state", "pool", "pool_prio"]
    assert [o["name"] for o in step["outputs"]] == ["logits", "new_conv_state", "new_ssm_state", "new_pool",
                                                   "new_pool_prio"]
    assert step["inputs"][1]["shape"] == [4, "batch", 128, 3]
    assert m["graphs"]["prefill"]["inputs"][:2] == [{"name": "input_ids", "shape": ["batch", "T"], "dtype": "int64"},
                                                    {"name": "lengths", "shape": ["batch"], "dtype": "int64"}]
    assert {p["op"] for p in m["plugins"]} == set(CUSTOM_OPS)
    assert all(p["domain"] == DOMAIN and p["version"] == "1" for p in m["plugins"])
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m["files"]) == files >= {"decode_step.onnx", "prefill.onnx", "reference/config.json",
                                        "reference/model.safetensors"}
    assert all(sha256(out / f) == h for f, h in m["files"].items())
    portable = json.loads((tiny_export(memory=True) / "manifest.json").read_text())
    assert portable["plugins"] == []


def test_external_data_export_runs(tiny_export):
    out = tiny_export(memory=True, external_data=True)
    m = json.loads((out / "manifest.json").read_text())
    assert m["graphs"]["decode_step"]["external_data"] == "decode_step.onnx.data"
    assert "decode_step.onnx.data" in m["files"] and (out / "prefill.onnx.data").is_file()
    assert (out / "decode_step.onnx").stat().st_size < 100_000        # the weights live beside the graph
    sess = ort.InferenceSession(str(out / "decode_step.onnx"), providers=["CPUExecutionProvider"])
    assert sess.get_outputs()[0].name == "logits"


def test_refuses_non_empty_out_without_force(tiny_export, tmp_path):
    ckpt = tiny_export(memory=False).parent / "ckpt-False"
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty .*--force"):
        export_model(ckpt, out, show_progress=False)
    with pytest.raises(FileExistsError, match="holds no earlier export .*even with --force"):
        export_model(ckpt, out, force=True, show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    export_model(ckpt, out, show_progress=False)                       # empty: taken
    export_model(ckpt, out, flavor="plugins", force=True, show_progress=False)   # an earlier export: replaced
    assert json.loads((out / "manifest.json").read_text())["flavor"] == "plugins"
    (out / "decode_step.engine").write_bytes(b"a stray engine")          # what a failed build of old left behind
    (out / ".prefill.tmp-ab12.engine").write_bytes(b"a killed build's")  # a killed writer's temporary
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps(dict(manifest, format_version=0, tensorrt=None)))   # an older one
    export_model(ckpt, out, force=True, show_progress=False)            # all memdeploy's: replaced
    assert not (out / "decode_step.engine").exists()
    (out / "notes.txt").write_text("mine")                             # an export with a file of the user's beside it
    with pytest.raises(FileExistsError, match=r"not part of its earlier export \(notes.txt\)"):
        export_model(ckpt, out, force=True, show_progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    other = tmp_path / "other"
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "app"}')           # somebody else's manifest.json
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no earlier export"):
        export_model(ckpt, other, force=True, show_progress=False)
    assert (other / "notes.txt").read_text() == "mine"


def test_manifest_fields_of_the_wrong_type_are_named(tiny_export, tmp_path):
    import shutil

    from memmamba_deploy.export import read_manifest
    from memmamba_deploy.export.manifest import ManifestError

    good = json.loads((tiny_export(memory=True) / "manifest.json").read_text())
    out = tmp_path / "out"
    shutil.copytree(tiny_export(memory=True), out)
    for key, value in [("files", []), ("files", None), ("graphs", None), ("graphs", {"decode_step": 3}),
                       ("state", None), ("dtype", None), ("flavor", "fancy"), ("config", []), ("tensorrt", [])]:
        (out / "manifest.json").write_text(json.dumps(dict(good, **{key: value})))
        with pytest.raises(ManifestError, match=f"'{key}' must be"):
            read_manifest(out)
    (out / "manifest.json").write_text(json.dumps(good))
    read_manifest(out)


def test_out_that_is_or_holds_the_checkpoint_or_the_working_dir_is_refused(tiny_export, tmp_path, monkeypatch):
    ckpt = tmp_path / "proj" / "ck"
    save_pretrained(make_model(memory=False), ckpt)
    for out in (ckpt, tmp_path / "proj"):
        with pytest.raises(ValueError, match="the checkpoint"):
            export_model(ckpt, out, force=True, show_progress=False)
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    export_model(ckpt, ckpt / "onnx", show_progress=False)             # inside it: a folder of its own, fine
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for out in (".", ""):
        with pytest.raises(ValueError, match="not the working directory"):
            export_model(ckpt, out, show_progress=False)
    with pytest.raises(OSError, match="holds the working directory"):
        export_model(ckpt, tmp_path / "work", show_progress=False)


def test_out_through_a_symlink_lands_where_it_points(tiny_export, tmp_path):
    ckpt = tiny_export(memory=False).parent / "ckpt-False"
    (tmp_path / "big").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "big")
    export_model(ckpt, tmp_path / "link", show_progress=False)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "big" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big", "link"]


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_export_leaves_no_out(tiny_export, tmp_path, monkeypatch, existing):
    """Interrupted after both graphs were written: no OUT (or the old OUT untouched), no temporary left behind."""
    import memmamba_deploy.export.exporter as exporter

    import shutil

    ckpt = tiny_export(memory=False).parent / "ckpt-False"
    out = tmp_path / "out"
    if existing:                                   # an earlier export
        shutil.copytree(tiny_export(memory=False), out)
        before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))

    def interrupted(*a, **k):
        assert any((p / "prefill.onnx").exists() for p in tmp_path.glob(".out.tmp-*"))
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(ckpt, out, force=True, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_bad_checkpoints_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        export_model(tmp_path / "missing", tmp_path / "out", show_progress=False)
    ckpt = tmp_path / "ckpt"
    save_pretrained(make_model(memory=False), ckpt)
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or not a safetensors file"):
        export_model(ckpt, tmp_path / "out", show_progress=False)
    with pytest.raises(ValueError, match="unknown flavour"):
        export_model(ckpt, tmp_path / "out", flavor="tensorrt", show_progress=False)
    with pytest.raises(ValueError, match="unknown dtype"):
        export_model(ckpt, tmp_path / "out", dtype="bf16", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_checker_failure_names_the_node(tiny_export, tmp_path):
    model = onnx.load(str(tiny_export(memory=False) / "decode_step.onnx"))
    node = next(n for n in model.graph.node if n.op_type == "MatMul")
    node.input[0] = "no_such_value"
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ExportError, match=f"broken.onnx: the ONNX checker rejected the graph: .*{node.name}"):
        check_graph_file(path, model)


def test_cli_export_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from memmamba_deploy.cli import app

    result = CliRunner().invoke(app, ["export", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "error:" in result.output and "no checkpoint directory" in result.output
    assert "Traceback" not in result.output


def test_fp16_export_keeps_state_and_scores_fp32(tiny_export):
    out = tiny_export(memory=True, dtype="fp16")
    m = json.loads((out / "manifest.json").read_text())
    assert {s["name"]: s["dtype"] for s in m["state"]} == {"conv_state": "float16", "ssm_state": "float32",
                                                             "pool": "float16", "pool_prio": "float32"}
    step = onnx.load(str(out / "decode_step.onnx"))
    init = {t.name: t.data_type for t in step.graph.initializer}
    assert init["layers.0.mixer.in_proj.weight.T"] == onnx.TensorProto.FLOAT16
    assert init["layers.0.mixer.A_log.A"] == init["layers.0.mixer.D"] == onnx.TensorProto.FLOAT
    assert [o.type.tensor_type.elem_type for o in step.graph.output][0] == onnx.TensorProto.FLOAT   # logits


def test_export_is_deterministic(tiny_export, tmp_path):
    """Same checkpoint, same flags -> byte-identical graphs (a rebuilt engine cache can key on the hash)."""
    out = tiny_export(memory=False)
    again = export_model(out.parent / "ckpt-False", tmp_path / "again", show_progress=False)
    first = json.loads((out / "manifest.json").read_text())
    assert again["files"]["decode_step.onnx"] == first["files"]["decode_step.onnx"]
    assert again["files"]["prefill.onnx"] == first["files"]["prefill.onnx"]


def test_readme_renders_the_contract_table():
    """export/README.md shows the contract to the plugin engineers: it must not drift from contract.py."""
    from pathlib import Path

    import memmamba_deploy.export as export_pkg

    text = (Path(export_pkg.__file__).parent / "README.md").read_text()
    for op in CUSTOM_OPS.values():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{op.name}`"))
        for t in op.inputs + op.outputs:
            assert t.name in row, (op.name, t.name)
        for a in op.attributes:
            assert f"{a.name}: {a.kind}" in row, (op.name, a.name)
    assert f'plugin_version = "{CUSTOM_OPS["SelectiveScanStep"].version}"' in text
