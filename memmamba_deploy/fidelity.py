"""Memory fidelity (spec §10): the paper's horizontal ETMF and vertical ECLMF, for the PyTorch model and a backend.

ETMF (token fidelity), self-reconstruction form: t_j = E[x_j], p_j = softmax(logits_j / τ), t̂_j = Σ_v p_j(v) E[v],
ETMF = mean cos(t_j, t̂_j); distance form ETMF_Δ = mean_i cos(t_i, t̂_{i+Δ}). Only logits are needed, so any
backend gives it (stepping token by token: fine for short sequences).

ECLMF (cross-layer fidelity) l -> l+G: X = H_l, Y = H_{l+G} (padding masked, flattened to N×D), ridge decoder
W = (XᵀX + λI)⁻¹XᵀY with λ = 1e-4, r = ‖Y − XW‖_F / (‖X‖_F + 1e-6), score 1 − r, averaged over l.
H_l is the residual stream after layer l = 1..L (MemMambaLM.hidden_states()[1:]), so l runs over 1..L−G; the
embedding output is left out (at ~0.02 scale its ‖X‖ would dominate r). As in the spec, r divides by ‖X‖_F, the
earlier layer's norm, not ‖Y‖_F: where the residual stream grows with depth, ‖Y − XW‖ exceeds ‖X‖ and the score
falls below 0, far below for large G (the demo model: G=2 −4.6, G=5 −54). So it compares models of one shape (or
a backend with its model), not with the paper's ~0.27. The samples are pooled into one regression (the spec's
flatten to N×D); the average is over l. A backend exposes no hidden states: its ECLMF is the reference model's on the same inputs, and what can
differ — the threshold decisions (§9) — is reported beside it: insertion decisions observed through the pool
priorities in the backend's state, and the reference's smallest decision margins.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import rel_err
from .models.ops.pool import fp32, pool_sweep_ref

DELTAS = (0, 8, 16, 32)
GAPS = (2, 5, 10)
RIDGE_LAMBDA = 1e-4


# ---- the metrics ------------------------------------------------------------------------------------------------
def etmf(logits: torch.Tensor, ids: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor | None = None,
         deltas=DELTAS, tau: float = 1.0) -> dict[int, float | None]:
    """logits [B,T,V], ids [B,T], embedding E [V,d], mask [B,T] (True = real token). Returns {Δ: ETMF_Δ}
    (Δ = 0 is the self-reconstruction form); None where no pair (i, i+Δ) of real tokens exists."""
    if logits.dim() != 3 or ids.shape != logits.shape[:2] or embedding.shape[0] != logits.shape[-1]:
        raise ValueError(f"etmf needs logits [B,T,V], ids [B,T], embedding [V,d]; got {list(logits.shape)}, "
                         f"{list(ids.shape)}, {list(embedding.shape)}")
    E = embedding.detach().double()
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    t = E[ids]                                                    # [B,T,d]
    t_hat = torch.softmax(logits.detach().double() / tau, -1) @ E  # [B,T,d]
    out = {}
    T = ids.shape[1]
    for d in deltas:
        if d >= T:
            out[d] = None
            continue
        m = mask[:, :T - d] & mask[:, d:]
        cos = F.cosine_similarity(t[:, :T - d], t_hat[:, d:], dim=-1, eps=1e-12)
        out[d] = cos[m].mean().item() if m.any() else None
    return out


def ridge_score(X: torch.Tensor, Y: torch.Tensor, lam: float = RIDGE_LAMBDA) -> float:
    """1 − ‖Y − XW‖_F / (‖X‖_F + 1e-6) with W = (XᵀX + λI)⁻¹XᵀY, in float64. X [N,D], Y [N,D']."""
    X, Y = X.double(), Y.double()
    W = torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=X.dtype, device=X.device), X.T @ Y)
    r = torch.linalg.norm(Y - X @ W) / (torch.linalg.norm(X) + 1e-6)
    return 1.0 - r.item()


