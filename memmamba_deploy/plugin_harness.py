"""Python driver of the plugin harness (plugins_trt/harness): TensorRT's part, played without TensorRT.

`build_plugins()` builds plugins_trt with CMake; `Harness` opens libmemmamba_plugin_harness.so (ctypes) and, through
it, the plugin library: list the creators, build a plugin from the fields TensorRT's ONNX parser would pass for a
node, run the build phase, serialize and recreate it for the runtime phase, and enqueue it on CUDA tensors.
Used by tests/test_plugins_aot.py, tests/test_contract.py (CPU: build phase) and tests/gpu/test_plugins_gpu.py.
"""
from __future__ import annotations

import ctypes
import functools
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

REPO = Path(__file__).resolve().parent.parent
PLUGINS_SRC = REPO / "plugins_trt"
TRT_HEADERS = REPO / "third_party" / "TensorRT" / "include"

# nvinfer1::DataType and nvinfer1::PluginFieldType values
DTYPES = {"float32": 0, "float16": 1, "int32": 3}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FIELD_INT32, FIELD_FLOAT32 = 5, 1
ATTRIBUTE_FIELD_TYPES = {"int": FIELD_INT32, "float": FIELD_FLOAT32}   # ONNX INT / FLOAT attribute -> PluginField


class HarnessError(RuntimeError):
    """The plugin (or the harness) refused: the message holds what the plugin logged."""


# ---- building plugins_trt ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Built:
    build_dir: Path
    plugins: Path          # libmemmamba_plugins.so
    harness: Path          # libmemmamba_plugin_harness.so
    harness_cli: Path      # plugin_harness


