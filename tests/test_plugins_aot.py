"""CPU checks of the TensorRT plugin build (issue 5): the AOT kernel library and the plugin build phase.

- The AOT compiler (memmamba_deploy/aot.py) on a small kernel defined here: every SM, ELF header checks, and the
  checks failing when the launch metadata is wrong.
- Every kernel of models.ops.triton.AOT_KERNELS compiled for sm_80/86/87/89/90 + PTX; the bytes embedded in the
  generated C++ re-read and checked (SM, entry symbol, parameters).
- The plugin library and the harness compiled with nvcc against the fetched TensorRT 11.1 (and 10.3) headers, and
  every build-phase call of every plugin run through the harness (no GPU): shapes, dtypes, serialization round
  trip, and each refusal (bad fields, ranks, extents).
Budget: about a minute on 2 cores (Triton's compile cache makes re-runs faster).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import triton
import triton.language as tl

from memmamba_deploy import aot
from memmamba_deploy.export.contract import CUSTOM_OPS
from memmamba_deploy.plugin_harness import (FIELD_FLOAT32, FIELD_INT32, REPO, TRT_HEADERS, Harness, HarnessError,
                                            build_for_tests, build_plugins, contract_fields)

TRT10_HEADERS = REPO / "third_party" / "TensorRT-10.3" / "include"


@triton.jit
def _scale_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, alpha * x + tl.load(y_ptr + offs, mask=mask), mask=mask)


def _toy(dtype="fp32", n_type="i32") -> aot.AotKernel:
    sig = {"x_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "alpha": "fp32", "n": n_type,
           "BLOCK": "constexpr"}
    return aot.AotKernel(f"scale_add_{dtype}", _scale_add_kernel, sig, {"BLOCK": 128}, num_warps=4,
                         grid="cdiv(n, 128)")


# ---- the AOT compiler ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_compiled():
    return aot.compile_kernel(_toy("fp16"), aot.DEFAULT_ARCHS)


def test_toy_kernel_compiles_for_every_sm_and_its_elf_agrees(toy_compiled):
    assert sorted(toy_compiled.cubins) == list(aot.DEFAULT_ARCHS)
    for sm, cubin in toy_compiled.cubins.items():
        info = aot.read_cubin(cubin)
        assert info.sm == sm
        assert info.arch_specific == (sm == 90)              # Triton targets sm_90a on Hopper
        assert toy_compiled.entry in info.functions
        assert info.param_sizes[toy_compiled.entry] == (8, 8, 8, 4, 4, 8, 8)   # 3 ptrs, fp32, i32, 2 scratch
    assert toy_compiled.ptx_sm == 80 and b".target sm_80" in toy_compiled.ptx and toy_compiled.ptx.endswith(b"\0")


def test_cubin_check_fails_on_wrong_metadata(toy_compiled):
    wrong = _toy("fp16", n_type="i64")                       # the launcher would pass 8 bytes for n
    with pytest.raises(aot.AotError, match="parameters"):
        aot.check_cubin(wrong, toy_compiled.entry, 86, toy_compiled.cubins[86])
    with pytest.raises(aot.AotError, match="says sm_86"):
        aot.check_cubin(_toy("fp16"), toy_compiled.entry, 89, toy_compiled.cubins[86])
    with pytest.raises(aot.AotError, match="entry 'other'"):
        aot.check_cubin(_toy("fp16"), "other", 86, toy_compiled.cubins[86])
    with pytest.raises(aot.AotError, match="not an ELF"):
        aot.read_cubin(b"\x00" * 100)
    not_cuda = bytearray(toy_compiled.cubins[80])
    not_cuda[18] = 62                                        # EM_X86_64
    with pytest.raises(aot.AotError, match="not EM_CUDA"):
        aot.read_cubin(bytes(not_cuda))


def test_spec_validation_names_the_problem():
    with pytest.raises(aot.AotError, match="constexpr"):
        aot.AotKernel("k", _scale_add_kernel, _toy().signature, {}).validate()
    sig = dict(_toy().signature)
    sig["n"] = "bf8x"
    with pytest.raises(aot.AotError, match="no C equivalent"):
        aot.AotKernel("k", _scale_add_kernel, sig, {"BLOCK": 128}).validate()
    with pytest.raises(aot.AotError, match="C identifier"):
        aot.AotKernel("k-1", _scale_add_kernel, _toy().signature, {"BLOCK": 128}).validate()
    for bad in ("80,75", "91", "95", "110", "130"):
        with pytest.raises(ValueError, match="bad --arch"):
            aot.parse_archs(bad)
    assert aot.parse_archs("sm_90, 87,80") == (80, 87, 90)


@triton.jit
def _gather_rows_kernel(srcs, strides, out_ptr, n, stride_out, PARTS: tl.constexpr, BLOCK: tl.constexpr):
    # out[j, :n] = srcs[j][row 1, :n] (rows strides[j] apart): a tuple of pointers and a tuple of strides
    offs = tl.arange(0, BLOCK)
    for j in tl.static_range(PARTS):
        x = tl.load(srcs[j] + strides[j] + offs, mask=offs < n)
        tl.store(out_ptr + j * stride_out + offs, x, mask=offs < n)


def test_tuple_arguments_and_multiples_of_16():
    """A tuple argument is one launch parameter per element (<name>_<j>, in order, checked against the cubin's
    parameter table), and `divisible` compiles the named ones as multiples of 16, as Triton's JIT specialises
    them: only then do the loads vectorise."""
    sig = {"srcs": ("*fp16", "*fp16", "*fp16"), "strides": ("i32", "i32", "i32"), "out_ptr": "*fp16", "n": "i32",
           "stride_out": "i32", "PARTS": "constexpr", "BLOCK": "constexpr"}
    plain = aot.AotKernel("gather_rows", _gather_rows_kernel, sig, {"PARTS": 3, "BLOCK": 1024})
    assert [n for n, _ in plain.params] == ["srcs_0", "srcs_1", "srcs_2", "strides_0", "strides_1", "strides_2",
                                            "out_ptr", "n", "stride_out", *aot.SCRATCH_PARAMS]
    hinted = aot.AotKernel("gather_rows", _gather_rows_kernel, sig, {"PARTS": 3, "BLOCK": 1024},
                           divisible=("srcs_0", "srcs_1", "srcs_2", "strides_0", "strides_1", "strides_2", "out_ptr",
                                      "n", "stride_out"))
    loads = {}
    for k in (plain, hinted):
        c = aot.compile_kernel(k, (80,), ptx=True)           # check_cubin: 9 parameters + 2 scratch, sizes agree
        assert aot.read_cubin(c.cubins[80]).param_sizes[c.entry] == (8, 8, 8, 4, 4, 4, 8, 4, 4, 8, 8)
        loads[k.divisible != ()] = set(re.findall(rb"ld\.global[.\w]*", c.ptx))
    assert not any(b".v" in op for op in loads[False]) and any(b".v" in op for op in loads[True]), loads
    for bad in ("alpha", "srcs", "out"):                      # only integer or pointer parameters, by element
        with pytest.raises(aot.AotError, match="divisible"):
            aot.AotKernel("g", _gather_rows_kernel, sig, {"PARTS": 3, "BLOCK": 1024}, divisible=(bad,)).validate()


def test_pdl_kernels_wait_for_their_predecessor_from_sm_90_on(tmp_path, monkeypatch):
    """`pdl`: the kernel's USE_PDL is compiled in (griddepcontrol) for sm_90 and later only, and the generated
    table tells the launcher which binaries it may launch as programmatic dependents (aot_runtime)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from memmamba_deploy.models.ops.triton.norm import norm_rows, residual_norm_kernel

    sig = {"h_ptr": "*fp32", "y_ptr": "*fp16", "w_ptr": "*fp16", "h_out_ptr": "*fp32", "u_ptr": "*fp16",
           "rows": "i32", "d": "i32", "eps": "fp32", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr",
           "HAS_Y": "constexpr", "USE_PDL": "constexpr"}
    cx = {"BLOCK_R": norm_rows(64), "BLOCK_D": 64, "HAS_Y": True, "USE_PDL": False}
    k = aot.AotKernel("residual_norm_pdl", residual_norm_kernel, sig, cx, pdl=True)
    assert [k.pdl_on(sm) for sm in (80, 87, 90, 100)] == [False, False, True, True]
    runtime = {n: t for n, t in sig.items() if t != "constexpr"}
    for use_pdl in (False, True):                  # what the constexpr does (sm_90's PTX is not embedded: sm_90a)
        ptx = triton.compile(triton.compiler.ASTSource(fn=residual_norm_kernel, signature=runtime,
                                                       constexprs=dict(cx, USE_PDL=use_pdl)),
                             target=GPUTarget("cuda", 90, 32)).asm["ptx"]
        assert ("griddepcontrol.wait" in ptx) == use_pdl
    seen, real = [], triton.compiler.ASTSource
    monkeypatch.setattr(triton.compiler, "ASTSource", lambda **kw: seen.append(kw["constexprs"]["USE_PDL"]) or real(**kw))
    c = aot.compile_kernel(k, (87, 90), ptx=True)
    assert seen == [False, True] and c.ptx and b"griddepcontrol" not in c.ptx
    monkeypatch.undo()
    meta = aot.build_library([k], tmp_path / "lib", archs=(87, 90))
    src = (tmp_path / "lib" / "memmamba_kernels.cpp").read_text()
    assert "{87, false, false, residual_norm_pdl_sm87" in src and "{90, true, true, residual_norm_pdl_sm90" in src
    assert "sizeof(residual_norm_pdl_ptx) - 1, 87, false}" in src          # the PTX (sm_87's) waits for nothing
    assert meta["kernels"]["residual_norm_pdl"]["pdl_sms"] == [90]
    toy = _toy("fp32")
    with pytest.raises(aot.AotError, match="USE_PDL"):
        aot.AotKernel("toy_pdl", toy.fn, toy.signature, toy.constexprs, pdl=True).validate()


