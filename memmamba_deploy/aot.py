"""Ahead-of-time kernel library: the Triton kernels of models/ops/triton compiled to cubins and embedded in C++.

`memdeploy aot --out DIR [--arch 80,86,87,89,90]` (or `python -m memmamba_deploy.aot`) compiles every kernel of
`models.ops.triton.AOT_KERNELS` with Triton's own compiler (no GPU needed) for each listed SM, plus PTX of the
lowest SM for forward compatibility, checks each cubin's ELF header (machine, SM, entry symbol, parameter count
and sizes) against the launch metadata, and writes:

    DIR/memmamba_kernels.h    typed launch functions, one per kernel variant (namespace memmamba::kernels)
    DIR/memmamba_kernels.cpp  the cubins + PTX as byte strings and their KernelImage records
    DIR/kernels.json          the same metadata, for tests and tools

The generated sources build against plugins_trt/aot_runtime (aot_runtime.h: pick the cubin for the running device,
load it once per CUDA context, launch on a stream). The TensorRT plugins and the C++ runtime link them.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

DEFAULT_ARCHS = (80, 86, 87, 89, 90)       # A100, RTX 30xx/A10, Jetson Orin, L4/RTX 40xx, H100
C_TYPES = {"*": "const void*", "i1": "int32_t", "i8": "int8_t", "i16": "int16_t", "i32": "int32_t",
           "i64": "int64_t", "u1": "uint32_t", "u8": "uint8_t", "u16": "uint16_t", "u32": "uint32_t",
           "u64": "uint64_t", "fp32": "float", "f32": "float", "fp64": "double"}
PARAM_BYTES = {"const void*": 8, "int8_t": 1, "int16_t": 2, "int32_t": 4, "int64_t": 8, "uint8_t": 1,
               "uint16_t": 2, "uint32_t": 4, "uint64_t": 8, "float": 4, "double": 8}
PDL_SM = 90                  # programmatic dependent launch (griddepcontrol): sm_90 and later
SCRATCH_PARAMS = ("global_scratch", "profile_scratch")   # Triton >= 3.5 appends these two pointers to every kernel


class AotError(RuntimeError):
    """A kernel that cannot be compiled ahead of time or whose binary does not match its launch metadata."""


@dataclasses.dataclass(frozen=True)
class AotKernel:
    """One compiled variant: a Triton kernel with every constexpr fixed and every runtime argument typed.

    name        C++ identifier of the variant (unique in the library), e.g. "selective_scan_chunk_fp16"
    fn          the @triton.jit function
    signature   Triton type of every argument of `fn`, in order ("*fp16", "i32", "fp32", ... or "constexpr"); a
                tuple argument has a tuple of types, and is passed as one parameter per element, <name>_<j>
    constexprs  the value of every constexpr argument
    grid        how the caller sizes the grid, in words (copied into the generated header)
    divisible   runtime arguments (by parameter name) compiled as multiples of 16 (pointers: 16-byte aligned),
                as Triton's JIT specialises them, so that their loads vectorise; the launcher must pass such values
    pdl         the kernel waits for its predecessor through constexpr USE_PDL (models/ops/triton/launch.py
                _after_predecessor): its binaries for PDL_SM and later are compiled with USE_PDL (griddepcontrol)
                and launched as programmatic dependents (aot_runtime), the others without it
    """

    name: str
    fn: Any
    signature: dict[str, Any]
    constexprs: dict[str, Any]
    num_warps: int = 4
    num_stages: int = 3
    grid: str = ""
    doc: str = ""
    divisible: tuple[str, ...] = ()
    pdl: bool = False

    def pdl_on(self, sm: int) -> bool:
        """Whether the binary for `sm` is compiled with USE_PDL."""
        return self.pdl and sm >= PDL_SM

    @property
    def runtime_args(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(parameter name, Triton type, path) of each runtime argument in order, tuple arguments flattened
        (path: (argument index,) or (argument index, element), as Triton's attrs name them)."""
        out = []
        for i, (n, t) in enumerate(self.signature.items()):
            if isinstance(t, (tuple, list)):
                out += [(f"{n}_{j}", tj, (i, j)) for j, tj in enumerate(t)]
            elif t != "constexpr":
                out.append((n, t, (i,)))
        return out

    @property
    def params(self) -> list[tuple[str, str]]:
        """(name, C type) of each launch parameter in order, Triton's scratch pointers last."""
        out = [(n, c_type(t)) for n, t, _ in self.runtime_args]
        return out + [(s, "const void*") for s in SCRATCH_PARAMS]

    def validate(self) -> None:
        if not self.name.isidentifier():
            raise AotError(f"kernel variant name {self.name!r} is not a C identifier")
        names = list(getattr(self.fn, "arg_names", []))
        if not names:
            raise AotError(f"{self.name}: fn is not a @triton.jit function")
        if list(self.signature) != names:
            raise AotError(f"{self.name}: signature names {list(self.signature)} must list the arguments of "
                           f"{self.fn.__name__} in order: {names}")
        want = {n for n, t in self.signature.items() if t == "constexpr"}
        if set(self.constexprs) != want:
            raise AotError(f"{self.name}: constexprs {sorted(self.constexprs)} must give exactly the constexpr "
                           f"arguments {sorted(want)}")
        types = {}
        for n, t, _ in self.runtime_args:
            c_type(t, where=f"{self.name}.{n}")
            types[n] = t
        if self.pdl and "USE_PDL" not in self.constexprs:
            raise AotError(f"{self.name}: pdl needs {self.fn.__name__} to take constexpr USE_PDL")
        for n in self.divisible:
            if n not in types or not (types[n].startswith("*") or types[n] in ("i32", "i64")):
                raise AotError(f"{self.name}: divisible names {n!r}, which is no pointer or integer parameter of "
                               f"{self.fn.__name__} ({sorted(types)})")


