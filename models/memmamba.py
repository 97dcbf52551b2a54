"""MemMamba language model in PyTorch: the reference every backend is checked against.

Spec: docs/memmamba-spec.md (cited as §N). Two execution modes share one set of weights:
  forward / prefill  the parallel form (§8) over a whole sequence, optionally resuming from a State;
  step               one token with an explicit fixed-size State (§7), O(1) per token.
Running `step` token by token reproduces `forward` (tests/test_model.py).
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import MemMambaConfig
from .ops import is_integer, load_ops
from .ops.norm import rms_norm_ref
from .ops.pool import cross_layer_bank, fp32, pool_after_ref
from .ops.scan import at_row_ends, padding


# --------------------------------------------------------------------------------------------------------------
# §7 Recurrent state
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class State:
    """Per-layer recurrent state, stacked over layers; within a layer every tensor is batch-first.

    conv [L, B, d_inner, d_conv-1]  last conv inputs, oldest first (model dtype)
    ssm  [L, B, d_inner, d_state]   SSM state (fp32 always: low-precision state drifts, deployment-notes)
    pool [L, B, K, d_s]             note-pool summaries (model dtype); None when memory=False
    prio [L, B, K]                  slot priorities (fp32), -1 marks an empty slot; None when memory=False
    """

    conv: torch.Tensor
    ssm: torch.Tensor
    pool: torch.Tensor | None = None
    prio: torch.Tensor | None = None

    FIELDS = ("conv", "ssm", "pool", "prio")

    @staticmethod
    def shapes(config: MemMambaConfig, batch: int) -> dict[str, tuple[int, ...]]:
        c = config
        s = {"conv": (c.n_layers, batch, c.d_inner, c.d_conv - 1), "ssm": (c.n_layers, batch, c.d_inner, c.d_state)}
        if c.memory:
            s["pool"] = (c.n_layers, batch, c.pool_size, c.summary_dim)
            s["prio"] = (c.n_layers, batch, c.pool_size)
        return s

    @staticmethod
    def dtypes(dtype: torch.dtype) -> dict[str, torch.dtype]:
        return {"conv": dtype, "ssm": torch.float32, "pool": dtype, "prio": torch.float32}

    @classmethod
    def zeros(cls, config: MemMambaConfig, batch: int, device=None, dtype=torch.float32) -> "State":
        """The state before any token: zeros, and every pool slot empty (prio = -1)."""
        dts = cls.dtypes(dtype)
        t = {k: torch.zeros(v, device=device, dtype=dts[k]) for k, v in cls.shapes(config, batch).items()}
        if "prio" in t:
            t["prio"].fill_(-1.0)
        return cls(**t)

    def layer(self, l: int) -> tuple:
        """Layer l's (conv, ssm, pool, prio), views; pool and prio None without memory (Layer.forward's state)."""
        return tuple(None if getattr(self, k) is None else getattr(self, k)[l] for k in self.FIELDS)

    @classmethod
    def stack(cls, layers) -> "State":
        """The State of per-layer (conv, ssm, pool, prio) tuples, in layer order."""
        return cls(*(None if parts[0] is None else torch.stack(parts) for parts in zip(*layers)))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in self.FIELDS if getattr(self, k) is not None}

    def clone(self) -> "State":
        return State(**{k: v.clone() for k, v in self.tensors().items()})

    def copy_(self, other: "State") -> "State":
        """Overwrite this state's tensors in place with other's (same shapes): buffers a CUDA graph reads."""
        for k, v in other.tensors().items():
            getattr(self, k).copy_(v)
        return self

    def to(self, device) -> "State":
        """The same state on `device` (the dtypes are the model's, and fp32 for ssm and prio: State.dtypes)."""
        if isinstance(device, torch.dtype):
            raise TypeError("State.to takes a device; a state's dtypes follow its model (State.dtypes)")
        return State(**{k: v.to(device) for k, v in self.tensors().items()})

    @property
    def batch_size(self) -> int:
        return self.conv.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.tensors().values())

    def check(self, config: MemMambaConfig, batch: int | None = None, dtype: torch.dtype | None = None,
              device: torch.device | None = None) -> None:
        """Raise ValueError naming the first tensor whose presence, shape, dtype or device does not fit."""
        b = self.batch_size if batch is None else batch
        want = self.shapes(config, b)
        dts = self.dtypes(self.conv.dtype if dtype is None else dtype)
        for k in self.FIELDS:
            v = getattr(self, k)
            if k not in want:
                if v is not None:
                    raise ValueError(f"state.{k} given but the model has memory=False")
                continue
            if v is None:
                raise ValueError(f"state.{k} is missing (expected shape {list(want[k])})")
            if tuple(v.shape) != want[k]:
                raise ValueError(f"state.{k} has shape {list(v.shape)}, expected {list(want[k])}")
            if v.dtype != dts[k]:
                raise ValueError(f"state.{k} has dtype {v.dtype}, expected {dts[k]}")
            if device is not None and v.device != device:
                raise ValueError(f"state.{k} is on {v.device}, the model on {device}: move it (state.to(device))")