def test_blackwell_cubins_parse():
    """sm_100 and later: ABI v8 cubins, OS/ABI 0x41, the SM in bits 8..15 of e_flags."""
    compiled = aot.compile_kernel(_toy("fp16"), (100, 120))
    for sm, cubin in compiled.cubins.items():
        assert cubin[7] == 0x41 and aot.read_cubin(cubin).sm == sm


def _embedded(source: str, symbol: str) -> bytes:
    """The bytes of `static const unsigned char <symbol>[] = "...";` in generated C++."""
    m = re.search(rf"{symbol}\[\] =\n((?:\s+\"[^\"]*\"\n?)+);", source)
    assert m, symbol
    body = "".join(re.findall(r'"([^"]*)"', m.group(1)))
    return bytes(int(h, 16) for h in re.findall(r"\\x([0-9a-f]{2})", body))


def test_generated_sources_embed_exactly_the_checked_cubins(tmp_path, toy_compiled):
    k = _toy("fp32")
    meta = aot.build_library([k, _toy("fp16")], tmp_path / "lib", archs=(80, 87, 90))
    src = (tmp_path / "lib" / "memmamba_kernels.cpp").read_text()
    header = (tmp_path / "lib" / "memmamba_kernels.h").read_text()
    assert "CUresult launch_scale_add_fp32(CUstream stream, aot::Grid grid, const void* x_ptr, const void* y_ptr, " \
           "const void* out_ptr, float alpha, int32_t n);" in header
    for name, entry in meta["kernels"].items():
        for sm in ("80", "87", "90"):
            data = _embedded(src, f"{name}_sm{sm}")
            assert len(data) == entry["cubins"][sm]["bytes"]
            assert aot.read_cubin(data).sm == int(sm)
        assert _embedded(src, f"{name}_ptx").startswith(b"//")
    with pytest.raises(aot.AotError, match="refusing to replace"):
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "mine.txt").write_text("keep")
        aot.build_library([k], tmp_path / "busy", archs=(80,))
    assert aot.missing_ptx(meta) is None


