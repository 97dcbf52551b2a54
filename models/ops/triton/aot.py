"""Machine-readable launch descriptions of the kernels, for ahead-of-time builds (TensorRT plugins, C++ runtime).

Each entry of aot_kernels() is what memmamba_deploy/aot.py compiles with
`triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", sm, 32))`:

    fn          the @triton.jit kernel
    signatures  {variant suffix: {argument: Triton type or "constexpr"}}, every argument of fn in order
    constexprs  the value of every constexpr argument (fixed per entry: one compiled variant per suffix)
    num_warps   as the Python launcher uses
    grid        the launch grid in words
    limits      sizes the variant handles (a launcher picks the first variant whose limits fit, else refuses)
    doc         what the kernel computes

Runtime sizes and strides are plain i32 scalars, thresholds/eps/scale fp32 scalars; "act" tensors are fp32 or
fp16 per variant, as export/contract.py says ("T"); SSM state, A, D, dt_bias, scores, priorities fp32; indices
int32. Triton (>= 3.5) appends two scratch pointers to every kernel; these kernels need no scratch (pass null).
README.md documents each kernel's launch contract (argument order, grid, workspace, variant choice).
"""
from __future__ import annotations

from . import decode, pool, scan

ACT = {"fp32": "*fp32", "fp16": "*fp16"}


