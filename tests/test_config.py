import json

import pytest

from memmamba_deploy.models import PRESETS, MemMambaConfig


def test_presets_match_spec_table():
    c = MemMambaConfig.preset("130m")
    assert (c.vocab_size, c.d_model, c.n_layers, c.d_state, c.expand) == (50280, 768, 24, 16, 2)
    assert (c.pool_size, c.summary_dim, c.memory_heads, c.cross_layer_every) == (50, 64, 4, 4)
    assert c.dt_rank == 48 and c.d_inner == 1536
    assert set(PRESETS) == {"tiny", "130m"}


def test_json_round_trip():
    for name in PRESETS:
        c = MemMambaConfig.preset(name, memory=False)
        assert MemMambaConfig.from_json(c.to_json()) == c


def test_cross_layer_rule():
    c = MemMambaConfig.preset("130m")
    assert [l for l in range(24) if c.is_cross_layer(l)] == [3, 7, 11, 15, 19, 23]
    assert not any(MemMambaConfig.preset("130m", memory=False).is_cross_layer(l) for l in range(24))


@pytest.mark.parametrize("bad, words", [
    ({"d_modle": 64}, "unknown config key"),
    ({"summary_dim": 15}, "divisible by memory_heads"),
    ({"d_model": 66, "memory_heads": 4, "summary_dim": 16}, "d_model (66) must be divisible"),
    ({"n_layers": 0}, "n_layers must be a positive integer"),
    ({"n_layers": 2.5}, "n_layers must be a positive integer"),
    ({"insert_threshold": 1.5}, "insert_threshold must lie in [0, 1)"),
    ({"cross_layer_every": 8}, "cross_layer_every (8) must be <= n_layers"),
    ({"architecture": "llama"}, "unknown architecture 'llama'"),
    ({"memory": "yes"}, "memory must be true or false"),
    ({"norm_eps": float("inf")}, "norm_eps must be a finite number > 0"),
    ({"norm_eps": True}, "norm_eps must be a finite number > 0"),
    ({"memory": False, "pool_size": -5}, "pool_size must be a positive integer"),
    ({"memory": False, "insert_threshold": 7.0}, "insert_threshold must lie in [0, 1)"),
])
def test_bad_config_errors_name_the_problem(bad, words):
    d = {**MemMambaConfig.preset("tiny").to_dict(), **bad}
    with pytest.raises(ValueError) as e:
        MemMambaConfig.from_dict(d)
    assert words in str(e.value)


def test_a_bad_width_is_named_before_dt_rank_derives_from_it_and_numpy_numbers_are_taken():
    import numpy as np

    for bad in ("8", None, 2.0):                          # dt_rank 0 derives from d_model: not before it is checked
        with pytest.raises(ValueError, match="d_model must be a positive integer"):
            MemMambaConfig(d_model=bad)
    c = MemMambaConfig(d_model=np.int64(64), n_layers=np.int32(2), insert_threshold=np.float32(0.25),
                       norm_eps=np.float64(1e-5), memory=np.bool_(True))
    assert (c.d_model, c.dt_rank, c.n_layers, c.insert_threshold) == (64, 4, 2, 0.25)
    assert [type(v) for v in (c.d_model, c.insert_threshold, c.norm_eps, c.memory)] == [int, float, float, bool]
    json.dumps(c.to_dict())                               # a config.json of Python numbers


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        MemMambaConfig.from_json("{nope")
    with pytest.raises(FileNotFoundError, match="no config file"):
        MemMambaConfig.load(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 10, "extra": 1}))
    with pytest.raises(ValueError, match=r"config.json: unknown config key\(s\) \['extra'\]"):
        MemMambaConfig.load(tmp_path / "config.json")


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        MemMambaConfig.preset("7b")
