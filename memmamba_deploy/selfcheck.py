"""Step ≡ forward self-check of a checkpoint (spec §8): the invariant every deployment relies on."""
from __future__ import annotations

import dataclasses

import torch

from .metrics import align_pool_slots, rel_err
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
    # the pools compared as sets: the parallel sweep and the steps may put the same entries in other slots where
    # half-precision rounding reorders near-equal priorities, which neither the reads nor later evictions see
    parallel = full_state.tensors()
    for k, v in align_pool_slots(full_state, state).tensors().items():
        label = f"final state.{k}{' (entries matched across slots)' if k in ('pool', 'prio') else ''}: step vs prefill"
        rows.append(CheckRow(label, rel_err(v, parallel[k]), tol))
    info = {"batch": batch, "tokens": length}
    notes = []
    if c.memory and model.dtype in (torch.float16, torch.bfloat16) and not all(r.ok for r in rows[-2:]):
        notes.append("the pools hold different entries: in half precision a score within rounding of a threshold "
                     "or of a pool priority can be decided one way by the steps and the other by the parallel "
                     "form (a near-tie flip, spec §9), after which the pools differ whole; `memdeploy parity` on "
                     "an export counts such flips apart from numeric error")
    if model.dtype == torch.bfloat16 and not all(r.ok for r in rows) and tol == DEFAULT_TOL[torch.bfloat16]:
        notes.append("bf16 keeps 8 bits of mantissa: one rounding step is 0.4-0.8% of a value, and the steps and the "
                     "parallel form round in another order, so errors of 1-2e-2 are rounding (--tol 3e-2)")
    if notes:
        info["note"] = "; ".join(notes)
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