def test_library_folder_is_checked_before_compiling(tmp_path, monkeypatch):
    """A library replaces its folder whole: only an earlier library, with nothing else beside it, is replaced,
    and a bad --out is named before any compile (compile_kernel would fail the test if it ran)."""
    monkeypatch.setattr(aot, "compile_kernel", lambda *a, **k: pytest.fail("compiled before checking --out"))
    k = _toy("fp32")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "kernels.json").write_text("{}")                  # a kernels.json that is not a library's
    (fake / "notes.txt").write_text("keep")
    with pytest.raises(aot.AotError, match="holds no earlier kernel library"):
        aot.build_library([k], fake, archs=(80,))
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "kernels.json").write_text(json.dumps({"format": 1, "kernels": {}}))
    (lib / "memmamba_kernels.h").write_text("")
    (lib / "mine.txt").write_text("keep")
    with pytest.raises(aot.AotError, match=r"not part of its kernel library \(mine.txt\)"):
        aot.build_library([k], lib, archs=(80,))
    assert (fake / "notes.txt").read_text() == (lib / "mine.txt").read_text() == "keep"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(aot.AotError, match="is a file"):
        aot.build_library([k], tmp_path / "afile", archs=(80,))
    with pytest.raises(OSError, match="is a file, not a directory"):
        aot.build_library([k], tmp_path / "afile" / "lib", archs=(80,))
    for out in (tmp_path / "afile", tmp_path / "afile" / "lib", lib):    # python -m memmamba_deploy.aot (CMake's)
        assert aot.main(["--out", str(out), "--arch", "80", "--only", "pool_sweep_k64_fp32"]) == 2


