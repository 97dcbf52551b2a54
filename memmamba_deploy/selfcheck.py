"""Step ≡ forward self-check of a checkpoint (spec §8): the invariant every deployment relies on."""
from __future__ import annotations

import dataclasses

import torch

from .metrics import rel_err
from .models.ops.pool import pool_sweep_ref


@dataclasses.dataclass
class CheckRow:
    name: str
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


# Default tolerance by the checkpoint's dtype: fp32 paths agree to rounding; half-precision ones round every
# op's output, and step and forward order their sums differently (parity's 1e-2 for half types, the same reason).
# bf16's 8-bit mantissa can also flip a near-tie pool decision between the two: the pool rows then differ whole
# (`memdeploy parity` tells such flips from errors)
DEFAULT_TOL = {torch.float64: 1e-5, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@torch.no_grad()
def step_vs_forward(model, batch: int = 2, length: int | None = None, seed: int = 0, tol: float | None = None):
    """Run `step` token by token, `forward` once and `prefill`+`step` split in two; compare logits and state.
    Returns (rows, info) where info counts pool insertions so a reader can see the memory path was exercised.
    tol: max relative error, by default DEFAULT_TOL of the model's dtype."""
    c = model.config
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if length is not None and length < 2:
        raise ValueError(f"--tokens must be >= 2 (the check splits the tokens in two), got {length}")
    if tol is not None and not tol > 0:
        raise ValueError(f"--tol must be > 0, got {tol}")
    if tol is None:
        if model.dtype not in DEFAULT_TOL:
            raise ValueError(f"no default tolerance for a {model.dtype} model: pass --tol")
        tol = DEFAULT_TOL[model.dtype]
    if length is None:                       # 4x the pool: it fills, then replaces
        length = max(64, 4 * c.pool_size if c.memory else 64)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, c.vocab_size, (batch, length), generator=g).to(model.device)
    full, full_state = model.prefill(ids)
    state, steps = model.new_state(batch), []
    for t in range(length):
        logits, state = model.step(ids[:, t], state)
        steps.append(logits)
    steps = torch.stack(steps, 1)
    half = length // 2
    _, mid = model.prefill(ids[:, :half])
    resumed = []
    for t in range(half, length):
        logits, mid = model.step(ids[:, t], mid)
        resumed.append(logits)
    resumed = torch.stack(resumed, 1)
    rows = [CheckRow("step vs forward: logits", rel_err(steps, full), tol),
            CheckRow("prefill(a)+step(b) vs forward(a+b): logits", rel_err(resumed, full[:, half:]), tol)]
    for k, v in state.tensors().items():
        rows.append(CheckRow(f"final state.{k}: step vs prefill", rel_err(v, full_state.tensors()[k]), tol))
    info = {"batch": batch, "tokens": length}
    if c.memory:
        info["pool_insertions_per_layer"] = pool_insertions(model, ids)
    return rows, info


@torch.no_grad()
def pool_insertions(model, ids) -> list[int]:
    """How many tokens entered each layer's pool (summed over the batch) while reading `ids`."""
    c = model.config
    hs = model.hidden_states(ids)
    counts = []
    for l, layer in enumerate(model.layers):
        a, _ = layer.note(layer.norm(hs[l]))
        index, _ = pool_sweep_ref(a, torch.full((ids.shape[0], c.pool_size), -1.0), c.insert_threshold)
        counts.append(sum(len(set(index[b].flatten().tolist())) - 1 for b in range(ids.shape[0])))  # less the -1
    return counts
