"""The protocol every backend implements; sampling and generation are written once on top of it (sampling.py)."""
from __future__ import annotations

from numbers import Integral
from typing import Any, Protocol, runtime_checkable

import torch

from ..models import MemMambaConfig
from ..models.memmamba import is_integer


@runtime_checkable
class Backend(Protocol):
    """A model that decodes with explicit recurrent state.

    Token ids go in as integer torch tensors (any device); logits come back as float32 torch tensors [B, vocab].
    A state is whatever the backend keeps (torch State, numpy arrays, device buffers); `step` and `prefill`
    return a new state and never change the one they were given, so a state can be kept, copied or rewound.
    """

    name: str
    config: MemMambaConfig

    def new_state(self, batch: int) -> Any: ...

    def prefill(self, input_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """input_ids [B,T], T >= 1 -> (logits of the last token [B,vocab], state after it). A backend whose
        `ragged_prefill` is True also takes lengths=[B] (rows of their own lengths, the rest padding:
        MemMambaLM.prefill's; the logits are then each row's last token's, 0 for a row of length 0); Session
        prefills the rows one at a time on the others."""

    def step(self, token_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """token_ids [B] -> (logits [B,vocab], state after the token)."""

    def copy_state(self, state: Any) -> Any: ...

    def state_nbytes(self, state: Any) -> int: ...


def check_ids(ids, vocab_size: int, what: str, dims: int) -> torch.Tensor:
    """`ids` as an int64 tensor once it is `dims`-D integer token ids in [0, vocab_size) with a batch of at least
    one row (and T >= 1 for [B, T]; [B, 1] is taken as [B] where dims is 1); else ValueError naming the problem."""
    try:
        ids = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{what} must be integer token ids: {e}") from None
    if not is_integer(ids):
        raise ValueError(f"{what} must be integer token ids, got dtype {ids.dtype}")
    if dims == 1 and ids.dim() == 2 and ids.shape[1] == 1:
        ids = ids[:, 0]
    if ids.dim() != dims or 0 in ids.shape:
        want = "[batch] or [batch, 1] with batch >= 1" if dims == 1 else "[batch, T] with batch, T >= 1"
        raise ValueError(f"{what} must be {want}, got shape {list(ids.shape)}")
    ids = ids.long()                        # first: torch has no min/max for uint16 / uint32
    lo, hi = (int(v) for v in torch.aminmax(ids))        # one sync where ids live on a GPU
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{what} holds token id {lo if lo < 0 else hi}, outside the vocabulary [0, {vocab_size})")
    return ids


def check_batch(batch) -> int:
    if isinstance(batch, bool) or not isinstance(batch, Integral) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    return int(batch)