def c_type(triton_type: str, where: str = "") -> str:
    if triton_type.startswith("*"):
        return C_TYPES["*"]
    if triton_type not in C_TYPES:
        raise AotError(f"{where}: Triton type {triton_type!r} has no C equivalent here; known: {sorted(C_TYPES)}")
    return C_TYPES[triton_type]


# ---- cubin ELF checks (no cuobjdump) --------------------------------------------------------------------------
EM_CUDA = 190
ELFOSABI_CUDA = (0x33, 0x41)     # 0x41: the ABI v8 cubins of sm_100 and later
EF_CUDA_ACCELERATORS_V7 = 0x800      # sm_90a-style "arch-accelerated" cubin (runs on exactly that SM)
EIATTR_KPARAM_INFO = 0x17


@dataclasses.dataclass(frozen=True)
class CubinInfo:
    sm: int
    arch_specific: bool
    functions: tuple[str, ...]
    param_sizes: dict[str, tuple[int, ...]]   # entry -> size in bytes of each parameter, by ordinal


def read_cubin(data: bytes) -> CubinInfo:
    """Parse what a launcher must agree with out of a cubin's ELF: target SM, kernel symbols, parameter sizes."""
    if len(data) < 64 or data[:4] != b"\x7fELF":
        raise AotError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise AotError("not a 64-bit little-endian ELF")
    if data[7] not in ELFOSABI_CUDA:
        raise AotError(f"ELF OS/ABI is {data[7]:#x}, not CUDA ({', '.join(f'{v:#x}' for v in ELFOSABI_CUDA)})")
    machine, = struct.unpack_from("<H", data, 18)
    if machine != EM_CUDA:
        raise AotError(f"ELF machine is {machine}, not EM_CUDA ({EM_CUDA})")
    abi = data[8]
    flags, = struct.unpack_from("<I", data, 48)
    if abi <= 7:                               # CUDA <= 12.x cubins: SM in the low byte
        sm, arch_specific = flags & 0xFF, bool(flags & EF_CUDA_ACCELERATORS_V7)
    else:                                      # ABI v8 (sm_100 and later toolchains): SM in bits 8..15
        sm, arch_specific = (flags >> 8) & 0xFF, bool(flags & 0x1)
    sections = _elf_sections(data)
    functions = tuple(sorted(_elf_functions(data, sections)))
    params = {}
    for name, (_, body) in sections.items():
        if name.startswith(".nv.info."):
            params[name[len(".nv.info."):]] = _kparam_sizes(body)
    return CubinInfo(sm, arch_specific, functions, params)