class Ragged(NamedTuple):
    """Rows of different lengths in one prefill: row b's tokens are ids[b, :lengths[b]], the rest padding.
    Padding changes no state: the kernel sets take the lengths (ops.causal_conv: each row's window after its own
    last input; ops.selective_scan: padding's δ is 0, softplus(-inf), the scan's identity; ops.fused_memory_read /
    Layer.memory_read: padding's note score is 0, never above τ1 ≥ 0, so it enters no pool). Every later token of
    a row is padding, so nothing causal reads it."""

    lengths: torch.Tensor         # [B] int64
    pad: torch.Tensor             # [B, T] bool, True at padding

    @classmethod
    def of(cls, lengths: torch.Tensor, T: int) -> "Ragged":
        return cls(lengths, padding(lengths, T))

    def at_ends(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,T,D] at each row's last token, [B,1,D] (a row of length 0: its first column)."""
        return at_row_ends(x, self.lengths)


def check_lengths(lengths, batch: int, T: int) -> torch.Tensor:
    """Rows' lengths (MemMambaLM.prefill's) as int64, where they are, once they are [batch] integers in [0, T],
    read where they are given (host lengths cost no GPU sync; inside a CUDA graph capture, where GPU ones cannot be
    read, the caller checks them)."""
    try:
        n = torch.as_tensor(lengths)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"lengths must be {batch} integers: {e}") from None
    if not is_integer(n) or n.shape != (batch,):
        raise ValueError(f"lengths must be {batch} integers (one a row), got {n.dtype} of shape {list(n.shape)}")
    n = n.long()
    if not (n.is_cuda and torch.cuda.is_current_stream_capturing()):
        lo, hi = (int(v) for v in n.aminmax())
        if lo < 0 or hi > T:
            raise ValueError(f"lengths must lie in [0, {T}] (the columns of input_ids), got {lo if lo < 0 else hi}")
    return n


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm in fp32 (as Hugging Face's MambaRMSNorm); returns the weight's dtype."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return rms_norm_ref(x, self.weight, self.eps)


def decay_rates(A_log: torch.Tensor) -> torch.Tensor:
    """§6 A = -exp(A_log) in fp32, whatever the weights' dtype."""
    return -torch.exp(A_log.float())


class Mixer(nn.Module):
    """§6 Mamba-1 selective SSM (as state-spaces/mamba `mamba_simple`); parameter names match Hugging Face."""

    def __init__(self, c: MemMambaConfig):
        super().__init__()
        di, n, r = c.d_inner, c.d_state, c.dt_rank
        self.d_state, self.dt_rank = n, r
        self.in_proj = nn.Linear(c.d_model, 2 * di, bias=False)
        self.conv1d = nn.Conv1d(di, di, c.d_conv, groups=di, padding=c.d_conv - 1, bias=True)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.empty(di, n))
        self.D = nn.Parameter(torch.empty(di))
        self.out_proj = nn.Linear(di, c.d_model, bias=False)

    @torch.no_grad()
    def reset_parameters(self, n_layers: int, dt_min=1e-3, dt_max=1e-1, dt_floor=1e-4):
        """mamba_ssm's init: A_log = log(1..N), D = 1, dt bias = softplus^-1 of log-uniform dt in
        [dt_min, dt_max], dt_proj.weight ~ U(±R^-0.5), out_proj scaled by 1/sqrt(n_layers)."""
        di, n = self.A_log.shape
        self.A_log.copy_(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))
        self.D.fill_(1.0)
        std = self.dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(di) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.out_proj.weight.div_(math.sqrt(n_layers))

    def _proj(self, xc):
        """x_proj + dt_proj (bias added inside the scan, in fp32). Returns dt, B, C."""
        dt_r, B, C = torch.split(self.x_proj(xc), [self.dt_rank, self.d_state, self.d_state], dim=-1)
        return F.linear(dt_r, self.dt_proj.weight), B, C

    def forward(self, u, window, h, ops, A=None, last_only=False, ragged: Ragged | None = None):
        """u [B,T,d] -> (y [B,T,d], window, h). A: decay_rates(self.A_log), which the model's prefill derives for
        every layer at once. last_only: y of the last token only, [B,1,d] (the last layer of a prefill that wants
        the last logits only): the gate's half of in_proj is then projected at that token alone (in_proj's
        weight is used directly there, so hooks on the in_proj module do not apply). ragged: rows of their own
        lengths (Ragged); the window and h are then each row's after its own last token, and last_only's token
        is each row's last."""
        A = decay_rates(self.A_log) if A is None else A
        rows = {} if ragged is None else {"lengths": ragged.lengths}    # (kernel sets without lengths run the rest)
        if last_only:                         # z gates y only: a 16k prompt's last layer saves a 38 GFLOP half
            x_w, z_w = self.in_proj.weight.chunk(2, dim=0)
            x, z = F.linear(u, x_w), F.linear(u[:, -1:] if ragged is None else ragged.at_ends(u), z_w)
        else:
            x, z = self.in_proj(u).chunk(2, dim=-1)
        xc, window = ops.causal_conv(x, self.conv1d.weight[:, 0], self.conv1d.bias, window, **rows)
        dt, B, C = self._proj(xc)
        y, h = ops.selective_scan(xc, dt, A, B, C, self.D, z, self.dt_proj.bias, h, last_only=last_only, **rows)
        return self.out_proj(y), window, h

    def step(self, u, window, h, ops):
        """u [B,d] -> (y [B,d], window, h)."""
        x, z = self.in_proj(u).chunk(2, dim=-1)
        xc, window = ops.causal_conv_step(x, self.conv1d.weight[:, 0], self.conv1d.bias, window)
        dt, B, C = self._proj(xc)
        y, h = ops.selective_state_step(h, xc, dt, decay_rates(self.A_log), B, C, self.D, z,
                                        self.dt_proj.bias)
        return self.out_proj(y), window, h


