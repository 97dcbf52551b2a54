"""The C++ runtime's host code (cpp/, no GPU): build it with CMake (MEMMAMBA_WITH_CUDA=OFF), run its unit tests
through ctest, and check it against the Python side: a checkpoint written by MemMambaLM.save_pretrained loads with
the same parameters, and the host sampler draws exactly the tokens of cpp_support.sample_ref."""
import ctypes
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import make_model

REPO = Path(__file__).resolve().parent.parent
CPP = REPO / "cpp"

missing = [t for t in ("cmake", "ctest", "c++") if shutil.which(t) is None]
pytestmark = pytest.mark.skipif(bool(missing), reason=f"the C++ unit tests need {missing} on PATH")


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("cpp-host-build")
    for cmd in (["cmake", "-S", str(CPP), "-B", str(out), "-DMEMMAMBA_WITH_CUDA=OFF", "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", str(out), "-j", "2"]):
        run = subprocess.run(cmd, capture_output=True, text=True)
        assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return out


def _python_checkpoint(directory: Path, dtype=torch.float32, **overrides) -> Path:
    model = make_model(seed=3, **overrides).to(dtype)
    model.save_pretrained(directory)
    sd = model.state_dict()
    names = ["embeddings.weight", "layers.1.mixer.A_log", "norm_f.weight"]
    (directory / "expected.json").write_text(json.dumps({
        "parameters": sum(v.numel() for v in sd.values()),
        "memory": model.config.memory,
        "first_values": {n: sd[n].flatten()[:16].float().tolist() for n in names},
    }))
    return directory


def test_ctest_runs_every_host_test(build, tmp_path):
    ckpt = _python_checkpoint(tmp_path / "ckpt")
    run = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True,
                         env={**os.environ, "MEMMAMBA_TEST_CHECKPOINT": str(ckpt)})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "100% tests passed" in run.stdout and "Skipped" not in run.stdout and "Not Run" not in run.stdout
    listed = subprocess.run([str(build / "memmamba_unit_tests"), "--list"], capture_output=True, text=True).stdout.split()
    registered = re.findall(r"Test +#\d+: (\w+) ", run.stdout)
    assert len(listed) >= 12 and sorted(registered) == sorted(listed), "every C++ test must be registered with ctest"


@pytest.mark.parametrize("dtype,memory", [(torch.float16, True), (torch.float32, False)])
def test_checkpoints_of_every_kind_load(build, tmp_path, dtype, memory):
    ckpt = _python_checkpoint(tmp_path / "ckpt", dtype=dtype, memory=memory)
    run = subprocess.run([str(build / "memmamba_unit_tests"), "checkpoint_written_by_python"], capture_output=True,
                         text=True, env={**os.environ, "MEMMAMBA_TEST_CHECKPOINT": str(ckpt)})
    assert run.returncode == 0, run.stdout


def _shim(build):
    lib = ctypes.CDLL(str(build / "libmemmamba_host_shim.so"))
    lib.mm_host_last_error.restype = ctypes.c_char_p
    lib.mm_host_sample.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.c_int,
                                   ctypes.c_float, ctypes.c_ulonglong, ctypes.c_uint, ctypes.c_void_p]
    lib.mm_host_checkpoint_parameters.restype = ctypes.c_longlong
    lib.mm_host_checkpoint_parameters.argtypes = [ctypes.c_char_p]
    lib.mm_host_weights_fingerprint.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.mm_host_state_copy.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    return lib


def test_host_sampler_equals_the_python_reference(build):
    from memmamba_deploy.models.ops.triton.cpp_support import sample_ref

    lib = _shim(build)
    g = torch.Generator().manual_seed(8)
    B, V = 4, 700
    logits = (2.5 * torch.randn(B, V, generator=g)).contiguous()
    logits[2, 5] = logits[2, 600] = logits[2].max() + 0.5
    settings = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.8, 20, 1.0), (1.0, 0, 0.5), (1.2, 50, 0.9), (1.0, 1, 1.0)]
    for i, (temp, k, p) in enumerate(settings):
        for step in (0, 1, 1000):
            seed = 0xDEADBEEF_00000000 + 17 * i
            out = torch.full((B,), -1, dtype=torch.int32)
            assert lib.mm_host_sample(logits.data_ptr(), B, V, temp, k, p, seed, step, out.data_ptr()) == 0
            ref = sample_ref(logits, temperature=temp, top_k=k, top_p=p, seed=seed, step=step)
            assert out.tolist() == ref.tolist(), (temp, k, p, step)
    out = torch.zeros(1, dtype=torch.int32)
    assert lib.mm_host_sample(logits.data_ptr(), 1, V, 1.0, 0, 0.0, 0, 0, out.data_ptr()) == -1
    assert b"bad sampling settings" in lib.mm_host_last_error()