def test_aot_under_the_interpreter_is_a_one_line_error(tmp_path):
    import os
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "memmamba_deploy.cli", "aot", "--out", str(tmp_path / "lib"), "--arch",
                          "80", "--only", "pool_sweep_k64_fp32"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 2 and "TRITON_INTERPRET=1" in run.stderr and "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "lib").exists()


def test_a_library_without_ptx_says_so(toy_compiled):
    meta = {"ptx": True, "archs": [90], "kernels": {"a": {"ptx_sm": 0}, "b": {"ptx_sm": 0}}}
    assert "no PTX in 2 of 2 kernel(s): sm_90 code is arch-specific" in aot.missing_ptx(meta)
    assert aot.missing_ptx(dict(meta, ptx=False)) is None
    assert aot.missing_ptx({"ptx": True, "archs": [80, 90], "kernels": {"a": {"ptx_sm": 80}}}) is None


# ---- the project's kernels and the plugin library -------------------------------------------------------------------
def _project_build(tmp_path_factory, include=TRT_HEADERS):
    if not shutil.which("nvcc"):
        pytest.skip("nvcc is not installed: the compile check needs the CUDA toolkit")
    if not (include / "NvInferRuntime.h").is_file():
        pytest.skip(f"no TensorRT headers at {include} (fetched NVIDIA/TensorRT include/, git-ignored; CI has none): "
                    f"these build-phase, contract and launch-glue tests run where the headers are fetched "
                    f"(plugins_trt/README.md); the GPU stage 30-plugins only builds the library and checks its numerics")
    return build_for_tests(str(tmp_path_factory.getbasetemp() / "plugins"), str(include))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _project_build(tmp_path_factory)


@pytest.fixture(scope="module")
def harness(built):
    h = Harness(built[0].harness, built[0].plugins)
    yield h
    h.close()


def test_every_plugin_kernel_is_compiled_for_every_sm(built):
    lib, meta = built
    source = (lib.build_dir.parent / "aot" / "memmamba_kernels.cpp").read_text()
    glue = (REPO / "plugins_trt/common/opLaunch.cpp").read_text()
    launched = set(re.findall(r"kernels::launch_(\w+)", glue))
    preloaded = set(re.findall(r"&kernels::(\w+)", glue))
    assert launched and launched == preloaded, "every kernel the plugins launch is preloaded, and only those"
    assert launched <= set(meta["kernels"]), f"opLaunch.cpp launches unknown {sorted(launched - set(meta['kernels']))}"
    for name, k in meta["kernels"].items():
        assert sorted(map(int, k["cubins"])) == list(aot.DEFAULT_ARCHS) and k["ptx_sm"] == 80
        for sm in k["cubins"]:
            info = aot.read_cubin(_embedded(source, f"{name}_sm{sm}"))
            assert info.sm == int(sm) and k["entry"] in info.functions
            assert len(info.param_sizes[k["entry"]]) == len(k["params"])


@pytest.mark.parametrize("headers", [TRT_HEADERS, TRT10_HEADERS], ids=["trt-11.1", "trt-10.3"])
def test_plugin_library_compiles_against_trt_headers(tmp_path_factory, headers):
    lib, _ = _project_build(tmp_path_factory, headers)
    assert _exported(lib.plugins) == ["getCreators", "setLoggerFinder"]
    listing = subprocess.run([str(lib.harness_cli), str(lib.plugins)], capture_output=True, text=True, check=True)
    field_type = {"int": FIELD_INT32, "float": FIELD_FLOAT32}
    want = []
    for name, op in CUSTOM_OPS.items():
        fields = ",".join(f"{a.name}:{field_type[a.kind]}" for a in op.attributes)
        want += [f'{name} 1 "" {fields}', f"{name} 1 memmamba {fields}"]
    assert sorted(listing.stdout.splitlines()) == sorted(want)