def _elf_sections(data: bytes) -> dict[str, tuple[int, bytes]]:
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 58)
    hdrs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = hdrs[shstrndx][4]

    def cstr(off):
        return data[off:data.index(b"\0", off)].decode()
    return {cstr(names_at + h[0]): (h[1], data[h[4]:h[4] + h[5]]) for h in hdrs}


def _elf_functions(data: bytes, sections) -> list[str]:
    if ".symtab" not in sections or ".strtab" not in sections:
        return []
    symtab, strtab = sections[".symtab"][1], sections[".strtab"][1]
    out = []
    for off in range(0, len(symtab), 24):
        st_name, st_info = struct.unpack_from("<IB", symtab, off)
        if st_info & 0xF == 2:                 # STT_FUNC
            out.append(strtab[st_name:strtab.index(b"\0", st_name)].decode())
    return out


def _kparam_sizes(info: bytes) -> tuple[int, ...]:
    """EIATTR_KPARAM_INFO records of a .nv.info.<kernel> section: (ordinal, size) -> sizes by ordinal."""
    sizes, i = {}, 0
    while i + 2 <= len(info):
        fmt, attr = info[i], info[i + 1]
        if fmt == 0x04:                        # EIFMT_SVAL: u16 length, then the payload
            n, = struct.unpack_from("<H", info, i + 2)
            body, i = info[i + 4:i + 4 + n], i + 4 + n
            if attr == EIATTR_KPARAM_INFO:
                _, ordinal, _, word = struct.unpack_from("<IHHI", body)
                sizes[ordinal] = (word >> 18) & 0x3FFF
        elif fmt == 0x03:                      # EIFMT_HVAL: a u16 value
            i += 4
        elif fmt == 0x02:                      # EIFMT_BVAL
            i += 3
        else:                                  # EIFMT_NVAL: no value
            i += 2
    return tuple(sizes[k] for k in sorted(sizes))


# ---- compilation -------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Compiled:
    kernel: AotKernel
    entry: str
    shared: int
    cubins: dict[int, bytes]
    ptx: bytes
    ptx_sm: int