def test_corrupt_checkpoint_is_an_error_not_a_crash(build, tmp_path):
    lib = _shim(build)
    ckpt = _python_checkpoint(tmp_path / "ckpt")
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    for cut in (3, 100, len(data) // 2, len(data) - 1):
        weights.write_bytes(data[:cut])
        assert lib.mm_host_checkpoint_parameters(str(ckpt).encode()) == -1
        assert b"model.safetensors is corrupt or not a safetensors file" in lib.mm_host_last_error()
    weights.write_bytes(data)
    assert lib.mm_host_checkpoint_parameters(str(ckpt).encode()) == json.loads((ckpt / "expected.json").read_text())[
        "parameters"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weights_fingerprint_equals_pythons(build, tmp_path, dtype):
    from memmamba_deploy.session import weights_fingerprint

    lib = _shim(build)
    file = _python_checkpoint(tmp_path / "ckpt", dtype=dtype) / "model.safetensors"
    out = ctypes.create_string_buffer(65)
    assert lib.mm_host_weights_fingerprint(str(file).encode(), out) == 0, lib.mm_host_last_error()
    stat = file.stat()
    want = weights_fingerprint(str(file), stat.st_size, stat.st_mtime_ns)
    assert out.value.decode() == want      # the host build finds OpenSSL here; the fingerprint is then never empty


@pytest.mark.parametrize("dtype,memory,batch", [(torch.float32, True, 2), (torch.float16, True, 1),
                                                (torch.float32, False, 1)])
def test_session_state_files_go_between_python_and_cpp(build, tmp_path, dtype, memory, batch):
    """A stream Python's Session.save_state wrote reads in the C++ runtime's reader, and what the C++ writer writes
    from it loads back in Python and goes on exactly as the original: the two runtimes share the format."""
    from safetensors.torch import load_file

    from memmamba_deploy.session import Session

    lib = _shim(build)
    ckpt = _python_checkpoint(tmp_path / "ckpt", dtype=dtype, memory=memory)
    a = Session.open(ckpt, device="cpu")
    prompt = torch.randint(0, 256, (batch, 17), generator=torch.Generator().manual_seed(2))
    a.prefill(prompt)
    list(a.generate(None, 5))                             # leaves its last tokens pending
    a.save_state(tmp_path / "py.safetensors")
    rest = torch.stack([torch.as_tensor(t) for t in a.generate(None, 9)])
    rc = lib.mm_host_state_copy(str(tmp_path / "py.safetensors").encode(), str(tmp_path / "cpp.safetensors").encode(),
                                str(ckpt).encode(), batch, int(dtype == torch.float16))
    assert rc == 0, lib.mm_host_last_error()
    py, cpp = load_file(tmp_path / "py.safetensors"), load_file(tmp_path / "cpp.safetensors")
    assert set(cpp) == set(py) and "pending" in py
    for k, v in py.items():
        assert cpp[k].dtype == v.dtype and torch.equal(cpp[k], v), k
    b = Session.open(ckpt, device="cpu")
    b.load_state(tmp_path / "cpp.safetensors")
    assert torch.equal(torch.stack([torch.as_tensor(t) for t in b.generate(None, 9)]), rest)


def test_cpp_refuses_a_state_file_that_does_not_fit(build, tmp_path):
    from memmamba_deploy.session import Session

    lib = _shim(build)
    ckpt = _python_checkpoint(tmp_path / "ckpt")
    s = Session.open(ckpt, device="cpu")
    s.prefill(torch.randint(0, 256, (1, 9)))
    s.save_state(tmp_path / "s.safetensors")
    twin = tmp_path / "twin"                                # the same config, other weights
    make_model(seed=4).save_pretrained(twin)
    plain = tmp_path / "plain"
    make_model(seed=3, memory=False).save_pretrained(plain)
    for directory, batch, message in [(twin, 1, b"a model with other weights"), (plain, 1, b"another model: memory"),
                                      (ckpt, 2, b"a batch of 1 rows; this session has batch 2")]:
        assert lib.mm_host_state_copy(str(tmp_path / "s.safetensors").encode(), None, str(directory).encode(),
                                      batch, 0) == -1
        assert message in lib.mm_host_last_error(), lib.mm_host_last_error()
    assert lib.mm_host_state_copy(str(tmp_path / "s.safetensors").encode(), None, str(ckpt).encode(), 1, 0) == 0


def test_kernels_compile_only_from_one_source_tree(tmp_path):
    """A checkout whose memmamba_deploy imports first while another checkout's editable install supplies its models
    (the kernels' source): the AOT builds refuse, naming both, instead of compiling the other tree's kernels."""
    import sys

    other = tmp_path / "checkout"
    shutil.copytree(REPO / "memmamba_deploy", other / "memmamba_deploy", ignore=shutil.ignore_patterns("assets"))
    shutil.copytree(REPO / "cpp", other / "cpp", ignore=shutil.ignore_patterns("build*"))
    code = f"import sys; sys.path.insert(0, {str(other)!r}); from memmamba_deploy import aot; aot.project_kernels()"
    for cmd in ([sys.executable, "-c", code],
                [sys.executable, str(other / "cpp" / "aot_kernels.py"), "--out", str(tmp_path / "aot"), "--arch", "90"]):
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
        assert run.returncode != 0 and "an editable install of another checkout" in run.stderr, run.stderr[-2000:]
        assert str(other / "memmamba_deploy") in run.stderr and str(REPO / "models") in run.stderr
    assert not (tmp_path / "aot").exists()


def test_variant_keys_name_what_sets_each_variant():
    """Configs that differ in one field each share the variants whose keys leave that field out: every such shared
    variant must be the same one (constexprs and the arguments compiled as multiples of 16), or the runtime would
    refuse a launch of the second config's values. cpp/aot_kernels.py raises where they are not; in either order."""
    import sys

    sys.path.insert(0, str(CPP))
    import aot_kernels

    from memmamba_deploy.models import MemMambaConfig

    base = MemMambaConfig.preset("130m", memory=True)
    changes = (dict(d_model=720), dict(dt_rank=40), dict(d_state=8), dict(pool_size=48), dict(summary_dim=32),
               dict(memory_heads=2), dict(d_conv=3), dict(cross_layer_every=2), dict(expand=3), dict(n_layers=6))
    configs = [base] + [MemMambaConfig.from_dict({**base.to_dict(), **c}) for c in changes]
    configs += [MemMambaConfig.preset("tiny", memory=m) for m in (True, False)]
    names = [[k.name for k, *_ in aot_kernels.runtime_kernels(order)] for order in (configs, configs[::-1])]
    assert sorted(names[0]) == sorted(names[1])
    # d_model 720 puts the bank's first column (ds + d/4 = 244) off a 16-byte boundary: its pool_mix is its own
    by_name = {k.name: k for k, *_ in aot_kernels.runtime_kernels(configs)}
    assert "banks_0" in by_name["prefill_pool_mix_fp16_d768_K50_ds64_H4_p4"].divisible
    assert "banks_0" not in by_name["prefill_pool_mix_fp16_d720_K50_ds64_H4_p4"].divisible


@pytest.mark.slow
def test_runtime_kernel_library_compiles(tmp_path):
    """cpp/aot_kernels.py: every kernel variant libmemmamba launches (tiny preset) compiles ahead of time for sm_90
    and sm_87 against the current models/ops/triton signatures, and the variant table names each one."""
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(CPP / "aot_kernels.py"), "--out", str(tmp_path / "aot"), "--arch",
                          "87,90", "--preset", "tiny", "--no-ptx"], capture_output=True, text=True, env=env, cwd=REPO)
    assert run.returncode == 0, run.stderr[-4000:]
    table = (tmp_path / "aot" / "runtime_variants.cpp").read_text()
    kernels = json.loads((tmp_path / "aot" / "kernels.json").read_text())["kernels"]
    ops = ("decode_norm_proj_embed_noproj", "decode_norm_proj_noproj", "decode_norm_proj_embed", "decode_norm_proj",
           "decode_note_pool", "decode_note_pool_cross", "decode_in_proj_conv", "decode_ssm_out", "conv_step",
           "scan_step", "sample", "prefill_conv", "prefill_note_scores", "pool_after", "gained_add", "cross_index",
           "prefill_scan_states", "prefill_scan_prefix", "prefill_scan_out", "sweep_top", "sweep_enter",
           "sweep_compact", "sweep_replay", "sweep_fill", "prefill_residual_norm",
           "prefill_conv_lengths", "prefill_note_scores_lengths", "prefill_scan_states_lengths")
    half_only = ("prefill_pool_mix", "prefill_pool_mix_cross")            # pool_mix's dots are half-precision
    for act in ("fp32", "fp16"):
        for op in ops + (half_only if act == "fp16" else ()):
            assert f'{{"{op}", "{act}", ' in table, (op, act)
    assert '{"prefill_pool_mix", "fp32"' not in table
    # the tiny preset and its plain-Mamba twin: the memory kernels once, the shared ones once per shape key
    assert any(k.endswith("_nomem") for k in kernels) and any("_K8_" in k for k in kernels)
    assert any("_d128_" in k for k in kernels)                      # the bundled demo checkpoints' shape, unasked
    # one table row per compiled kernel, but the plugins' (opLaunch.cpp calls them by their typed launchers)
    from memmamba_deploy.models.ops.triton.aot import aot_kernels
    plugin = {f"{n}_{s}" for n, e in aot_kernels().items() for s in e["signatures"]}
    assert plugin <= set(kernels) and table.count('\n    {"') == len(kernels) - len(plugin)
    assert all(sorted(k["cubins"]) == ["87", "90"] for k in kernels.values())
    # every Launch in the runtime's sources passes exactly the arguments of one kernel, by name (a tuple argument's
    # elements, <name>_<j>, as name + "_j")
    tuple_args = {a for k in kernels.values() for a, t in k["signature"].items() if isinstance(t, list)}
    assert tuple_args == {"banks", "indices", "ends", "strides_s_b", "strides_s_m", "strides_i_b", "strides_i_t",
                          "strides_e_b"}
    params = {}
    for op, p in re.findall(r'\{"(\w+)", "fp(?:32|16)", "[^"]*", &\w+, "[^"]*", "([^"]*)"\}', table):
        names = {n.split(":")[0] for n in p.split(",")}
        params[op] = {re.sub(r"_\d+$", "", n) if re.sub(r"_\d+$", "", n) in tuple_args else n for n in names}
    assert set(params) == set(ops + half_only)
    assert "/16" in table                                  # pool_mix's arguments compiled as multiples of 16
    matched = set()
    for src in ("native.cpp", "tensorrt.cpp"):
        text = (CPP / "src" / src).read_text()
        for block in re.findall(r"Launch(?:\(\w+\)| \w+\(\w+\);)(.*?)\.run\(", text, re.S):
            names = set(re.findall(r'\.(?:ptr|i32|f32)\("(\w+)"', block))
            hits = [op for op, p in params.items() if p == names]
            assert hits, f"{src}: a launch passes {sorted(names)}, which matches no kernel's arguments"
            matched.update(hits)
    assert matched == set(ops + half_only), f"kernels never launched: {set(ops + half_only) - matched}"


