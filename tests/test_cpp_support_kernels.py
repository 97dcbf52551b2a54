"""CPU (Triton interpreter) checks of models/ops/triton/cpp_support.py against the references beside it: the
causal-conv step and the GPU sampler of the C++ runtime; plus their AOT compile for the two SMs the runtime
ships first (sm_90 H100, sm_87 Jetson Orin)."""
import os

import pytest
import torch

from conftest import INTERPRETED, interpreted, run_interpreted

from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models.ops.triton import cpp_support as cs


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("Di,KW", [(40, 4), (300, 3)])          # Di not a block multiple; a width-3 conv
def test_conv_step_matches_reference(dtype, Di, KW):
    from memmamba_deploy.models.ops.scan import causal_conv_step_ref

    g = torch.Generator().manual_seed(Di + KW)
    B = 3
    xz = torch.randn(B, 2 * Di, generator=g).to(dtype)            # x is the first half of in_proj's output
    x = xz[:, :Di]
    w = torch.randn(Di, KW, generator=g).to(dtype)
    bias = torch.randn(Di, generator=g).to(dtype)
    window = torch.randn(B, Di, KW - 1, generator=g).to(dtype)
    before = window.clone()
    out, win = cs.conv_step(x, w, bias, window)
    ref_out, ref_win = causal_conv_step_ref(x, w, bias, window)
    assert torch.equal(window, before)                             # the input window is not written
    assert torch.equal(win, ref_win)                               # the shift is exact
    assert torch.isfinite(out.float()).all()
    assert rel_err(out.float(), ref_out.float()) <= (1e-5 if dtype == torch.float32 else 1e-2)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gained_add_matches_reference(dtype):
    g = torch.Generator().manual_seed(11)
    B, T, d = 2, 5, 100                                            # d not a power of two
    res, o = (torch.randn(B, T, d, generator=g).to(dtype) for _ in range(2))
    gain = torch.randn(B, T, generator=g) * (torch.rand(B, T, generator=g) > 0.3)   # zeros: the trigger off
    out = torch.full_like(o, float("nan"))                         # poisoned: an unwritten element fails
    cs.gained_add(res, o, gain, out=out)
    assert torch.equal(out, cs.gained_add_ref(res, o, gain))       # the same roundings, so the same bits
    alpha = torch.tensor([0.37])                                   # one gain for every row (the §5 read's α)
    assert torch.equal(cs.gained_add(res, o, alpha), cs.gained_add_ref(res, o, alpha.expand(B, T)))
    inplace = res.clone()
    cs.gained_add(inplace, o, gain, out=inplace)                   # out aliasing res, as the runtime's second read
    assert torch.equal(inplace, cs.gained_add_ref(res, o, gain))


@interpreted
def test_cross_index_matches_reference():
    g = torch.Generator().manual_seed(12)
    B, T, K, M = 2, 5, 6, 11                                       # M = K + T entries a member's bank
    indices = [torch.where(torch.rand(B, T + 1, K, generator=g) < 0.3, -1,
                           torch.randint(0, M, (B, T + 1, K), generator=g)).to(torch.int32) for _ in range(3)]
    got = cs.cross_index(indices, M)
    ref = cs.cross_index_ref(indices, M)
    assert got.shape == (B, T, 3 * K) and torch.equal(got, ref)
    assert (got == -1).any() and (got >= 2 * M).any()              # both kinds of entry were exercised


def test_philox_known_answers():
    # Random123's published philox4x32-10 test vectors
    assert cs.philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert cs.philox4x32_10((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert cs.philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == \
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


SETTINGS = [dict(), dict(temperature=1.0), dict(temperature=0.7, top_k=7), dict(temperature=1.0, top_p=0.6),
            dict(temperature=1.3, top_k=40, top_p=0.8), dict(temperature=0.9, top_k=1), dict(temperature=1.0, top_p=1e-6)]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sampler_matches_reference(dtype):
    g = torch.Generator().manual_seed(5)
    B, V = 3, 2100                                        # V not a multiple of the block: a ragged last block
    logits = (3 * torch.randn(B, V, generator=g)).to(dtype)
    logits[1, 17] = logits[1, 900] = logits[1].max() + 1  # a tie for the maximum: the lower id wins
    for i, s in enumerate(SETTINGS):
        seed, step = 0x1234_5678_9ABC + i, 3 * i
        tokens, rng = cs.sample(logits, seed=seed, step=step, **s)
        assert tokens.tolist() == cs.sample_ref(logits, seed=seed, step=step, **s).tolist(), s
        assert rng.tolist() == [seed & 0xFFFFFFFF, seed >> 32, step + 1, 0]    # one step consumed, arrivals reset
    greedy = cs.sample(logits)[0]
    assert greedy[1] == 17 and greedy.tolist() == logits.float().argmax(-1).tolist()
    assert cs.sample(logits, temperature=0.9, top_k=1, seed=9)[0].tolist() == greedy.tolist()


@interpreted
def test_sampler_edge_rows():
    V = 1500
    logits = torch.full((2, V), float("-inf"))
    logits[0, 1234] = 0.0                                 # one finite token: always drawn
    tokens, _ = cs.sample(logits, temperature=1.0, top_p=0.5, seed=1)
    assert tokens[0] == 1234 and tokens[1] == 0           # an all -inf row gives token 0, as torch.argmax
    assert cs.sample(logits)[0].tolist() == [1234, 0]


@interpreted
def test_sampler_top_k_top_p_sets():
    """Every draw lands in the kept set, and different steps draw different tokens from a flat distribution."""
    V = 1100
    logits = torch.linspace(0, 4, V)[None].repeat(2, 1)
    seen = set()
    for step in range(6):
        t, _ = cs.sample(logits, temperature=1.0, top_k=30, seed=77, step=step)
        assert all(v >= V - 30 for v in t.tolist())
        seen.update(t.tolist())
        t, _ = cs.sample(logits, temperature=1.0, top_p=0.3, seed=77, step=step)
        ref = cs.sample_ref(logits, temperature=1.0, top_p=0.3, seed=77, step=step)
        assert t.tolist() == ref.tolist()
    assert len(seen) > 3


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETED, reason="the compiled parent process runs this one")
def test_cpp_support_kernels_compile_ahead_of_time(tmp_path):
    """The AOT build (Triton's compiler, no GPU) of every variant for sm_87 and sm_90, with the cubin ELF checks."""
    import json
    import subprocess
    import sys

    script = ("import sys; from memmamba_deploy import aot; from memmamba_deploy.models.ops.triton import cpp_support "
              "as cs; ks = [k for n, e in cs.CPP_SUPPORT_AOT_KERNELS.items() for k in aot.from_table_entry(n, e)]; "
              "aot.build_library(ks, sys.argv[1], archs=(87, 90))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # the real compiler, not the interpreter
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "aot")], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    meta = json.loads((tmp_path / "aot" / "kernels.json").read_text())
    names = {f"{n}_{a}" for n, e in cs.CPP_SUPPORT_AOT_KERNELS.items() for a in e["signatures"]}
    assert len(names) == 7
    assert set(meta["kernels"]) == names
    assert all(sorted(k["cubins"]) == ["87", "90"] for k in meta["kernels"].values())


def test_kernels_in_an_interpreted_process():
    run_interpreted(__file__)
