"""OrtBackend: the exported graphs in ONNX Runtime match the PyTorch reference; state handling; clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memmamba_deploy.backends.base import Backend
from memmamba_deploy.backends.ort_backend import OrtBackend, OrtState
from memmamba_deploy.export import ManifestError
from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models import MemMambaLM
from memmamba_deploy.parity import compare
from memmamba_deploy.sampling import generate
from test_export import one_thread, tiny_export  # noqa: F401  (fixtures)


def _reference(out) -> MemMambaLM:
    return MemMambaLM.from_pretrained(out / "reference")


@pytest.mark.parametrize("memory, flavor", [(True, "portable"), (False, "portable"), (True, "plugins")])
def test_prefill_and_512_steps_match_the_reference(tiny_export, memory, flavor):
    """fp32: prefill + 512 greedy decode steps within 1e-4 rel, greedy tokens identical. The plugins flavour runs
    through its function bodies. Insert decisions the two sides take differently are rounding-level ties only."""
    out = tiny_export(memory=memory, flavor=flavor)
    backend = OrtBackend.open(out, threads=1)
    assert isinstance(backend, Backend)
    prompt = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))
    r = compare(_reference(out), backend, prompt, steps=512, rtol=1e-4, flip_radius=1e-3)
    assert r.ok, r.failures
    assert r.prefill_logits_rel <= 1e-4 and r.step_logits_max_rel <= 1e-4
    assert max(r.final_state_rel.values()) <= 1e-4
    assert r.greedy_agreement == 1.0
    assert len(r.step_logits_rel) == 512
    assert all(m <= 1e-6 for m in r.flip_margins), r.flip_margins     # fp32 rounding, nothing more
    if memory:
        assert r.insert_decisions == 512 * 2 * 4


def test_fp16_export_within_1e2(tiny_export):
    out = tiny_export(memory=True, dtype="fp16")
    backend = OrtBackend.open(out, threads=1)
    prompt = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    r = compare(_reference(out), backend, prompt, steps=64, rtol=1e-2, flip_radius=1e-1)
    assert r.ok, r.failures
    assert r.step_logits_max_rel <= 1e-2 and r.prefill_logits_rel <= 1e-2
    assert r.step_logits_max_rel > 1e-6          # it really ran in half precision
    state = backend.new_state(1)
    assert {k: v.data_type() for k, v in state.values.items()} == {
        "conv_state": "tensor(float16)", "ssm_state": "tensor(float)", "pool": "tensor(float16)",
        "pool_prio": "tensor(float)"}


def test_resumed_prefill_equals_one_prefill(tiny_export):
    """prefill(a) then prefill(b) from its state == prefill(a+b): the graph really resumes from the state."""
    backend = OrtBackend.open(tiny_export(memory=True), threads=1)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    whole, s1 = backend.prefill(ids, backend.new_state(2))
    _, s = backend.prefill(ids[:, :11], backend.new_state(2))
    split, s2 = backend.prefill(ids[:, 11:], s)
    assert rel_err(split, whole) <= 1e-5
    for k, v in s1.numpy().items():
        assert rel_err(torch.from_numpy(s2.numpy()[k]).float(), torch.from_numpy(v).float()) <= 1e-5


@pytest.mark.parametrize("memory, flavor, dtype", [(True, "portable", "fp32"), (True, "plugins", "fp32"),
                                                   (False, "portable", "fp32"), (True, "portable", "fp16")])
def test_prefill_of_rows_of_different_lengths_in_one_call(tiny_export, memory, flavor, dtype):
    """The prefill graph's lengths input: rows of their own lengths in one call, as MemMambaLM.prefill(...,
    lengths) (each row its tokens alone: tests/test_model.py) from a state of earlier tokens: each row's logits
    and state; a row of length 0 keeps its state and has logits 0; what the padding holds changes nothing."""
    out = tiny_export(memory=memory, flavor=flavor, dtype=dtype)
    backend, ref = OrtBackend.open(out, threads=1), _reference(out)
    assert backend.ragged_prefill
    tol = 1e-4 if dtype == "fp32" else 1e-2
    g = torch.Generator().manual_seed(9)
    first = torch.randint(0, 256, (4, 7), generator=g)
    _, start = backend.prefill(first, backend.new_state(4))
    _, ref_start = ref.prefill(first)
    ids, lengths = torch.randint(0, 256, (4, 40), generator=g), torch.tensor([40, 23, 0, 1])
    logits, state = backend.prefill(ids, start, lengths=lengths)
    want, want_state = ref.prefill(ids, ref_start, last_only=True, lengths=lengths)
    assert rel_err(logits, want[:, -1]) <= tol and not logits[2].any()
    got = backend.state_to_reference(state)
    for k, v in want_state.tensors().items():
        assert rel_err(got.tensors()[k].float(), v.float()) <= tol, k
    before = backend.state_to_reference(start)
    for k, v in got.tensors().items():                          # row 2: no tokens, its state as it was
        assert torch.equal(v[:, 2], before.tensors()[k][:, 2]), k
    other = torch.where(torch.arange(40) >= lengths[:, None], torch.randint(0, 256, (4, 40), generator=g), ids)
    logits_other, state_other = backend.prefill(other, start, lengths=lengths)
    assert torch.equal(logits_other, logits)
    assert all(np.array_equal(v, state_other.numpy()[k]) for k, v in state.numpy().items())
    whole, _ = backend.prefill(ids, start)                      # without lengths: every row whole
    assert rel_err(whole, backend.prefill(ids, start, lengths=[40] * 4)[0]) == 0
    assert rel_err(whole[1], logits[1]) > 1e-2                  # the padding would have mattered
    for bad, message in [([40, 23, 0], "4 integers"), ([41, 0, 0, 0], r"\[0, 40\]")]:
        with pytest.raises(ValueError, match=message):
            backend.prefill(ids, start, lengths=bad)


def format_1_export(src, out):
    """A copy of export `src` as format version 1 wrote it: its prefill graph without the lengths input (here
    computed inside the graph as T for every row, which is what such a graph did)."""
    import json
    import shutil

    import onnx
    from onnx import helper

    from memmamba_deploy.export.manifest import file_hashes

    shutil.copytree(src, out)
    model = onnx.load(str(out / "prefill.onnx"))
    g = model.graph
    g.input.remove(next(i for i in g.input if i.name == "lengths"))
    consts = [helper.make_node("Constant", [], [n], value=helper.make_tensor(n, onnx.TensorProto.INT64, [1], [v]))
              for n, v in (("v1_zero", 0), ("v1_one", 1), ("v1_two", 2))]
    nodes = consts + [helper.make_node("Shape", ["input_ids"], ["v1_shape"]),
                      helper.make_node("Slice", ["v1_shape", "v1_one", "v1_two"], ["v1_T"]),
                      helper.make_node("Slice", ["v1_shape", "v1_zero", "v1_one"], ["v1_B"]),
                      helper.make_node("Expand", ["v1_T", "v1_B"], ["lengths"])]
    for n in reversed(nodes):
        g.node.insert(0, n)
    onnx.save(model, str(out / "prefill.onnx"))
    m = json.loads((out / "manifest.json").read_text())
    m["format_version"] = 1
    m["graphs"]["prefill"]["inputs"] = [i for i in m["graphs"]["prefill"]["inputs"] if i["name"] != "lengths"]
    m["files"] = file_hashes(out)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_exports_of_format_1_still_run(tiny_export, tmp_path):
    """An export made before the prefill graph took lengths: loads, prefills whole rows (lengths of T for every
    row are accepted), refuses rows of their own lengths by name, and a Session prefills them a row at a time."""
    from memmamba_deploy.session import Session

    out = tiny_export(memory=True)
    old, new = OrtBackend.open(format_1_export(out, tmp_path / "v1"), threads=1), OrtBackend.open(out, threads=1)
    assert not old.ragged_prefill and new.ragged_prefill
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(4))
    want, want_state = new.prefill(ids, new.new_state(3))
    for lengths in (None, [20, 20, 20]):
        got, got_state = old.prefill(ids, old.new_state(3), lengths=lengths)
        assert torch.equal(got, want)
        assert all(np.array_equal(v, want_state.numpy()[k]) for k, v in got_state.numpy().items())
    with pytest.raises(ValueError, match="predates prefill's lengths input: export it again"):
        old.prefill(ids, old.new_state(3), lengths=[20, 5, 1])
    prompts = [ids[0, :20].tolist(), ids[1, :5].tolist(), ids[2, :1].tolist()]
    a, b = Session(old).prefill(prompts), Session(new).prefill(prompts)
    assert rel_err(a, b) <= 1e-5


def test_states_are_never_overwritten(tiny_export):
    """Buffers are recycled (ping-pong), but a state somebody still holds is never written: stepping twice from
    a kept state gives the same logits, and the kept state's values do not change."""
    backend = OrtBackend.open(tiny_export(memory=True), threads=1)
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    _, kept = backend.prefill(ids, backend.new_state(1))
    before = kept.numpy()
    first, _ = backend.step(torch.tensor([5]), kept)
    state = kept
    for t in range(6):                          # enough steps to cycle the spare buffers several times
        _, state = backend.step(torch.tensor([t]), state)
    assert len(backend._free.get(1, [])) <= 2
    again, _ = backend.step(torch.tensor([5]), kept)
    assert torch.equal(first, again)
    for k, v in kept.numpy().items():
        np.testing.assert_array_equal(v, before[k])
    copy = backend.copy_state(kept)
    assert isinstance(copy, OrtState) and backend.state_nbytes(copy) == backend.state_nbytes(kept) > 0