def _straight_through(x: torch.Tensor) -> torch.Tensor:
    """Exactly 1.0 in value, with the gradient of x: lets a hard threshold decision train its score."""
    return 1.0 + (x - x.detach())


class NoteBlock(nn.Module):
    """§3 Note Block: importance a = sigmoid(w2ᵀ ReLU(W1 u)) and summary s = W_N u (no biases)."""

    def __init__(self, c: MemMambaConfig):
        super().__init__()
        self.score_in = nn.Linear(c.d_model, c.d_model // 4, bias=False)
        self.score_out = nn.Linear(c.d_model // 4, 1, bias=False)
        self.summary = nn.Linear(c.d_model, c.summary_dim, bias=False)

    def forward(self, u):
        """Returns (a [...] fp32, s [..., d_s]). When training, s carries a straight-through factor so the
        score (which only decides insertion) gets the gradient of the attention that reads the token."""
        a = torch.sigmoid(self.score_out(F.relu(self.score_in(u))).float()[..., 0])
        s = self.summary(u)
        if torch.is_grad_enabled():
            s = s * _straight_through(a).unsqueeze(-1).to(s.dtype)
        return a, s


class PoolAttention(nn.Module):
    """§4 cross-token attention (with a learned trigger) or §5 cross-layer attention (no trigger).

    r = [1(b > τ2)] · α · MultiHead(W_q u, P W_k, P W_v) over the valid slots, b = sigmoid(w_bᵀ u + β).
    forward hands q_proj/k_proj/v_proj's weights to ops.pool_read (the kernel set moves the projections where
    they are cheapest), so hooks or wrappers on those Linear modules do not apply; the trigger is called."""

    def __init__(self, c: MemMambaConfig, trigger: bool):
        super().__init__()
        self.heads, self.read_threshold = c.memory_heads, c.read_threshold
        self.q_proj = nn.Linear(c.d_model, c.summary_dim, bias=False)
        self.k_proj = nn.Linear(c.summary_dim, c.summary_dim, bias=False)
        self.v_proj = nn.Linear(c.summary_dim, c.d_model, bias=False)
        self.alpha = nn.Parameter(torch.full((1,), 0.1))
        self.trigger = nn.Linear(c.d_model, 1, bias=True) if trigger else None

    def forward(self, u, bank, index, ops, residual=None):
        """u [B,T,d]; bank [B,M,d_s] summaries; index [B,T,S] the entries each token reads (-1: none).
        Returns the read r [B,T,d], or residual + r."""
        gain = self.alpha.float().expand(u.shape[:-1])              # α, or 0 where the trigger does not fire
        if self.trigger is not None:
            b = torch.sigmoid(self.trigger(u).float()[..., 0])
            gate = (b > fp32(self.read_threshold)).float()
            if torch.is_grad_enabled():
                gate = gate * _straight_through(b)
            gain = gain * gate
        return ops.pool_read(u, bank, index, self.q_proj.weight, self.k_proj.weight, self.v_proj.weight, self.heads,
                             gain, residual)


def _pool_index(prio: torch.Tensor) -> torch.Tensor:
    """[B,K] priorities -> [B,1,K] indices of the occupied slots (-1 for empty ones), for a one-token read."""
    k = torch.arange(prio.shape[-1], device=prio.device, dtype=torch.int32)
    return torch.where(prio >= 0, k, -1).unsqueeze(1)


class Layer(nn.Module):
    """§2: u = RMSNorm(h); ũ = u + r_tok + r_cross (pools before the token); h' = h + Mixer(ũ); then insert."""

    def __init__(self, c: MemMambaConfig, index: int):
        super().__init__()
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.mixer = Mixer(c)
        self.insert_threshold, self.pool_size = c.insert_threshold, c.pool_size
        if c.memory:
            self.note = NoteBlock(c)
            self.token_attn = PoolAttention(c, trigger=True)
            self.cross_attn = PoolAttention(c, trigger=False) if c.is_cross_layer(index) else None

    def memory_read(self, u, pool0, prio0, group, ops, u_is_scratch=False, lengths=None):
        """§3–§5 in parallel form (§8). Returns ũ = u + r_tok + r_cross [B,T,d] (the mixer's input), the pool
        after the last token (summaries [B,K,ds], priorities [B,K]) and this layer's entries for §5: its bank
        [B,K+T,ds] (pool0's summaries, then each token's) and the sweep's index rows [B,T,K]. group: the entries
        of this §5 group's earlier layers. A kernel set may do it all at once (ops.fused_memory_read, None where
        it does not apply); the lines below are what it must equal. u_is_scratch: the caller has no further use
        for u, so a kernel set may overwrite it (with ũ). lengths [B]: row b's tokens past lengths[b] are padding,
        which enters no pool (Ragged)."""
        fused = ops.fused_memory_read(self, u, pool0, prio0, group, u_is_scratch,
                                      **({} if lengths is None else {"lengths": lengths}))
        if fused is not None:
            return fused
        T = u.shape[1]
        a, s = self.note(u)
        if lengths is not None:
            a = a.masked_fill(padding(lengths, T), 0.0)                     # 0 is never above τ1 (in [0, 1))
        index, prio = ops.pool_sweep(a, prio0, self.insert_threshold)       # [B,T+1,K], [B,K]
        bank = torch.cat([pool0.to(s.dtype), s], dim=1)                     # initial slots, then tokens
        ut = self.token_attn(u, bank, index[:, :T], ops, residual=u)
        if self.cross_attn is not None:
            banks, indices = cross_layer_bank(group + [(bank, index[:, :T])], self.pool_size + T)
            ut = self.cross_attn(u, banks, indices, ops, residual=ut)
        return ut, pool_after_ref(bank, index[:, T]), prio, (bank, index[:, :T])

    def forward(self, h, y, state: tuple, group, ops, A=None, last_only=False, ragged: Ragged | None = None):
        """One layer of the parallel form (§8): h += y (y None: nothing to add), u = RMSNorm(h), ũ = the memory
        path, y = Mixer(ũ). state: this layer's (conv, ssm, pool, prio) before the tokens (pool and prio None
        without memory); group: the §5 entries of this group's earlier layers. Returns (h, y, the state after the
        tokens, the group the next layer reads). last_only: the mixer's y at the last token only. ragged: rows of
        their own lengths (the state after each row's last token)."""
        conv, ssm, pool, prio = state
        # h += y; u = RMSNorm(h): one fused op on the weight (self.norm itself is called by step() only)
        h, u = ops.residual_norm(h, y, self.norm.weight, self.norm.eps)
        if pool is not None:
            u, pool, prio, entries = self.memory_read(u, pool, prio, group, ops, u_is_scratch=True,
                                                      lengths=None if ragged is None else ragged.lengths)
            group = [] if self.cross_attn is not None else group + [entries]
        y, conv, ssm = self.mixer(u, conv, ssm, ops, A, last_only=last_only, ragged=ragged)
        return h, y, (conv, ssm, pool, prio), group


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------
class MemMambaLM(nn.Module):
    """Embedding, L MemMamba layers, final RMSNorm, tied LM head (§1, §2).

    kernels: "torch" (the reference, models/ops/*.py) or "triton" (models/ops/triton, same math)."""

    def __init__(self, config: MemMambaConfig, kernels: str = "torch"):
        super().__init__()
        self.config = config
        self.embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.n_layers))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.set_kernels(kernels)
        self.reset_parameters()

    def set_kernels(self, kernels: str) -> "MemMambaLM":
        self.ops = load_ops(kernels)
        self.kernels = kernels
        return self

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.embeddings.weight, std=0.02)
        for layer in self.layers:
            layer.mixer.reset_parameters(self.config.n_layers)

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embeddings.weight.device

    def new_state(self, batch: int) -> State:
        return State.zeros(self.config, batch, self.device, self.dtype)

    def _logits(self, h):
        return F.linear(self.norm_f(h), self.embeddings.weight).float()

    # ---- parallel form (§8) --------------------------------------------------------------------------------
    def _run(self, input_ids, state: State | None, want_hidden: bool, last_only: bool = False, lengths=None):
        c, ops = self.config, self.ops
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, T], got shape {list(input_ids.shape)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids holds no tokens (T = 0)")
        self._check_ids(input_ids, "input_ids")
        Bsz, T = input_ids.shape
        ragged = None if lengths is None else Ragged.of(self.check_lengths(lengths, Bsz, T), T)
        if state is None:
            state = self.new_state(Bsz)
        self._check_state(state, Bsz)
        h = self.embeddings(input_ids).float()                        # residual stream in fp32
        hidden = [h] if want_hidden else None
        group: list[tuple[torch.Tensor, torch.Tensor]] = []           # (bank, index) of this §5 group's layers
        y = None                                                      # the previous layer's mixer output
        A = self.decay_rates()
        # the last layer's output read at one token (each row's last, where rows have lengths of their own)
        last_token = last_only and not want_hidden
        after = []
        for l, layer in enumerate(self.layers):
            h, y, layer_state, group = layer(h, y, state.layer(l), group, ops, A[l],
                                             last_only=last_token and l == c.n_layers - 1, ragged=ragged)
            after.append(layer_state)
            if want_hidden and l > 0:
                hidden.append(h)
        if last_token:                                               # the logits read the last token's only
            h = h[:, -1:] if ragged is None else ragged.at_ends(h)   # (each row's own; y is the mixer's there)
        elif last_only and ragged is not None:
            h, y = ragged.at_ends(h), ragged.at_ends(y)
        h = h + y
        if want_hidden:
            hidden.append(h)
        logits = self._logits(h[:, -1:] if last_only else h)
        if ragged is not None:                                       # no token there: 0, not a padding's logits
            logits = logits.masked_fill((ragged.lengths == 0)[:, None, None] if last_only else ragged.pad[..., None],
                                        0.0)
        return logits, self._as_state(State.stack(after)), hidden

    def check_lengths(self, lengths, batch: int, T: int, device=None) -> torch.Tensor:
        """check_lengths(lengths, batch, T) on `device` (None: the model's)."""
        return check_lengths(lengths, batch, T).to(self.device if device is None else device)

    def _check_ids(self, ids: torch.Tensor, name: str) -> None:
        """Token ids: integers on the model's device, inside the vocabulary (an id outside it would index past the
        embedding: an IndexError on a CPU, a device-side assert that ends the process on a GPU). The range check
        reads the ids (a sync on a GPU); inside a CUDA graph capture, where it cannot, the caller checks them."""
        if not is_integer(ids):
            raise ValueError(f"{name} must be integers, got {ids.dtype}")
        if ids.device != self.device:
            raise ValueError(f"{name} is on {ids.device}, the model on {self.device}")
        if ids.numel() and not (ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            lo, hi = (int(v) for v in ids.aminmax())
            if lo < 0 or hi >= self.config.vocab_size:
                raise ValueError(f"{name} must lie in [0, {self.config.vocab_size}), got {lo if lo < 0 else hi}")

    def _check_state(self, state, batch: int) -> None:
        if not isinstance(state, State):
            raise ValueError(f"state must be a State (model.new_state(batch)), got {type(state).__name__}")
        state.check(self.config, batch, self.dtype, self.device)

    def decay_rates(self) -> torch.Tensor:
        """Every layer's A at once: three small launches in all, not three a layer (0.2 ms of a 16k prefill);
        laid out [L, N, d_inner] (A[l] a transposed view), the layout the scan kernels' state tiles take."""
        return decay_rates(torch.stack([layer.mixer.A_log.t() for layer in self.layers])).transpose(1, 2)

    def forward(self, input_ids: torch.Tensor, state: State | None = None) -> torch.Tensor:
        """input_ids [B,T] -> logits [B,T,vocab] (fp32)."""
        return self._run(input_ids, state, False)[0]

    def prefill(self, input_ids: torch.Tensor, state: State | None = None,
                last_only: bool = False, lengths=None) -> tuple[torch.Tensor, State]:
        """forward that also returns the state after the last token (resumes from `state` if given).
        last_only: logits of the last token only ([B,1,vocab]), which is what generation needs: the LM head
        over every token of a long prompt costs more than some layers (a 16k prompt: 3.3 GB of fp32 logits).
        lengths [B] (ints in [0, T]): prompts of different lengths in one call, row b's tokens being
        input_ids[b, :lengths[b]] and the rest padding (any ids in the vocabulary: they change nothing, and 0
        will do). Each row's state and logits are then, within rounding, those of its
        own tokens prefilled alone (last_only: at its last token); logits at padding are 0, and a row of length
        0 keeps its state."""
        logits, new_state, _ = self._run(input_ids, state, False, last_only, lengths)
        return logits, new_state

    def hidden_states(self, input_ids: torch.Tensor, state: State | None = None) -> list[torch.Tensor]:
        """Residual stream after the embedding and after each layer: L+1 tensors [B,T,d] (fp32), for §10."""
        return self._run(input_ids, state, True)[2]

    # ---- recurrent form (§2–§7 token by token) -------------------------------------------------------------
    def step(self, token_ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """token_ids [B] or [B,1] -> (logits [B,vocab] fp32, new state). `state` is not modified."""
        c, ops = self.config, self.ops
        if token_ids.dim() == 2 and token_ids.shape[1] == 1:
            token_ids = token_ids[:, 0]
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be [batch] or [batch, 1], got shape {list(token_ids.shape)}")
        self._check_ids(token_ids, "token_ids")
        self._check_state(state, token_ids.shape[0])
        h = self.embeddings(token_ids).float()
        out = {k: [] for k in state.tensors()}
        for l, layer in enumerate(self.layers):
            u = layer.norm(h)
            ut = u
            if c.memory:
                ut = ut + layer.token_attn(u[:, None], state.pool[l], _pool_index(state.prio[l]), ops)[:, 0]
                if c.is_cross_layer(l):
                    g = slice(l - c.cross_layer_every + 1, l + 1)
                    bank = state.pool[g].transpose(0, 1).flatten(1, 2)          # [B, p·K, d_s], layers in order
                    prio = state.prio[g].transpose(0, 1).flatten(1, 2)
                    ut = ut + layer.cross_attn(u[:, None], bank, _pool_index(prio), ops)[:, 0]
                a, s = layer.note(u)
                pool, prio = ops.pool_insert(state.pool[l], state.prio[l], a, s, c.insert_threshold)
                out["pool"].append(pool)
                out["prio"].append(prio)
            y, window, hs = layer.mixer.step(ut, state.conv[l], state.ssm[l], ops)
            out["conv"].append(window)
            out["ssm"].append(hs)
            h = h + y
        return self._logits(h), self._as_state(State(**{k: torch.stack(v) for k, v in out.items()}))

    def _as_state(self, state: State) -> State:
        """In the model's dtypes: under torch.autocast the conv window and the pool come out of lower-precision
        matmuls, and step() must take back the State it returned."""
        want = State.dtypes(self.dtype)
        return State(**{k: v if v is None or v.dtype == want[k] else v.to(want[k]) for k, v in state.tensors().items()})

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save_pretrained(self, directory) -> None:
        """config.json + model.safetensors into `directory` (made if absent; each file replaced in one rename;
        other files there are left alone)."""
        from .checkpoint import save_pretrained
        save_pretrained(self, directory, force=True)

    @classmethod
    def from_pretrained(cls, directory, kernels: str = "torch", device=None, dtype=None) -> "MemMambaLM":
        from .checkpoint import load_pretrained
        return load_pretrained(directory, kernels=kernels, device=device, dtype=dtype)
