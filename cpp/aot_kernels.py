"""The kernel library of the C++ native runtime: the Triton kernels its decode step launches, compiled ahead of time
(memmamba_deploy/aot.py) for the model shapes it should run, plus a table the runtime looks variants up in.

    python cpp/aot_kernels.py --out DIR [--arch 80,86,87,89,90] [--preset tiny,130m] [--config CKPT/config.json ...]

The bundled demo checkpoints' shapes (memmamba_deploy/assets) are always in the library.

Kernels (all from models/ops/triton; the default "cublas" plan does every projection with cuBLASLt):
    decode_*      decode.py's kernels as models/ops/triton/aot.py decode_aot_kernels describes them: the
                  "_noproj" norms (residual + RMSNorm) and decode_note_pool(_cross) (§3-§5) in both plans; the
                  projecting norms, decode_in_proj_conv and decode_ssm_out in the "fused" plan (four launches per
                  layer with the projections inside the kernels, as the Python fast path)
    conv_step     cpp_support.conv_step_kernel                  (cublas plan)
    scan_step     scan.selective_state_step_kernel              (cublas plan)
    sample        cpp_support.sample_kernel                     (both)
The parallel prefill (both plans; cpp/src/native.cpp parallelPrefill):
    prefill_conv  scan.causal_conv_kernel (d_conv 2-4)          prefill_note_scores  memory.note_scores_kernel
    prefill_residual_norm  norm.residual_norm_kernel (h += y, u = RMSNorm(h); layers 1..L-1)
    prefill_scan_states, prefill_scan_prefix, prefill_scan_out  scan.scan_forward's three passes
    prefill_conv_lengths, prefill_scan_states_lengths, prefill_note_scores_lengths  the same with HAS_LENGTHS (rows
                  of different lengths: Session::prefill with lengths)
    sweep_top, sweep_enter, sweep_compact, sweep_replay, sweep_fill   pool.pool_sweep_ends's five kernels
    prefill_pool_mix(_cross)  pool.pool_mix_kernel, one pool / a §5 group's (fp16: half-precision dots)
    pool_after    pool.pool_after_kernel                        gained_add, cross_index  cpp_support (fp32 reads)
    and the TensorRT plugins' kernels (models/ops/triton/aot.py aot_kernels: the sparse pool attention of the fp32
    reads; the sweep and chunked scan too) under the plugins' names, launched through plugins_trt/common/opLaunch.cpp.
Arguments the runtime passes as multiples of 16 for a model shape (row strides, widths, aligned pointers) are
compiled as such (multiples_of_16, decode_values: Triton's JIT specialises the Python path's calls alike, and
without it the loads do not vectorise: the prefill scan took 11.0 ms of a 16k prefill instead of 7.4); the table
marks them ("/16") and the runtime checks each at launch. Kernels that wait for their predecessor themselves
(USE_PDL, models/ops/triton/launch.py: every decode and prefill kernel but the cublas plan's conv and scan steps, the
sampler and the fp32 reads' helpers) are compiled with it for sm_90 and later, and launched there as programmatic
dependents (aot.AotKernel.pdl), as the Python path launches them.
Block sizes are constexprs chosen by each kernel's own heuristic (decode_blocks, step_blocks, conv_blocks) for one
model shape, so a variant serves the shapes its key names (e.g. decode_note_pool_fp16_d768_..._p4); the runtime
refuses a model whose variants are missing and names them. The table also lists each kernel's runtime arguments
by name and kind; the runtime passes arguments by name (cpp/src/kernels.h), so a kernel whose signature changes
fails with a message naming the argument rather than misbehaving. Writes DIR/memmamba_kernels.{h,cpp}, kernels.json and
DIR/runtime_variants.cpp (the table, see cpp/src/kernels.h).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)          # ahead-of-time compilation needs Triton's real compiler

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

ACTS = ("fp32", "fp16")
TABLE_FILES = ("runtime_variants.cpp", "runtime_shapes.json")   # beside aot.LIBRARY_FILES in the library folder


def shape_keys(c) -> dict[str, str]:
    """The variant key of each kernel family for config `c` (cpp/src/native.cpp builds the same strings)."""
    decode_key = f"d{c.d_model}_di{c.d_inner}_n{c.d_state}_r{c.dt_rank}_k{c.d_conv}"
    decode_key += (f"_K{c.pool_size}_ds{c.summary_dim}_H{c.memory_heads}_p{c.cross_layer_every}" if c.memory
                   else "_nomem")
    return {"decode": decode_key, "conv_step": f"di{c.d_inner}_k{c.d_conv}", "scan_step": f"di{c.d_inner}_n{c.d_state}",
            "prefill_scan": f"di{c.d_inner}_n{c.d_state}_r{c.dt_rank}",
            "sample": "any", "pool_after": f"K{c.pool_size}_ds{c.summary_dim}", "gained_add": f"d{c.d_model}",
            "residual_norm": f"d{c.d_model}",
            "cross_index": f"K{c.pool_size}", "sweep": f"K{c.pool_size}",
            "pool_mix": f"d{c.d_model}_K{c.pool_size}_ds{c.summary_dim}_H{c.memory_heads}_p{c.cross_layer_every}"}


FLOAT_ARGS = {"eps", "tau1", "tau2", "scale"}       # fp32 scalars; every other non-pointer argument is an i32


def multiples_of_16(values: dict[str, int]) -> list[str]:
    """The arguments to compile as multiples of 16 (aot.AotKernel.divisible), as Triton's JIT specialises the
    Python path's calls: of `values` (what cpp/src/native.cpp passes for one model shape: an integer, or a
    pointer's byte offset from a 256-byte aligned buffer; a stride that is T times a width is given as the width)
    those that are. The runtime checks every hinted value at launch (Launch::run), so a layout that changes on one
    side only fails loudly."""
    return [name for name, v in values.items() if v % 16 == 0]


def signature(fn, pointers: dict[str, str], constexprs: dict, tuples: dict | None = None) -> dict:
    """Triton types of every argument of `fn`, in order: constexprs as given, `*_ptr` from `pointers` (an unknown
    pointer is an error: its dtype cannot be guessed), tuple arguments from `tuples` (a tuple of types each),
    FLOAT_ARGS fp32, the rest i32 (sizes, strides, switches)."""
    from memmamba_deploy.aot import AotError

    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in (tuples or {}):
            sig[name] = tuple(tuples[name])
        elif name.endswith("_ptr"):
            if name not in pointers:
                raise AotError(f"{fn.__name__} takes pointer {name!r}, which cpp/aot_kernels.py does not know: "
                               f"add its dtype here and pass it in cpp/src/native.cpp")
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def x_width(c) -> int:
    """native.cpp xWidth: the rows of x_proj's output and sums (dt_r, B, C), R + 2N padded to a multiple of 8."""
    return (c.dt_rank + 2 * c.d_state + 7) // 8 * 8