def _include_dirs():
    """(CUDA include dir, cuBLASLt include dir) or a reason they are missing."""
    cuda = next((Path(p) for p in ("/usr/local/cuda/include", "/usr/include") if (Path(p) / "cuda.h").is_file()), None)
    try:
        import nvidia
        cublas = next((Path(p) / sub / "include" for p in nvidia.__path__ for sub in ("cu13", "cu12", "cublas")
                       if (Path(p) / sub / "include" / "cublasLt.h").is_file()), None)
    except ImportError:
        cublas = None
    cublas = cublas or (cuda if cuda and (cuda / "cublasLt.h").is_file() else None)
    return cuda, cublas


@pytest.mark.parametrize("headers", ["TensorRT", "TensorRT-10.3"])
def test_tensorrt_backend_compiles_against_the_headers(headers):
    """The TensorRT backend (cpp/src/tensorrt.cpp) compiles against the open-source TensorRT 11.1 and 10.3 headers
    (fetched into the git-ignored third_party/, which CI does not have: then the GPU stage 60-native compiles it)."""
    include = REPO / "third_party" / headers / "include"
    cuda, cublas = _include_dirs()
    if not (include / "NvInferRuntime.h").is_file():
        pytest.skip(f"no TensorRT headers in {include} (fetched by hand, never committed)")
    if cuda is None or cublas is None:
        pytest.skip("needs the CUDA toolkit headers (cuda.h) and cuBLASLt's (cublasLt.h)")
    run = subprocess.run(["c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-fsyntax-only",
                          "-isystem", str(include), "-I", str(CPP / "include"), "-I", str(CPP / "src"),
                          "-I", str(REPO / "plugins_trt" / "aot_runtime" / "include"), "-isystem", str(cuda),
                          "-isystem", str(cublas), str(CPP / "src" / "tensorrt.cpp")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
