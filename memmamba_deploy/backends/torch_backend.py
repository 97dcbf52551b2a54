"""The PyTorch reference model as a backend (kernels="torch" or "triton")."""
from __future__ import annotations

import torch

from ..models import MemMambaLM, State
from .base import check_batch, check_ids


class TorchBackend:
    name = "torch"
    ragged_prefill = True              # prefill(..., lengths=): rows of their own lengths in one call

    def __init__(self, model: MemMambaLM):
        self.model = model.eval()
        self.config = model.config

    @classmethod
    def open(cls, checkpoint, device=None, dtype=None, kernels: str = "torch") -> "TorchBackend":
        return cls(MemMambaLM.from_pretrained(checkpoint, kernels=kernels, device=device, dtype=dtype))

    def new_state(self, batch: int) -> State:
        return self.model.new_state(check_batch(batch))

    @torch.no_grad()
    def prefill(self, input_ids, state, lengths=None):
        ids = check_ids(input_ids, self.config.vocab_size, "input_ids", 2).to(self.model.device)
        logits, state = self.model.prefill(ids, state, last_only=True, lengths=lengths)
        return logits[:, -1], state

    @torch.no_grad()
    def step(self, token_ids, state):
        ids = check_ids(token_ids, self.config.vocab_size, "token_ids", 1).to(self.model.device)
        return self.model.step(ids, state)

    def copy_state(self, state: State) -> State:
        return state.clone()

    def state_nbytes(self, state: State) -> int:
        return state.nbytes