def build_plugins(build_dir: str | Path, trt_include: str | Path | None = None, aot_dir: str | Path | None = None,
                  archs: str = "80;86;87;89;90", jobs: int | None = None, extra: Sequence[str] = ()) -> Built:
    """cmake configure + build of plugins_trt into `build_dir` (incremental when it exists)."""
    cmake = shutil.which("cmake")
    if not cmake:
        raise HarnessError("cmake is not installed")
    build_dir = Path(build_dir)
    args = [cmake, "-S", str(PLUGINS_SRC), "-B", str(build_dir), f"-DMEMMAMBA_CUDA_ARCHS={archs}",
            f"-DPython3_EXECUTABLE={sys.executable}"]
    if trt_include:
        args.append(f"-DTensorRT_INCLUDE_DIR={trt_include}")
    if aot_dir:
        args.append(f"-DMEMMAMBA_AOT_DIR={aot_dir}")
    _run(args + list(extra), "cmake configure")
    _run([cmake, "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 2)], "cmake build")
    return Built(build_dir, build_dir / "libmemmamba_plugins.so", build_dir / "libmemmamba_plugin_harness.so",
                 build_dir / "plugin_harness")


def _run(args, what):
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise HarnessError(f"{what} failed ({' '.join(map(str, args))}):\n{tail}")
    return proc


# ---- the harness ----------------------------------------------------------------------------------------------------
class _Tensor(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int32), ("rank", ctypes.c_int32), ("dims", ctypes.c_int64 * 8)]


class _Field(ctypes.Structure):
    _fields_ = [("name", ctypes.c_char_p), ("type", ctypes.c_int32), ("data", ctypes.c_void_p),
                ("length", ctypes.c_int32)]


@dataclasses.dataclass(frozen=True)
class CreatorInfo:
    name: str
    version: str
    namespace: str
    fields: dict[str, int]       # field name -> PluginFieldType


@dataclasses.dataclass
class RuntimePlugin:
    """A plugin brought through the build phase, serialized and recreated for the runtime phase."""
    op: str
    handle: int
    outputs: list[tuple[str, tuple[int, ...]]]   # (dtype name, shape) the plugin reported
    workspace: int


def _tensors(specs: Sequence[tuple[str, Sequence[int]]]):
    arr = (_Tensor * max(1, len(specs)))()
    for i, (dtype, shape) in enumerate(specs):
        arr[i].dtype = DTYPES[dtype]
        arr[i].rank = len(shape)
        for k, d in enumerate(shape):
            arr[i].dims[k] = int(d)
    return arr


class Harness:
    def __init__(self, harness_lib: str | Path, plugin_lib: str | Path):
        self.lib = ctypes.CDLL(str(harness_lib))
        L = self.lib
        L.mh_open.restype, L.mh_open.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
        L.mh_close.argtypes = [ctypes.c_void_p]
        L.mh_creators.restype = ctypes.c_int32
        L.mh_creators.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32]
        L.mh_build.restype = ctypes.c_void_p
        L.mh_build.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32,
                               ctypes.POINTER(_Field), ctypes.c_int32, ctypes.POINTER(_Tensor), ctypes.c_int32,
                               ctypes.POINTER(_Tensor), ctypes.c_int32, ctypes.POINTER(ctypes.c_uint64)]
        L.mh_supports.restype = ctypes.c_int32
        L.mh_supports.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int32,
                                  ctypes.POINTER(_Field), ctypes.c_int32, ctypes.c_int32,
                                  ctypes.POINTER(ctypes.c_int32)]
        L.mh_enqueue.restype = ctypes.c_int32
        L.mh_enqueue.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.POINTER(_Tensor),
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32, ctypes.POINTER(_Tensor),
                                 ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_void_p]
        L.mh_release.argtypes = [ctypes.c_void_p]
        L.mh_last_error.restype = ctypes.c_char_p
        self.handle = L.mh_open(str(plugin_lib).encode())
        if not self.handle:
            raise HarnessError(self.last_error())

    def last_error(self) -> str:
        return self.lib.mh_last_error().decode(errors="replace")

    def close(self):
        if self.handle:
            self.lib.mh_close(self.handle)
            self.handle = None

    def creators(self) -> list[CreatorInfo]:
        buf = ctypes.create_string_buffer(1 << 16)
        if self.lib.mh_creators(self.handle, buf, len(buf)) < 0:
            raise HarnessError(self.last_error())
        out = []
        for line in buf.value.decode().splitlines():
            name, version, ns, *rest = line.split(" ")
            fields = dict((f.split(":")[0], int(f.split(":")[1])) for f in (rest[0].split(",") if rest and rest[0]
                                                                            else []))
            out.append(CreatorInfo(name, version, "" if ns == '""' else ns, fields))
        return out

    @staticmethod
    def _fields(fields: dict[str, tuple[int, object]]):
        """{name: (PluginFieldType, value)} -> ctypes array (+ the buffers it points into, kept alive)."""
        arr = (_Field * max(1, len(fields)))()
        keep = []
        for i, (name, (ftype, value)) in enumerate(fields.items()):
            buf = np.array([value], dtype=np.int32 if ftype == FIELD_INT32 else np.float32)
            keep += [buf, name.encode()]
            arr[i].name, arr[i].type, arr[i].length = keep[-1], ftype, 1
            arr[i].data = buf.ctypes.data
        return arr, keep

    def build(self, op: str, inputs: Sequence[tuple[str, Sequence[int]]], fields: dict[str, tuple[int, object]],
              nb_outputs: int, namespace: str = "", symbolic: bool = True, node_name: str = "node") -> RuntimePlugin:
        farr, keep = self._fields(fields)
        ins = _tensors(inputs)
        outs = (_Tensor * nb_outputs)()
        ws = ctypes.c_uint64(0)
        h = self.lib.mh_build(self.handle, op.encode(), namespace.encode(), node_name.encode(), len(fields), farr,
                              len(inputs), ins, nb_outputs, outs, int(symbolic), ctypes.byref(ws))
        del keep
        if not h:
            raise HarnessError(self.last_error())
        reported = [(DTYPE_NAMES.get(o.dtype, f"dtype{o.dtype}"), tuple(o.dims[k] for k in range(o.rank)))
                    for o in outs]
        return RuntimePlugin(op, h, reported, int(ws.value))

    def supports(self, op: str, dtypes: Sequence[str], nb_inputs: int, fields: dict[str, tuple[int, object]],
                 namespace: str = "") -> bool:
        farr, keep = self._fields(fields)
        arr = (ctypes.c_int32 * len(dtypes))(*[DTYPES[d] for d in dtypes])
        r = self.lib.mh_supports(self.handle, op.encode(), namespace.encode(), len(fields), farr, nb_inputs,
                                 len(dtypes) - nb_inputs, arr)
        del keep
        if r < 0:
            raise HarnessError(self.last_error())
        return bool(r)

    def enqueue(self, plugin: RuntimePlugin, inputs, outputs, workspace=None, stream=None) -> None:
        """inputs/outputs: contiguous CUDA torch tensors; stream: a torch.cuda.Stream (default: current)."""
        import torch

        def spec(t):
            return ({torch.float32: "float32", torch.float16: "float16", torch.int32: "int32"}[t.dtype],
                    tuple(t.shape))
        for t in list(inputs) + list(outputs):
            if not t.is_cuda or not t.is_contiguous():
                raise ValueError("harness tensors must be contiguous CUDA tensors")
        stream = stream or torch.cuda.current_stream()
        self.enqueue_pointers(plugin, [spec(t) for t in inputs], [t.data_ptr() for t in inputs],
                              [spec(t) for t in outputs], [t.data_ptr() for t in outputs],
                              workspace.data_ptr() if workspace is not None else None, stream.cuda_stream)

    def enqueue_pointers(self, plugin: RuntimePlugin, in_specs, in_ptrs, out_specs, out_ptrs, workspace=None,
                         stream=None) -> None:
        """onShapeChange + enqueue on raw device addresses ((dtype, shape) specs, int addresses)."""
        ins, outs = _tensors(in_specs), _tensors(out_specs)
        in_arr = (ctypes.c_void_p * len(in_ptrs))(*in_ptrs)
        out_arr = (ctypes.c_void_p * len(out_ptrs))(*out_ptrs)
        r = self.lib.mh_enqueue(plugin.handle, len(in_specs), ins, in_arr, len(out_specs), outs, out_arr, workspace,
                                stream)
        if r != 0:
            raise HarnessError(self.last_error())

    def release(self, plugin: RuntimePlugin) -> None:
        if plugin.handle:
            self.lib.mh_release(plugin.handle)
            plugin.handle = 0