def compile_kernel(k: AotKernel, archs: Iterable[int], ptx: bool = True) -> Compiled:
    """Compile one variant for every SM in `archs` (and PTX of the lowest) and check each cubin's ELF."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k.validate()
    archs = sorted(set(archs))
    cubins, shared, entry, ptx_text = {}, 0, "", b""
    for sm in archs:
        attrs = {path: [["tt.divisibility", 16]] for n, _, path in k.runtime_args if n in k.divisible}
        constexprs = dict(k.constexprs, USE_PDL=k.pdl_on(sm)) if k.pdl else dict(k.constexprs)
        src = ASTSource(fn=k.fn, signature=dict(k.signature), constexprs=constexprs, attrs=attrs)
        try:
            ck = triton.compile(src, target=GPUTarget("cuda", sm, 32),
                                options={"num_warps": k.num_warps, "num_stages": k.num_stages})
        except Exception as e:  # Triton raises many types (CompilationError, PTXASError, ...)
            detail = " ".join(str(e).split())          # Triton's message spans lines (source excerpt, caret)
            raise AotError(f"{k.name}: Triton could not compile {k.fn.__name__} for sm_{sm}: "
                           f"{type(e).__name__}: {detail[:800]}") from e
        md = ck.metadata
        for field in ("global_scratch_size", "profile_scratch_size"):
            if getattr(md, field, 0):
                raise AotError(f"{k.name}: needs {field}={getattr(md, field)} bytes per program; the AOT launcher "
                               f"passes null scratch pointers (make the kernel scratch-free)")
        if getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_cooperative_grid", False) or \
                getattr(md, "launch_pdl", False):
            raise AotError(f"{k.name}: clusters, cooperative grids and PDL launches are not supported by the AOT "
                           f"launcher")
        entry = entry or md.name
        if md.name != entry:
            raise AotError(f"{k.name}: entry symbol differs across SMs ({entry!r} vs {md.name!r})")
        shared = max(shared, int(md.shared))
        cubin = ck.asm["cubin"]
        check_cubin(k, entry, sm, cubin)
        cubins[sm] = cubin
        if ptx and sm == archs[0] and f".target sm_{sm}a".encode() not in ck.asm["ptx"].encode():
            # PTX of the lowest SM JITs on any later GPU; arch-specific PTX (sm_90a) would not, so it is left out
            ptx_text = ck.asm["ptx"].encode() + b"\0"      # cuModuleLoadData wants a NUL-terminated string
    return Compiled(k, entry, shared, cubins, ptx_text, archs[0] if ptx_text else 0)


def check_cubin(k: AotKernel, entry: str, sm: int, cubin: bytes) -> CubinInfo:
    """The cubin targets `sm`, defines `entry`, and takes exactly the parameters the launcher will pass."""
    try:
        info = read_cubin(cubin)
    except AotError as e:
        raise AotError(f"{k.name} sm_{sm}: bad cubin: {e}") from None
    if info.sm != sm:
        raise AotError(f"{k.name}: cubin compiled for sm_{sm} says sm_{info.sm} in its ELF header")
    if entry not in info.functions:
        raise AotError(f"{k.name} sm_{sm}: entry {entry!r} not among the cubin's functions {info.functions}")
    want = tuple(PARAM_BYTES[t] for _, t in k.params)
    got = info.param_sizes.get(entry)
    if got != want:
        raise AotError(f"{k.name} sm_{sm}: the cubin's parameters {got} (bytes each) differ from the launch "
                       f"metadata {want} = {[n for n, _ in k.params]}")
    return info


# ---- C++ generation -----------------------------------------------------------------------------------------------
def _bytes_literal(data: bytes, indent: str = "    ") -> str:
    """Bytes as adjacent C string literals of 48 bytes each (compiles far faster than a brace list)."""
    lines = []
    for i in range(0, len(data), 48):
        lines.append(indent + '"' + "".join(f"\\x{b:02x}" for b in data[i:i + 48]) + '"')
    return "\n".join(lines) if lines else indent + '""'


def _doc_line(c: Compiled) -> str:
    k = c.kernel
    mod = getattr(getattr(k.fn, "fn", None), "__module__", "?")
    cx = ", ".join(f"{n}={v}" for n, v in k.constexprs.items()) or "none"
    div = f"; multiples of 16: {', '.join(k.divisible)}" if k.divisible else ""
    div += f"; USE_PDL from sm_{PDL_SM} on" if k.pdl else ""
    return (f"// {k.name}: Triton kernel `{k.fn.__name__}` ({mod}), num_warps={k.num_warps}, "
            f"num_stages={k.num_stages}, shared={c.shared} B; constexprs: {cx}{div}")


def render_sources(compiled: list[Compiled]) -> tuple[str, str]:
    """(header, source) of the kernel library."""
    decls, defs = [], []
    for c in compiled:
        k = c.kernel
        args = "".join(f", {t} {n}" for n, t in k.params if n not in SCRATCH_PARAMS)
        grid = f"\n// grid: {k.grid}" if k.grid else ""
        doc = f"\n// {k.doc}" if k.doc else ""
        decls.append(f"{_doc_line(c)}{grid}{doc}\n"
                     f"extern const aot::KernelImage {k.name};\n"
                     f"CUresult launch_{k.name}(CUstream stream, aot::Grid grid{args});\n")
        cubin_rows = []
        for sm, data in sorted(c.cubins.items()):
            info = read_cubin(data)
            defs.append(f"static const unsigned char {k.name}_sm{sm}[] =\n{_bytes_literal(data)};\n")
            cubin_rows.append(f"    {{{sm}, {str(info.arch_specific).lower()}, {str(k.pdl_on(sm)).lower()}, "
                              f"{k.name}_sm{sm}, sizeof({k.name}_sm{sm}) - 1}},")
        if c.ptx:
            defs.append(f"static const unsigned char {k.name}_ptx[] =\n{_bytes_literal(c.ptx)};\n")
        ptx = (f"{k.name}_ptx, sizeof({k.name}_ptx) - 1, {c.ptx_sm}, {str(k.pdl_on(c.ptx_sm)).lower()}" if c.ptx
               else "nullptr, 0, 0, false")
        sizes = ", ".join(str(PARAM_BYTES[t]) for _, t in k.params)
        defs.append(f"static const aot::Cubin {k.name}_cubins[] = {{\n" + "\n".join(cubin_rows) + "\n};\n"
                    f"static const int {k.name}_param_sizes[] = {{{sizes}}};\n"
                    f"const aot::KernelImage {k.name} = {{\"{k.name}\", \"{c.entry}\", {k.num_warps}, {c.shared}, "
                    f"{len(k.params)}, {k.name}_param_sizes, {k.name}_cubins, {len(c.cubins)}, {ptx}}};\n")
        names = [n for n, _ in k.params]
        packed = ", ".join(f"&{n}" for n in names)
        scratch = "".join(f"    const void* {s} = nullptr;\n" for s in SCRATCH_PARAMS)
        defs.append(f"CUresult launch_{k.name}(CUstream stream, aot::Grid grid{args})\n{{\n{scratch}"
                    f"    void* params[] = {{{packed}}};\n"
                    f"    return aot::launch({k.name}, grid, stream, params);\n}}\n")
    all_list = ", ".join(f"&{c.kernel.name}" for c in compiled)
    header = (
        "// Generated by memmamba_deploy/aot.py from the Triton kernels in models/ops/triton. Do not edit.\n"
        "#pragma once\n#include <cstdint>\n\n#include \"memmamba/aot_runtime.h\"\n\n"
        "namespace memmamba::kernels\n{\n\n" + "\n".join(decls) +
        f"\n// Every kernel of the library (e.g. to preload them outside CUDA-graph capture).\n"
        f"extern const aot::KernelImage* const kAll[{len(compiled)}];\n\n}} // namespace memmamba::kernels\n")
    source = (
        "// Generated by memmamba_deploy/aot.py from the Triton kernels in models/ops/triton. Do not edit.\n"
        "#include \"memmamba_kernels.h\"\n\nnamespace memmamba::kernels\n{\n\n" + "\n".join(defs) +
        f"\nconst aot::KernelImage* const kAll[{len(compiled)}] = {{{all_list}}};\n\n"
        "} // namespace memmamba::kernels\n")
    return header, source


def manifest(compiled: list[Compiled]) -> dict:
    import triton
    return {
        "format": 1,
        "triton": triton.__version__,
        "ptxas": _ptxas_version(),
        "kernels": {c.kernel.name: {
            "fn": c.kernel.fn.__name__,
            "module": getattr(getattr(c.kernel.fn, "fn", None), "__module__", "?"),
            "entry": c.entry,
            "num_warps": c.kernel.num_warps,
            "num_stages": c.kernel.num_stages,
            "shared": c.shared,
            "params": [[n, t] for n, t in c.kernel.params],
            "signature": c.kernel.signature,
            "divisible": list(c.kernel.divisible),
            "pdl_sms": [sm for sm in sorted(c.cubins) if c.kernel.pdl_on(sm)],
            "constexprs": {n: repr(v) for n, v in c.kernel.constexprs.items()},
            "grid": c.kernel.grid,
            "cubins": {str(sm): {"bytes": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                       for sm, b in sorted(c.cubins.items())},
            "ptx_sm": c.ptx_sm,
        } for c in compiled},
    }


def _ptxas_version() -> str:
    import subprocess

    try:
        from triton.backends.nvidia.compiler import get_ptxas
        out = subprocess.run([get_ptxas(80).path, "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[-1]
    except Exception:  # informational only
        return "unknown"


def build_library(kernels: list[AotKernel], out: str | Path, archs: Iterable[int] = DEFAULT_ARCHS,
                  ptx: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Compile `kernels` and write the library sources into `out` atomically. Returns the manifest."""
    from .models.checkpoint import atomic_directory
    from triton import knobs

    out = Path(out)
    check_library_out(out)
    archs = parse_archs(archs)
    if not kernels:
        raise AotError("no kernels to compile")
    seen = set()
    for k in kernels:
        if k.name in seen:
            raise AotError(f"two kernel variants are named {k.name!r}")
        seen.add(k.name)
    compiled = []
    saved = knobs.compilation.disable_line_info
    knobs.compilation.disable_line_info = True      # no debug sections: smaller cubins, no source paths inside
    try:
        for k in kernels:
            if progress:
                progress(k.name)
            compiled.append(compile_kernel(k, archs, ptx))
    finally:
        knobs.compilation.disable_line_info = saved
    header, source = render_sources(compiled)
    meta = manifest(compiled)
    meta["archs"] = list(archs)
    meta["ptx"] = ptx
    with atomic_directory(out, force=True) as tmp:     # an earlier library only (checked above)
        (tmp / "memmamba_kernels.h").write_text(header)
        (tmp / "memmamba_kernels.cpp").write_text(source)
        (tmp / "kernels.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# the SMs of released GPUs from Ampere on that Triton's bundled ptxas compiles (an SM between them, sm_91 say,
# crashes LLVM inside Triton's compile; CUDA 13's sm_110, Thor, is sm_101 to the CUDA 12.8 ptxas Triton ships)
CUDA_SMS = (80, 86, 87, 89, 90, 100, 101, 103, 120, 121)
LIBRARY_FILES = ("memmamba_kernels.h", "memmamba_kernels.cpp", "kernels.json")


def check_library_out(out: Path, files: Iterable[str] = LIBRARY_FILES) -> None:
    """Before any compile: `out` must be a folder that can be made, and a kernel library replaces it whole, so a
    non-empty one must hold an earlier library and nothing but its `files` (anything else would be deleted)."""
    from .models.checkpoint import creatable_dir

    if out.exists() and not out.is_dir():
        raise AotError(f"--out {out} is a file: give a directory")
    creatable_dir(out.parent, out)             # atomic_directory writes it after the compiles
    if not out.is_dir() or not any(out.iterdir()):
        return
    try:
        earlier = json.loads((out / "kernels.json").read_text())
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("format") != 1 or not isinstance(earlier.get("kernels"), dict):
        raise AotError(f"{out} is not empty and holds no earlier kernel library (kernels.json): refusing to replace it")
    others = sorted(p.name for p in out.iterdir() if p.name not in files)
    if others:
        raise AotError(f"{out} holds files that are not part of its kernel library ({', '.join(others[:5])}"
                       f"{', ...' if len(others) > 5 else ''}): they would be deleted; move them or give another --out")


def missing_ptx(meta: dict) -> str | None:
    """A note when PTX was asked for but left out (the lowest SM's code is arch-specific, sm_90a and up)."""
    if not meta.get("ptx") or not meta.get("kernels"):
        return None
    left = [name for name, k in meta["kernels"].items() if not k["ptx_sm"]]
    if not left:
        return None
    lowest = min(meta["archs"])
    return (f"no PTX in {len(left)} of {len(meta['kernels'])} kernel(s): sm_{lowest} code is arch-specific "
            f"(sm_{lowest}a), which no other GPU can JIT; add an SM below 90 to --arch (e.g. 80) for a PTX that "
            f"newer GPUs JIT")


def parse_archs(archs) -> tuple[int, ...]:
    """"80,86,sm_90" or an iterable of ints -> sorted unique SMs; each must be a real CUDA SM >= 80."""
    items = archs.split(",") if isinstance(archs, str) else list(archs)
    out = set()
    for a in items:
        s = str(a).strip().lower().removeprefix("sm_").removeprefix("sm")
        if not s:
            continue
        if not s.isdigit() or int(s) not in CUDA_SMS:
            raise ValueError(f"bad --arch entry {a!r}: give SM numbers of real GPUs, sm_80 or newer: "
                             f"{','.join(map(str, CUDA_SMS))}")
        out.add(int(s))
    if not out:
        raise ValueError("no architectures given (--arch 80,86,87,89,90)")
    return tuple(sorted(out))


# ---- the project's kernels -------------------------------------------------------------------------------------
def check_source_tree() -> None:
    """Check that memmamba_deploy and its models (where the kernels live) come from one source tree: with another
    checkout's editable install the package can resolve here and its models there, and a library would be built
    from sources its build never looked at."""
    import memmamba_deploy

    try:
        from . import models
    except ImportError as e:
        raise AotError(f"cannot import memmamba_deploy.models ({e}): install the project (pip install -e .)") from None
    package = Path(memmamba_deploy.__file__).resolve().parent
    found = Path(models.__file__).resolve().parent
    if found not in (package / "models", package.parent / "models"):
        raise AotError(f"memmamba_deploy is imported from {package} but its models (the kernels' source) from "
                       f"{found}: an editable install of another checkout; install this one "
                       f"(pip install -e {package.parent}) or build from {found.parent}")


def project_kernels(only: Iterable[str] = ()) -> list[AotKernel]:
    """Every variant listed in models.ops.triton.AOT_KERNELS (or the ones named in `only`)."""
    check_source_tree()
    try:
        from .models.ops import triton as kernels_pkg
    except ImportError as e:
        raise AotError(f"cannot import the Triton kernels (models/ops/triton): {e}") from None
    try:
        table = getattr(kernels_pkg, "AOT_KERNELS", None)
    except RuntimeError as e:                   # TRITON_INTERPRET=1: the kernels are not compilable in this process
        raise AotError(str(e)) from None
    if not table:
        raise AotError("models/ops/triton defines no AOT_KERNELS yet: there is nothing to compile ahead of time")
    specs = [from_table_entry(name, entry) for name, entry in table.items()]
    specs = [s for group in specs for s in group]
    only = [o.strip() for o in only if o.strip()]
    if only:
        known = {s.name for s in specs}
        missing = [o for o in only if o not in known]
        if missing:
            raise AotError(f"unknown kernel variant(s) {missing}; AOT_KERNELS has {sorted(known)}")
        specs = [s for s in specs if s.name in only]
    return specs


def from_table_entry(name: str, entry) -> list[AotKernel]:
    """models.ops.triton.AOT_KERNELS entry -> variants. An entry is an AotKernel, a list of them, or a dict with
    `fn`, `signatures` ({variant suffix: signature}; the variant is named <entry>_<suffix>), `constexprs`,
    `num_warps`, `num_stages`, `grid`, `limits`, `doc` (models/ops/triton/aot.py)."""
    if isinstance(entry, AotKernel):
        return [entry]
    if isinstance(entry, (list, tuple)):
        return [e if isinstance(e, AotKernel) else AotKernel(**e) for e in entry]
    if not isinstance(entry, dict) or "fn" not in entry:
        raise AotError(f"AOT_KERNELS[{name!r}] is not a kernel description (a dict with fn, signatures, ...)")
    sigs = entry.get("signatures") or {"": entry["signature"]}
    doc = " ".join(x for x in (entry.get("doc", ""), f"(handles {entry['limits']})" if entry.get("limits") else "")
                   if x)
    common = {k: entry[k] for k in ("num_warps", "num_stages", "grid") if k in entry}
    return [AotKernel(name=f"{name}_{suffix}" if suffix else name, fn=entry["fn"], signature=dict(sig),
                      constexprs=dict(entry.get("constexprs", {})), doc=doc, **common)
            for suffix, sig in sigs.items()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for memmamba_kernels.{h,cpp} and kernels.json")
    ap.add_argument("--arch", default=",".join(map(str, DEFAULT_ARCHS)), help="SMs to compile cubins for")
    ap.add_argument("--no-ptx", action="store_true", help="do not embed PTX (no JIT fallback on newer GPUs)")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all of AOT_KERNELS)")
    args = ap.parse_args(argv)
    try:
        archs = parse_archs(args.arch)
        check_library_out(Path(args.out))          # before the kernels are even imported
        kernels = project_kernels(args.only.split(","))
        meta = build_library(kernels, args.out, archs, ptx=not args.no_ptx,
                             progress=lambda n: print(f"compiling {n}", file=sys.stderr))
    except (AotError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(meta['kernels'])} kernel(s) x sm_{'/'.join(map(str, meta['archs']))} to {args.out}")
    note = missing_ptx(meta)
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