def _exported(library) -> list[str]:
    """The dynamic symbols a library defines, less the linker's own (_init, _fini, __bss_start, ...) and the C++
    standard library's template instances (namespace std: every C++ library exports those weakly)."""
    import re

    out = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True, check=True)
    names = [line.split()[-1] for line in out.stdout.splitlines()]
    in_std = re.compile(r"^_Z(T[VIS]|GV)?Z?N?[KVR]*S[tabsiod]")
    return sorted(n for n in names if n.startswith("_Z") and not in_std.match(n) or not n.startswith("_"))


def test_cmake_builds_the_library_and_the_harness(built, tmp_path):
    lib, _ = built
    cmake = build_plugins(tmp_path / "build", trt_include=TRT_HEADERS, aot_dir=lib.build_dir.parent / "aot",
                          jobs=2)
    listing = subprocess.run([str(cmake.harness_cli), str(cmake.plugins)], capture_output=True, text=True, check=True)
    assert len(listing.stdout.splitlines()) == 2 * len(CUSTOM_OPS)
    assert _exported(cmake.plugins) == ["getCreators", "setLoggerFinder"]     # the AOT runtime's symbols hidden too
    assert b"MEMMAMBA_AOT_DRYRUN" not in cmake.plugins.read_bytes()          # no test hooks in a library for use


