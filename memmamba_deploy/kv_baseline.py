"""The transformer that `memdeploy bench` measures MemMamba against: same vocabulary, width and depth, with a KV cache.

A GPT-style decoder (pre-RMSNorm, rotary positions, PyTorch SDPA attention with heads about 64 wide (`heads_for`),
a 4x GELU MLP, tied head) with random weights: decode speed does not depend on what the weights learned. Its
per-token cost grows with the context because every step attends over the whole cache; that growth is what the
benchmark shows beside MemMamba's fixed-size state.

On a GPU the decode step runs as MemMamba's Triton backend does, captured in a CUDA graph (one graph per cache
buffer; what gpt-fast does with a static cache): the graphed step attends over the cache's whole capacity with a
mask of the positions written so far, through SDPA's math path (batched GEMMs spread over the cache length; the
fused kernels' one program per head would read a 64k cache from 12 SMs). So the baseline is as free of Python
overhead as MemMamba's path, and its cost grows with the cache as a real KV cache's does. `graph=False` (and every
CPU run) keeps the eager step, which attends over exactly the cache's length.

KVBaseline follows the Backend protocol (backends/base.py) so the benchmark times both models the same way. Its
cache is append-only: a state is (buffers, length); a step writes position `length` and returns (buffers,
length + 1), leaving the tokens the given state sees untouched. Two steps from one state write the same slot, so
branch with copy_state, as a real KV cache demands.
"""
from __future__ import annotations

import dataclasses
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

HEAD_DIM = 64


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, 4 * d, bias=False)
        self.down = nn.Linear(4 * d, d, bias=False)


def heads_for(d_model: int) -> int:
    """The number of heads that splits d_model exactly into heads nearest HEAD_DIM wide (a model's width need not
    be a multiple of 64: 768 -> 12 heads of 64, 200 -> 4 of 50, 130 -> 2 of 65)."""
    return min((h for h in range(1, d_model + 1) if d_model % h == 0), key=lambda h: (abs(d_model / h - HEAD_DIM), h))


def rotate(x, pos, base: float = 10000.0):
    """Rotary position embedding; x [B, H, T, hd], pos [T] absolute positions. An odd head width leaves its last
    channel unrotated."""
    hd = x.shape[-1]
    even = hd - hd % 2
    inv = base ** (-torch.arange(0, even, 2, device=x.device, dtype=torch.float32) / hd)
    ang = pos.float()[:, None] * inv[None]                              # [T, hd/2]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., 0:even:2], x[..., 1:even:2]
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)
    return rotated if even == hd else torch.cat([rotated, x[..., even:]], -1)


