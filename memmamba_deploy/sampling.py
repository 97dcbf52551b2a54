"""Token sampling and streaming generation, written once for every backend."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Iterator, Sequence

import torch


def _scalar(x):
    # a one-element tensor as the Python number it holds (settings computed with torch)
    return x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x


def check_settings(temperature=0.0, top_k=0, top_p=1.0, seed=None, stop=()) -> list[int]:
    """ValueError naming each bad sampling setting; returns `stop` (any iterable of ids, a tensor included) as a
    list of ints."""
    temperature, top_k, top_p, seed = map(_scalar, (temperature, top_k, top_p, seed))
    if isinstance(stop, torch.Tensor):
        stop = stop.reshape(-1).tolist()
    elif not isinstance(stop, (str, bytes)) and hasattr(stop, "__iter__"):
        stop = [_scalar(t) for t in stop]             # once: a generator is consumed here, not by the check
    bad = []
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or math.isnan(temperature) \
            or temperature < 0:
        bad.append(f"temperature={temperature!r} (a number >= 0)")
    if isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 0:
        bad.append(f"top_k={top_k!r} (an integer >= 0)")
    if isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1:
        bad.append(f"top_p={top_p!r} (in (0, 1])")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, Integral)):
        bad.append(f"seed={seed!r} (an integer or None)")
    if not isinstance(stop, list) or not all(isinstance(t, Integral) and not isinstance(t, bool) for t in stop):
        bad.append(f"stop={stop!r} (a sequence of token ids)")
    if bad:
        raise ValueError("bad sampling settings: " + "; ".join(bad))
    return [int(t) for t in stop]


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B,V] -> token ids [B]. temperature 0 is greedy (argmax, lowest id on ties)."""
    check_settings(temperature, top_k, top_p)
    return _sample(logits, temperature, top_k, top_p, generator)


def _sample(logits, temperature, top_k, top_p, generator):
    # sample() without its checks: generate() checks once, then draws a token per step
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    # less the row's maximum first: a tiny temperature then sends the others to -inf, not inf - inf = NaN
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature
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
             top_p: float = 1.0, seed: int | None = None, stop: Sequence[int] = (), state=None,
             finite: bool = True, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Prefill `prompt` [B,T] (from `state` if given), then yield max_new_tokens tokens [B] one by one.
    Stops early once every row has produced a token in `stop`. finite: logits holding NaN or +Inf raise a
    ValueError (an evaluation that scores whatever comes out, as eval passkey, passes False). The draws come from
    a generator seeded with `seed`, else from `generator` (a stream the caller keeps), else from torch's global
    one; each token yielded takes one draw (none when greedy), and only those."""
    prompt = torch.as_tensor(prompt)
    if prompt.dim() == 1:
        prompt = prompt[None]
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, T] with T >= 1, got shape {list(prompt.shape)}")
    stop = check_settings(temperature, top_k, top_p, seed, stop)
    if seed is not None:
        generator = torch.Generator().manual_seed(int(seed))
    state = backend.new_state(prompt.shape[0]) if state is None else state
    logits, state = backend.prefill(prompt, state)
    done = torch.zeros(prompt.shape[0], dtype=torch.bool)
    stop_ids = torch.tensor(list(stop), dtype=torch.long)
    for i in range(max_new_tokens):
        if finite and bool(torch.isnan(logits).any() | torch.isposinf(logits).any()):   # argmax picks them, and
                                                                                            # multinomial fails
            raise ValueError(f"the model's logits hold NaN or +Inf {'after the prompt' if i == 0 else f'at new token {i}'}"
                             f": its weights or export are broken (`memdeploy parity` or `selfcheck` shows where)")
        token = _sample(logits, temperature, top_k, top_p, generator).cpu()
        yield token
        done |= torch.isin(token, stop_ids)
        if bool(done.all()) or i == max_new_tokens - 1:
            return
        logits, state = backend.step(token, state)
