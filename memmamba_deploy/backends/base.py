"""The protocol every backend implements; sampling and generation are written once on top of it (sampling.py)."""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ..models import MemMambaConfig


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
        """input_ids [B,T], T >= 1 -> (logits of the last token [B,vocab], state after it)."""

    def step(self, token_ids: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """token_ids [B] -> (logits [B,vocab], state after the token)."""

    def copy_state(self, state: Any) -> Any: ...

    def state_nbytes(self, state: Any) -> int: ...
