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
                                                   "config": {}, "graphs": {"decode_step": {}, "prefill": {}},
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
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt("11.1.0"))      # strongly typed only
    with pytest.raises(ValueError, match="strongly typed"):
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