def contract_fields(op: str, attributes: dict[str, object]) -> dict[str, tuple[int, object]]:
    """The PluginFields TensorRT's ONNX parser passes for a node of `op` with these attributes: each attribute the
    creator lists, INT as one kINT32, FLOAT as one kFLOAT32 (onnx-tensorrt loadFields)."""
    from .export.contract import CUSTOM_OPS

    kinds = {a.name: a.kind for a in CUSTOM_OPS[op].attributes}
    return {name: (ATTRIBUTE_FIELD_TYPES[kinds[name]], value) for name, value in attributes.items()
            if name in kinds}


# ---- one build per process for the CPU tests ------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def aot_for_tests(workdir: str) -> tuple[Path, dict]:
    """The project's kernels compiled for every default SM into WORKDIR/aot (once per process)."""
    from .aot import DEFAULT_ARCHS, build_library, project_kernels

    aot_dir = Path(workdir) / "aot"
    return aot_dir, build_library(project_kernels(), aot_dir, DEFAULT_ARCHS)


@functools.lru_cache(maxsize=None)
def build_for_tests(workdir: str, trt_include: str = str(TRT_HEADERS)) -> tuple[Built, dict]:
    """The plugin library + harness compiled against `trt_include` by plugins_trt/compile_check.sh (nvcc), with the
    kernels of aot_for_tests. Cached per process: the CPU test modules share it."""
    aot_dir, meta = aot_for_tests(workdir)
    out = Path(workdir) / f"cc-{Path(trt_include).parent.name}"
    _run(["bash", str(PLUGINS_SRC / "compile_check.sh"), trt_include, str(aot_dir), str(out)], "compile check")
    return Built(out, out / "libmemmamba_plugins.so", out / "libmemmamba_plugin_harness.so", out / "plugin_harness"), meta


