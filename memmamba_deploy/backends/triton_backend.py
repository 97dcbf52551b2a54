"""The fast decode path: the Triton decode kernels, optionally one CUDA graph per step; prefill through
MemMambaLM(kernels="triton").prefill, with cuda_graph=True in captured graphs of power-of-two pieces (a long piece
as two halves on two streams: prefill_in_halves).

Three ways to run the same step math (step_kernel=):
  "layered"     (default) the four per-layer kernels of models/ops/triton/decode.py (three without the memory
                path), with programmatic dependent launch on sm_90+; what the C++ runtime's fused plan runs (cpp/).
  "persistent"  (GPU) the whole step, every layer, in one cooperative launch of models/ops/triton/decode_step.py,
                with grid-wide barriers between its phases. On an H100 (BENCHMARKS.md, 2026-11-25 evening) it
                ties "layered" without the memory path and loses to it with; in fp32 its weights do not fit in
                registers and it is 15x slower (it warns).
  "phased"      the persistent kernel launched once per phase (no barrier): how Triton's interpreter runs it on the
                CPU, where a barrier would never open; correct on a GPU too, just slower.
The tied LM head is a cuBLAS matmul after the kernels.

The state lives in two preallocated buffers per batch size (ping-pong): a step reads one and writes the other,
so no kernel or captured graph updates a buffer it reads (deployment-notes: in-place state updates in a CUDA
graph biased onnxruntime-genai). States returned to the caller stay valid for as long as the caller keeps them
(the Backend protocol): before a buffer is overwritten, a state still alive in it is moved to memory of its own.
The usual loop (`logits, state = backend.step(token, state)`) drops the old state first, so it never copies.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import types
import warnings
import weakref

import torch
import torch.nn.functional as F

from ..models import MemMambaConfig, MemMambaLM, State
from ..models.memmamba import Ragged, decay_rates
from ..models.ops.pool import fp32
from .base import check_ids


class TritonState:
    """A decode state of TritonBackend: the reference State's tensors (same layout, same dtypes), on the device."""

    def __init__(self, state: State):
        self.state = state

    def to_reference(self) -> State:
        """A copy as the reference State (for parity checks, or to continue in another backend)."""
        return self.state.clone()

    @property
    def batch_size(self) -> int:
        return self.state.batch_size


@dataclasses.dataclass
class _Buffers:
    """Everything one step touches, preallocated for one batch size (a captured graph bakes in these pointers)."""
    tokens: torch.Tensor
    h: torch.Tensor            # [2, B, d] fp32 residual stream, alternating by layer
    u: torch.Tensor            # [B, d] RMSNorm output
    mem: torch.Tensor          # [B, R_mem] memory projections of u
    ut: torch.Tensor           # [B, d] u + reads
    xc: torch.Tensor           # [B, Di] conv output
    z: torch.Tensor            # [B, Di] gate input
    xacc: torch.Tensor         # [L, B, R+2N] fp32 x_proj sums per layer (atomics of kernel C)
    oacc: torch.Tensor         # [L, B, d] fp32 out_proj sums per layer (atomics of kernel D)
    uf: torch.Tensor           # [B, d] final RMSNorm output
    logits: torch.Tensor       # [B, V] fp32
    ws: torch.Tensor           # fp32 workspace of the persistent kernel, zeroed before each step: barrier counter
    acc: torch.Tensor          # view of ws: [L, copies, B, R+2N + d] fp32 x_proj and out_proj sums per layer
    note: torch.Tensor         # [B, d/4 + d_s] score_in and summary rows of u (persistent kernel)
    reads: torch.Tensor        # [2, B, d] r_tok, r_cross (persistent kernel)
    states: list               # two State objects: the ping-pong pair
    owners: list               # weakref to the TritonState living in each state buffer (or None)
    graphs: list | None = None


