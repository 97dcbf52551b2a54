"""scripts/sass_stats.py on the CPU: the prefill scan's passes compiled for sm_90 (no GPU), their hot loop found in
the SASS and counted."""
import importlib.util
from pathlib import Path

import pytest


SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "sass_stats.py"
spec = importlib.util.spec_from_file_location("sass_stats", SCRIPT)
sass_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_stats)


@pytest.mark.parametrize("which", ["pass1", "pass3"])
def test_hot_loop_issues_one_exp2_per_state_and_token(which, capsys):
    cubin, const = sass_stats.compile_pass(which)
    s = sass_stats.sass_stats(cubin)
    per_thread = sass_stats.channels_per_thread(const)
    decays = const["UNROLL"] * per_thread * const["BLOCK_N"]        # exp2(δ·A) for each state of each channel-token
    assert 0 < s["registers"] <= 255 and s["stack"] is not None
    # the loop found is the token loop: its exp2 are the decays plus a few per channel-token (softplus, SiLU)
    assert decays <= s["ops"]["MUFU.EX2"] <= decays + 2 * const["UNROLL"] * per_thread
    assert s["mufu"] >= s["ops"]["MUFU.EX2"] and 4 * decays < s["instructions"] < 20 * decays
    # twice the tokens an iteration: twice the exponentials in the loop found
    cubin4, _ = sass_stats.compile_pass(which, overrides=dict(UNROLL=2 * const["UNROLL"]))
    assert sass_stats.sass_stats(cubin4)["ops"]["MUFU.EX2"] == 2 * s["ops"]["MUFU.EX2"]
    assert sass_stats.main([which, "--set", "UNROLL=4"]) == 0
    assert "4 tokens x" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="NAME=INTEGER"):
        sass_stats.main([which, "--set", "T=1"])
