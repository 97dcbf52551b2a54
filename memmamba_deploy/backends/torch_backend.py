"""The PyTorch reference model as a backend (kernels="torch" or "triton")."""
from __future__ import annotations

import torch

from ..models import MemMambaLM, State


class TorchBackend:
    name = "torch"

    def __init__(self, model: MemMambaLM):
        self.model = model.eval()
        self.config = model.config

    @classmethod
    def open(cls, checkpoint, device=None, dtype=None, kernels: str = "torch") -> "TorchBackend":
        return cls(MemMambaLM.from_pretrained(checkpoint, kernels=kernels, device=device, dtype=dtype))

    def new_state(self, batch: int) -> State:
        return self.model.new_state(batch)

    @torch.no_grad()
    def prefill(self, input_ids, state):
        ids = torch.as_tensor(input_ids).to(self.model.device).long()
        logits, state = self.model.prefill(ids, state, last_only=True)
        return logits[:, -1], state

    @torch.no_grad()
    def step(self, token_ids, state):
        return self.model.step(torch.as_tensor(token_ids).to(self.model.device).long(), state)

    def copy_state(self, state: State) -> State:
        return state.clone()

    def state_nbytes(self, state: State) -> int:
        return state.nbytes