class TritonBackend:
    """Backend protocol (backends/base.py) over the fused Triton decode kernels.

    cuda_graph=True captures the whole step (all layers, LM head) once per batch size and replays it, and runs
    prefill as captured graphs of power-of-two pieces of the prompt (_graphed_prefill).
    step_kernel: "layered" (default), "persistent" or "phased" (the module docstring). pdl (layered only; default
    where the GPU has it, sm_90+): programmatic dependent launch.
    On a CPU model (tests) the kernels run in Triton's interpreter, without graphs.
    The backend packs the model's weights when it is built (the decode kernels' layouts, the prefill's derived
    memory weights): build a new one after changing them."""

    name = "triton"
    ragged_prefill = True              # prefill(..., lengths=): rows of their own lengths in one call
    STEP_KERNELS = ("layered", "persistent", "phased")
    # the most tokens (batch x length) one captured prefill graph runs (cuda_graph=True): a prefill's fixed cost
    # (~2 ms on the 130m, an H100; PIECE_COST_TOKENS) is paid once a piece, so one 64k piece runs 9% faster than four of 16k, for
    # ~2 GiB of graph memory at batch 1 (the 130m; 0.4 GiB at 16k) and the same at any batch (BENCHMARKS.md)
    PREFILL_TOKENS = 65536
    # a captured piece of at least this many tokens (batch x length) runs as two halves on two streams
    # (prefill_in_halves): the 130m on an H100, 16k tokens 18.04 -> 17.61 ms, 32k 33.75 -> 33.33, 64k 65.42 ->
    # 64.13; 8k gains nothing (BENCHMARKS.md, sixteenth session)
    SPLIT_TOKENS = 16384
    # a captured prefill piece's fixed cost, in tokens (batch x length) of work: ~2 ms for the 130m on an H100, what
    # ~2000 tokens take at 1 us each; prefill_plan pads a prompt rather than run a piece more (BENCHMARKS.md, thirtieth
    # session). 0: never pad
    PIECE_COST_TOKENS = 2048
    # decode buffers and graphs, and prefill buffers and graphs, are each kept for this many batch sizes, the least
    # recently used dropped first: a server whose batch changes as rows leave and join (Session.rows, Session.stack)
    # or as waves of prompts come (Session.prefill of rows) keeps what it reuses, not buffers (states of the batch's
    # size) and graphs for every size it ever ran
    BATCH_SIZES_KEPT = 8

    def __init__(self, model: MemMambaLM, cuda_graph: bool = True, pdl: bool | None = None,
                 step_kernel: str = "layered"):
        from ..models.ops.triton import kernels_for

        self.config: MemMambaConfig = model.config
        self.model = copy.copy(model).eval().set_kernels("triton")     # prefill path; the caller's model untouched
        self.device, self.dtype = model.device, model.dtype
        if cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, not {self.device} "
                             f"(use cuda_graph=False)")
        self.cuda_graph = cuda_graph
        if step_kernel not in self.STEP_KERNELS:
            raise ValueError(f"step_kernel must be one of {', '.join(self.STEP_KERNELS)}, not {step_kernel!r}")
        if step_kernel == "persistent" and self.device.type != "cuda":
            raise ValueError("step_kernel='persistent' needs a CUDA device (its grid barriers cannot run in Triton's "
                             "interpreter); use 'phased'")
        self.step_kernel = step_kernel
        if step_kernel == "persistent" and self.dtype == torch.float32:
            warnings.warn("step_kernel='persistent' with fp32 weights: the kernel's registers spill to memory (6.2 "
                          "ms/token for 130m on an H100, 'layered' 0.41); it is correct, but use 'layered'",
                          stacklevel=2)
        self.profile = None            # an int64 [grid, 256, 6] tensor: the persistent kernel stamps its phases there
        kernels = kernels_for(self.device)
        self.k, self.ks = kernels.decode, kernels.step
        if model.config.memory and self.dtype in (torch.float16, torch.bfloat16):
            # the prefill's derived memory weights once, as the decode kernels' packed weights: not a stack_weights
            # launch a layer in every prefill (24 launches, ~0.1 ms of a 130m prefill at any length)
            with torch.no_grad():
                derived = {layer: kernels.memory.layer_weights(layer, self.dtype) for layer in self.model.layers}
            self.model.ops = types.SimpleNamespace(**{**vars(self.model.ops), "fused_memory_read": functools.partial(
                kernels.memory.fused_memory_read, derived=derived)})
        c = self.config
        self.blocks = self.k.decode_blocks(c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv, c.pool_size,
                                           c.summary_dim, c.memory_heads, c.cross_layer_every)
        self.step_blocks = self.ks.step_blocks(c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv, c.pool_size,
                                               c.summary_dim, c.memory_heads, c.cross_layer_every, c.memory)
        # programmatic dependent launch (sm_90+): each kernel prefetches its weights while its predecessor runs;
        # pdl=None takes it where the GPU has it, False turns it off (to measure what it buys)
        can_pdl = self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] >= 9
        if pdl and not can_pdl:
            raise ValueError(f"pdl=True needs a CUDA device of compute capability 9.0 or newer, not {self.device}")
        if pdl and step_kernel != "layered":
            raise ValueError(f"pdl=True applies to step_kernel='layered' only, not {step_kernel!r}")
        self.pdl = can_pdl if pdl is None else pdl
        if step_kernel == "persistent":         # every program resident at once, at most two per SM (4 warps each)
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            if self.step_blocks["grid"] > 2 * sms:
                raise ValueError(f"step_kernel='persistent' needs {self.step_blocks['grid']} resident programs for "
                                 f"this model (d_inner {c.d_inner}), more than 2 per SM on {sms} SMs: use 'layered'")
        if step_kernel == "layered":
            self.layers = [self._pack(model, l) for l in range(c.n_layers)]
        else:
            self.stacked = self._stack(model)
        self.norm_f = model.norm_f.weight.detach()
        self.embedding = model.embeddings.weight.detach()
        self._buffers: dict[int, _Buffers] = {}      # by batch size, least recently used first
        self._prefill_io: dict[int, types.SimpleNamespace] = {}
        self._prefill_graphs: dict[tuple[int, int, bool], types.SimpleNamespace] = {}   # (B, n, ragged)
        self._prefill_pool = None
        self._prefill_streams = None

    @classmethod
    def open(cls, checkpoint, device="cuda", dtype=None, cuda_graph: bool = True,
             step_kernel: str = "layered") -> "TritonBackend":
        return cls(MemMambaLM.from_pretrained(checkpoint, device=device, dtype=dtype), cuda_graph=cuda_graph,
                   step_kernel=step_kernel)

    # ---- weights, packed once ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _pack(self, model: MemMambaLM, l: int) -> types.SimpleNamespace:
        c, layer = self.config, model.layers[l]
        m = layer.mixer
        w = types.SimpleNamespace(
            norm_w=layer.norm.weight.detach(),
            w_in=m.in_proj.weight.detach().contiguous(),
            conv_w=m.conv1d.weight.detach()[:, 0].contiguous(),
            conv_b=m.conv1d.bias.detach().contiguous(),
            w_xT=m.x_proj.weight.detach().t().contiguous(),             # [Di, R+2N]: a channel's row is contiguous
            w_dt=m.dt_proj.weight.detach().contiguous(),
            dt_bias=m.dt_proj.bias.detach().contiguous(),
            A=decay_rates(m.A_log.detach()),
            D=m.D.detach().contiguous(),
            w_outT=m.out_proj.weight.detach().t().contiguous(),         # [Di, d]
            cross=c.is_cross_layer(l))
        if c.memory:
            tok = layer.token_attn
            rows = [tok.q_proj.weight, layer.note.score_in.weight, layer.note.summary.weight, tok.trigger.weight]
            bias = [torch.zeros(c.summary_dim + c.d_model // 4 + c.summary_dim),
                    tok.trigger.bias.detach().float().cpu()]
            if w.cross:
                rows.append(layer.cross_attn.q_proj.weight)
                bias.append(torch.zeros(c.summary_dim))
                w.x_wk = layer.cross_attn.k_proj.weight.detach().contiguous()
                w.x_wv = layer.cross_attn.v_proj.weight.detach().contiguous()
                w.x_alpha = layer.cross_attn.alpha.detach()
            w.w_mem = torch.cat([r.detach() for r in rows]).contiguous()
            w.b_mem = torch.cat(bias).to(self.device)
            w.wk = tok.k_proj.weight.detach().contiguous()
            w.wv = tok.v_proj.weight.detach().contiguous()
            w.alpha = tok.alpha.detach()
            w.w_score = layer.note.score_out.weight.detach()[0].contiguous()
        return w

    @torch.no_grad()
    def _stack(self, model: MemMambaLM) -> types.SimpleNamespace:
        """Every layer's weights stacked into [L, ...] tensors (the persistent kernel indexes them by layer), the
        cross-layer attention's over the cross layers. A copy of the layers' weights (130m fp16: 0.2 GB)."""
        c, layers = self.config, list(model.layers)

        def st(f, which=layers):
            return torch.stack([f(y).detach() for y in which]).contiguous()

        w = types.SimpleNamespace(
            norm_w=st(lambda y: y.norm.weight), w_in=st(lambda y: y.mixer.in_proj.weight),
            conv_w=st(lambda y: y.mixer.conv1d.weight[:, 0]), conv_b=st(lambda y: y.mixer.conv1d.bias),
            w_xT=st(lambda y: y.mixer.x_proj.weight.t()), w_dt=st(lambda y: y.mixer.dt_proj.weight),
            dt_bias=st(lambda y: y.mixer.dt_proj.bias), A=st(lambda y: decay_rates(y.mixer.A_log)),
            D=st(lambda y: y.mixer.D), w_outT=st(lambda y: y.mixer.out_proj.weight.t()))
        if c.memory:
            cross = [y for i, y in enumerate(layers) if c.is_cross_layer(i)]
            w.w_q = st(lambda y: y.token_attn.q_proj.weight)
            w.w_trig = st(lambda y: y.token_attn.trigger.weight[0])
            w.b_trig = st(lambda y: y.token_attn.trigger.bias.float()[0])
            w.w_note = st(lambda y: torch.cat([y.note.score_in.weight, y.note.summary.weight]))
            w.wk, w.wv = st(lambda y: y.token_attn.k_proj.weight), st(lambda y: y.token_attn.v_proj.weight)
            w.alpha = st(lambda y: y.token_attn.alpha[0])
            w.w_score = st(lambda y: y.note.score_out.weight[0])
            w.w_xq = st(lambda y: y.cross_attn.q_proj.weight, cross)
            w.x_wk = st(lambda y: y.cross_attn.k_proj.weight, cross)
            w.x_wv = st(lambda y: y.cross_attn.v_proj.weight, cross)
            w.x_alpha = st(lambda y: y.cross_attn.alpha[0], cross)
        return w

    # ---- buffers and graphs -----------------------------------------------------------------------------------
    def _recent(self, table: dict, batch: int):
        """table[batch] made the most recently used (dicts keep insertion order), or None where absent, after
        dropping the least recently used until there is room for it: returns (value, dropped batch sizes)."""
        value = table.pop(batch, None)
        dropped = []
        if value is None:
            while table and len(table) >= max(1, self.BATCH_SIZES_KEPT):
                dropped.append(next(iter(table)))
                del table[dropped[-1]]
        else:
            table[batch] = value
        return value, dropped

    def _get_buffers(self, batch: int) -> _Buffers:
        bufs, _ = self._recent(self._buffers, batch)   # a TritonState holding one of a dropped set's states keeps
        if bufs is not None:                           # that State alive on its own
            return bufs
        c, dev, dt = self.config, self.device, self.dtype
        f32 = dict(device=dev, dtype=torch.float32)
        r_mem = max([w.w_mem.shape[0] for w in self.layers] if c.memory and self.step_kernel == "layered" else [1])
        x_width = c.dt_rank + 2 * c.d_state
        bufs = _Buffers(
            tokens=torch.zeros(batch, device=dev, dtype=torch.long),
            h=torch.zeros(2, batch, c.d_model, **f32),
            u=torch.zeros(batch, c.d_model, device=dev, dtype=dt),
            mem=torch.zeros(batch, r_mem, device=dev, dtype=dt),
            ut=torch.zeros(batch, c.d_model, device=dev, dtype=dt),
            xc=torch.zeros(batch, c.d_inner, device=dev, dtype=dt),
            z=torch.zeros(batch, c.d_inner, device=dev, dtype=dt),
            xacc=torch.zeros(c.n_layers, batch, x_width, **f32),
            oacc=torch.zeros(c.n_layers, batch, c.d_model, **f32),
            uf=torch.zeros(batch, c.d_model, device=dev, dtype=dt),
            logits=torch.zeros(batch, c.vocab_size, **f32),
            ws=torch.zeros(4 + c.n_layers * self.step_blocks['ACC_COPIES'] * batch * (x_width + c.d_model), **f32),
            acc=None, note=torch.zeros(batch, c.d_model // 4 + c.summary_dim, device=dev, dtype=dt),
            reads=torch.zeros(2, batch, c.d_model, device=dev, dtype=dt),
            states=[State.zeros(c, batch, dev, dt), State.zeros(c, batch, dev, dt)],
            owners=[None, None])
        bufs.acc = bufs.ws[4:]                 # [L, copies, B, R+2N + d], 16-byte aligned after the counter
        if self.cuda_graph:
            bufs.graphs = self._capture(bufs)
        self._buffers[batch] = bufs
        return bufs

    def _capture(self, bufs: _Buffers) -> list:
        return [warm_and_capture(functools.partial(self._launch, bufs, src)) for src in (0, 1)]

    # ---- one step: the kernel sequence --------------------------------------------------------------------------
    def _launch(self, bufs: _Buffers, src: int) -> None:
        """Read state buffer `src`, write state buffer 1 - src, tokens -> logits."""
        if self.step_kernel == "layered":
            for _, _, launch in self.launches(bufs, src):
                launch()
            return
        bufs.ws.zero_()
        launch, n_phases = self._step_launch(bufs, src)
        if self.step_kernel == "persistent":
            launch(0, n_phases, GRID_SYNC=True, launch_cooperative_grid=True)
        else:
            for s in range(n_phases):
                launch(s, s + 1, GRID_SYNC=False)
        self._lm_head(bufs)

    def _step_launch(self, bufs: _Buffers, src: int):
        """(launch(s_lo, s_hi, **options), number of phases) for decode_step_kernel on this step's buffers."""
        c, w, blk = self.config, self.stacked, dict(self.step_blocks)
        s_in, s_out = bufs.states[src], bufs.states[1 - src]
        grid = blk.pop("grid")
        batch, heads, ds = bufs.tokens.shape[0], c.memory_heads, c.summary_dim
        dummy = bufs.h
        mem = (w.w_q, w.w_trig, w.b_trig, w.w_note, w.wk, w.wv, w.alpha, w.w_score, w.w_xq, w.x_wk, w.x_wv,
               w.x_alpha) if c.memory else (dummy,) * 12
        pool = (s_in.pool, s_in.prio) if c.memory else (dummy, dummy)
        pool_out = (s_out.pool, s_out.prio) if c.memory else (dummy, dummy)
        n_phases = c.n_layers * (3 if c.memory else 2) + 1
        if self.profile is not None and (self.profile.shape[1:] != (256, 6) or n_phases > 256 or
                                         self.profile.shape[0] < grid or self.profile.dtype != torch.int64):
            raise ValueError(f"profile must be an int64 [>= {grid}, 256, 6] tensor and the step at most 256 phases "
                             f"(this model: {n_phases})")

        def launch(s_lo, s_hi, **options):
            self.ks.decode_step_kernel[(grid,)](
                bufs.tokens, self.embedding, bufs.h, bufs.u, bufs.reads, bufs.note, bufs.xc, bufs.z, bufs.acc,
                bufs.ws[:1].view(torch.int32), bufs.uf, self.profile if self.profile is not None else bufs.h,
                s_in.conv, s_in.ssm, *pool, s_out.conv, s_out.ssm, *pool_out,
                w.norm_w, self.norm_f, w.w_in, w.conv_w, w.conv_b, w.w_xT, w.w_dt, w.dt_bias, w.A, w.D, w.w_outT,
                *mem, batch, c.n_layers, c.d_model, c.d_inner, c.d_state, c.dt_rank, c.d_conv, c.pool_size, ds,
                ds // heads, c.d_model // heads, c.d_model // 4, c.cross_layer_every, self.embedding.stride(0),
                c.norm_eps, fp32(c.insert_threshold), fp32(c.read_threshold), (ds // heads) ** -0.5, grid, s_lo,
                s_hi, HAS_MEMORY=c.memory, PROFILE=self.profile is not None, **blk,
                **options)
        return launch, n_phases

    def launches(self, bufs: _Buffers, src: int):
        """The step as (layer, kernel name, thunk) in launch order (bench_kernels times them one by one)."""
        if self.step_kernel != "layered":
            raise ValueError(f"launches() lists the layered kernels; this backend runs "
                             f"step_kernel={self.step_kernel!r}")
        c, k, blk = self.config, self.k, self.blocks
        s_in, s_out = bufs.states[src], bufs.states[1 - src]
        batch, d, di = bufs.tokens.shape[0], c.d_model, c.d_inner
        ds, d4, heads = c.summary_dim, c.d_model // 4, c.memory_heads
        x_width = c.dt_rank + 2 * c.d_state
        a, b, cc, e = blk["norm_proj"], blk["note_pool"], blk["in_proj_conv"], blk["ssm_out"]
        pdl = dict(USE_PDL=self.pdl, launch_pdl=True) if self.pdl else dict(USE_PDL=False)
        dummy = bufs.h
        out = []

        def norm(l, w_mem, b_mem, r_mem, dst):
            # layer l's kernel A (l == n_layers: the final RMSNorm, which zeroes layer 0's sums, unused till the
            # next step's A of layer 0 zeroes them again)
            zl = l % c.n_layers
            return functools.partial(
                k.decode_norm_proj_kernel[(triton_cdiv(r_mem, a["BLOCK_R"]) if r_mem else 1, batch)],
                bufs.tokens, self.embedding, bufs.h[(l + 1) % 2], bufs.oacc[l - 1], bufs.h[l % 2], dst,
                self.norm_f if l == c.n_layers else self.layers[l].norm_w, w_mem, b_mem, bufs.mem,
                bufs.xacc[zl], bufs.oacc[zl], d, r_mem, 0 if l == 0 else 1, x_width, c.norm_eps,
                self.embedding.stride(0), BLOCK_DM=a["BLOCK_DM"], BLOCK_R=a["BLOCK_R"], BLOCK_X=a["BLOCK_X"],
                FROM_EMBEDDING=l == 0, HAS_PROJ=r_mem > 0, num_warps=a["num_warps"], **pdl)

        for l, w in enumerate(self.layers):
            r_mem = w.w_mem.shape[0] if c.memory else 0
            out.append((l, "norm_proj", norm(l, w.w_mem if c.memory else dummy, w.b_mem if c.memory else dummy,
                                             r_mem, bufs.u)))
            x_in = bufs.u
            if c.memory:
                g0 = l - c.cross_layer_every + 1 if w.cross else l
                n_ob = triton_cdiv(d // heads, b["BLOCK_O"])
                out.append((l, "note_pool", functools.partial(
                    k.decode_note_pool_kernel[(heads * n_ob, batch)],
                    bufs.u, bufs.mem, s_in.pool[l], s_in.prio[l], s_in.pool[g0], s_in.prio[g0],
                    s_out.pool[l], s_out.prio[l], bufs.ut, w.wk, w.wv, w.alpha,
                    w.x_wk if w.cross else w.wk, w.x_wv if w.cross else w.wv, w.x_alpha if w.cross else w.alpha,
                    w.w_score, d, c.pool_size, ds, ds // heads, d // heads, d4, r_mem, n_ob,
                    batch * c.pool_size * ds, batch * c.pool_size,
                    fp32(c.insert_threshold), fp32(c.read_threshold), (ds // heads) ** -0.5,
                    BLOCK_O=b["BLOCK_O"], BLOCK_K=b["BLOCK_K"], BLOCK_DS=b["BLOCK_DS"], BLOCK_DH=b["BLOCK_DH"],
                    BLOCK_D4=b["BLOCK_D4"], BLOCK_GK=b["BLOCK_GK"], HAS_CROSS=w.cross,
                    GROUP=c.cross_layer_every if w.cross else 1, num_warps=b["num_warps"], **pdl)))
                x_in = bufs.ut
            out.append((l, "in_proj_conv", functools.partial(
                k.decode_in_proj_conv_kernel[(triton_cdiv(di, cc["BLOCK_C"]), batch)],
                x_in, w.w_in, w.conv_w, w.conv_b, s_in.conv[l], s_out.conv[l], w.w_xT, bufs.xc, bufs.z,
                bufs.xacc[l], d, di, c.d_conv, x_width,
                BLOCK_C=cc["BLOCK_C"], BLOCK_KD=cc["BLOCK_KD"], BLOCK_W=cc["BLOCK_W"], BLOCK_X=cc["BLOCK_X"],
                num_warps=cc["num_warps"], **pdl)))
            out.append((l, "ssm_out", functools.partial(
                k.decode_ssm_out_kernel[(triton_cdiv(di, e["BLOCK_C"]), batch)],
                bufs.xc, bufs.z, bufs.xacc[l], w.w_dt, w.dt_bias, w.A, w.D, s_in.ssm[l], s_out.ssm[l], w.w_outT,
                bufs.oacc[l], d, di, c.d_state, c.dt_rank, x_width,
                BLOCK_C=e["BLOCK_C"], BLOCK_N=e["BLOCK_N"], BLOCK_R=e["BLOCK_R"], BLOCK_O=e["BLOCK_O"],
                num_warps=e["num_warps"], **pdl)))
        out.append((c.n_layers, "final_norm", norm(c.n_layers, dummy, dummy, 0, bufs.uf)))
        out.append((c.n_layers, "lm_head", functools.partial(self._lm_head, bufs)))
        return out

    def _lm_head(self, bufs: _Buffers) -> None:
        if self.dtype == torch.float32:
            torch.mm(bufs.uf, self.embedding.t(), out=bufs.logits)
        else:
            bufs.logits.copy_(F.linear(bufs.uf, self.embedding))       # model-dtype logits, as the reference

    # ---- Backend protocol -----------------------------------------------------------------------------------------
    def new_state(self, batch: int) -> TritonState:
        return TritonState(State.zeros(self.config, batch, self.device, self.dtype))

    def _as_state(self, state, batch: int) -> State:
        s = state.state if isinstance(state, TritonState) else state
        if not isinstance(s, State):
            raise ValueError(f"expected a TritonState or a models.State, got {type(state).__name__}")
        s.check(self.config, batch, self.dtype)
        if s.conv.device != self.device:
            raise ValueError(f"state is on {s.conv.device}, the model on {self.device}")
        return s

    @torch.no_grad()
    def prefill(self, input_ids, state, lengths=None):
        """lengths [B]: rows of their own lengths, the rest padding (MemMambaLM.prefill's)."""
        # checked on the host: a captured graph reads them unchecked (an id past the vocabulary: a device-side assert)
        ids = check_ids(input_ids, self.config.vocab_size, "input_ids", 2).to(self.device)
        s = self._as_state(state, ids.shape[0])
        if lengths is not None:                        # on the host: the graphed prefill plans its pieces by them
            lengths = self.model.check_lengths(lengths, *ids.shape, device="cpu")
        if not self.cuda_graph:
            logits, new = self.model.prefill(ids, s, last_only=True, lengths=lengths)
            return logits[:, -1], TritonState(new)
        return self._graphed_prefill(ids, s, lengths)

    # ---- prefill in CUDA graphs -------------------------------------------------------------------------------
    def _graphed_prefill(self, ids: torch.Tensor, state: State, lengths: torch.Tensor | None = None):
        """The prompt in pieces of power-of-two lengths (prefill_plan: batch x length at most PREFILL_TOKENS, the
        prompt padded where fewer pieces cost less), each one captured CUDA graph of model.prefill resuming from
        the previous piece's state: eager prefill costs ~40 ms of Python and launch time for the 130m whatever the
        length, more than the GPU's work up to ~16k tokens. A length's graph is captured on first use (at most
        log2(longest piece) + 1 of them per batch size, twice where rows end inside pieces, in one shared memory
        pool, kept for BATCH_SIZES_KEPT batch sizes or until release_prefill_graphs); the pieces' state and logits
        live in buffers outside it. With lengths ([B] on the host: rows of their own lengths) a piece where some row
        ends runs a graph of its own, told how many of its columns each row has left; a row's logits are taken in
        the piece where it ends."""
        shortest = ids.shape[1]
        if lengths is not None:                        # columns past every row's end: not run at all
            shortest, longest = (int(v) for v in lengths.aminmax())
            ids = ids[:, :max(1, longest)]
        B, T = ids.shape
        plan = self.prefill_plan(B, T)
        if sum(plan) > T:                              # padded to fewer pieces: every row ends at T or before
            ids = torch.cat([ids, ids.new_zeros(B, sum(plan) - T)], 1)
            lengths = torch.full((B,), T) if lengths is None else lengths
        io, dropped = self._recent(self._prefill_io, B)
        if dropped:                                    # with their graphs
            self._prefill_graphs = {k: g for k, g in self._prefill_graphs.items() if k[0] not in dropped}
        if io is None:
            io = self._prefill_io[B] = types.SimpleNamespace(
                state=State.zeros(self.config, B, self.device, self.dtype),
                logits=torch.empty(B, self.config.vocab_size, device=self.device, dtype=torch.float32))
        io.state.copy_(state)
        if shortest == 0:
            io.logits.zero_()                          # a row of length 0 has no last token (MemMambaLM.prefill)
        pos = 0
        for n in plan:
            # a piece every row fills runs the plain graph; one where some row ends (or is padding) the ragged
            ragged = pos + n > shortest
            graph = self._prefill_graphs.get((B, n, ragged)) or self._capture_prefill(io, B, n, ragged)
            graph.ids.copy_(ids[:, pos:pos + n])
            if ragged:                                 # n + 1: more than this piece holds (the row goes on)
                graph.left.copy_((lengths - pos).clamp(0, n + 1))
            graph.graph.replay()
            pos += n
        return io.logits.clone(), TritonState(io.state.clone())

    def prefill_plan(self, batch: int, T: int) -> list[int]:
        """The graphed prefill's pieces for T tokens a row: powers of two of at most PREFILL_TOKENS // batch
        tokens, summing to T or, padded, a little more where that saves pieces: each piece costs a fixed
        PIECE_COST_TOKENS tokens' work, so T is rounded up to the multiple of 2^j that costs least (a 1500-token
        prompt: 1024 + 256 + 128 + 64 + 16 + 8 + 4 exactly, one piece of 2048 padded)."""
        longest = 1 << (max(1, self.PREFILL_TOKENS // batch).bit_length() - 1)
        sizes = [-(-T >> j) << j for j in range(longest.bit_length())]         # T, then rounded up to 2, 4, ...
        S = min(sizes, key=lambda S: ((S // longest + (S % longest).bit_count()) * self.PIECE_COST_TOKENS
                                      + batch * S, S))
        return [longest] * (S // longest) + [1 << i for i in reversed(range(longest.bit_length()))
                                             if (S % longest) >> i & 1]

    def release_prefill_graphs(self) -> None:
        """Drop the captured prefill graphs and their memory pool (about a PREFILL_TOKENS-token prefill's
        activations); the next graphed prefill captures again."""
        self._prefill_graphs.clear()
        self._prefill_io.clear()
        self._prefill_pool = None

    def _capture_prefill(self, io, B: int, n: int, ragged: bool = False):
        ids = torch.zeros(B, n, dtype=torch.long, device=self.device)
        left = torch.zeros(B, dtype=torch.long, device=self.device) if ragged else None   # columns a row has left

        split = B * n >= self.SPLIT_TOKENS and n >= 2
        if split and self._prefill_streams is None:
            self._prefill_streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))

        def run():
            lengths = None if left is None else left.clamp(max=n)
            if split:
                logits, new = prefill_in_halves(self.model, ids, io.state, self._prefill_streams, lengths)
            else:
                logits, new = self.model.prefill(ids, io.state, last_only=True, lengths=lengths)
            if left is None:
                io.logits.copy_(logits[:, -1])
            else:                                      # rows that end in this piece; the others keep theirs
                io.logits.copy_(torch.where(((left >= 1) & (left <= n))[:, None], logits[:, -1], io.logits))
            io.state.copy_(new)                        # in place, after every read of io.state

        saved = io.state.clone()
        if self._prefill_pool is None:
            self._prefill_pool = torch.cuda.graph_pool_handle()
        graph = warm_and_capture(run, self._prefill_pool)
        io.state.copy_(saved)                          # the warm-up ran on the caller's state: put it back
        entry = self._prefill_graphs[(B, n, ragged)] = types.SimpleNamespace(ids=ids, left=left, graph=graph)
        return entry

    @torch.no_grad()
    def step(self, token_ids, state):
        tokens = torch.as_tensor(token_ids).to(self.device).long()
        if tokens.dim() == 2 and tokens.shape[1] == 1:
            tokens = tokens[:, 0]
        if tokens.dim() != 1:
            raise ValueError(f"token_ids must be [batch] or [batch, 1], got shape {list(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got {tokens.tolist()}")
        s = self._as_state(state, tokens.shape[0])
        bufs = self._get_buffers(tokens.shape[0])
        src = next((i for i in (0, 1) if s is bufs.states[i]), None)
        if src is None:                                # a state from elsewhere: copy it into a free buffer
            src = 0 if self._owner(bufs, 0) is None else 1
            self._evict(bufs, src)
            bufs.states[src].copy_(s)
        self._evict(bufs, 1 - src)
        bufs.tokens.copy_(tokens)
        if bufs.graphs is not None:
            bufs.graphs[src].replay()
        else:
            self._launch(bufs, src)
        new = TritonState(bufs.states[1 - src])
        bufs.owners[1 - src] = weakref.ref(new)
        return bufs.logits.clone(), new

    @staticmethod
    def _owner(bufs: _Buffers, i: int):
        return bufs.owners[i]() if bufs.owners[i] is not None else None

    def _evict(self, bufs: _Buffers, i: int) -> None:
        """Buffer i is about to be written: a state the caller still holds there moves to memory of its own."""
        owner = self._owner(bufs, i)
        if owner is not None and owner.state is bufs.states[i]:
            owner.state = owner.state.clone()
        bufs.owners[i] = None

    def copy_state(self, state) -> TritonState:
        return TritonState(self._as_state(state, state.batch_size).clone())

    def state_nbytes(self, state) -> int:
        return self._as_state(state, state.batch_size).nbytes

    def state_to_reference(self, state) -> State:
        """A copy as the reference State (parity, Session.save_state, another backend)."""
        return self._as_state(state, state.batch_size).clone()

    def state_from_reference(self, state: State) -> TritonState:
        """A reference State (any device, fp32 or the model dtype) as this backend's state, on its device."""
        dtypes = State.dtypes(self.dtype)
        s = State(**{k: v.to(self.device, dtypes[k]) for k, v in state.tensors().items()})
        return TritonState(self._as_state(s, s.batch_size))


@torch.no_grad()
def prefill_in_halves(model: MemMambaLM, ids: torch.Tensor, state: State, streams=None, lengths=None):
    """model.prefill(ids, state, last_only=True) as its two halves, the second a layer behind the first on a
    stream of its own: layer l of the second half starts once the first half's layer l has left its state. The
    halves' latency-bound kernels (the pool sweep's one-warp replay, the small reads and launches) then overlap
    the other half's large ones. The result is prefilling the halves one after the other (so it differs from one
    whole prefill as any split of a prompt does: the scan's chunks, the GEMMs' shapes). streams: two CUDA
    streams, or None to run in the same order on the current stream (the CPU); they are this function's own:
    memory it frees returns to their allocator pools, so any later work on them must first wait on the current
    stream, as this function does. Returns (logits [B,1,vocab] fp32, the State after the last token); `state` is
    not modified. lengths [B]: rows of their own lengths (MemMambaLM.prefill's; each half gets its share)."""
    c, ops = model.config, model.ops
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"prefill_in_halves needs input_ids [batch, T] with T >= 2, got shape {list(ids.shape)}")
    state.check(c, ids.shape[0], model.dtype)
    half = ids.shape[1] // 2
    pieces = (ids[:, :half], ids[:, half:])
    ragged = [None, None]
    if lengths is not None:                            # the halves' own lengths; the last layer's y is then read
        lengths = model.check_lengths(lengths, *ids.shape)      # at each row's end, in whichever half it lies
        ragged = [Ragged.of(lengths.clamp(max=half), half),
                  Ragged.of((lengths - half).clamp(min=0), ids.shape[1] - half)]
    A = model.decay_rates()                            # before the fork: both streams read it
    if streams is not None:
        for s in streams:
            s.wait_stream(torch.cuda.current_stream(ids.device))

    def on(i):
        return torch.cuda.stream(streams[i]) if streams is not None else contextlib.nullcontext()

    h, y, group = [None, None], [None, None], [[], []]
    layer_states = [state.layer(l) for l in range(c.n_layers)]
    held = []          # the first half's states, read on the second stream: held to the end, so that the caching
    ready = []         # allocator gives their memory to no later work of the first stream
    for i in (0, 1):
        with on(i):
            h[i] = model.embeddings(pieces[i]).float()
    for l, layer in enumerate(model.layers):
        # the last layer's y at the last token (each row's, with lengths): the first half needs none of it (only
        # its state) but where rows end in it, the second half its last token's
        last = l == c.n_layers - 1
        for i in (0, 1):
            with on(i):
                if i == 1 and streams is not None:
                    streams[1].wait_event(ready[l])
                h[i], y[i], layer_states[l], group[i] = layer(h[i], y[i], layer_states[l], group[i], ops, A[l],
                                                              last_only=last, ragged=ragged[i])
                if i == 0:
                    held.append(layer_states[l])
                    if streams is not None:
                        ready.append(torch.cuda.Event())
                        ready[l].record(streams[0])
    if streams is not None:
        for s in streams:
            torch.cuda.current_stream(ids.device).wait_stream(s)
    if lengths is None:
        return model._logits(h[1][:, -1:] + y[1][:, -1:]), State.stack(layer_states)
    last = [ragged[i].at_ends(h[i]) + y[i] for i in (0, 1)]
    logits = model._logits(torch.where((ragged[1].lengths > 0)[:, None, None], last[1], last[0]))
    return logits.masked_fill((lengths == 0)[:, None, None], 0.0), State.stack(layer_states)


def warm_and_capture(run, pool=None) -> torch.cuda.CUDAGraph:
    """run() once on a side stream (compiles its kernels, warms cuBLAS), then captured as a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