def test_graphs_write_every_state_element(tiny_export):
    """Poison the recycled output buffers with NaN before prefill and step: a graph that left any element
    unwritten would show it."""
    backend = OrtBackend.open(tiny_export(memory=True), threads=1)
    ref = _reference(tiny_export(memory=True))
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(4))

    def poison():
        nan = backend.state_from_arrays({s["name"]: np.full([2 if d == "batch" else d for d in s["shape"]], np.nan,
                                                            np.float32) for s in backend.state_specs})
        backend._free[2] = [nan.values]
        return nan.values

    def check(state, ref_state):
        got = backend.state_to_reference(state)
        for k, v in ref_state.tensors().items():
            assert not torch.isnan(got.tensors()[k]).any(), k
            assert rel_err(got.tensors()[k], v) <= 1e-5, k

    buffers = poison()
    _, state = backend.prefill(ids, backend.new_state(2))
    assert state.values is buffers                 # the prefill wrote into the poisoned buffers
    _, ref_state = ref.prefill(ids)
    check(state, ref_state)
    buffers = poison()
    _, state = backend.step(torch.tensor([1, 2]), state)
    assert state.values is buffers
    _, ref_state = ref.step(torch.tensor([1, 2]), ref_state)
    check(state, ref_state)


def test_generate_uses_the_shared_sampler(tiny_export):
    backend = OrtBackend.open(tiny_export(memory=True), threads=1)
    ref = _reference(tiny_export(memory=True))
    from memmamba_deploy.backends import TorchBackend

    prompt = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(5))
    greedy = torch.stack(list(backend.generate(prompt, 20)))
    assert torch.equal(greedy, torch.stack(list(generate(TorchBackend(ref), prompt, 20))))
    a = torch.stack(list(backend.generate(prompt, 20, temperature=0.8, top_k=20, top_p=0.9, seed=11)))
    b = torch.stack(list(backend.generate(prompt, 20, temperature=0.8, top_k=20, top_p=0.9, seed=11)))
    assert torch.equal(a, b) and a.shape == (20, 2)


