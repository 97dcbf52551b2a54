"""The two recurrent graphs, written node by node from a MemMambaLM's weights (spec §2–§8).

decode_step: input_ids [batch, 1] + state -> logits [batch, vocab] (fp32) + new state   (MemMambaLM.step)
prefill:     input_ids [batch, T] + lengths [batch] + state -> logits of each row's last token + new state
             (MemMambaLM.prefill(..., lengths): row b's tokens are input_ids[b, :lengths[b]], the rest padding,
             which changes no state; lengths T everywhere is the plain prefill)

State tensors are stacked over layers so the graph I/O does not grow with depth (State in models/memmamba.py):
conv_state [L,B,Di,k-1] (act dtype), ssm_state [L,B,Di,N] (fp32), pool [L,B,K,ds] (act dtype), pool_prio [L,B,K]
(fp32). Each new state is a separate output (new_<name>): a graph never updates its input in place.

The selective scan (chunk and step), the note-pool sweep and the sparse pool attention are `memmamba` custom nodes
(export/custom_ops.py); the portable flavour inlines their function bodies. Everything else is standard ops and
follows MemMambaLM op for op, in the same dtypes: residual stream and RMSNorm in fp32, linears in the activation
dtype, scores and thresholds in fp32.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import onnx
import torch
from onnx import helper

from ..models import MemMambaConfig, MemMambaLM
from ..models.ops.pool import fp32
from . import custom_ops
from .custom_ops import emit
from .onnx_builder import FLOAT, FLOAT16, INT32, INT64, Builder, value_info

ACT_DTYPES = {"fp32": FLOAT, "fp16": FLOAT16}
INT64_MAX = np.iinfo(np.int64).max
BATCH, TOKENS = "batch", "T"   # symbolic dims (the TensorRT backend sizes its optimisation profile from these names)


@dataclasses.dataclass(frozen=True)
class StateTensor:
    """One stacked state tensor of the graphs' I/O."""
    name: str          # graph input; the graph output is "new_" + name
    field: str         # the models.State field it carries
    shape: tuple       # with BATCH where the batch goes
    dtype: int
    initial: float     # State.zeros: 0, or -1 for the priorities (empty slots)

    @property
    def output(self) -> str:
        return "new_" + self.name


def state_tensors(config: MemMambaConfig, act: int) -> list[StateTensor]:
    c = config
    out = [StateTensor("conv_state", "conv", (c.n_layers, BATCH, c.d_inner, c.d_conv - 1), act, 0.0),
           StateTensor("ssm_state", "ssm", (c.n_layers, BATCH, c.d_inner, c.d_state), FLOAT, 0.0)]
    if c.memory:
        out += [StateTensor("pool", "pool", (c.n_layers, BATCH, c.pool_size, c.summary_dim), act, 0.0),
                StateTensor("pool_prio", "prio", (c.n_layers, BATCH, c.pool_size), FLOAT, -1.0)]
    return out


