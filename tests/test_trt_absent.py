"""Every TensorRT path fails at once, in one line, saying what to install, when `tensorrt` cannot be imported; and
the engine build refuses bad requests before doing any work. TensorRT is simulated absent (sys.modules entry None)
so these run the same on machines that have it."""
import json
import sys
import types

import pytest
from typer.testing import CliRunner

from memmamba_deploy.backends import trt_backend
from memmamba_deploy.cli import app

runner = CliRunner()


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)      # `import tensorrt` now raises ImportError


def _one_line_hint(result):
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    assert "pip install tensorrt" in text and "JetPack" in text
    return text


def test_build_without_tensorrt_says_what_to_install(no_tensorrt, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    before = sorted(p.name for p in out.iterdir())
    _one_line_hint(runner.invoke(app, ["build", str(out), "--plugins", str(tmp_path / "lib.so")]))
    assert sorted(p.name for p in out.iterdir()) == before          # nothing written


def test_selftest_without_tensorrt_says_what_to_install(no_tensorrt, tmp_path):
    _one_line_hint(runner.invoke(app, ["selftest", "--tensorrt", "--workdir", str(tmp_path / "w")]))
    assert not (tmp_path / "w").exists()


def test_selftest_needs_a_target():
    result = runner.invoke(app, ["selftest"])
    assert result.exit_code == 2 and "--tensorrt" in result.output


def test_backend_without_tensorrt_raises_import_error(no_tensorrt, tmp_path):
    with pytest.raises(ImportError, match="pip install tensorrt"):
        trt_backend.TensorRTBackend(tmp_path)
    with pytest.raises(ImportError, match="JetPack"):
        trt_backend.build_engines(tmp_path, tmp_path / "lib.so")


# ---- the build's own checks, with a stand-in `tensorrt` module (they run before TensorRT is touched) --------------
def _fake_tensorrt(version: str):
    return types.SimpleNamespace(__version__=version)


def _export_dir(tmp_path, **manifest):
    out = tmp_path / "export"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "memmamba-deploy-export", "format_version": 1,
                                                   "config": {}, "graphs": {"decode_step": {"file": "decode_step.onnx"},
                                                                                "prefill": {"file": "prefill.onnx"}},
                                                   "state": [], "files": {}, **manifest}))
    return out


def test_build_refuses_a_folder_that_is_not_an_export(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.3.0"))
    with pytest.raises(FileNotFoundError, match="not an export directory"):
        trt_backend.build_engines(tmp_path, tmp_path / "lib.so")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        trt_backend.build_engines(tmp_path, tmp_path / "lib.so")


def test_build_refuses_portable_flavour_and_precision_mismatch(monkeypatch, tmp_path):
    out = _export_dir(tmp_path, flavor="portable", dtype="fp32")
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.3.0"))
    with pytest.raises(ValueError, match="plugins flavour"):
        trt_backend.build_engines(out, tmp_path / "lib.so")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(flavor="plugins", dtype="fp16")
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="export again with --dtype fp32"):
        trt_backend.build_engines(out, tmp_path / "lib.so", precision="fp32")
    manifest["dtype"] = "fp32"
    (out / "manifest.json").write_text(json.dumps(manifest))
    for version in ("10.3.0", "11.1.0"):       # strongly typed on both: no weakly typed fp16 of an fp32 graph
        monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(version))
        with pytest.raises(ValueError, match="strongly typed.*export again with --dtype fp16"):
            trt_backend.build_engines(out, tmp_path / "lib.so", precision="fp16")
    with pytest.raises(ValueError, match="unknown precision"):
        trt_backend.build_engines(out, tmp_path / "lib.so", precision="int8")
    with pytest.raises(ValueError, match="max-batch"):
        trt_backend.build_engines(out, tmp_path / "lib.so", max_batch=0)


def test_missing_plugin_library_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no plugin library at .*lib.so"):
        trt_backend.load_plugins(_fake_tensorrt("10.3.0"), tmp_path / "lib.so", logger=None)


def test_profile_shapes_cover_batch_and_tokens():
    lo, opt, hi = trt_backend._profile_shape("input_ids", (-1, -1), ["batch", "T"], max_batch=4, max_prefill=512)
    assert lo == (1, 1) and hi == (4, 512) and all(a <= b <= c for a, b, c in zip(lo, opt, hi))
    assert trt_backend._profile_shape("conv", (4, -1, 128, 3), ["L", "batch", "Di", "k"], 8, 64)[2] == (4, 8, 128, 3)
    with pytest.raises(ValueError, match="neither a batch nor a token"):
        trt_backend._profile_shape("x", (-1,), ["mystery"], 8, 64)


# ---- the plugin library, loaded once a process (TensorRT's registry refuses plugins it holds already) ---------------
@pytest.fixture(autouse=True)
def fresh_process(monkeypatch):
    """Each test is a process: nothing loaded, one plugin registry (every stand-in TensorRT of the test shares it)."""
    monkeypatch.setattr(trt_backend, "_LOADED", {})
    monkeypatch.setattr(sys.modules[__name__], "_PROCESS_REGISTRY", _Registry())


class _Registry:
    """IPluginRegistry as documented: load_library registers the library's creators, and returns None (nullptr)
    when any of them is registered already; get_creator finds registered ones only."""

    def __init__(self):
        self.creators, self.loads = set(), []

    def load_library(self, path):
        from memmamba_deploy.export.contract import CUSTOM_OPS

        if self.creators & set(CUSTOM_OPS):
            return None
        self.creators |= set(CUSTOM_OPS)
        self.loads.append(path)
        return object()

    def get_creator(self, name, version, namespace=""):
        return object() if name in self.creators else None