def decode_values(c, size: int) -> dict[str, dict[str, int]]:
    """multiples_of_16's values of decode.py's kernels as cpp/src/native.cpp launches them (enqueueNorm,
    enqueueNotePool, enqueueFusedStep, and the prefill's norms), by kernel function name. size: bytes of an
    activation. Pointers not named are buffers' or weights' starts; a per-layer pointer's value is its layer's
    size (the layer index and batch multiply it), a value two launches pass differently is their gcd."""
    d, di, N, R, K, ds = c.d_model, c.d_inner, c.d_state, c.dt_rank, c.pool_size, c.summary_dim
    xw = x_width(c)                                     # the sums' rows (xAcc)
    norm = {"part_ptr": d * 4, "zx_ptr": xw * 4, "zo_ptr": d * 4, "d": d, "R": 0, "X": math.gcd(R + 2 * N, xw),
            "stride_emb": d}                            # R: memRows (a multiple of 16) or 0; X: fused, cublas, 0
    pool_layer, prio_layer = K * ds * size, K * 4
    note = {"pool_ptr": pool_layer, "prio_ptr": prio_layer, "group_pool_ptr": pool_layer,
            "group_prio_ptr": prio_layer, "pool_out_ptr": pool_layer, "prio_out_ptr": prio_layer, "d": d, "K": K,
            "ds": ds, "dh": ds // c.memory_heads, "dv": d // c.memory_heads, "d4": d // 4, "R_mem": 0,
            "stride_pool_l": K * ds, "stride_prio_l": K}
    win = di * (c.d_conv - 1) * size
    in_conv = {"win_in_ptr": win, "win_out_ptr": win, "xacc_ptr": xw * 4, "d": d, "Di": di, "KW": c.d_conv,
               "X": R + 2 * N}
    ssm_out = {"xacc_ptr": xw * 4, "h_in_ptr": di * N * 4, "h_out_ptr": di * N * 4, "oacc_ptr": d * 4, "d": d,
               "Di": di, "N": N, "R": R, "X": R + 2 * N}
    return {"decode_norm_proj_kernel": norm, "decode_note_pool_kernel": note, "decode_in_proj_conv_kernel": in_conv,
            "decode_ssm_out_kernel": ssm_out}