def _signature(fn, types: dict[str, str], constexprs: dict) -> dict[str, str]:
    """Every argument of fn in order: constexpr, an explicit type, or i32 (sizes and strides)."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            raise ValueError(f"{fn.__name__}: no type given for pointer argument {name}")
        else:
            sig[name] = "i32"
    return sig


def _entry(fn, types_for, constexprs, num_warps, grid, limits, doc, dtypes=("fp32", "fp16")):
    return dict(fn=fn, signatures={dt: _signature(fn, types_for(ACT[dt]), constexprs) for dt in dtypes},
                constexprs=constexprs, num_warps=num_warps, num_stages=1, grid=grid, limits=limits, doc=doc)


# ---- SelectiveScanChunk / SelectiveScanStep -----------------------------------------------------------------------
def _scan_types(act):
    return dict(x_ptr=act, dt_ptr=act, A_ptr="*fp32", B_ptr=act, C_ptr=act, D_ptr="*fp32", z_ptr=act,
                dt_bias_ptr="*fp32", h_in_ptr="*fp32", y_ptr=act, h_out_ptr="*fp32", dt_sum_ptr="*fp32")


SCAN_BLOCKS = dict(BLOCK_T=scan.AOT_SCAN_BLOCK_T, BLOCK_D=scan.AOT_SCAN_BLOCK_D, BLOCK_N=16)  # scan_chunk_plan's tile
SCAN_LIMITS = "N <= 16"
_SCAN_GRID = "(B, cdiv(Di, 16), n_chunks) with (chunk_len, n_chunks) = scan_chunk_plan(B, T, Di, N)"


def _scan_entries() -> dict:
    fwd = scan.selective_scan_fwd_kernel
    common = dict(**SCAN_BLOCKS, HAS_Z=True, HAS_DT_BIAS=True)
    return {
        "selective_scan_fwd": _entry(
            fwd, _scan_types, dict(common, HAS_H_IN=True, WRITE_Y=True, WRITE_H=True, WRITE_DT_SUM=False),
            scan.NUM_WARPS, "(B, cdiv(Di, 16), 1), chunk_len = T", SCAN_LIMITS,
            "SelectiveScanChunk when scan_chunk_plan gives one chunk: y and h from h0 in one pass"),
        "selective_scan_chunk_states": _entry(
            fwd, _scan_types, dict(common, HAS_H_IN=False, WRITE_Y=False, WRITE_H=True, WRITE_DT_SUM=True),
            scan.NUM_WARPS, _SCAN_GRID, SCAN_LIMITS,
            "pass 1 of 3: each chunk from zero state -> workspace states[b,c] and dt_sum[b,c]"),
        "selective_scan_chunk_out": _entry(
            fwd, _scan_types, dict(common, HAS_H_IN=True, WRITE_Y=True, WRITE_H=False, WRITE_DT_SUM=False),
            scan.NUM_WARPS, _SCAN_GRID, SCAN_LIMITS,
            "pass 3 of 3: each chunk from states[b,c] (after scan_chunk_combine) -> y"),
        "scan_chunk_combine": _entry(
            scan.scan_chunk_combine_kernel, lambda act: dict(A_ptr="*fp32", dt_sum_ptr="*fp32", h0_ptr="*fp32",
                                                             states_ptr="*fp32", h_out_ptr="*fp32"),
            dict(BLOCK_D=16, BLOCK_N=16, HAS_H0=True, REVERSE=False), 4, "(B, cdiv(Di, 16))",
            SCAN_LIMITS,
            "pass 2 of 3: chain the chunks (states[b,c] becomes the state before chunk c) -> h", dtypes=("fp32",)),
        "selective_state_step": _entry(
            scan.selective_state_step_kernel,
            lambda act: dict(x_ptr=act, dt_ptr=act, A_ptr="*fp32", B_ptr=act, C_ptr=act, D_ptr="*fp32", z_ptr=act,
                             dt_bias_ptr="*fp32", h_in_ptr="*fp32", y_ptr=act, h_out_ptr="*fp32"),
            dict(BLOCK_D=64, BLOCK_N=16, HAS_Z=True, HAS_DT_BIAS=True), 4, "(B, cdiv(Di, 64))", SCAN_LIMITS,
            "SelectiveScanStep: one token; h_out may alias h_in"),
    }


# ---- NotePoolSweep / SparsePoolAttention ----------------------------------------------------------------------------
def _pool_entries() -> dict:
    out = {}
    for k in (64, 256):
        out[f"pool_sweep_k{k}"] = _entry(
            pool.pool_sweep_kernel,
            lambda act: dict(scores_ptr="*fp32", prio0_ptr="*fp32", index_ptr="*i32", prio_ptr="*fp32", tau1="fp32"),
            dict(BLOCK_T=pool.sweep_block_t(k), BLOCK_K=k), 4, "(B,)", f"K <= {k}",
            "NotePoolSweep: the §3 replay, one program per batch row", dtypes=("fp32",))
    for s in (64, 256):
        block_q, block_s, block_dh, block_v, num_warps = pool.attention_blocks(s, 16, 64)
        out[f"pool_attention_s{s}"] = _entry(
            pool.pool_attention_fwd_kernel,
            lambda act: dict(q_ptr=act, k_ptr=act, v_ptr=act, index_ptr="*i32", o_ptr=act, scale="fp32"),
            dict(BLOCK_Q=block_q, BLOCK_S=block_s, BLOCK_DH=block_dh, BLOCK_V=block_v), num_warps,
            f"(B, cdiv(T, {block_q}), H), n_vblocks = cdiv(d/H, {block_v})", f"S <= {s}, ds/H <= 16",
            "SparsePoolAttention forward")
    return out


def aot_kernels() -> dict:
    """The kernels of the four custom ops of export/contract.py (what the TensorRT plugins compile)."""
    return {**_scan_entries(), **_pool_entries()}


# ---- the fused decode step (C++ runtime, issue 7): one set per model shape ---------------------------------------
def decode_aot_kernels(config, dtype: str = "fp16") -> dict:
    """The four decode kernels of models/ops/triton/decode.py with decode_blocks(..., aot=True) for `config`
    (MemMambaConfig: the Python fast path's blocks except D's 8 channels); `dtype` is the model's ("fp32" or
    "fp16"). Launch order and arguments per layer: memmamba_deploy/backends/triton_backend.py
    TritonBackend.launches (documented in README.md)."""
    c = config
    blk = decode.decode_blocks(c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv, c.pool_size, c.summary_dim,
                               c.memory_heads, c.cross_layer_every, aot=True)
    act = ACT[dtype]

    def cx(name, **extra):
        # USE_PDL off here; cpp/aot_kernels.py marks its variants of these kernels pdl (aot.AotKernel.pdl), which
        # compiles it in for sm_90 and later
        return {k: v for k, v in blk[name].items() if k != "num_warps"} | dict(USE_PDL=False) | extra

    out = {}
    for emb in (True, False):
        for proj in ((True, False) if c.memory else (False,)):
            cxs = cx("norm_proj", FROM_EMBEDDING=emb, HAS_PROJ=proj)
            out[f"decode_norm_proj{'_embed' if emb else ''}{'' if proj else '_noproj'}"] = dict(
                fn=decode.decode_norm_proj_kernel,
                signatures={dtype: _signature(decode.decode_norm_proj_kernel, dict(
                    tok_ptr="*i64", emb_ptr=act, h_prev_ptr="*fp32", part_ptr="*fp32", h_ptr="*fp32", u_ptr=act,
                    norm_w_ptr=act, w_ptr=act, bias_ptr="*fp32", out_ptr=act, zx_ptr="*fp32", zo_ptr="*fp32",
                    eps="fp32"), cxs)},
                constexprs=cxs, num_warps=blk["norm_proj"]["num_warps"], num_stages=1,
                grid=f"(cdiv(R, {cxs['BLOCK_R']}) or 1 without projection, B)", doc="decode kernel A")
    if c.memory:
        for cross in {c.is_cross_layer(l) for l in range(c.n_layers)}:
            cxs = cx("note_pool", HAS_CROSS=cross, GROUP=c.cross_layer_every if cross else 1)
            out[f"decode_note_pool{'_cross' if cross else ''}"] = dict(
                fn=decode.decode_note_pool_kernel,
                signatures={dtype: _signature(decode.decode_note_pool_kernel, dict(
                    u_ptr=act, mem_ptr=act, pool_ptr=act, prio_ptr="*fp32", group_pool_ptr=act,
                    group_prio_ptr="*fp32", pool_out_ptr=act, prio_out_ptr="*fp32", ut_ptr=act, wk_ptr=act,
                    wv_ptr=act, alpha_ptr=act, x_wk_ptr=act, x_wv_ptr=act, x_alpha_ptr=act, w_score_ptr=act,
                    tau1="fp32", tau2="fp32", scale="fp32"), cxs)},
                constexprs=cxs, num_warps=blk["note_pool"]["num_warps"], num_stages=1,
                grid=f"(H * cdiv(d/H, {cxs['BLOCK_O']}), B)", doc="decode kernel B")
    cxs = cx("in_proj_conv")
    out["decode_in_proj_conv"] = dict(
        fn=decode.decode_in_proj_conv_kernel,
        signatures={dtype: _signature(decode.decode_in_proj_conv_kernel, dict(
            ut_ptr=act, w_in_ptr=act, conv_w_ptr=act, conv_b_ptr=act, win_in_ptr=act, win_out_ptr=act,
            w_xT_ptr=act, xc_ptr=act, z_ptr=act, xacc_ptr="*fp32"), cxs)},
        constexprs=cxs, num_warps=blk["in_proj_conv"]["num_warps"], num_stages=1,
        grid=f"(cdiv(Di, {cxs['BLOCK_C']}), B)", doc="decode kernel C")
    cxs = cx("ssm_out")
    out["decode_ssm_out"] = dict(
        fn=decode.decode_ssm_out_kernel,
        signatures={dtype: _signature(decode.decode_ssm_out_kernel, dict(
            xc_ptr=act, z_ptr=act, xacc_ptr="*fp32", w_dt_ptr=act, dt_bias_ptr=act, A_ptr="*fp32", D_ptr=act,
            h_in_ptr="*fp32", h_out_ptr="*fp32", w_outT_ptr=act, oacc_ptr="*fp32"), cxs)},
        constexprs=cxs, num_warps=blk["ssm_out"]["num_warps"], num_stages=1,
        grid=f"(cdiv(Di, {cxs['BLOCK_C']}), B)", doc="decode kernel D")
    return out