@dataclasses.dataclass
class KVCache:
    """k, v [L, B, H, capacity, hd]; positions < length hold the tokens seen so far."""

    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes the cache needs for `length` tokens (what grows with the context)."""
        per_token = 2 * self.k[:, :, :, :1].numel() * self.k.element_size()
        return per_token * self.length


class KVTransformer(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int):
        super().__init__()
        self.heads = heads_for(d_model)
        self.embeddings = nn.Embedding(vocab_size, d_model)
        self.layers = nn.ModuleList(Block(d_model, self.heads) for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model)
        with torch.no_grad():
            for p in self.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)

    def forward(self, ids: torch.Tensor, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        """ids [B, T] after the cache's tokens -> (logits of the last token [B, vocab] fp32, cache with them)."""
        Bsz, T = ids.shape
        start, end = cache.length, cache.length + T
        if end > cache.capacity:
            cache = _resized(cache, max(end, 2 * cache.capacity))
        pos = torch.arange(start, end, device=ids.device)
        if T == 1:
            mask = None                                                # one query sees the whole cache
        elif start == 0:
            mask = "causal"
        else:
            mask = causal_lower_right(T, end)                          # query i sees keys <= start + i
        h = self.embeddings(ids)
        for l, blk in enumerate(self.layers):
            x = blk.attn_norm(h)
            q, k, v = blk.qkv(x).view(Bsz, T, 3, blk.heads, -1).permute(2, 0, 3, 1, 4)   # each [B, H, T, hd]
            q, k = rotate(q, pos), rotate(k, pos)
            cache.k[l, :, :, start:end] = k
            cache.v[l, :, :, start:end] = v
            keys, values = cache.k[l, :, :, :end], cache.v[l, :, :, :end]
            if mask == "causal":
                o = F.scaled_dot_product_attention(q, keys, values, is_causal=True)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            h = h + blk.out(o.transpose(1, 2).reshape(Bsz, T, -1))
            h = h + blk.down(F.gelu(blk.up(blk.mlp_norm(h)), approximate="tanh"))
        logits = F.linear(self.norm_f(h[:, -1]), self.embeddings.weight).float()
        return logits, KVCache(cache.k, cache.v, end)


    def decode_static(self, ids: torch.Tensor, pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        """One token per row at position `pos` ([1] int64 on the device) into caches of fixed capacity, with no host
        synchronisation or shape that depends on pos: what a CUDA graph captures. -> logits [B, vocab] fp32."""
        Bsz = ids.shape[0]
        seen = (torch.arange(k_cache.shape[3], device=ids.device) <= pos)          # [capacity] keys written so far
        h = self.embeddings(ids)
        for l, blk in enumerate(self.layers):
            q, k, v = blk.qkv(blk.attn_norm(h)).view(Bsz, 1, 3, blk.heads, -1).permute(2, 0, 3, 1, 4)
            k_cache[l].index_copy_(2, pos, rotate(k, pos))
            v_cache[l].index_copy_(2, pos, v)
            with sdpa_kernel([SDPBackend.MATH]):
                o = F.scaled_dot_product_attention(rotate(q, pos), k_cache[l], v_cache[l], attn_mask=seen)
            h = h + blk.out(o.transpose(1, 2).reshape(Bsz, 1, -1))
            h = h + blk.down(F.gelu(blk.up(blk.mlp_norm(h)), approximate="tanh"))
        return F.linear(self.norm_f(h[:, -1]), self.embeddings.weight).float()


@dataclasses.dataclass
class _Graph:
    """A captured decode step bound to one cache's buffers (kept alive here so their addresses stay valid)."""

    graph: torch.cuda.CUDAGraph
    ids: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def _resized(cache: KVCache, capacity: int) -> KVCache:
    shape = list(cache.k.shape)
    shape[3] = capacity
    k, v = cache.k.new_zeros(shape), cache.v.new_zeros(shape)     # zeros: the graphed step weighs unwritten slots 0
    k[:, :, :, :cache.length] = cache.k[:, :, :, :cache.length]
    v[:, :, :, :cache.length] = cache.v[:, :, :, :cache.length]
    return KVCache(k, v, cache.length)


class KVBaseline:
    """Backend protocol over KVTransformer. `capacity` preallocates the cache so timed steps never reallocate."""

    name = "kv-baseline"

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, device="cpu", dtype=torch.float32,
                 capacity: int = 4096, seed: int = 0, graph: bool = True):
        torch.manual_seed(seed)
        self.model = KVTransformer(vocab_size, d_model, n_layers).to(device=device, dtype=dtype).eval()
        self.config = types.SimpleNamespace(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers,
                                            heads=self.model.heads)
        self.device, self.dtype, self.capacity = torch.device(device), dtype, capacity
        self.graph = graph and self.device.type == "cuda"
        self._graphs: dict[tuple, _Graph] = {}

    @classmethod
    def like(cls, config, **kwargs) -> "KVBaseline":
        """The baseline of a MemMamba config's vocabulary, width and depth."""
        return cls(config.vocab_size, config.d_model, config.n_layers, **kwargs)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def new_state(self, batch: int) -> KVCache:
        m = self.model
        shape = (len(m.layers), batch, m.heads, self.capacity, m.embeddings.weight.shape[1] // m.heads)
        return KVCache(torch.zeros(shape, device=self.device, dtype=self.dtype),   # finite: the graphed step
                       torch.zeros(shape, device=self.device, dtype=self.dtype), 0)   # weighs unwritten slots 0

    @torch.no_grad()
    def prefill(self, input_ids, state: KVCache):
        ids = torch.as_tensor(input_ids).to(self.device).long()
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, T] with T >= 1, got shape {list(ids.shape)}")
        return self.model(ids, state)

    @torch.no_grad()
    def step(self, token_ids, state: KVCache):
        ids = torch.as_tensor(token_ids).to(self.device).long().reshape(-1, 1)
        if not self.graph or state.length >= state.capacity:        # the eager step grows a full cache
            return self.model(ids, state)
        g = self._graph_for(state, ids.shape[0])
        g.ids.copy_(ids)
        g.pos.fill_(state.length)
        g.graph.replay()
        return g.logits.clone(), KVCache(state.k, state.v, state.length + 1)

    def _graph_for(self, state: KVCache, batch: int) -> _Graph:
        key = (state.k.data_ptr(), state.v.data_ptr(), tuple(state.k.shape))
        if key not in self._graphs:
            ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            pos = torch.full((1,), state.length, dtype=torch.long, device=self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                # warm-up outside the graph (writes only slot `length`)
                self.model.decode_static(ids, pos, state.k, state.v)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = self.model.decode_static(ids, pos, state.k, state.v)
            self._graphs[key] = _Graph(graph, ids, pos, logits, state.k, state.v)
        return self._graphs[key]

    def copy_state(self, state: KVCache, headroom: int | None = None) -> KVCache:
        """A private copy; its capacity is the original's, or length + headroom when given."""
        capacity = state.capacity if headroom is None else state.length + headroom
        copy = _resized(KVCache(state.k, state.v, state.length), capacity) if capacity != state.capacity else \
            KVCache(state.k.clone(), state.v.clone(), state.length)
        return copy

    def state_nbytes(self, state: KVCache) -> int:
        return state.nbytes