def test_cmake_names_the_missing_tensorrt_headers(tmp_path):
    """A copy of plugins_trt without third_party/ beside it: configure stops and says which option to pass."""
    src = tmp_path / "repo" / "plugins_trt"
    shutil.copytree(REPO / "plugins_trt", src, ignore=shutil.ignore_patterns("build*"))
    if (Path("/usr/include/x86_64-linux-gnu") / "NvInferRuntime.h").exists():
        pytest.skip("this machine has system TensorRT headers, which CMake finds")
    proc = subprocess.run(["cmake", "-S", str(src), "-B", str(tmp_path / "b"), "-DMEMMAMBA_AOT_DIR=/nonexistent"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "TensorRT headers not found" in proc.stderr and "-DTensorRT_INCLUDE_DIR" in proc.stderr


# ---- the build phase of every plugin, through the harness -------------------------------------------------------------
SIZES = dict(B=2, T=5, Di=128, N=8, K=8, S=8, M=13, ds=16, d=64)
ATTRS = {"SelectiveScanChunk": {"dt_softplus": 1}, "SelectiveScanStep": {"dt_softplus": 1},
         "NotePoolSweep": {"insert_threshold": 0.5}, "SparsePoolAttention": {"num_heads": 2}}


def _dims(shape, sizes=SIZES):
    return tuple(eval(s, {}, dict(sizes)) for s in shape)     # "T+1" too


def _io(op, act, sizes=SIZES):
    dt = lambda t: act if t.dtype == "T" else t.dtype      # noqa: E731
    c = CUSTOM_OPS[op]
    return ([(dt(t), _dims(t.shape, sizes)) for t in c.inputs], [(dt(t), _dims(t.shape, sizes)) for t in c.outputs])


@pytest.mark.parametrize("op", list(CUSTOM_OPS))
@pytest.mark.parametrize("act", ["float32", "float16"])
@pytest.mark.parametrize("symbolic", [True, False], ids=["dynamic", "static"])
@pytest.mark.parametrize("namespace", ["", "memmamba"])
def test_build_phase_and_serialization(harness, op, act, symbolic, namespace):
    inputs, outputs = _io(op, act)
    p = harness.build(op, inputs, contract_fields(op, ATTRS[op]), len(outputs), namespace=namespace,
                      symbolic=symbolic, node_name=f"/layers.0/{op}")
    try:
        assert p.outputs == outputs                        # dtypes and shapes exactly as export/contract.py
        assert p.workspace >= 0
    finally:
        harness.release(p)


@pytest.mark.parametrize("fields, message", [
    ({"dt_softplus": (FIELD_FLOAT32, 1.0)}, "must be one kINT32 value"),
    ({}, "missing field 'dt_softplus'"),
    ({"dt_softplus": (FIELD_INT32, 1), "plugin_version": (FIELD_INT32, 1)}, "unknown field 'plugin_version'"),
    ({"dt_softplus": (FIELD_INT32, 2)}, "dt_softplus must be 0 or 1"),
])
def test_bad_fields_are_refused_by_name(harness, fields, message):
    inputs, outputs = _io("SelectiveScanChunk", "float32")
    with pytest.raises(HarnessError, match=message):
        harness.build("SelectiveScanChunk", inputs, fields, len(outputs))


def test_bad_field_values_and_shapes_are_refused(harness):
    inputs, outputs = _io("SparsePoolAttention", "float32")
    with pytest.raises(HarnessError, match="num_heads must be >= 1"):
        harness.build("SparsePoolAttention", inputs, {"num_heads": (FIELD_INT32, 0)}, 1)
    with pytest.raises(HarnessError, match="divisible by num_heads=3"):
        harness.build("SparsePoolAttention", inputs, {"num_heads": (FIELD_INT32, 3)}, 1, symbolic=False)
    with pytest.raises(HarnessError, match="finite"):
        harness.build("NotePoolSweep", _io("NotePoolSweep", "float32")[0],
                      {"insert_threshold": (FIELD_FLOAT32, float("nan"))}, 2)
    inputs, outputs = _io("SelectiveScanStep", "float32")
    with pytest.raises(HarnessError, match="rank 2"):
        harness.build("SelectiveScanStep", [inputs[0]] + [("float32", (2, 5, 128))] + inputs[2:],
                      contract_fields("SelectiveScanStep", ATTRS["SelectiveScanStep"]), 2)
    bad = list(inputs)
    bad[2] = ("float32", (64, 8))                          # A [Di, N] with the wrong Di
    with pytest.raises(HarnessError, match="d_inner of x and A disagree"):
        harness.build("SelectiveScanStep", bad, {"dt_softplus": (FIELD_INT32, 1)}, 2, symbolic=False)
    with pytest.raises(HarnessError, match="no creator for plugin 'SelectiveScanStep' version 1 namespace 'other'"):
        harness.build("SelectiveScanStep", inputs, {"dt_softplus": (FIELD_INT32, 1)}, 2, namespace="other")


def test_runtime_shape_check_names_the_tensor(harness):
    """onShapeChange (called before enqueue) checks every runtime extent before anything is launched."""
    import ctypes

    from memmamba_deploy import plugin_harness as ph

    inputs, outputs = _io("SelectiveScanChunk", "float32")
    p = harness.build("SelectiveScanChunk", inputs, contract_fields("SelectiveScanChunk", {"dt_softplus": 1}), 2)
    try:
        bad = list(inputs)
        bad[6] = ("float32", (2, 4, 128))                  # z with the wrong T
        ins, outs = ph._tensors(bad), ph._tensors(outputs)
        null_in = (ctypes.c_void_p * len(bad))()
        null_out = (ctypes.c_void_p * len(outputs))()
        rc = harness.lib.mh_enqueue(p.handle, len(bad), ins, null_in, len(outputs), outs, null_out, None, None)
        assert rc != 0
        assert "z must be [2,5,128], got [2,4,128]" in harness.last_error()
    finally:
        harness.release(p)




# ---- SelectiveScanChunk's workspace: sized once for a profile's largest shapes, it must hold any smaller problem ----
# (B, T, Di, N): the first three are sizes where the plan needs more chunks below the largest T than at it
WORKSPACE_SHAPES = [(2, 8200, 256, 16), (1, 5700, 768, 16), (2, 16400, 128, 8), (1, 16384, 1536, 16), (3, 700, 48, 4)]


def _chunk_states_bytes(b, t, di, n):
    from memmamba_deploy.models.ops.triton.scan import scan_chunk_plan

    chunks = scan_chunk_plan(b, t, di, n)[1]
    return 0 if chunks == 1 else 4 * b * chunks * di * (n + 1)


@pytest.mark.parametrize("shape", WORKSPACE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_scan_workspace_holds_every_smaller_problem(shape):
    from memmamba_deploy.models.ops.triton.scan import scan_workspace_bytes

    B, T, di, n = shape
    bound = scan_workspace_bytes(B, T, di, n)
    need = max(_chunk_states_bytes(b, t, di, n) for b in range(1, B + 1) for t in range(0, T + 1))
    assert need <= bound <= 2 * max(need, 1)
    if shape in WORKSPACE_SHAPES[:3]:        # the plan at the largest shapes alone would be too small
        assert need > max(_chunk_states_bytes(b, T, di, n) for b in range(1, B + 1))


def test_plugin_workspace_is_the_bound(harness):
    from memmamba_deploy.models.ops.triton.scan import scan_workspace_bytes

    for B, T, di, n in WORKSPACE_SHAPES:
        inputs, outputs = _io("SelectiveScanChunk", "float16", dict(SIZES, B=B, T=T, Di=di, N=n))
        p = harness.build("SelectiveScanChunk", inputs, contract_fields("SelectiveScanChunk", ATTRS["SelectiveScanChunk"]),
                          len(outputs))
        try:
            assert p.workspace == scan_workspace_bytes(B, T, di, n), (B, T, di, n)
        finally:
            harness.release(p)


# ---- the launch glue, replayed in Triton's interpreter ---------------------------------------------------------------
# With MEMMAMBA_AOT_DRYRUN set the AOT runtime records each launch (variant, grid, parameter bytes) instead of running
# it. Each case enqueues a plugin on fake addresses; one interpreted subprocess replays every recorded launch on CPU
# tensors (plugin_harness.replay). The outputs check opLaunch.cpp's variant choice, argument order, strides, grids,
# chunk plan and workspace layout against the PyTorch reference, without a GPU. Outputs start as NaN / -12345.
def _scan_case(b, t, di, n, act, softplus=1):
    import torch

    from memmamba_deploy.models.ops.scan import selective_scan_ref

    g = torch.Generator().manual_seed(b * 100 + t + di)
    r = lambda *s: torch.randn(*s, generator=g)            # noqa: E731
    # without softplus dt + dt_bias is the step itself: keep it positive, or the state grows without bound
    dt = (r(b, t, di) * 0.5 - 1) if softplus else torch.rand(b, t, di, generator=g) * 0.1
    x, dt, z = r(b, t, di).to(act), dt.to(act), r(b, t, di).to(act)
    B, C = r(b, t, n).to(act), r(b, t, n).to(act)
    A, D, bias, h0 = -torch.exp(r(di, n) * 0.5), r(di), torch.rand(di, generator=g) * 0.1, r(b, di, n)
    outs = [torch.full((b, t, di), float("nan"), dtype=act), torch.full((b, di, n), float("nan"))]
    ins = [x, dt, A, B, C, D, z, bias, h0]
    ref = selective_scan_ref(x.float(), dt.float(), A, B.float(), C.float(), D, z.float(), bias, h0, bool(softplus))
    return "SelectiveScanChunk", {"dt_softplus": softplus}, ins, outs, ref


def _step_case(b, di, n, act, softplus):
    import torch

    from memmamba_deploy.models.ops.scan import selective_state_step_ref

    g = torch.Generator().manual_seed(b + di)
    r = lambda *s: torch.randn(*s, generator=g)            # noqa: E731
    dt = r(b, di) - 1 if softplus else torch.rand(b, di, generator=g) * 0.1
    x, dt, z, B, C = (v.to(act) for v in (r(b, di), dt, r(b, di), r(b, n), r(b, n)))
    A, D, bias, h0 = -torch.exp(r(di, n)), r(di), torch.rand(di, generator=g), r(b, di, n)
    outs = [torch.full((b, di), float("nan"), dtype=act), torch.full((b, di, n), float("nan"))]
    ref = selective_state_step_ref(h0, x.float(), dt.float(), A, B.float(), C.float(), D, z.float(), bias,
                                   bool(softplus))
    return "SelectiveScanStep", {"dt_softplus": softplus}, [x, dt, A, B, C, D, z, bias, h0], outs, ref


def _sweep_case(b, t, k):
    import torch

    from memmamba_deploy.models.ops.pool import pool_sweep_ref

    g = torch.Generator().manual_seed(k + t)
    scores = torch.randint(0, 9, (b, t), generator=g).float() / 8            # exact ties, some == tau1
    prio0 = torch.where(torch.rand(b, k, generator=g) < 0.5, -1.0, torch.randint(0, 9, (b, k), generator=g) / 8)
    outs = [torch.full((b, t + 1, k), -12345, dtype=torch.int32), torch.full((b, k), float("nan"))]
    return "NotePoolSweep", {"insert_threshold": 0.5}, [scores, prio0.float()], outs, pool_sweep_ref(scores, prio0, 0.5)


def _attention_case(b, t, m, s, ds, d, heads, act):
    import torch

    from memmamba_deploy.models.ops.pool import pool_attention_ref

    g = torch.Generator().manual_seed(s + t)
    q, keys, values = (torch.randn(*sh, generator=g).to(act) for sh in ((b, t, ds), (b, m, ds), (b, m, d)))
    index = torch.randint(-1, m, (b, t, s), generator=g, dtype=torch.int32)
    index[:, 0] = -1                                                        # a query with no entry reads 0
    outs = [torch.full((b, t, d), float("nan"), dtype=act)]
    ref = (pool_attention_ref(q.float(), keys.float(), values.float(), index, heads),)
    return "SparsePoolAttention", {"num_heads": heads}, [q, keys, values, index], outs, ref


def _replay_cases():
    import torch
    f32, f16 = torch.float32, torch.float16
    return {  # name: (case, expected variants launched in order)
        "chunk-one-pass": (lambda: _scan_case(2, 7, 32, 8, f32), ["selective_scan_fwd_fp32"]),
        "chunk-three-pass": (lambda: _scan_case(1, 300, 16, 8, f32, softplus=0),
                             ["selective_scan_chunk_states_fp32", "scan_chunk_combine_fp32",
                              "selective_scan_chunk_out_fp32"]),
        "chunk-no-token": (lambda: _scan_case(2, 0, 16, 4, f32), ["scan_chunk_combine_fp32"]),
        "chunk-fp16": (lambda: _scan_case(1, 40, 24, 16, f16), ["selective_scan_fwd_fp16"]),
        "step-fp16": (lambda: _step_case(3, 80, 8, f16, 0), ["selective_state_step_fp16"]),
        "step-fp32": (lambda: _step_case(2, 130, 16, f32, 1), ["selective_state_step_fp32"]),
        "sweep-k8": (lambda: _sweep_case(2, 40, 8), ["pool_sweep_k64_fp32"]),
        "sweep-k100": (lambda: _sweep_case(2, 30, 100), ["pool_sweep_k256_fp32"]),
        "attention-s8": (lambda: _attention_case(2, 5, 20, 8, 16, 64, 2, f32), ["pool_attention_s64_fp32"]),
        "attention-s70-fp16": (lambda: _attention_case(1, 3, 80, 70, 32, 96, 2, f16), ["pool_attention_s256_fp16"]),
    }


@pytest.fixture(scope="module")
def replayed(harness, tmp_path_factory):
    """{case: (recorded variants, outputs after the replay, reference)} for every case of _replay_cases."""
    import os

    import torch

    from memmamba_deploy.plugin_harness import fake_address

    work = tmp_path_factory.mktemp("replay")
    cases, expected = {}, {}
    for name, (make, _) in _replay_cases().items():
        op, attrs, ins, outs, ref = make()
        log = work / f"{name}.launches"
        os.environ["MEMMAMBA_AOT_DRYRUN"] = str(log)
        try:
            spec = [(str(t.dtype).replace("torch.", ""), tuple(t.shape)) for t in ins + outs]
            p = harness.build(op, spec[:len(ins)], contract_fields(op, attrs), len(outs))
            n = len(ins) + len(outs)
            harness.enqueue_pointers(p, spec[:len(ins)], [fake_address(i) for i in range(len(ins))], spec[len(ins):],
                                     [fake_address(i) for i in range(len(ins), n)], fake_address(n))
            harness.release(p)
        finally:
            del os.environ["MEMMAMBA_AOT_DRYRUN"]
        records = log.read_text().splitlines() if log.exists() else []
        cases[name] = {"records": records, "tensors": ins + outs, "workspace": p.workspace}
        expected[name] = (len(ins), ref)
    torch.save(cases, work / "cases.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "memmamba_deploy.plugin_harness", str(work / "cases.pt"),
                           str(work / "out.pt")], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(work / "out.pt")
    return {name: ([r.split()[0] for r in cases[name]["records"]], out[name][expected[name][0]:], expected[name][1])
            for name in cases}


@pytest.mark.parametrize("case", list(_replay_cases()))
def test_launch_glue_replays_to_the_reference(replayed, case):
    import torch

    from memmamba_deploy.metrics import rel_err

    launched, outputs, reference = replayed[case]
    assert launched == _replay_cases()[case][1]
    for got, want in zip(outputs, reference):
        if want.dtype == torch.int32 or case.startswith("sweep"):
            assert torch.equal(got, want.to(got.dtype)), case          # the sweep's decisions are exact
        else:
            tol = 1e-2 if got.dtype == torch.float16 else 1e-4
            assert rel_err(got.float(), want) <= tol, case
    if case.startswith("attention"):
        assert torch.all(outputs[0][:, 0] == 0)
