import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memmamba_deploy.models import MemMambaConfig, MemMambaLM
from memmamba_deploy.models.ops.triton import INTERPRETED

# Triton is interpreted or compiled per process, fixed at its first import (models/ops/triton/__init__.py), and some
# test files compile kernels ahead of time. So a file of interpreter tests marks them `interpreted` and adds one
# test calling run_interpreted(__file__): in the usual compiled process that reruns the file in a child process with
# TRITON_INTERPRET=1 and fails with the child's report; in the child (or under TRITON_INTERPRET=1) the tests run here.
interpreted = pytest.mark.skipif(not INTERPRETED, reason="needs Triton's interpreter, and this process imported triton "
                                 "compiled: run_interpreted reruns the file in a child process")


def run_interpreted(test_file: str, timeout: float = 900) -> None:
    if INTERPRETED:
        pytest.skip("this process runs Triton interpreted: the file's tests ran here")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = Path(test_file)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here)],
                         capture_output=True, text=True, env=env, cwd=here.parent.parent, timeout=timeout)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Inside scripts/gpu_check.sh (MEMMAMBA_GPU_CHECK set) a gpu test that skips fails: the check is there to run
    them, and a broken CUDA setup must not read as ok."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and os.environ.get("MEMMAMBA_GPU_CHECK") \
            and item.get_closest_marker("gpu"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped inside the GPU check, where every gpu test must run: {reason}"


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


class DictStateBackend:
    """The torch backend with its state as a dict keyed by the export's state names and a batch limit, as the
    TensorRT backend's: what parity and Session's rows must handle through their Mapping paths."""

    NAMES = {"conv": "conv_state", "ssm": "ssm_state", "pool": "pool", "prio": "pool_prio"}

    def __init__(self, model, max_batch: int | None = None):
        from memmamba_deploy.backends.torch_backend import TorchBackend

        self.inner, self.config, self.name, self.max_batch = TorchBackend(model), model.config, "dict", max_batch

    def _to(self, state):
        return {self.NAMES[k]: v for k, v in state.tensors().items()}

    def _from(self, d):
        from memmamba_deploy.models import State

        return State(**{k: d[n] for k, n in self.NAMES.items() if n in d})

    def new_state(self, batch):
        if self.max_batch is not None and batch > self.max_batch:
            raise ValueError(f"batch {batch} is outside the engines' profile 1..{self.max_batch}")
        return self._to(self.inner.new_state(batch))

    def prefill(self, ids, state):
        logits, s = self.inner.prefill(ids, self._from(state))
        return logits, self._to(s)

    def step(self, tokens, state):
        logits, s = self.inner.step(tokens, self._from(state))
        return logits, self._to(s)

    def copy_state(self, state):
        return {k: v.clone() for k, v in state.items()}

    def state_nbytes(self, state):
        return sum(v.numel() * v.element_size() for v in state.values())