def runtime_kernels(configs) -> list[tuple]:
    """(AotKernel, op, act, key) for every variant the runtime needs to run `configs`, without duplicates.
    decode.py's kernels come as models/ops/triton/aot.py describes them for one model shape (decode_aot_kernels:
    the Python fast path's block sizes); op = their entry name (decode_norm_proj_noproj, decode_note_pool, ...).
    The plugins' kernels (aot_kernels) come first, under their own names and with op None: opLaunch.cpp calls
    their typed launchers, so they are not rows of the runtime's table."""
    import dataclasses

    import triton

    from memmamba_deploy import aot
    from memmamba_deploy.models.ops.triton import cpp_support, memory, norm, pool, scan
    from memmamba_deploy.models.ops.triton.aot import aot_kernels, decode_aot_kernels

    out = [(k, None, None, None) for op, entry in aot_kernels().items() for k in aot.from_table_entry(op, entry)]
    seen = {k.name for k, *_ in out}
    np2 = triton.next_power_of_2

    def add(op, act, key, k):
        name = f"{op}_{act}_{key}"
        if name in seen:                    # another config of the same key: it must need the very same variant
            first = next(v for v, *_ in out if v.name == name)
            if (first.constexprs, first.divisible) != (k.constexprs, k.divisible):
                raise aot.AotError(f"{name}: two model shapes with the same key need different variants "
                                   f"(constexprs or multiples of 16): the key must name what sets them")
            return
        seen.add(name)
        out.append((dataclasses.replace(k, name=name), op, act, key))

    for c in configs:
        keys = shape_keys(c)
        for act in ACTS:
            size = 2 if act == "fp16" else 4            # bytes of an activation
            values = decode_values(c, size)
            for op, entry in decode_aot_kernels(c, act).items():
                for k in aot.from_table_entry(op, entry):
                    given = values[k.fn.__name__]
                    args = {n: given.get(n, 0) for n, t, _ in k.runtime_args if t.startswith("*") or n in given}
                    add(op, act, keys["decode"], dataclasses.replace(k, divisible=tuple(multiples_of_16(args)),
                                                                     pdl="USE_PDL" in k.constexprs))
            t, f32 = f"*{act}", "*fp32"

            def kernel(op, key, fn, ptrs, cx, num_warps, tuples=None, divisible=()):
                # the shape `key` names must fix every divisible value: variants are shared by the configs it names
                add(op, act, keys[key], aot.AotKernel("", fn, signature(fn, ptrs, cx, tuples), cx,
                                                      num_warps=num_warps, divisible=tuple(divisible),
                                                      pdl="USE_PDL" in cx))

            kernel("conv_step", "conv_step", cpp_support.conv_step_kernel,
                   {n: t for n in ("x_ptr", "w_ptr", "bias_ptr", "win_in_ptr", "win_out_ptr", "out_ptr")},
                   cpp_support.conv_blocks(c.d_inner, c.d_conv), 4)
            block_d, block_n = scan.step_blocks(c.d_state, c.d_inner)
            kernel("scan_step", "scan_step", scan.selective_state_step_kernel,
                   {"x_ptr": t, "dt_ptr": t, "A_ptr": f32, "B_ptr": t, "C_ptr": t, "D_ptr": f32, "z_ptr": t,
                    "dt_bias_ptr": f32, "h_in_ptr": f32, "y_ptr": t, "h_out_ptr": f32},
                   {"BLOCK_D": block_d, "BLOCK_N": block_n, "HAS_Z": True, "HAS_DT_BIAS": True}, 4)
            kernel("sample", "sample", cpp_support.sample_kernel,
                   {"logits_ptr": t, "params_ptr": f32, "rng_ptr": "*u32", "token_ptr": "*i64"},
                   {"BLOCK": cpp_support.SAMPLE_BLOCK}, 8)
            # the parallel prefill
            if 2 <= c.d_conv <= 4:                  # causal_conv_kernel's widths (the runtime falls back otherwise)
                win = c.d_inner * (c.d_conv - 1)
                for lengths in (False, True):     # "_lengths": rows of their own lengths (the window at each end)
                    kernel("prefill_conv" + "_lengths" * lengths, "conv_step", scan.causal_conv_kernel,
                           {**{n: t for n in ("x_ptr", "w_ptr", "b_ptr", "win_ptr", "out_ptr", "new_win_ptr")},
                            "lengths_ptr": "*i64"},
                           {"WIDTH": c.d_conv, "CHUNK": scan.CONV_CHUNK, "AHEAD": scan.CONV_AHEAD,
                            "BLOCK_D": scan.conv_block_d(c.d_inner), "HAS_BIAS": True, "HAS_LENGTHS": lengths,
                            "USE_PDL": False}, 1,
                           divisible=multiples_of_16({
                               "x_ptr": 0, "w_ptr": 0, "b_ptr": 0, "win_ptr": win * size, "out_ptr": 0,
                               "new_win_ptr": win * size, "Di": c.d_inner, "stride_x_b": 2 * c.d_inner,
                               "stride_x_t": 2 * c.d_inner, "stride_win_b": win, "stride_out_b": c.d_inner,
                               "stride_out_t": c.d_inner, "stride_new_win_b": win}))
            # the prompt's scan: scan.scan_forward's three passes (TritonBackend's prefill scan)
            block_d, block_n, warps = scan.seq_blocks(c.d_state, c.d_inner)
            seq = {"BLOCK_D": block_d, "BLOCK_N": block_n, "EVEN_N": c.d_state == block_n, "UNROLL": scan.SEQ_UNROLL,
                   "STAGES": scan.SEQ_STAGES, "HAS_LENGTHS": False, "USE_PDL": False}
            ptrs = {"x_ptr": t, "dt_ptr": t, "AT_ptr": f32, "B_ptr": t, "C_ptr": t, "D_ptr": f32, "z_ptr": t,
                    "dt_bias_ptr": f32, "h_in_ptr": f32, "y_ptr": t, "h_out_ptr": f32, "dt_sum_ptr": f32,
                    "delta_ptr": f32, "lengths_ptr": "*i64"}
            di, N, R, X = c.d_inner, c.d_state, c.dt_rank, x_width(c)
            # buffers and weights, but the token rows' (the last layer's pass 3 starts at a chunk: native.cpp
            # scanPass), B, C and z column blocks, and the chunk states (that pass's first)
            scan_values = {n: 0 for n in ptrs}
            scan_values.update({"x_ptr": di * size, "dt_ptr": math.gcd(di * size, di * 4), "y_ptr": di * size,
                                "B_ptr": math.gcd(R * size, X * size), "C_ptr": math.gcd((R + N) * size, X * size),
                                "z_ptr": di * size, "h_in_ptr": di * N * 4, "Di": di, "N": N})
            scan_values.update({f"stride_{m}_{bt}": w for m, w in (("x", di), ("dt", di), ("B", X), ("C", X),
                                                                 ("z", 2 * di), ("y", di)) for bt in "bt"})
            scan_values.update({f"stride_{h}_{bc}": di * N for h in ("hin", "hout") for bc in "bc"})
            for lengths in (False, True):         # "_lengths": δ 0 past each row's end (pass 3 reads pass 1's δ)
                kernel("prefill_scan_states" + "_lengths" * lengths, "prefill_scan", scan.selective_scan_seq_kernel,
                       ptrs, dict(seq, HAS_Z=False, HAS_DT_BIAS=True, HAS_H_IN=False, WRITE_Y=False, WRITE_H=True,
                                  WRITE_DT_SUM=True, WRITE_DELTA=True, DELTA_IN=False, HAS_LENGTHS=lengths), warps,
                       divisible=multiples_of_16(scan_values))
            kernel("prefill_scan_out", "prefill_scan", scan.selective_scan_seq_kernel,
                   dict(ptrs, dt_ptr=f32),                                  # δ (fp32, pass 1's) in as dt
                   dict(seq, HAS_Z=True, HAS_DT_BIAS=False, HAS_H_IN=True, WRITE_Y=True, WRITE_H=False,
                        WRITE_DT_SUM=False, WRITE_DELTA=False, DELTA_IN=True), warps,
                   divisible=multiples_of_16(scan_values))
            prefix_ptrs = ("AT_ptr", "dt_sum_ptr", "h0_ptr", "states_ptr", "starts_ptr", "h_out_ptr")
            kernel("prefill_scan_prefix", "prefill_scan", scan.scan_chunk_prefix_kernel, {n: f32 for n in prefix_ptrs},
                   {"BLOCK_C": scan.PREFIX_BLOCK_C, "BLOCK_E": scan.PREFIX_BLOCK_E, "HAS_H0": True, "USE_PDL": False},
                   scan.PREFIX_NUM_WARPS, divisible=multiples_of_16(
                       {**{n: 0 for n in prefix_ptrs}, "h0_ptr": di * N * 4, "h_out_ptr": di * N * 4,  # a layer's
                        "Di": di, "N": N, "stride_h0_b": di * N,
                        "stride_hout_b": di * N}))
            block_d = np2(c.d_model)
            kernel("prefill_residual_norm", "residual_norm", norm.residual_norm_kernel,
                   {"h_ptr": f32, "y_ptr": t, "w_ptr": t, "h_out_ptr": f32, "u_ptr": t},
                   {"BLOCK_R": norm.norm_rows(block_d), "BLOCK_D": block_d, "HAS_Y": True, "USE_PDL": False}, 4,
                   divisible=multiples_of_16({"h_ptr": 0, "y_ptr": 0, "w_ptr": 0, "h_out_ptr": 0, "u_ptr": 0,
                                              "d": c.d_model}))
            kernel("gained_add", "gained_add", cpp_support.gained_add_kernel,
                   {"res_ptr": t, "o_ptr": t, "gain_ptr": f32, "out_ptr": t}, {"BLOCK_D": np2(c.d_model)}, 4)
            if not c.memory:
                continue
            for lengths in (False, True):         # "_lengths": padding scores 0 (it enters no pool)
                kernel("prefill_note_scores" + "_lengths" * lengths, "decode", memory.note_scores_kernel,
                       {"g_ptr": t, "w2_ptr": t, "trig_bias_ptr": t, "alpha_ptr": t, "a_ptr": f32, "gain_ptr": f32,
                        "pool0_ptr": t, "lengths_ptr": "*i64"},
                       {"BLOCK_M": memory.SCORE_ROWS, "BLOCK_H": max(16, np2(c.d_model // 4)),
                        "BLOCK_K": np2(c.pool_size), "BLOCK_S": np2(c.summary_dim), "HAS_LENGTHS": lengths,
                        "USE_PDL": False}, 4)
            kernel("pool_after", "pool_after", pool.pool_after_kernel,
                   {"bank_ptr": t, "last_ptr": "*i32", "out_ptr": t},
                   {"BLOCK_K": np2(c.pool_size), "BLOCK_C": np2(c.summary_dim), "USE_PDL": False}, 4)
            kernel("cross_index", "cross_index", cpp_support.cross_index_kernel,
                   {"index_ptr": "*i32", "out_ptr": "*i32"}, {"BLOCK_K": np2(c.pool_size)}, 1)
            # the §3 sweep as pool.pool_sweep_ends launches it (five kernels; the entry ends pool_mix reads)
            block_k = np2(c.pool_size)
            seg = max(pool.SWEEP_SEG, block_k)
            sweep = {"SEG": seg, "BLOCK_K": block_k, "USE_PDL": False}
            i32s = ("seg_count_ptr", "ev_tok_ptr", "ecount_ptr", "ends_ptr", "hist_ptr", "index_ptr")
            sweep_ptrs = {n: ("*i32" if n in i32s else f32) for n in (
                "scores_ptr", "top_ptr", "prio0_ptr", "enter_ptr", "ev_a_ptr", "prio_ptr") + i32s}
            kernel("sweep_top", "sweep", pool.sweep_segment_top_kernel, sweep_ptrs, sweep, 4)
            kernel("sweep_enter", "sweep", pool.sweep_enter_kernel, sweep_ptrs,
                   dict(sweep, BLOCK_T=pool.SWEEP_COUNT_T, BLOCK_S=pool.SWEEP_COUNT_S, GROUP=pool.SWEEP_COUNT_GROUP),
                   pool.SWEEP_COUNT_WARPS)
            # BLOCK_SEG covers the segments of the longest chunk (SessionOptions::prefillRows < 65536)
            block_seg = np2(-(-65535 // seg))
            kernel("sweep_compact", "sweep", pool.sweep_compact_kernel, sweep_ptrs,
                   {"SEG": seg, "BLOCK_SEG": block_seg, "USE_PDL": False}, 4)
            kernel("sweep_replay", "sweep", pool.sweep_replay_kernel, sweep_ptrs,
                   {"BLOCK_SEG": block_seg, "BLOCK_K": block_k, "SLOT_BITS": block_k.bit_length() - 1,
                    "BLOCK_R": pool.SWEEP_RANGE_R, "USE_PDL": False}, 1)
            kernel("sweep_fill", "sweep", pool.sweep_fill_kernel, sweep_ptrs,
                   {"BLOCK_T": pool.SWEEP_FILL_T, "BLOCK_K": block_k, "USE_PDL": False}, 4)
            if act == "fp32":                       # pool_mix's dots are half-precision ones (fp32: the plugins')
                continue
            # §4 / §5 reads on the summaries (pool.pool_mix): one pool, and a cross-layer group's p pools. The
            # runtime lays q, m and the banks' rows out in multiples of 16 elements (g's rows: memRows); the
            # banks' first column (ds + d/4) is one where the shape makes it so
            block_q, block_h, block_k, block_c, warps = pool.mix_blocks(c.pool_size, c.summary_dim, c.memory_heads)
            for op, layers in (("prefill_pool_mix", 1), ("prefill_pool_mix_cross", c.cross_layer_every)):
                many = ("banks", "indices", "ends", "strides_s_b", "strides_s_m", "strides_i_b", "strides_i_t",
                        "strides_e_b")
                tuples = {n: (t if n == "banks" else "*i32" if n in ("indices", "ends") else "i32",) * layers
                          for n in many}
                aligned = ["q_ptr", "m_ptr", "stride_q_b", "stride_q_t", "stride_m_b", "stride_m_t"]
                aligned += [f"{n}_{j}" for n in ("strides_s_b", "strides_s_m") for j in range(layers)]
                if (c.summary_dim + c.d_model // 4) % 8 == 0:
                    aligned += [f"banks_{j}" for j in range(layers)]
                if c.summary_dim % 16 == 0:         # the summaries' column mask, in whole vectors
                    aligned.append("ds")
                kernel(op, "pool_mix", pool.pool_mix_kernel,
                       {"q_ptr": t, "gain_ptr": f32, "m_ptr": t},
                       {"LAYERS": layers, "BLOCK_Q": block_q, "BLOCK_H": block_h, "BLOCK_K": block_k,
                        "BLOCK_C": block_c, "USE_PDL": False}, warps, tuples, aligned)
    return out


def render_table(variants) -> str:
    rows = []
    for k, op, act, key in variants:
        if op is None:                       # a plugin kernel: opLaunch.cpp calls its typed launcher
            continue
        cx = ",".join(f"{n}={int(v)}" for n, v in k.constexprs.items() if not (k.pdl and n == "USE_PDL"))
        params = ",".join(f"{n}:{'ptr' if t.startswith('*') else t}{'/16' if n in k.divisible else ''}"
                          for n, t, _ in k.runtime_args)
        rows.append(f'    {{"{op}", "{act}", "{key}", &{k.name}, "{cx}", "{params}"}},')
    return ("// Generated by cpp/aot_kernels.py. Do not edit.\n#include \"kernels.h\"\n#include \"memmamba_kernels.h\"\n\n"
            "namespace memmamba::kernels\n{\n\nconst RuntimeVariant kRuntimeVariants[] = {\n" + "\n".join(rows) +
            "\n};\nconst int kNumRuntimeVariants = " + str(len(rows)) + ";\n\n} // namespace memmamba::kernels\n")


def _compile_one(job):
    """Worker: compile variant `index` of runtime_kernels(configs) (rebuilt here: kernels do not pickle)."""
    configs, index, archs, ptx = job
    from triton import knobs

    from memmamba_deploy import aot
    from memmamba_deploy.models import MemMambaConfig

    knobs.compilation.disable_line_info = True          # as aot.build_library: no debug sections in the cubins
    k = runtime_kernels([MemMambaConfig.from_dict(c) for c in configs])[index][0]
    c = aot.compile_kernel(k, archs, ptx)
    return c.entry, c.shared, c.cubins, c.ptx, c.ptx_sm


def build(configs, out: Path, archs, ptx: bool = True, jobs: int = 0) -> int:
    """Compile every variant (in parallel processes) and write the library + table into `out` atomically."""
    import concurrent.futures
    import multiprocessing

    from memmamba_deploy import aot
    from memmamba_deploy.models.checkpoint import atomic_directory

    aot.check_library_out(out, aot.LIBRARY_FILES + TABLE_FILES)
    variants = runtime_kernels(configs)
    dicts = [c.to_dict() for c in configs]
    jobs = jobs or min(len(variants), os.cpu_count() or 1)
    work = [(dicts, i, tuple(archs), ptx) for i in range(len(variants))]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as ex:
        done = []
        for (k, *_), res in zip(variants, ex.map(_compile_one, work)):
            print(f"compiled {k.name}", file=sys.stderr)
            done.append(aot.Compiled(k, *res))
    header, source = aot.render_sources(done)
    meta = aot.manifest(done)
    meta["archs"] = list(archs)
    with atomic_directory(out, force=True) as tmp:     # the build tree's own folder
        (tmp / "memmamba_kernels.h").write_text(header)
        (tmp / "memmamba_kernels.cpp").write_text(source)
        (tmp / "kernels.json").write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / TABLE_FILES[0]).write_text(render_table(variants))
        (tmp / TABLE_FILES[1]).write_text(json.dumps(dicts, indent=1) + "\n")
    return len(done)


def bundled_configs() -> list[str]:
    """The demo checkpoints' config.json files (memmamba_deploy/assets): the README's examples run on them."""
    return sorted(str(p) for p in (REPO / "memmamba_deploy" / "assets").glob("*/config.json"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--arch", default="80,86,87,89,90")
    ap.add_argument("--preset", default="tiny,130m", help="model presets to compile for, memory on and off (comma-separated, or none)")
    ap.add_argument("--config", action="append", default=[], help="a checkpoint's config.json (repeatable)")
    ap.add_argument("--no-ptx", action="store_true")
    ap.add_argument("--jobs", type=int, default=0, help="compiler processes (default: one per CPU)")
    args = ap.parse_args(argv)
    from memmamba_deploy import aot

    try:
        aot.check_source_tree()          # this file's tree is first on sys.path: its models must be imported too
        from memmamba_deploy.models import MemMambaConfig

        presets = [p for p in args.preset.split(",") if p and p != "none"]
        # a preset's plain-Mamba twin (memory off) is a shape of its own: compile both
        configs = [MemMambaConfig.preset(p, memory=m) for p in presets for m in (True, False)]
        configs += [MemMambaConfig.load(p) for p in args.config + bundled_configs()]
        archs = aot.parse_archs(args.arch)
        n = build(configs, Path(args.out), archs, ptx=not args.no_ptx, jobs=args.jobs)
    except (aot.AotError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {n} kernel variant(s) x sm_{'/'.join(map(str, archs))} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