_PROCESS_REGISTRY = None


def test_the_plugin_library_is_loaded_once_a_process(tmp_path):
    registry = _Registry()
    trt = types.SimpleNamespace(get_plugin_registry=lambda: registry)
    lib = tmp_path / "libmemmamba_plugins.so"
    lib.write_bytes(b"stand-in")
    first = trt_backend.load_plugins(trt, lib, logger=None)            # memdeploy build ...
    assert trt_backend.load_plugins(trt, tmp_path / "." / lib.name, logger=None) is first   # ... then a session
    assert registry.loads == [str(lib.resolve())]
    other = tmp_path / "other.so"
    other.write_bytes(b"stand-in")
    with pytest.raises(ValueError, match=f"loaded the plugin library {lib.resolve()} already.*other.so"):
        trt_backend.load_plugins(trt, other, logger=None)


def test_plugins_registered_by_someone_else_are_used(monkeypatch, tmp_path):
    registry = _Registry()
    registry.load_library("loaded by the application")
    lib = tmp_path / "libmemmamba_plugins.so"
    lib.write_bytes(b"stand-in")
    trt = types.SimpleNamespace(get_plugin_registry=lambda: registry)
    assert trt_backend.load_plugins(trt, lib, logger=None) is None and registry.loads == ["loaded by the application"]
    registry.creators = {"SelectiveScanChunk"}                 # some, not all: another library's, refused by name
    with pytest.raises(ValueError, match="registered in this process already, not from .*libmemmamba_plugins.so"):
        trt_backend.load_plugins(trt, lib, logger=None)


# ---- the engine build's file handling, with a stand-in TensorRT that "builds" any graph into its name's bytes --------
def _building_tensorrt(fail: str = "", tag: bytes = b""):
    """Enough of `tensorrt` for build_engines: the parser reads the ONNX inputs and counts the custom nodes as
    plugin layers; build_serialized_network returns None (TensorRT's failure) for a graph named `fail`."""
    import enum

    import onnx

    class Layer(enum.Enum):
        PLUGIN_V3, OTHER = 1, 2

    class Network:
        def __init__(self):
            self.inputs, self.layers, self.name = [], [], ""
            self.num_inputs = self.num_layers = 0

        def get_input(self, i):
            return self.inputs[i]

        def get_layer(self, i):
            return self.layers[i]

    class Parser:
        num_errors = 0

        def __init__(self, network, logger):
            self.network = network

        def parse(self, data, path):
            g = onnx.load_from_string(data).graph
            net = self.network
            net.name = path
            net.inputs = [types.SimpleNamespace(name=i.name, shape=tuple(d.dim_value if d.HasField("dim_value") else -1
                                                                         for d in i.type.tensor_type.shape.dim))
                          for i in g.input]
            net.layers = [types.SimpleNamespace(type=Layer.PLUGIN_V3 if n.domain == "memmamba" else Layer.OTHER)
                          for n in g.node]
            net.num_inputs, net.num_layers = len(net.inputs), len(net.layers)
            return True

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return types.SimpleNamespace(set_memory_pool_limit=lambda *a: None, set_flag=lambda *a: None,
                                         add_optimization_profile=lambda p: None)

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network, config):
            name = network.name.rsplit("/", 1)[-1]
            return None if fail and name.startswith(fail) else b"engine " + name.encode() + tag

    class ILogger:
        Severity = enum.IntEnum("Severity", "INTERNAL_ERROR ERROR WARNING INFO VERBOSE", start=0)

        def __init__(self):
            pass

    registry = _PROCESS_REGISTRY
    return types.SimpleNamespace(
        __version__="10.3.0", ILogger=ILogger, Builder=Builder, OnnxParser=Parser, LayerType=Layer,
        get_plugin_registry=lambda: registry, NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE=0))         # 10.x's enum value; no FP16 flag: never set


def _folder(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_failed_build_leaves_the_export_as_it_was(monkeypatch, tmp_path):
    from conftest import make_model

    from memmamba_deploy.export import export_model
    from memmamba_deploy.models.checkpoint import save_pretrained

    save_pretrained(make_model(memory=True), tmp_path / "ckpt")
    out = tmp_path / "out"
    export_model(tmp_path / "ckpt", out, flavor="plugins", show_progress=False)
    plugins = tmp_path / "libmemmamba_plugins.so"
    plugins.write_bytes(b"stand-in")
    exported = _folder(out)
    monkeypatch.setitem(sys.modules, "tensorrt", _building_tensorrt(fail="prefill"))
    with pytest.raises(ValueError, match="could not build .*prefill.onnx"):
        trt_backend.build_engines(out, plugins)
    assert _folder(out) == exported                          # no engine, no temporary, the manifest untouched
    monkeypatch.setitem(sys.modules, "tensorrt", _building_tensorrt())
    entry = trt_backend.build_engines(out, plugins)
    built = _folder(out)
    assert built["decode_step.engine"].startswith(b"engine decode_step") and set(entry["engines"]) == {"decode_step",
                                                                                                       "prefill"}
    monkeypatch.setitem(sys.modules, "tensorrt", _building_tensorrt(fail="prefill", tag=b" v2"))
    with pytest.raises(ValueError, match="could not build"):
        trt_backend.build_engines(out, plugins, max_batch=2)
    assert _folder(out) == built                             # the engines that worked are still there, as recorded
    trt_backend.read_manifest(out)
    with pytest.raises(ValueError, match="--workspace-mb must be >= 1"):
        trt_backend.build_engines(out, plugins, workspace_mb=0)