class GraphWriter:
    """Writes decode_step and prefill for one model and activation dtype ("fp32" or "fp16")."""

    def __init__(self, model: MemMambaLM, dtype: str = "fp32"):
        if dtype not in ACT_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: choose fp32 or fp16")
        self.config = model.config
        self.act = ACT_DTYPES[dtype]
        self.np_act = np.float16 if dtype == "fp16" else np.float32
        self.params = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        if dtype == "fp16":
            big = [k for k, v in self.params.items() if v.abs().max().item() > float(np.finfo(np.float16).max)]
            if big:
                raise ValueError(f"weights {big[:4]} exceed the fp16 range (65504): export with --dtype fp32")
        self.state = state_tensors(self.config, self.act)

    # ---- weights ---------------------------------------------------------------------------------------------------
    def _w(self, b: Builder, key: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
           fp32_weight: bool = False, suffix: str = "") -> str:
        """The parameter `key` as an initializer of this graph (once per graph), in the activation dtype unless
        fp32_weight (A, D, dt_bias: fp32 by the contract)."""
        name = key + suffix
        if name not in self._seen:
            t = self.params[key] if transform is None else transform(self.params[key])
            self._seen.add(name)
            b.weight(name, t.numpy().astype(np.float32 if fp32_weight else self.np_act))
        return name

    def _linear(self, b: Builder, x: str, prefix: str) -> str:
        """x @ W^T (nn.Linear without bias); W is stored transposed so one MatMul serves [B,d] and [B,T,d]."""
        return b.op("MatMul", x, self._w(b, prefix + ".weight", lambda t: t.t(), suffix=".T"))

    def _rmsnorm(self, b: Builder, h: str, key: str) -> str:
        """RMSNorm in fp32 (h is fp32), cast to the activation dtype, times the weight (models.memmamba.RMSNorm)."""
        ms = b.reduce_mean(b.op("Mul", h, h), -1, keepdims=True)
        x = b.op("Mul", h, b.op("Reciprocal", b.op("Sqrt", b.op("Add", ms, b.const(self.config.norm_eps, FLOAT)))))
        return b.op("Mul", self._w(b, key), self._cast_act(b, x))

    def _cast_act(self, b: Builder, x: str) -> str:
        return x if self.act == FLOAT else b.cast(x, self.act)

    def _to_fp32(self, b: Builder, x: str) -> str:
        return x if self.act == FLOAT else b.cast(x, FLOAT)

    # ---- §3–§5 memory path -------------------------------------------------------------------------------------------
    def _note(self, b: Builder, u: str, l: int) -> tuple[str, str]:
        """§3: (a [...] fp32, s [..., ds]) from u [..., d]."""
        p = f"layers.{l}.note"
        hidden = b.op("Relu", self._linear(b, u, p + ".score_in"))
        a = b.squeeze(b.op("Sigmoid", self._to_fp32(b, self._linear(b, hidden, p + ".score_out"))), -1)
        return a, self._linear(b, u, p + ".summary")

    def _read(self, b: Builder, u: str, bank: str, index: str, l: int, which: str) -> str:
        """§4 (which="token_attn", with the trigger) or §5 (which="cross_attn"): r [B,T,d] from u [B,T,d], bank
        [B,M,ds] and index [B,T,S] int32."""
        p = f"layers.{l}.{which}"
        with b.scope(which):
            q = self._linear(b, u, p + ".q_proj")
            k = self._linear(b, bank, p + ".k_proj")
            v = self._linear(b, bank, p + ".v_proj")
            (o,) = emit(b, "SparsePoolAttention", q, k, v, index, num_heads=self.config.memory_heads)
            r = b.op("Mul", self._w(b, p + ".alpha"), o)
            if which == "token_attn":
                logit = b.op("Add", self._linear(b, u, p + ".trigger"), self._w(b, p + ".trigger.bias"))
                tau2 = b.const(fp32(self.config.read_threshold), FLOAT)
                fire = b.op("Greater", b.op("Sigmoid", self._to_fp32(b, logit)), tau2)
                r = b.op("Mul", r, b.cast(fire, self.act))
        return r

    @staticmethod
    def _slot_index(b: Builder, prio: str, size: int) -> str:
        """[B,S] priorities -> [B,1,S] int32 indices of the occupied slots, -1 for empty ones (models._pool_index)."""
        slots = b.const(np.arange(size), INT32)
        return b.unsqueeze(b.where(b.op("GreaterOrEqual", prio, b.const(0.0, FLOAT)), slots, b.const(-1, INT32)), 1)

    def _insert(self, b: Builder, pool: str, prio: str, a: str, s: str) -> tuple[str, str]:
        """§3 priority replacement for one token (pool_insert_ref): the first slot of least priority, then Where.
        The slot is the least index among the minima, spelled out (ReduceMin twice) rather than ArgMin: empty slots
        tie at -1, and ONNX's select_last_index is a convention a runtime may not keep (TensorRT lowers ArgMin to
        TopK, whose order among ties it does not document)."""
        K = self.config.pool_size
        slots = b.const(np.arange(K).reshape(1, K), INT32)                                     # [1, K]
        least = b.op("ReduceMin", prio, axes=[1], keepdims=1)                                   # [B, 1]
        j = b.op("ReduceMin", b.where(b.op("Equal", prio, least), slots, b.const(K, INT32)), axes=[1],
                 keepdims=1)                                                                    # [B, 1] int32
        a = b.unsqueeze(a, 1)                                                                   # [B, 1]
        take = b.op("And", b.op("Greater", a, b.const(fp32(self.config.insert_threshold), FLOAT)),
                    b.op("Greater", a, least))
        hit = b.op("And", take, b.op("Equal", slots, j))                                        # [B, K]
        new_prio = b.where(hit, a, prio)
        new_pool = b.where(b.unsqueeze(hit, -1), b.unsqueeze(s, 1), pool)
        return new_pool, new_prio

    # ---- §6 mixer ----------------------------------------------------------------------------------------------------
    def _mixer_tail(self, b: Builder, xc: str, z: str, h0: str, l: int, step: bool,
                    pad: str | None = None) -> tuple[str, str]:
        c, p = self.config, f"layers.{l}.mixer"
        dt_r, B, C = b.split(self._linear(b, xc, p + ".x_proj"), [c.dt_rank, c.d_state, c.d_state], -1)
        dt = self._linear(b, dt_r, p + ".dt_proj")                                               # bias: in the scan
        if pad is not None:                     # padding: δ = softplus(-inf) = 0, the scan's identity
            dt = b.where(b.unsqueeze(pad, -1), b.const(float("-inf"), self.act), dt)
        A = self._w(b, p + ".A_log", lambda t: -torch.exp(t), fp32_weight=True, suffix=".A")
        D = self._w(b, p + ".D", fp32_weight=True)
        dt_bias = self._w(b, p + ".dt_proj.bias", fp32_weight=True)
        y, h = emit(b, "SelectiveScanStep" if step else "SelectiveScanChunk", xc, dt, A, B, C, D, z, dt_bias, h0,
                    dt_softplus=1)
        return self._linear(b, y, p + ".out_proj"), h

    def _mixer_step(self, b: Builder, u: str, window: str, h0: str, l: int):
        """One token: u [B,d] -> (y [B,d], window [B,Di,k-1], h [B,Di,N])."""
        c, p = self.config, f"layers.{l}.mixer"
        x, z = b.split(self._linear(b, u, p + ".in_proj"), [c.d_inner, c.d_inner], -1)
        xt = b.op("Concat", window, b.unsqueeze(x, 2), axis=2)                                 # [B, Di, k]
        w = self._w(b, p + ".conv1d.weight", lambda t: t[:, 0], suffix=".step")
        xc = b.silu(b.op("Add", b.reduce_sum(b.op("Mul", xt, w), -1), self._w(b, p + ".conv1d.bias")))
        y, h = self._mixer_tail(b, xc, z, h0, l, step=True)
        return y, b.slice(xt, 1, c.d_conv, 2), h

    def _mixer_chunk(self, b: Builder, u: str, window: str, h0: str, l: int, pad: str, window_at: str):
        """T tokens: u [B,T,d] -> (y [B,T,d], window, h); the causal conv is one grouped Conv over [window, x].
        pad [B,T]: padding (δ 0); window_at [B,Di,k-1]: the columns of [window, x] after each row's last token."""
        c, p = self.config, f"layers.{l}.mixer"
        x, z = b.split(self._linear(b, u, p + ".in_proj"), [c.d_inner, c.d_inner], -1)
        xt = b.op("Concat", window, b.op("Transpose", x, perm=[0, 2, 1]), axis=2)              # [B, Di, k-1+T]
        conv = b.op("Conv", xt, self._w(b, p + ".conv1d.weight"), self._w(b, p + ".conv1d.bias"), group=c.d_inner)
        xc = b.op("Transpose", b.silu(conv), perm=[0, 2, 1])                                    # [B, T, Di]
        y, h = self._mixer_tail(b, xc, z, h0, l, step=False, pad=pad)
        return y, b.op("GatherElements", xt, window_at, axis=2), h

    # ---- graphs ------------------------------------------------------------------------------------------------------
    def _begin(self) -> Builder:
        self._seen: set[str] = set()
        return Builder()

    def _layer_states(self, b: Builder) -> dict[str, list[str]]:
        """Split every stacked state input into per-layer tensors."""
        L = self.config.n_layers
        return {s.name: [b.squeeze(t, 0) for t in b.split(s.name, [1] * L, 0)] for s in self.state}

    def _finish(self, b: Builder, name: str, h_last: str, new: dict[str, list[str]], tokens,
                no_tokens: str | None = None) -> onnx.ModelProto:
        c = self.config
        normed = self._rmsnorm(b, h_last, "norm_f.weight")
        logits = b.op("Gemm", normed, self._w(b, "embeddings.weight"), transB=1)                # tied LM head
        if no_tokens is None:
            b.op("Cast", logits, to=FLOAT, outputs=["logits"])
        else:                                   # a row of length 0: no last token, logits 0 (MemMambaLM.prefill)
            b.op("Where", b.unsqueeze(no_tokens, 1), b.const(0.0, FLOAT), b.cast(logits, FLOAT), outputs=["logits"])
        for s in self.state:
            b.op("Concat", *[b.unsqueeze(t, 0) for t in new[s.name]], axis=0, outputs=[s.output])
        inputs = [value_info("input_ids", INT64, [BATCH, tokens])]
        if no_tokens is not None:
            inputs.append(value_info("lengths", INT64, [BATCH]))
        inputs += [value_info(s.name, s.dtype, s.shape) for s in self.state]
        outputs = [value_info("logits", FLOAT, [BATCH, c.vocab_size])]
        outputs += [value_info(s.output, s.dtype, s.shape) for s in self.state]
        graph = helper.make_graph(b.nodes, f"memmamba_{name}", inputs, outputs, initializer=b.initializers)
        return helper.make_model(graph, opset_imports=custom_ops.opset_imports(),
                                 functions=custom_ops.functions(self.act, {n.op_type for n in b.nodes if n.domain}),
                                 ir_version=9,
                                 producer_name="memmamba-deploy", doc_string=f"MemMamba {name} (spec §2-§8)")

    def _embed(self, b: Builder) -> str:
        return self._to_fp32(b, b.op("Gather", self._w(b, "embeddings.weight"), "input_ids", axis=0))

    def decode_step(self, on_layer: Callable[[], None] = lambda: None) -> onnx.ModelProto:
        """MemMambaLM.step as a graph: one token per row, O(1) work."""
        c, b = self.config, self._begin()
        h = b.squeeze(self._embed(b), 1)                                                        # [B, d] fp32
        st = self._layer_states(b)
        new = {s.name: [] for s in self.state}
        for l in range(c.n_layers):
            with b.scope(f"layer{l}"):
                u = self._rmsnorm(b, h, f"layers.{l}.norm.weight")
                ut = u
                if c.memory:
                    pool, prio = st["pool"][l], st["pool_prio"][l]
                    u3 = b.unsqueeze(u, 1)
                    r = self._read(b, u3, pool, self._slot_index(b, prio, c.pool_size), l, "token_attn")
                    ut = b.op("Add", ut, b.squeeze(r, 1))
                    if c.is_cross_layer(l):
                        first = l - c.cross_layer_every + 1                                     # pools before the token
                        bank = b.reshape(b.op("Transpose", b.slice("pool", first, l + 1, 0), perm=[1, 0, 2, 3]),
                                         [0, -1, c.summary_dim])
                        prios = b.reshape(b.op("Transpose", b.slice("pool_prio", first, l + 1, 0), perm=[1, 0, 2]),
                                          [0, -1])
                        r = self._read(b, u3, bank, self._slot_index(b, prios, c.cross_layer_every * c.pool_size), l,
                                       "cross_attn")
                        ut = b.op("Add", ut, b.squeeze(r, 1))
                    a, s = self._note(b, u, l)
                    new_pool, new_prio = self._insert(b, pool, prio, a, s)
                    new["pool"].append(new_pool)
                    new["pool_prio"].append(new_prio)
                y, window, hs = self._mixer_step(b, ut, st["conv_state"][l], st["ssm_state"][l], l)
                new["conv_state"].append(window)
                new["ssm_state"].append(hs)
                h = b.op("Add", h, self._to_fp32(b, y))
            on_layer()
        return self._finish(b, "decode_step", h, new, 1)

    def prefill(self, on_layer: Callable[[], None] = lambda: None) -> onnx.ModelProto:
        """MemMambaLM.prefill(..., lengths) as a graph (§8 parallel form), resuming from the state inputs: row b's
        tokens are input_ids[b, :lengths[b]] (0..T), the rest padding, which changes no state (δ 0, note score 0,
        each layer's conv window at the row's end); the logits are each row's last token's."""
        c, b = self.config, self._begin()
        h = self._embed(b)                                                                      # [B, T, d] fp32
        st = self._layer_states(b)
        batch, T = b.dim("input_ids", 0), b.dim("input_ids", 1)
        positions = b.op("Range", b.const(0, INT64), b.squeeze(T, 0), b.const(1, INT64))
        pad = b.op("GreaterOrEqual", b.unsqueeze(positions, 0), b.unsqueeze("lengths", 1))      # [B, T]
        # [window, x]'s columns after each row's last token, lengths[b] + j (j < k-1), for every channel
        at = b.op("Add", b.unsqueeze("lengths", 1, 2), b.const(np.arange(c.d_conv - 1).reshape(1, 1, -1), INT64))
        window_at = b.op("Expand", at, b.op("Concat", batch, b.i64(c.d_inner, c.d_conv - 1), axis=0))
        new = {s.name: [] for s in self.state}
        K = c.pool_size
        if c.memory:
            bank_len = b.cast(b.op("Add", b.dim("input_ids", 1), b.i64(K)), INT32)          # K + T entries per bank
            slots = b.const(np.arange(K), INT32)
        group: list[tuple[str, str]] = []
        for l in range(c.n_layers):
            with b.scope(f"layer{l}"):
                u = self._rmsnorm(b, h, f"layers.{l}.norm.weight")
                ut = u
                if c.memory:
                    a, s = self._note(b, u, l)
                    a = b.where(pad, b.const(0.0, FLOAT), a)                       # padding never enters a pool
                    index, prio = emit(b, "NotePoolSweep", a, st["pool_prio"][l],
                                       insert_threshold=fp32(c.insert_threshold))             # [B, T+1, K], [B, K]
                    bank = b.op("Concat", st["pool"][l], s, axis=1)                             # initial slots, tokens
                    before = b.slice(index, 0, -1, 1)                                          # pools before each token
                    ut = b.op("Add", ut, self._read(b, u, bank, before, l, "token_attn"))
                    group.append((bank, before))
                    if c.is_cross_layer(l):
                        shifted = [i if j == 0 else b.where(b.op("GreaterOrEqual", i, b.const(0, INT32)),
                                                            b.op("Add", i, b.op("Mul", bank_len, b.const(j, INT32))), i)
                                   for j, (_, i) in enumerate(group)]
                        r = self._read(b, u, b.op("Concat", *[g for g, _ in group], axis=1),
                                       b.op("Concat", *shifted, axis=2), l, "cross_attn")
                        ut = b.op("Add", ut, r)
                        group = []
                    last = b.squeeze(b.slice(index, -1, INT64_MAX, 1), 1)                      # the pool after T
                    last = b.where(b.op("GreaterOrEqual", last, b.const(0, INT32)), last, b.unsqueeze(slots, 0))
                    new["pool"].append(b.op("GatherND", bank, b.unsqueeze(b.cast(last, INT64), -1), batch_dims=1))
                    new["pool_prio"].append(prio)
                y, window, hs = self._mixer_chunk(b, ut, st["conv_state"][l], st["ssm_state"][l], l, pad, window_at)
                new["conv_state"].append(window)
                new["ssm_state"].append(hs)
                h = b.op("Add", h, self._to_fp32(b, y))
            on_layer()
        end = b.op("Max", b.op("Sub", "lengths", b.const(1, INT64)), b.const(0, INT64))           # each row's last
        last = b.op("Expand", b.unsqueeze(end, 1, 2), b.op("Concat", batch, b.i64(1, c.d_model), axis=0))
        h_last = b.squeeze(b.op("GatherElements", h, last, axis=1), 1)
        return self._finish(b, "prefill", h_last, new, TOKENS,
                            no_tokens=b.op("Equal", "lengths", b.const(0, INT64)))