def test_wrong_states_and_tokens_are_refused_clearly(tiny_export):
    backend = OrtBackend.open(tiny_export(memory=True), threads=1)
    good = backend.new_state(2).numpy()
    tok = torch.tensor([1, 2])
    bad = dict(good, ssm_state=good["ssm_state"][:, :, :, :4])
    with pytest.raises(ValueError, match=r"'ssm_state' has shape \[4, 2, 128, 4\], expected \[4, 2, 128, 8\]"):
        backend.step(tok, bad)
    with pytest.raises(ValueError, match="'pool' has dtype float16, expected float32"):
        backend.step(tok, dict(good, pool=good["pool"].astype(np.float16)))
    with pytest.raises(ValueError, match=r"state tensor\(s\) \['pool_prio'\] missing"):
        backend.step(tok, {k: v for k, v in good.items() if k != "pool_prio"})
    with pytest.raises(ValueError, match=r"unknown state tensor\(s\) \['extra'\]"):
        backend.step(tok, dict(good, extra=good["pool"]))
    with pytest.raises(ValueError, match="state has batch 2 but the token ids have batch 3"):
        backend.step(torch.tensor([1, 2, 3]), good)
    with pytest.raises(ValueError, match=r"'conv_state' is \[4, 2, 128, 3\] float32, expected \[4, 3, 128, 3\]"):
        backend.step(torch.tensor([1, 2, 3]), backend.new_state(2))
    with pytest.raises(ValueError, match=r"token id 256, outside the vocabulary \[0, 256\)"):
        backend.step(torch.tensor([1, 256]), backend.new_state(2))
    with pytest.raises(ValueError, match="integer token ids"):
        backend.step(torch.tensor([1.0, 2.0]), backend.new_state(2))
    with pytest.raises(ValueError, match="T >= 1"):
        backend.prefill(torch.zeros(2, 0, dtype=torch.long), backend.new_state(2))
    with pytest.raises(ValueError, match="must be an OrtState"):
        backend.step(tok, [1, 2])


