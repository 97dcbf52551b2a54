"""Registers, stack bytes (spills) and the instruction mix of the prefill scan's passes as compiled for an NVIDIA
GPU, on any machine (no GPU needed): triton.compile for a GPUTarget, then the SASS of its hot loop from
cuobjdump. For perf work on models/ops/triton/scan.py, where device time is the scarce thing: what a pass's loop
issues per state and token, and how many of those are MUFU ops (the H100's bound for this scan, BENCHMARKS.md).
The counts can rule a change out; they cannot promise a gain (the seventeenth session's FMA-pipe exp2 counted one
and measured a loss).

    python scripts/sass_stats.py [pass1|pass3] [--dtype fp16|fp32] [--arch 90] [--maxnreg N] [--set NAME=VALUE]...

The launch is scan_forward's for the 130m preset at 16k tokens (its block sizes, unroll and stages from scan.py;
the JIT's specialisations: 16-divisible sizes and strides, dt_softplus == 1).
"""
from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from memmamba_deploy.models.ops.triton import scan
from memmamba_deploy.models.ops.triton.aot import _signature

DI, N = 1536, 16                                  # the 130m's d_inner and d_state
PASSES = {   # scan_forward's two walks of the chunks: 1 (chunk states from zero, δ kept) and 3 (y from the starts)
    "pass1": dict(HAS_Z=False, HAS_DT_BIAS=True, HAS_H_IN=False, WRITE_Y=False, WRITE_H=True, WRITE_DT_SUM=True,
                  WRITE_DELTA=True, DELTA_IN=False, dt_softplus=1),
    "pass3": dict(HAS_Z=True, HAS_DT_BIAS=False, HAS_H_IN=True, WRITE_Y=True, WRITE_H=False, WRITE_DT_SUM=False,
                  WRITE_DELTA=False, DELTA_IN=True),
}
CONSTEXPRS = [p.name for p in scan.selective_scan_seq_kernel.params if p.is_constexpr]
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)")
TARGET = re.compile(r"0x([0-9a-f]+)")      # a branch's target: the last address among its operands


def compile_pass(which: str, dtype: str = "fp16", arch: int = 90, maxnreg: int | None = None,
                 overrides: dict | None = None) -> tuple[bytes, dict]:
    """(cubin, constexprs) of selective_scan_seq_kernel as scan_forward launches it for `which`."""
    fn = scan.selective_scan_seq_kernel
    block_d, block_n, num_warps = scan.seq_blocks(N, DI)
    const = dict(BLOCK_D=block_d, BLOCK_N=block_n, EVEN_N=N == block_n, UNROLL=scan.SEQ_UNROLL,
                 STAGES=scan.SEQ_STAGES, HAS_LENGTHS=False, USE_PDL=arch >= 90, **PASSES[which])
    const.update(overrides or {})
    act = {"fp16": "*fp16", "fp32": "*fp32"}[dtype]
    acts = {"x_ptr", "B_ptr", "C_ptr", "z_ptr", "y_ptr"} | ({"dt_ptr"} if which == "pass1" else set())
    sig = _signature(fn, {n: act if n in acts else "*fp32" for n in fn.arg_names if n.endswith("_ptr")}, const)
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)   # multiples of 16 at this shape
             if sig[n] != "constexpr" and (n.endswith("_ptr") or n.startswith("stride") or n in ("T", "Di", "N"))}
    options = dict(num_warps=num_warps, num_stages=scan.SEQ_STAGES, **({"maxnreg": maxnreg} if maxnreg else {}))
    kernel = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32), options=options)
    return kernel.asm["cubin"], const


def channels_per_thread(const: dict) -> int:
    """Channels each thread of compile_pass's launch owns (all N states of each)."""
    return const["BLOCK_D"] // (32 * scan.seq_blocks(N, DI)[2])


def cuobjdump() -> str:
    """Triton's bundled cuobjdump, else the CUDA toolkit's."""
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.exists() else shutil.which("cuobjdump")
    if not found:
        raise SystemExit("sass_stats: no cuobjdump (neither Triton's bundled one nor the CUDA toolkit's on PATH)")
    return found


def sass_stats(cubin: bytes) -> dict:
    """Registers, stack bytes and the hot loop (the backward branch's body with the most MUFU ops): its address
    range and instruction counts by opcode."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([cuobjdump(), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    code = [(int(m[1], 16), m[2], m[3]) for m in map(LINE.search, sass.splitlines()) if m]
    loops = []
    for addr, op, rest in code:
        targets = TARGET.findall(rest.split(";")[0]) if op.startswith("BRA") else []
        if targets and int(targets[-1], 16) < addr:
            start = int(targets[-1], 16)
            body = [o for a, o, _ in code if start <= a <= addr]
            loops.append((sum(o.startswith("MUFU") for o in body), -len(body), start, addr, body))
    if not loops:
        raise ValueError("sass_stats: no loop in the SASS (no backward branch)")
    mufu, size, start, end, body = max(loops)   # most MUFU ops; of those, the innermost (shortest)
    size = -size
    ops = collections.Counter(o if o.startswith("MUFU") else o.split(".")[0] for o in body)
    return dict(registers=int(regs[1]) if regs else None, stack=int(stack[1]) if stack else None,
                loop=(start, end), instructions=size, mufu=mufu, ops=ops)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", nargs="?", default="pass3", choices=sorted(PASSES))
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    ap.add_argument("--arch", type=int, default=90, help="SM version, e.g. 90 (H100) or 87 (Jetson Orin)")
    ap.add_argument("--maxnreg", type=int, default=None, help="register cap per thread")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a constexpr of the kernel (an integer), e.g. --set UNROLL=4")
    args = ap.parse_args(argv)
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in CONSTEXPRS or not value.lstrip("-").isdigit():
            raise SystemExit(f"sass_stats: --set wants NAME=INTEGER, NAME one of {', '.join(CONSTEXPRS)}; got {item!r}")
        overrides[name] = int(value)
    cubin, const = compile_pass(args.which, args.dtype, args.arch, args.maxnreg, overrides)
    s = sass_stats(cubin)
    per_thread = channels_per_thread(const)
    state_tokens = const["UNROLL"] * per_thread * const["BLOCK_N"]
    print(f"{args.which} {args.dtype} sm_{args.arch}: {s['registers']} registers, {s['stack']} B stack")
    print(f"hot loop 0x{s['loop'][0]:x}-0x{s['loop'][1]:x}: {s['instructions']} instructions, {s['mufu']} MUFU, for "
          f"{const['UNROLL']} tokens x {per_thread} channels x {const['BLOCK_N']} states a thread = "
          f"{s['instructions'] / state_tokens:.2f} instructions and {s['mufu'] / state_tokens:.3f} MUFU a "
          f"state-token")
    print("  " + "  ".join(f"{op} {n}" for op, n in s["ops"].most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