def eclmf(hidden: list[torch.Tensor], mask: torch.Tensor | None = None, gaps=GAPS,
          lam: float = RIDGE_LAMBDA) -> dict[int, float | None]:
    """hidden: the layers' outputs, tensors [B,T,D] in layer order; mask [B,T]. Returns {G: ECLMF_G} averaged over
    the pairs (l, l+G); None when there is no such pair (G or fewer layers)."""
    m = torch.ones(hidden[0].shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    m = m.to(hidden[0].device)
    out = {}
    for g in gaps:
        scores = [ridge_score(hidden[l][m], hidden[l + g][m], lam) for l in range(len(hidden) - g)]
        out[g] = sum(scores) / len(scores) if scores else None
    return out


# ---- §9 decisions -------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_decisions(model, ids: torch.Tensor) -> dict:
    """The reference's threshold decisions on `ids` (from an empty state): per layer, which tokens enter the pool
    (bool [L,B,T]), and the smallest margins of the three decisions: a − τ1, a − min π (taken only when a > τ1;
    exact ties, as a repeated token meeting its own earlier score, are counted apart), b − τ2 (the token-read
    trigger)."""
    c = model.config
    if not c.memory:
        return {"inserted": None, "margins": {}, "ties": 0}
    hs = model.hidden_states(ids)
    tau1, tau2 = fp32(c.insert_threshold), fp32(c.read_threshold)
    inserted, m_insert, m_replace, m_read, ties = [], [], [], [], 0
    for l, layer in enumerate(model.layers):
        u = layer.norm(hs[l])
        a, _ = layer.note(u)
        prio0 = torch.full((ids.shape[0], c.pool_size), -1.0, device=a.device)
        index, _ = pool_sweep_ref(a, prio0, c.insert_threshold)
        index = index.cpu().numpy()
        a_np = a.float().cpu().numpy()
        B, T = a_np.shape
        K = c.pool_size
        took = index[:, 1:] == (K + np.arange(T))[None, :, None]              # token t sits in a slot after t
        inserted.append(torch.from_numpy(took.any(-1)))
        before = index[:, :T]                                                 # slots before token t: their π
        pri = np.where(before >= K, np.take_along_axis(a_np, np.clip(before - K, 0, T - 1).reshape(B, -1), 1)
                       .reshape(before.shape), -1.0)
        over = a_np > tau1
        m_insert.append(np.abs(a_np - tau1).min())
        gaps = np.abs(a_np - pri.min(-1))[over]
        ties += int((gaps == 0).sum())                    # a repeated token meeting its own earlier score (as
                                                          # parity's "exact ties (insert)")
        if (gaps > 0).any():
            m_replace.append(gaps[gaps > 0].min())
        b = torch.sigmoid(layer.token_attn.trigger(u).float()[..., 0]).cpu().numpy()
        m_read.append(np.abs(b - tau2).min())
    margins = {"insert (a vs tau1)": float(min(m_insert)), "read (b vs tau2)": float(min(m_read))}
    if m_replace:
        margins["replace (a vs min prio)"] = float(min(m_replace))
    return {"inserted": torch.stack(inserted), "margins": margins, "ties": ties}


def state_priorities(state, backend=None) -> torch.Tensor | None:
    """The pool priorities [L,B,K] held in a backend's state: through backend.state_to_reference (as models.State)
    where the backend has it, else a torch State, or a dict of named arrays ("...prio..."). None if not found."""
    if backend is not None and hasattr(backend, "state_to_reference"):
        state = backend.state_to_reference(state)
    if hasattr(state, "prio"):
        return None if state.prio is None else torch.as_tensor(state.prio).detach().float().cpu()
    if isinstance(state, dict):
        for name, v in state.items():
            if "prio" in name:
                if isinstance(v, torch.Tensor):
                    return v.detach().float().cpu()
                return torch.from_numpy(np.array(v.numpy() if hasattr(v, "numpy") else v)).float()  # numpy, OrtValue
    return None


# ---- reference vs backend ----------------------------------------------------------------------------------
@dataclasses.dataclass
class FidelityReport:
    reference: dict           # {"etmf": {Δ: v}, "eclmf": {G: v}}
    backend: dict             # {"etmf": {Δ: v}, "eclmf": {G: v}} (ECLMF: the reference's, see module doc)
    etmf_diff: dict           # {Δ: |backend − reference|}
    tolerance: float
    logits_rel_err: float     # backend step logits vs the reference's parallel forward
    argmax_disagreements: int
    insertion_flips: int | None   # None: the backend's state shows no priorities
    decisions: int
    margins: dict
    replace_ties: int = 0     # a == min π exactly: decided alike wherever both values are computed alike

    @property
    def ok(self) -> bool:
        return all(v is None or v <= self.tolerance for v in self.etmf_diff.values())

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


def backend_logits(backend, ids: torch.Tensor, on_step: Callable[[], None] | None = None):
    """Step `backend` through ids [B,T] from a fresh state. Returns (logits [B,T,V], inserted [L,B,T] or None):
    inserted[l,b,t] says the pool priorities of layer l changed at token t (the token entered the pool)."""
    state = backend.new_state(ids.shape[0])
    prio = state_priorities(state, backend)
    logits, inserted = [], []
    for t in range(ids.shape[1]):
        out, state = backend.step(ids[:, t], state)
        logits.append(torch.as_tensor(out).float().cpu())
        new = state_priorities(state, backend)
        if prio is not None and new is not None:
            inserted.append((new != prio).any(-1))
        prio = new
        if on_step:
            on_step()
    return torch.stack(logits, 1), (torch.stack(inserted, -1) if inserted else None)


@torch.no_grad()
def compare(model, backend, ids: torch.Tensor, mask: torch.Tensor | None = None, tolerance: float = 1e-4,
            on_step: Callable[[], None] | None = None) -> FidelityReport:
    """ETMF and ECLMF of the reference `model` and of `backend` on ids [B,T] (mask: real tokens)."""
    ids = ids.long()
    ref_logits = model(ids.to(model.device)).float().cpu()
    hidden = [h.float().cpu() for h in model.hidden_states(ids.to(model.device))[1:]]   # the layers' outputs
    E = model.embeddings.weight.float().cpu()
    reference = {"etmf": etmf(ref_logits, ids, E, mask), "eclmf": eclmf(hidden, mask)}
    be_logits, be_inserted = backend_logits(backend, ids, on_step)
    ours = {"etmf": etmf(be_logits, ids, E, mask), "eclmf": dict(reference["eclmf"])}
    diff = {d: None if v is None or ours["etmf"][d] is None else abs(ours["etmf"][d] - v)
            for d, v in reference["etmf"].items()}
    decisions = reference_decisions(model, ids.to(model.device))
    flips, n_decisions = None, 0
    if decisions["inserted"] is not None:
        n_decisions = decisions["inserted"].numel()
        if be_inserted is not None and be_inserted.shape == decisions["inserted"].shape:
            flips = int((be_inserted != decisions["inserted"]).sum())
    return FidelityReport(reference, ours, diff, tolerance, rel_err(be_logits, ref_logits),
                          int((be_logits.argmax(-1) != ref_logits.argmax(-1)).sum()), flips, n_decisions,
                          decisions["margins"], decisions["ties"])