# ---- dry runs: check the launch glue without a GPU -----------------------------------------------------------------
# With MEMMAMBA_AOT_DRYRUN=FILE the AOT runtime appends one line per launch ("variant gx gy gz" + each parameter's
# bytes in hex) instead of running it. Enqueue a plugin on fake addresses (tensor i at (i + 1) << SPACING), then
# replay the lines on CPU tensors in Triton's interpreter (a separate process: Triton is interpreted or compiled per
# process): the outputs show whether the C++ launch glue (variant choice, argument order, strides, grids, chunk
# plan, workspace layout) computes the op. tests/test_plugins_aot.py does this for every plugin.
SPACING = 36


def fake_address(i: int) -> int:
    return (i + 1) << SPACING


def replay(records: list[str], tensors: list, workspace_bytes: int) -> list:
    """Run recorded launches on CPU copies of `tensors` (and a zeroed workspace, fake address len(tensors)).
    Needs an interpreted process (TRITON_INTERPRET=1 before triton is first imported). Returns the tensors."""
    import struct

    import torch

    from .aot import from_table_entry
    from .models.ops.triton.aot import aot_kernels    # in this (interpreted) process: the interpreted kernels

    variants = {v.name: v for name, entry in aot_kernels().items() for v in from_table_entry(name, entry)}
    raw = [t.contiguous().view(torch.uint8).reshape(-1).clone() for t in tensors]
    raw.append(torch.zeros(max(workspace_bytes, 16), dtype=torch.uint8))
    ptr_dtypes = {"*fp32": torch.float32, "*fp16": torch.float16, "*i32": torch.int32, "*i64": torch.int64}
    for line in records:
        name, gx, gy, gz, *params = line.split()
        k = variants[name]
        args = []
        for (_, ptype, _), hexbytes in zip(k.runtime_args, params):
            data = bytes.fromhex(hexbytes)
            if ptype.startswith("*"):
                addr = int.from_bytes(data, "little")
                buf, offset = raw[(addr >> SPACING) - 1], addr & ((1 << SPACING) - 1)
                elem = torch.empty(0, dtype=ptr_dtypes[ptype]).element_size()
                usable = (buf.numel() - offset) // elem * elem
                args.append(buf[offset:offset + usable].view(ptr_dtypes[ptype]))
            elif ptype == "fp32":
                args.append(struct.unpack("<f", data)[0])
            else:
                args.append(int.from_bytes(data, "little", signed=True))
        call = []                                  # a tuple argument's elements, one parameter each, as a tuple
        for (_, _, path), value in zip(k.runtime_args, args):
            if len(path) == 2 and path[1] > 0:
                call[-1] = (*call[-1], value)
            else:
                call.append((value,) if len(path) == 2 else value)
        k.fn[(int(gx), int(gy), int(gz))](*call, **k.constexprs, num_warps=k.num_warps)
    return [r[:t.numel() * t.element_size()].view(t.dtype).reshape(t.shape) for r, t in zip(raw, tensors)]


def _replay_main(cases_file: str, out_file: str) -> None:
    """python -m memmamba_deploy.plugin_harness CASES.pt OUT.pt (run with TRITON_INTERPRET=1)."""
    import torch

    cases = torch.load(cases_file)
    torch.save({name: replay(c["records"], c["tensors"], c["workspace"]) for name, c in cases.items()}, out_file)


if __name__ == "__main__":
    _replay_main(*sys.argv[1:])
