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


@torch.no_grad()
def step_vs_forward(model, batch: int = 2, length: int | None = None, seed: int = 0, tol: float = 1e-5):
    """Run `step` token by token, `forward` once and `prefill`+`step` split in two; compare logits and state.
    Returns (rows, info) where info counts pool insertions so a reader can see the memory path was exercised."""
    c = model.config
    length = length or max(64, 4 * c.pool_size if c.memory else 64)
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
