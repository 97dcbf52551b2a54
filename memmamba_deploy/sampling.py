"""Token sampling and streaming generation, written once for every backend."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B,V] -> token ids [B]. temperature 0 is greedy (argmax, lowest id on ties)."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (in (0, 1])")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        drop = probs.cumsum(-1) - probs > top_p          # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


def generate(backend, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int | None = None, stop: Sequence[int] = (), state=None
             ) -> Iterator[torch.Tensor]:
    """Prefill `prompt` [B,T] (from `state` if given), then yield max_new_tokens tokens [B] one by one.
    Stops early once every row has produced a token in `stop`."""
    prompt = torch.as_tensor(prompt)
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, T] with T >= 1, got shape {list(prompt.shape)}")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    state = backend.new_state(prompt.shape[0]) if state is None else state
    logits, state = backend.prefill(prompt, state)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool)
    stop_ids = torch.tensor(list(stop), dtype=torch.long)
    for i in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator).cpu()
        yield token
        done |= torch.isin(token, stop_ids)
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        logits, state = backend.step(token, state)