def test_modified_graph_is_refused(tiny_export, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_export(memory=False), out)
    data = bytearray((out / "decode_step.onnx").read_bytes())
    data[-10] ^= 0xFF
    (out / "decode_step.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="decode_step.onnx does not match the sha256 recorded in manifest.json"):
        OrtBackend.open(out)
    (out / "decode_step.onnx").unlink()
    with pytest.raises(ManifestError, match="decode_step.onnx is listed in manifest.json but missing"):
        OrtBackend.open(out)
    with pytest.raises(FileNotFoundError, match="not an export directory"):
        OrtBackend.open(tmp_path)


def test_both_flavours_agree_bit_for_bit(tiny_export):
    """The plugins flavour's function bodies and the portable flavour's inlined nodes are one computation."""
    portable = OrtBackend.open(tiny_export(memory=True), threads=1)
    plugins = OrtBackend.open(tiny_export(memory=True, flavor="plugins"), threads=1)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(8))
    (la, sa), (lb, sb) = portable.prefill(ids, portable.new_state(2)), plugins.prefill(ids, plugins.new_state(2))
    for _ in range(16):
        token = la.argmax(-1)
        (la, sa), (lb, sb) = portable.step(token, sa), plugins.step(token, sb)
        assert torch.equal(la, lb)
    for k, v in sa.numpy().items():
        np.testing.assert_array_equal(v, sb.numpy()[k])


def test_hugging_face_mamba_exports_and_matches(tmp_path):
    """A Hugging Face MambaForCausalLM folder exports as a memory-off model and matches transformers' logits."""
    transformers = pytest.importorskip("transformers", reason="transformers is a dev dependency (pip install -e .[dev])")
    from memmamba_deploy.export import export_model

    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=97, hidden_size=32, state_size=8,
                                                                num_hidden_layers=2, expand=2, conv_kernel=4)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if not name.endswith(("A_log", ".D")):
                p.normal_(0, 0.2)
    hf.save_pretrained(tmp_path / "hf")
    manifest = export_model(tmp_path / "hf", tmp_path / "out", show_progress=False)
    assert manifest["config"]["memory"] is False and [s["name"] for s in manifest["state"]] == ["conv_state",
                                                                                               "ssm_state"]
    backend = OrtBackend.open(tmp_path / "out", threads=1)
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        want = hf(ids).logits
    logits, state = backend.prefill(ids[:, :8], backend.new_state(2))
    assert rel_err(logits, want[:, 7]) <= 1e-4
    for t in range(8, 12):
        logits, state = backend.step(ids[:, t], state)
        assert rel_err(logits, want[:, t]) <= 1e-4
