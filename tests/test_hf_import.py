"""Hugging Face MambaForCausalLM checkpoints load into a memory-off MemMambaLM with the same logits."""
import pytest
import torch

from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models import MemMambaLM
from memmamba_deploy.models.checkpoint import CheckpointError

transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency (pip install -e .[dev])")


def hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(vocab_size=97, hidden_size=32, state_size=8, num_hidden_layers=3, expand=2,
                                   conv_kernel=4, **kw)
    model = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():                      # HF's init leaves some tensors constant: draw everything afresh
        for name, p in model.named_parameters():
            if not name.endswith(("A_log", ".D")):
                p.normal_(0, 0.2)
            elif name.endswith("A_log"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("form", ["safetensors", "sharded", "bin"])
def test_hf_mamba_logits_match(tmp_path, form):
    hf = hf_model()
    if form == "safetensors":
        hf.save_pretrained(tmp_path)
    elif form == "sharded":                    # what transformers writes past max_shard_size (larger Mambas)
        hf.save_pretrained(tmp_path, max_shard_size="20KB")
        assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*"))) > 1
    else:                                      # the older format, still common on the Hub
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    ours = MemMambaLM.from_pretrained(tmp_path)
    assert ours.config.memory is False and ours.config.d_model == 32
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert rel_err(got, expected) <= 1e-5
    # and the recurrent path agrees too
    state, steps = ours.new_state(2), []
    with torch.no_grad():
        for t in range(40):
            logits, state = ours.step(ids[:, t], state)
            steps.append(logits)
    assert rel_err(torch.stack(steps, 1), expected) <= 1e-5


def test_hf_unsupported_variant_is_refused(tmp_path):
    hf_model(use_bias=True).save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="use_bias=true"):
        MemMambaLM.from_pretrained(tmp_path)


def test_hf_other_activation_and_bad_config_values_are_refused(tmp_path):
    import json

    hf_model(hidden_act="gelu").save_pretrained(tmp_path / "gelu")
    with pytest.raises(CheckpointError, match="hidden_act='gelu' is not supported"):
        MemMambaLM.from_pretrained(tmp_path / "gelu")
    hf_model().save_pretrained(tmp_path / "ok")
    good = json.loads((tmp_path / "ok" / "config.json").read_text())
    for key, value in [("hidden_size", None), ("hidden_size", "32"), ("expand", None), ("use_bias", "false")]:
        cfg = {**good, key: value}
        (tmp_path / "ok" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=f"{key} = {value!r} is not a valid value"):
            MemMambaLM.from_pretrained(tmp_path / "ok")
