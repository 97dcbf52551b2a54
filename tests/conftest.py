import os

import pytest
import torch

from memmamba_deploy.models import MemMambaConfig, MemMambaLM

# Tiny shapes keep the CPU suite inside CI's budget; fp32 throughout unless a test says otherwise.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def make_model(seed: int = 0, **overrides) -> MemMambaLM:
    """A seeded random tiny model. The Note Block's output weights are redrawn at unit scale so that, in every
    layer, a good share of tokens clears tau1 (at the default init a layer can sit almost wholly below it)."""
    torch.manual_seed(seed)
    config = MemMambaConfig.preset("tiny", **overrides)
    model = MemMambaLM(config).eval()
    if config.memory:
        with torch.no_grad():
            for layer in model.layers:
                layer.note.score_out.weight.normal_(0.0, 1.0)
    return model


@pytest.fixture
def tiny():
    return make_model()


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
