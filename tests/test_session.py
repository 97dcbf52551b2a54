"""Session API (memmamba_deploy/session.py) and `memdeploy generate`: same tokens as the model itself, on every CPU
backend; fork() and threads keep states apart; bad paths, backends and inputs give one clear error."""
import json
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import DictStateBackend, make_model
from memmamba_deploy.cli import app
from memmamba_deploy.metrics import rel_err
from memmamba_deploy.models.checkpoint import save_pretrained
from memmamba_deploy.session import Session, inspect_path, open_backend

PROMPT = list(b"Once upon a time, ")


def lively_model(seed=0):
    """make_model with the mixers' output scaled up: a random tiny model otherwise echoes its input, and greedy
    decoding would repeat one token, which proves nothing."""
    model = make_model(seed)
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.out_proj.weight.mul_(20.0)
    return model


@pytest.fixture(scope="module")
def model():
    return lively_model()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_pretrained(model, path)
    return path


@pytest.fixture(scope="module")
def export_dir(checkpoint, tmp_path_factory):
    from memmamba_deploy.export import export_model

    out = tmp_path_factory.mktemp("export") / "tiny"
    export_model(checkpoint, out, flavor="portable", dtype="fp32", show_progress=False)
    return out


@torch.no_grad()
def greedy_by_hand(model, prompt, n, state=None):
    """Reference: model.prefill then model.step, argmax each time. Returns (tokens, logits per token, state)."""
    logits, state = model.prefill(torch.tensor([prompt]), state)
    logits = logits[:, -1]
    tokens, all_logits = [], []
    for i in range(n):
        t = logits.argmax(-1)
        tokens.append(int(t))
        all_logits.append(logits)
        if i < n - 1:
            logits, state = model.step(t, state)
    return tokens, torch.cat(all_logits), state


def greedy(session, prompt=None, n=24):
    return [int(t) for t in session.generate(prompt, max_new_tokens=n)]


# ---- same tokens as the model ----------------------------------------------------------------------------------------
def test_session_over_torch_gives_the_same_greedy_generation_as_model_step(model, checkpoint):
    s = Session.open(checkpoint, device="cpu")
    want, want_logits, _ = greedy_by_hand(model, PROMPT, 40)
    assert len(set(want)) > 10, "the reference generation must vary or the comparison proves nothing"
    got, got_logits = [], []
    stream = s.generate(PROMPT, max_new_tokens=40)
    for token in stream:
        got.append(int(token))
        got_logits.append(s.logits)
    assert got == want
    assert rel_err(torch.cat(got_logits), want_logits) <= 1e-6

    # The session follows the stream: generating on, or prefilling more, continues the same text.
    more = greedy(s, None, 8)
    assert more == greedy_by_hand(model, PROMPT + want, 8)[0]
    s.prefill(list(b"!"))
    assert greedy(s, None, 6) == greedy_by_hand(model, PROMPT + want + more + list(b"!"), 6)[0]


def test_prefill_step_and_text_prompts(model, checkpoint):
    s = Session.open(checkpoint, device="cpu")
    text = "héllo ✓"                                             # multi-byte UTF-8
    assert s.encode(text).tolist() == list(text.encode())
    logits = s.prefill(text)
    ref, state = model.prefill(torch.tensor([list(text.encode())]))
    assert rel_err(logits, ref[:, -1]) <= 1e-6
    logits = s.step(7)
    assert rel_err(logits, model.step(torch.tensor([7]), state)[0]) <= 1e-6
    assert s.decode(s.encode(text)) == text
    assert s.state_nbytes == sum(v.numel() * v.element_size() for v in state.tensors().values())
    s.reset()
    assert s.logits is None and s.state is None


def test_sampled_generation_is_seeded(checkpoint):
    s = Session.open(checkpoint, device="cpu")
    a = [int(t) for t in s.generate(PROMPT, 24, temperature=1.0, top_k=50, top_p=0.95, seed=7)]
    s.reset()
    b = [int(t) for t in s.generate(PROMPT, 24, temperature=1.0, top_k=50, top_p=0.95, seed=7)]
    s.reset()
    c = [int(t) for t in s.generate(PROMPT, 24, temperature=1.0, top_k=50, top_p=0.95, seed=8)]
    assert a == b and a != c


def test_the_sampling_stream_goes_on_across_calls(checkpoint):
    """A seed starts the session's stream; later calls without one continue it, so generating in pieces (with a
    stop in between) draws what one call does; a fork continues a copy of it."""
    opts = dict(temperature=1.0, top_k=50)

    def tokens(it):
        return [int(t) for t in it]

    s = Session.open(checkpoint, device="cpu")
    whole = tokens(s.generate(PROMPT, 16, seed=11, **opts))
    s.reset()
    first = tokens(s.generate(PROMPT, 5, seed=11, **opts))
    forked = s.fork()
    assert first + tokens(s.generate(None, 11, **opts)) == whole
    assert first + tokens(forked.generate(None, 11, **opts)) == whole
    s.reset()
    stop = whole[3]
    head = tokens(s.generate(PROMPT, 16, seed=11, stop=[stop], **opts))
    assert head == whole[:whole.index(stop) + 1]
    assert head + tokens(s.generate(None, 16 - len(head), **opts)) == whole
    s.reset()
    assert tokens(s.generate(PROMPT, 5, seed=11, **opts)) + tokens(s.generate(None, 11, seed=11, **opts)) != whole
    assert len(set(whole)) > 4                                  # really sampled


def test_a_saved_stream_goes_on_in_another_session_and_backend(checkpoint, export_dir, tmp_path):
    """save_state then load_state (the same backend, or ONNX Runtime) continues exactly as the original session."""
    a = Session.open(checkpoint, device="cpu")
    head = greedy(a, PROMPT, 10)                          # generate leaves its last token pending
    a.save_state(tmp_path / "s.safetensors")
    rest = greedy(a, None, 12)
    for other in (Session.open(checkpoint, device="cpu"), Session.open(export_dir, backend="onnxruntime")):
        other.load_state(tmp_path / "s.safetensors")
        assert greedy(other, None, 12) == rest, other.backend.name
    b = Session.open(checkpoint, device="cpu")
    b.load_state(tmp_path / "s.safetensors")
    b.prefill([5, 6])                                     # the pending token is fed first, as in the original
    a2 = Session.open(checkpoint, device="cpu")
    a2.prefill(PROMPT + head + [5, 6])
    assert torch.allclose(b.logits, a2.logits, atol=1e-5) and len(head) == 10


def test_session_state_files_are_checked(checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    s = Session.open(checkpoint, device="cpu")
    with pytest.raises(ValueError, match="consumed no tokens"):
        s.save_state(tmp_path / "x.safetensors")
    s.prefill(PROMPT)
    good = tmp_path / "s.safetensors"
    s.save_state(good)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.safetensors"]          # no temporaries left
    with pytest.raises(FileNotFoundError, match="no session state file"):
        s.load_state(tmp_path / "missing.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable session state file"):
        s.load_state(tmp_path / "cut.safetensors")
    save_file(load_file(good), str(tmp_path / "bare.safetensors"))                  # no metadata
    with pytest.raises(ValueError, match="not a session state file"):
        s.load_state(tmp_path / "bare.safetensors")
    with pytest.raises(IsADirectoryError, match="is a directory"):
        s.load_state(tmp_path)
    other = make_model(memory=False)
    other.save_pretrained(tmp_path / "plain")
    plain = Session.open(tmp_path / "plain", device="cpu")
    with pytest.raises(ValueError, match="the state of another model: memory True"):
        plain.load_state(good)
    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()

    def altered(change, **meta_change):
        tensors = load_file(good)
        change(tensors)
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, **meta_change})
        return tmp_path / "bad.safetensors"

    for change, message in [
            (lambda t: t.update({"state.ssm": t["state.ssm"][:, :, :-1].contiguous()}), "bad.safetensors: state.ssm has shape"),
            (lambda t: t["state.ssm"].view(-1)[0].fill_(float("nan")), r"\['ssm'\] hold NaN"),
            (lambda t: t["state.prio"].view(-1)[0].fill_(-5.0), "neither scores"),
            (lambda t: t.update({"state.conv": t["state.conv"].to(torch.int32),
                                 "state.pool": t["state.pool"].to(torch.int32)}), "state.conv has dtype torch.int32"),
            (lambda t: t.update({"pending": torch.tensor([3.5])}), "pending token must be .* integer ids"),
            (lambda t: t.update({"pending": torch.tensor([300])}), "pending token must be .* integer ids"),
            (lambda t: t.update({"pending": torch.tensor([3, 4])}), "pending token must be .* integer ids"),
            (lambda t: t.update({"logits": t["logits"][:, :-1].contiguous()}), "logits must be float"),
            (lambda t: t.update({"logits": t["logits"].long()}), "logits must be float"),
            (lambda t: t["logits"].view(-1)[0].fill_(float("inf")), r"\['logits'\] hold NaN")]:
        with pytest.raises(ValueError, match=message):
            s.load_state(altered(change))
    with pytest.raises(ValueError, match="format version '2'"):
        s.load_state(altered(lambda t: None, format_version="2"))
    with pytest.raises(ValueError, match=r"config does not read \(it lacks"):
        s.load_state(altered(lambda t: None, config="{}"))
    make_model(seed=5).save_pretrained(tmp_path / "twin")                # the same config, other weights
    with pytest.raises(ValueError, match="a model with other weights"):
        Session.open(tmp_path / "twin", device="cpu").load_state(good)
    s.load_state(good)                                     # the good file still loads after the refusals
    assert s.batch_size == 1


def test_a_state_past_fp16s_range_is_refused_by_an_fp16_session(checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    s = Session.open(checkpoint, device="cpu")
    s.prefill(PROMPT)
    s.save_state(tmp_path / "s.safetensors")
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(tmp_path / "s.safetensors")
    tensors["state.pool"].view(-1)[0] = 1e6                  # finite in fp32, infinite in fp16
    save_file(tensors, str(tmp_path / "big.safetensors"), metadata=meta)
    Session.open(checkpoint, device="cpu").load_state(tmp_path / "big.safetensors")     # fp32: fine
    half = Session.open(checkpoint, device="cpu", dtype=torch.float16)
    with pytest.raises(ValueError, match=r"\['pool'\] hold values past the range of this session's dtype"):
        half.load_state(tmp_path / "big.safetensors")
    half.load_state(tmp_path / "s.safetensors")             # the real file loads


def test_generate_with_a_prompt_feeds_the_pending_token_first(checkpoint):
    """A second generate(prompt) goes on after the first one's last token, then the new prompt."""
    a = Session.open(checkpoint, device="cpu")
    first = greedy(a, PROMPT, 6)
    second = greedy(a, [5, 6], 6)
    b = Session.open(checkpoint, device="cpu")
    assert greedy(b, PROMPT + first + [5, 6], 6) == second


def test_a_saved_sampling_stream_goes_on_too(checkpoint, tmp_path):
    opts = dict(temperature=1.0, top_k=50)
    a = Session.open(checkpoint, device="cpu")
    head = [int(t) for t in a.generate(PROMPT, 4, seed=3, **opts)]
    a.save_state(tmp_path / "s.safetensors")
    rest = [int(t) for t in a.generate(None, 12, **opts)]
    b = Session.open(checkpoint, device="cpu")
    b.load_state(tmp_path / "s.safetensors")
    assert [int(t) for t in b.generate(None, 12, **opts)] == rest and len(set(head + rest)) > 4


def test_torch_and_onnxruntime_sessions_give_identical_generations(model, export_dir):
    ort, ref = Session.open(export_dir, backend="onnxruntime"), Session.open(export_dir, backend="torch", device="cpu")
    assert ort.backend.name == "onnxruntime" and ref.backend.name == "torch"
    want = greedy(ref, PROMPT, 64)
    assert len(set(want)) > 10
    assert greedy(ort, PROMPT, 64) == want
    assert want == greedy_by_hand(model, PROMPT, 64)[0]
    assert rel_err(ort.logits, ref.logits) <= 1e-4
    assert greedy(ort, None, 16) == greedy(ref, None, 16)                    # continuing a stream
    sampled = [[int(t) for t in s.generate(PROMPT, 32, temperature=0.9, top_p=0.9, seed=3)] for s in (ort, ref)]
    assert sampled[0] == sampled[1]
    assert ort.state_nbytes == ref.state_nbytes


# ---- fork and threads ------------------------------------------------------------------------------------------------
def test_fork_diverges_independently(model, checkpoint):
    s = Session.open(checkpoint, device="cpu")
    s.prefill(PROMPT)
    before = {k: v.clone() for k, v in s.state.tensors().items()}
    f = s.fork()
    branch = greedy(f, list(b" the cat"), 20)
    for k, v in s.state.tensors().items():                         # the fork's decoding left the original alone
        assert torch.equal(v, before[k]), k
    trunk = greedy(s, list(b" the dog"), 20)
    assert branch == greedy_by_hand(model, PROMPT + list(b" the cat"), 20)[0]
    assert trunk == greedy_by_hand(model, PROMPT + list(b" the dog"), 20)[0]
    assert branch != trunk

    g = s.fork()                                                   # a fork of a stream mid-generation
    assert greedy(g, None, 10) == greedy(s, None, 10)


def _decode_in_threads(sessions, prompts, n=32):
    results, errors = [None] * len(sessions), []
    barrier = threading.Barrier(len(sessions))

    def run(i):
        try:
            barrier.wait()
            results[i] = greedy(sessions[i], prompts[i], n)
        except Exception as e:   # surfaced below: a thread's exception is otherwise lost
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sessions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


PROMPTS = [list(b"Alpha and omega"), list(b"zzz: 0123456789"), list(b"The quick brown fox")]


def test_threads_decoding_at_once_match_single_thread_torch(model, checkpoint):
    alone = [greedy_by_hand(model, p, 32)[0] for p in PROMPTS]
    assert len({tuple(a) for a in alone}) == len(PROMPTS)
    separate = [Session.open(checkpoint, device="cpu") for _ in PROMPTS]       # one backend each
    assert _decode_in_threads(separate, PROMPTS) == alone
    root = Session.open(checkpoint, device="cpu")                                # one backend, forked sessions
    assert _decode_in_threads([root] + [root.fork() for _ in PROMPTS[1:]], PROMPTS) == alone


def test_threads_decoding_at_once_match_single_thread_onnxruntime(model, export_dir):
    alone = [greedy_by_hand(model, p, 32)[0] for p in PROMPTS]
    root = Session.open(export_dir, backend="onnxruntime")
    shared = [root] + [root.fork() for _ in PROMPTS[1:]]                       # one ORT backend, serialised calls
    assert _decode_in_threads(shared, PROMPTS) == alone
    separate = [Session.open(export_dir, backend="ort") for _ in PROMPTS]
    assert _decode_in_threads(separate, PROMPTS) == alone


# ---- rows: prompts of different lengths, continuous batching, beams ----------------------------------------------------
RAGGED = [list(b"Alpha and omega"), list(b"zz"), list(b"The quick brown fox jumps"), list(b"0123")]


def _root(kind, checkpoint, export_dir):
    if kind == "onnxruntime":
        return Session.open(export_dir, backend="onnxruntime")
    root = Session.open(checkpoint, device="cpu")
    return Session(DictStateBackend(root.backend.model, max_batch=4)) if kind == "dict-state" else root


def _logits_of(session, prompt, n):
    """(greedy tokens, logits [n, vocab]) of `prompt` alone in a fork of `session`."""
    s = session.fork()
    tokens, logits = [], []
    for t in s.generate(prompt, max_new_tokens=n):
        tokens.append(int(t))
        logits.append(s.logits[0])
    return tokens, torch.stack(logits)


@pytest.mark.parametrize("kind", ["torch", "onnxruntime", "dict-state"])
def test_prompts_of_different_lengths_decode_together_once_stacked(model, checkpoint, export_dir, kind):
    root = _root(kind, checkpoint, export_dir)
    alone = [_logits_of(root, p, 20) for p in RAGGED]
    assert len({tuple(t) for t, _ in alone}) == len(RAGGED), "distinct streams, or the rows prove nothing"
    forks = [root.fork() for _ in RAGGED]
    for f, p in zip(forks, RAGGED):
        f.prefill(p)
    before = [f.logits for f in forks]
    batch = Session.stack(forks)
    assert batch.batch_size == len(RAGGED) and batch.backend is root.backend
    tokens, logits = [], []
    for t in batch.generate(max_new_tokens=20):
        tokens.append(t)
        logits.append(batch.logits)
    tokens, logits = torch.stack(tokens, 1), torch.stack(logits, 1)
    for i, (want_tokens, want_logits) in enumerate(alone):
        assert tokens[i].tolist() == want_tokens, i
        assert rel_err(logits[i], want_logits) <= 1e-5, i
    for f, b in zip(forks, before):                                  # the stacked sessions were left alone
        assert torch.equal(f.logits, b)
    assert [int(t) for t in forks[1].generate(max_new_tokens=20)] == alone[1][0]


@pytest.mark.parametrize("kind", ["torch", "onnxruntime", "dict-state"])
def test_rows_drop_reorder_and_repeat_rows(model, checkpoint, export_dir, kind):
    root = _root(kind, checkpoint, export_dir)
    forks = [root.fork() for _ in RAGGED[:3]]
    for f, p in zip(forks, RAGGED):
        f.prefill(p)
    batch = Session.stack(forks)
    picked = batch.rows([2, 0, 0])
    assert picked.batch_size == 3 and batch.batch_size == 3
    got = torch.stack(list(picked.generate(max_new_tokens=12)), 1)
    for row, i in zip(got, [2, 0, 0]):
        assert row.tolist() == _logits_of(root, RAGGED[i], 12)[0]
    assert batch.rows(1).batch_size == 1                             # an int takes one row
    assert [int(t) for t in batch.rows([1]).generate(max_new_tokens=12)] == _logits_of(root, RAGGED[1], 12)[0]


def test_continuous_batching_rows_leave_and_join_mid_generation(model, checkpoint):
    """A finished row leaves with rows(), a new prompt joins with stack(): every stream is the one it would be
    alone, with generate()'s pending tokens fed in the right order."""
    root = Session.open(checkpoint, device="cpu")
    a, b, c = (root.fork() for _ in range(3))
    a.prefill(RAGGED[0])
    b.prefill(RAGGED[1])
    batch = Session.stack([a, b])
    first = torch.stack(list(batch.generate(max_new_tokens=6)), 1)       # both rows end with a pending token
    c.prefill(RAGGED[2])                                                 # no pending token: mixed, fed on stack
    batch = Session.stack([batch.rows([1]), c])                          # row a finished; c joins
    second = torch.stack(list(batch.generate(max_new_tokens=8)), 1)
    assert first[0].tolist() == _logits_of(root, RAGGED[0], 6)[0]
    assert first[1].tolist() + second[0].tolist() == _logits_of(root, RAGGED[1], 14)[0]
    assert second[1].tolist() == _logits_of(root, RAGGED[2], 8)[0]
    batch.prefill([list(b" and so"), list(b" but no")])              # a batched prompt goes on from both rows
    assert batch.batch_size == 2


def test_a_stack_draws_from_a_copy_of_its_first_sessions_sampling_stream(checkpoint):
    root = Session.open(checkpoint, device="cpu")
    a, b = root.fork(), root.fork()
    list(a.generate(RAGGED[0], 3, temperature=1.0, seed=5))           # a's stream, three draws in
    b.prefill(RAGGED[1])
    before = a._generator.get_state()
    draws = [torch.stack(list(Session.stack([a, b]).generate(max_new_tokens=6, temperature=1.0))) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])                               # the same copy each time, not torch's
    assert torch.equal(a._generator.get_state(), before)                 # global generator; a's own stream untouched


def test_rows_and_stack_refuse_what_they_cannot_do(checkpoint, export_dir):
    root = Session.open(checkpoint, device="cpu")
    a = root.fork()
    a.prefill(PROMPT)
    with pytest.raises(ValueError, match="non-empty list of Sessions"):
        Session.stack([])
    with pytest.raises(ValueError, match="non-empty list of Sessions"):
        Session.stack(a)
    with pytest.raises(ValueError, match=r"sessions\[1\] has consumed no tokens"):
        Session.stack([a, root.fork()])
    other = Session.open(checkpoint, device="cpu")
    other.prefill(PROMPT)
    with pytest.raises(ValueError, match=r"sessions\[1\] runs on another backend object.*fork\(\)"):
        Session.stack([a, other])
    with pytest.raises(ValueError, match="consumed no tokens: it has no rows yet"):
        root.fork().rows([0])
    for bad, message in [([1], "row 1 is outside this session's rows 0..0"), ([-1], "row -1 is outside"),
                         ([], "non-empty list of integer"), ([0.0], "non-empty list of integer"),
                         ([[0]], "non-empty list of integer"), ([1j], "non-empty list of integer"),
                         ("x", "list of row indices")]:
        with pytest.raises(ValueError, match=message):
            a.rows(bad)
    from memmamba_deploy.cli_runtime import _generate_batch

    limited = Session(DictStateBackend(root.backend.model, max_batch=2))
    with pytest.raises(ValueError, match="3 prompts, but the engines take batches of up to 2"):
        _generate_batch(limited, [[1], [2], [3]], 4, 0.0, 0, 1.0, None, [])
    assert limited.state is None                                         # refused before any prefill
    limited.prefill(PROMPT)
    with pytest.raises(ValueError, match="outside the engines' profile 1..2"):
        Session.stack([limited, limited, limited])


class CountingBackend:
    """A backend's prefill calls, counted (whether rows of different lengths went in one call)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefill(self, ids, state, **kw):
        self.calls.append((tuple(ids.shape), kw.get("lengths")))
        return self.inner.prefill(ids, state, **kw)


@pytest.mark.parametrize("kind", ["torch", "onnxruntime", "dict-state"])
def test_prompts_of_different_lengths_prefill_as_rows_of_their_own(checkpoint, model, export_dir, kind):
    """Session.prefill of rows of different lengths: in one backend call where the backend takes lengths (torch,
    onnxruntime), a row at a time where it does not (a TensorRT-like Mapping state); each row's logits, greedy tokens and state
    are its prompt's alone, also going on from a state with generate()'s pending tokens; generate() takes such a
    prompt too, and `memdeploy generate` with several prompts prefills them in one call."""
    from memmamba_deploy.cli_runtime import _generate_batch
    from memmamba_deploy.parity import state_view

    torch_backend = Session.open(checkpoint, device="cpu").backend
    inner = {"torch": torch_backend, "onnxruntime": Session.open(export_dir).backend}.get(kind) or \
        DictStateBackend(model)
    backend = CountingBackend(inner)
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (41, 5, 1, 23)]
    s = Session(backend)
    logits = s.prefill(prompts)
    one_call = kind != "dict-state"
    tol = 1e-4 if kind == "onnxruntime" else 1e-5
    assert [c[0] for c in backend.calls] == ([(4, 41)] if one_call else [(1, n) for n in (41, 5, 1, 23)])
    if one_call:
        assert backend.calls[0][1].tolist() == [41, 5, 1, 23]
    state = state_view(backend, s.state)
    tokens = torch.stack(list(s.generate(max_new_tokens=12)), 1)
    for i, p in enumerate(prompts):
        want, want_logits, want_state = greedy_by_hand(model, p, 12)
        assert rel_err(logits[i:i + 1], want_logits[:1]) <= tol, i
        assert tokens[i].tolist() == want, i
        _, alone = model.prefill(torch.tensor([p]))
        for k, v in alone.tensors().items():
            assert rel_err(state.tensors()[k][:, i:i + 1], v) <= tol, (i, k)
    # going on with more rows of different lengths: generate()'s last tokens (pending) go first, each row's own
    more = [[7, 8, 9], [10], [11, 12, 13, 14, 15, 16], [17, 18]]
    backend.calls.clear()
    again = s.prefill(more)
    assert [c[0] for c in backend.calls] == ([(4, 7)] if one_call else [(1, 4), (1, 2), (1, 7), (1, 3)])
    for i, p in enumerate(prompts):
        alone, _ = model.prefill(torch.tensor([p + tokens[i].tolist() + more[i]]), last_only=True)
        assert rel_err(again[i:i + 1], alone[:, -1]) <= tol, i
    # generate() with such a prompt: each row generating from its own end; nothing consumed until it is iterated
    lazy = Session(backend)
    stream = lazy.generate(prompts, max_new_tokens=12)
    assert lazy.state is None
    t = torch.stack(list(stream), 1)
    assert torch.equal(t, tokens)
    t = torch.stack(list(s.fork().generate([[1], [2, 3], [4], [5, 6, 7]], max_new_tokens=3)), 1)   # after pending
    for i, p in enumerate(prompts):
        row = p + tokens[i].tolist() + more[i] + [[1], [2, 3], [4], [5, 6, 7]][i]
        assert t[i].tolist() == greedy_by_hand(model, row, 3)[0], i
    # texts of different lengths (byte-level) and equal-length rows as before
    texts = ["a cat", "the dog barked"]
    got = Session(backend).prefill(texts)
    for i, text in enumerate(texts):
        assert rel_err(got[i:i + 1], Session(torch_backend).prefill(text)) <= tol
    assert Session(backend).prefill([[1, 2], [3, 4]]).shape == (2, 256)
    rows = np.array([np.array(prompts[0]), np.array(prompts[1])], dtype=object)      # numpy's ragged rows
    assert rel_err(Session(backend).prefill(rows), logits[:2]) <= tol
    square = np.array([np.array([1, 2]), np.array([3, 4])], dtype=object)           # rows of one length: 2-D
    assert torch.equal(Session(backend).prefill(square), Session(backend).prefill([[1, 2], [3, 4]]))
    for bad, message in [([[1, 2], []], r"prompts\[1\] is empty"), ([[1, 2], [300]], r"prompts\[1\]: .*\[0, 256\)"),
                         ([[1, 2], [[1, 2], [3, 4]]], r"prompts\[1\] must be one row"),
                         ([[1, 2], [0.5]], r"prompts\[1\]: .*integers"),
                         ([[1, 2], 3], r"prompts\[1\] is not a row where prompts\[0\] is a row"),
                         ([3, [1, 2]], r"prompts\[1\] is a row where prompts\[0\] is a token id")]:
        with pytest.raises(ValueError, match=message):
            Session(backend).prefill(bad)
    with pytest.raises(ValueError, match="decodes 4 row"):
        s.prefill([[1], [2, 3]])
    # the CLI's batch: one prefill call on a backend that takes lengths
    backend.calls.clear()
    _generate_batch(Session(backend), [torch.tensor(p) for p in prompts], 4, 0.0, 0, 1.0, None, [])
    assert len(backend.calls) == (1 if one_call else 4)


# ---- clear errors ----------------------------------------------------------------------------------------------------
def test_an_export_runs_on_onnxruntime_and_a_checkpoint_on_torch_unless_told(checkpoint, export_dir):
    assert Session.open(export_dir).backend.name == "onnxruntime"      # what was exported, not its checkpoint copy
    assert Session.open(checkpoint).backend.name == "torch"
    assert Session.open(export_dir, backend="torch").backend.name == "torch"


def test_bad_paths_and_backends_give_clear_errors(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        Session.open(tmp_path / "missing")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        Session.open(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a checkpoint directory"):
        Session.open(tmp_path / "empty")
    shutil.copytree(checkpoint, tmp_path / "run" / "model")
    with pytest.raises(ValueError, match="the checkpoint of a training run is its model/ folder"):
        Session.open(tmp_path / "run")
    with pytest.raises(ValueError, match="unknown backend 'tvm'"):
        Session.open(checkpoint, backend="tvm")
    with pytest.raises(ValueError, match="runs an export directory.*memdeploy export"):
        Session.open(checkpoint, backend="onnxruntime")
    with pytest.raises(ValueError, match="unknown dtype"):
        Session.open(checkpoint, dtype="int3")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA GPU"):
            Session.open(checkpoint, backend="triton")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            Session.open(checkpoint, device="cuda")
    bad = tmp_path / "bad-export"
    bad.mkdir()
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json is not valid JSON"):
        Session.open(bad, backend="onnxruntime")
    (bad / "manifest.json").write_text(json.dumps({"config": json.loads((checkpoint / "config.json").read_text()),
                                                   "dtype": "fp32", "graphs": {}}))
    assert inspect_path(bad).kind == "export"
    with pytest.raises(ValueError, match="carries no copy of its checkpoint"):
        Session.open(bad, backend="torch")


def test_export_dtype_mismatch_is_refused(export_dir):
    with pytest.raises(ValueError, match="fp32 export"):
        open_backend(export_dir, "onnxruntime", dtype="fp16")


def test_bad_inputs_give_clear_errors(checkpoint):
    s = Session.open(checkpoint, device="cpu")
    with pytest.raises(ValueError, match=r"must lie in \[0, 256\)"):
        s.prefill([1, 2, 300])
    with pytest.raises(ValueError, match="must be integers"):
        s.prefill(torch.ones(3))
    with pytest.raises(ValueError, match="T >= 1"):
        s.prefill([])
    with pytest.raises(ValueError, match="needs a prompt"):
        s.generate(max_new_tokens=3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        s.generate(PROMPT, max_new_tokens=0)
    with pytest.raises(ValueError, match="bad sampling settings"):
        s.generate(PROMPT, max_new_tokens=3, top_p=0.0)
    s.prefill([[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="decodes 2 row"):
        s.step(5)
    s.reset()
    stream = s.generate(PROMPT, max_new_tokens=8)
    next(stream)
    s.step(3)                                                         # the session moved on under the stream
    with pytest.raises(RuntimeError, match="overtaken"):
        next(stream)


def test_text_needs_a_byte_level_vocabulary(tmp_path):
    model = make_model(0, vocab_size=300)
    save_pretrained(model, tmp_path / "v300")
    s = Session.open(tmp_path / "v300", device="cpu")
    with pytest.raises(ValueError, match="300 tokens, not 256 bytes"):
        s.generate("hello", max_new_tokens=2)
    assert len(greedy(s, [1, 299, 5], 3)) == 3


# ---- memdeploy generate ----------------------------------------------------------------------------------------------
def test_generate_cli_streams_the_session_text(checkpoint):
    runner = CliRunner()
    res = runner.invoke(app, ["generate", str(checkpoint), "--prompt", "Once upon a time, ", "--max-new-tokens", "12",
                              "--temperature", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    s = Session.open(checkpoint, device="cpu")
    want = bytes(greedy(s, PROMPT, 12)).decode("utf-8", errors="replace")
    assert res.stdout.startswith(want)
    assert "12 tokens in" in res.output and "the first after" in res.output and "tokens/s (median)" in res.output

    res = runner.invoke(app, ["generate", str(checkpoint), "--ids", "1,2,3", "--max-new-tokens", "4",
                              "--temperature", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output


def test_generate_cli_decodes_several_prompts_as_one_batch(checkpoint):
    texts = ["Alpha and omega", "zz", "The quick brown fox jumps"]
    res = CliRunner().invoke(app, ["generate", str(checkpoint), *[a for t in texts for a in ("--prompt", t)],
                                   "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    root = Session.open(checkpoint, device="cpu")
    alone = [greedy(root.fork(), list(t.encode()), 12) for t in texts]
    for i, want in enumerate(alone):
        assert f"--- prompt {i + 1} of 3 ---\n{bytes(want).decode('utf-8', errors='replace')}\n" in res.stdout
    assert "3 prompts (" in res.output and "generated as one batch" in res.output
    rows = [greedy(root.fork(), ids, 10) for ids in ([1, 2, 3], [7])]
    stop = rows[1][3]                                       # a row ends at its first stop token; the other goes on
    res = CliRunner().invoke(app, ["generate", str(checkpoint), "--ids", "1,2,3", "--ids", "7",
                                   "--max-new-tokens", "10", "--temperature", "0", "--device", "cpu",
                                   "--stop", str(stop)])
    assert res.exit_code == 0, res.output
    cut = [r[:r.index(stop) + 1] if stop in r else r for r in rows]
    assert len(cut[1]) < 10 and len(cut[0]) > len(cut[1])
    for i, want in enumerate(cut):
        assert f"--- prompt {i + 1} of 2 ---\n{bytes(want).decode('utf-8', errors='replace')}\n" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["generate", "/nonexistent/ckpt", "--prompt", "hi"], "no such directory"),
    (["generate", "{ckpt}", "--prompt", "hi", "--backend", "nope"], "unknown backend"),
    (["generate", "{ckpt}"], "exactly one of --prompt"),
    (["generate", "{ckpt}", "--ids", "1,x"], "comma-separated token ids"),
    (["generate", "{ckpt}", "--ids", "1,300"], "outside the vocabulary"),
    (["generate", "{ckpt}", "--prompt", "hi", "--stop", "300"], "--stop holds token id(s) [300]"),
    (["generate", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "{ckpt}", "--prompt", "hi", "--ids", "1"], "exactly one of --prompt"),
    (["generate", "{ckpt}", "--prompt", "-", "--prompt", "-"], "may be given once"),
    (["generate", "{ckpt}", "--prompt", "a", "--prompt", ""], "--prompt 2 of 2 is empty"),
    (["generate", "{ckpt}", "--ids", "1", "--ids", "1,300"], "--ids 2 holds token id(s) [300]"),
])
def test_generate_cli_errors_are_one_line(checkpoint, args, message):
    res = CliRunner().invoke(app, [a.replace("{ckpt}", str(checkpoint)) for a in args])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


def test_generate_cli_reads_the_prompt_from_stdin_and_ids_need_no_trailing_space(checkpoint):
    res = CliRunner().invoke(app, ["generate", str(checkpoint), "--prompt", "-", "--max-new-tokens", "4",
                                   "--temperature", "0", "--device", "cpu"], input="Once upon a time, ")
    assert res.exit_code == 0, res.output
    want = bytes(greedy(Session.open(checkpoint, device="cpu"), PROMPT, 4)).decode("utf-8", errors="replace")
    assert res.stdout.startswith(want)


def test_generate_cli_ends_quietly_when_the_reader_leaves(checkpoint):
    """`memdeploy generate ... | head -c 5`: exit 141 (128 + SIGPIPE) with nothing on stderr."""
    import subprocess
    import sys

    cmd = (f"{sys.executable} -m memmamba_deploy.cli generate {checkpoint} --prompt hi --max-new-tokens 400 "
           f"--temperature 0 --device cpu | head -c 5; exit ${{PIPESTATUS[0]}}")
    run = subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=300)
    assert run.returncode == 141 and run.stderr == b"", (run.returncode, run.stderr)


class NaNBackend:
    """A torch backend whose logits turn NaN: generate names it instead of failing inside the sampler."""

    def __init__(self, backend):
        self.inner, self.config, self.name = backend, backend.config, "nan"

    def new_state(self, batch):
        return self.inner.new_state(batch)

    def prefill(self, ids, state):
        logits, state = self.inner.prefill(ids, state)
        return logits * float("nan"), state


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generate_names_nan_logits(checkpoint, temperature):
    from memmamba_deploy.sampling import generate

    backend = NaNBackend(Session.open(checkpoint, device="cpu").backend)
    with pytest.raises(ValueError, match="logits hold NaN or \\+Inf after the prompt"):
        next(generate(backend, torch.tensor([PROMPT]), 3, temperature=temperature, seed=0))


# ---- GPU (scripts/gpu_stages/40-bench.sh runs these) -----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_session_matches_cpu_reference(checkpoint, model, backend):
    """Triton (decode step in a CUDA graph) and torch on the GPU, fp32: the reference's greedy tokens after a 1k
    prompt, logits within 1e-4; forks that share the backend (and its graph buffers) stay independent."""
    prompt = torch.randint(0, 256, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    want, want_logits, _ = greedy_by_hand(model, prompt, 128)
    s = Session.open(checkpoint, backend=backend, device="cuda", dtype="fp32")
    got, logits = [], []
    for t in s.generate(prompt, max_new_tokens=128):
        got.append(int(t))
        logits.append(s.logits.float().cpu())
    assert got == want
    assert rel_err(torch.cat(logits), want_logits) <= 1e-4
    a, b = s.fork(), s.fork()
    ta, tb = a.generate(list(b" cat"), 24), b.generate(list(b" dog"), 24)
    got_a, got_b = [], []
    for x, y in zip(ta, tb):                                     # interleaved steps on one backend
        got_a.append(int(x))
        got_b.append(int(y))
    assert got_a == greedy_by_hand(model, prompt + want + list(b" cat"), 24)[0]
    assert got_b == greedy_by_hand(model, prompt + want + list(b" dog"), 24)[0]
    with tempfile.TemporaryDirectory() as tmp:                   # the GPU stream goes on in a CPU session
        a.save_state(Path(tmp) / "s.safetensors")
        cpu = Session.open(checkpoint, device="cpu")
        cpu.load_state(Path(tmp) / "s.safetensors")
        assert greedy(cpu, None, 16) == greedy(a, None, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_gpu_stacked_rows_match_their_streams_alone(checkpoint, model, backend):
    """Prompts of different lengths prefilled apart, stacked, decoded as one batch (the Triton backend's batch-3
    CUDA graph), a row dropped and a new one joined: each row's tokens are the reference's for its prompt alone,
    logits within 1e-4."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (700, 33, 1500, 9)]
    root = Session.open(checkpoint, backend=backend, device="cuda", dtype="fp32")
    forks = [root.fork() for _ in prompts[:3]]
    for f, p in zip(forks, prompts):
        f.prefill(p)
    batch = Session.stack(forks)
    tokens, logits = [], []
    for t in batch.generate(max_new_tokens=48):
        tokens.append(t)
        logits.append(batch.logits.float().cpu())
    tokens, logits = torch.stack(tokens, 1), torch.stack(logits, 1)
    for i, p in enumerate(prompts[:3]):
        want, want_logits, _ = greedy_by_hand(model, p, 48)
        assert tokens[i].tolist() == want, i
        assert rel_err(logits[i], want_logits) <= 1e-4, i
    late = root.fork()
    late.prefill(prompts[3])
    batch = Session.stack([batch.rows([2, 0]), late])
    got = torch.stack(list(batch.generate(max_new_tokens=16)), 1)
    for row, (i, before) in zip(got, [(2, tokens[2]), (0, tokens[0])]):
        assert before.tolist() + row.tolist() == greedy_by_hand(model, prompts[i], 64)[0], i
    assert got[2].tolist() == greedy_by_hand(model, prompts[3], 16)[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_gpu_triton_prefills_prompts_of_different_lengths_in_one_call(checkpoint, model, dtype):
    """The Triton backend's CUDA-graph prefill of rows of their own lengths: a 4096-token piece run as two halves
    on two streams (rows ending in either half, one going on into the next piece), then a 4-token piece. fp32: each
    row's greedy tokens are the reference's for its prompt alone, logits within 1e-4; fp16 (the fused memory path):
    the logits and state within 1e-2 of the row prefilled alone on the same backend, the same first token."""
    from memmamba_deploy.parity import state_view

    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (4100, 2000, 3000, 1)]
    s = Session.open(checkpoint, backend="triton", device="cuda", dtype=dtype)
    assert 4 * 4096 >= s.backend.SPLIT_TOKENS                       # the first piece runs as two halves
    logits = s.prefill(prompts).float().cpu()
    assert {k[:2] for k in s.backend._prefill_graphs} == {(4, 4096), (4, 4)}
    if dtype == "fp32":
        tokens = torch.stack(list(s.generate(max_new_tokens=16)), 1)
        for i, p in enumerate(prompts):
            want, want_logits, _ = greedy_by_hand(model, p, 16)
            assert rel_err(logits[i:i + 1], want_logits[:1]) <= 1e-4, i
            assert tokens[i].tolist() == want, i
        return
    state = state_view(s.backend, s.state)
    for i, p in enumerate(prompts):
        alone = s.fork()
        alone.reset()
        want = alone.prefill(p).float().cpu()
        assert rel_err(logits[i:i + 1], want) <= 1e-2 and logits[i].argmax() == want[0].argmax(), i
        for k, v in state_view(s.backend, alone.state).tensors().items():
            assert rel_err(state.tensors()[k][:, i:i + 1].float(), v.float()) <= 1e-2, (i, k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_keeps_decode_graphs_for_a_few_batch_sizes_and_states_survive_the_rest(checkpoint, model):
    """Rows leaving one by one take the batch through ten sizes: the backend keeps BATCH_SIZES_KEPT of them, and a
    state it held for a dropped size still decodes as the reference does."""
    prompts = [list(b"row %d: " % i) * (i + 1) for i in range(10)]
    root = Session.open(checkpoint, backend="triton", device="cuda", dtype="fp32")
    forks = [root.fork() for _ in prompts]
    for f, p in zip(forks, prompts):
        f.prefill(p)
    batch = Session.stack(forks)
    kept = batch.rows([0])                                           # batch 1, stepped once: its buffers filled
    kept.step(0)
    for n in range(10, 1, -1):                                       # sizes 10, 9, ..., 2
        batch = batch.rows(list(range(n)))
        batch.step(torch.zeros(n, dtype=torch.long))
    assert len(root.backend._buffers) == root.backend.BATCH_SIZES_KEPT
    assert 1 not in root.backend._buffers                            # kept's state outlives its buffer set
    assert greedy(kept, None, 8) == greedy_by_hand(model, prompts[0] + [0], 8)[0]
    # prefill buffers and graphs likewise: waves of 1, 2, 3 prompts with 2 sizes kept drop batch 1's, which then
    # captures again and prefills as the reference
    backend = Session.open(checkpoint, backend="triton", device="cuda", dtype="fp32").backend
    backend.BATCH_SIZES_KEPT = 2
    for n in (1, 2, 3):
        Session(backend).prefill(prompts[:n])
    assert list(backend._prefill_io) == [2, 3] and {k[0] for k in backend._prefill_graphs} == {2, 3}
    again = Session(backend)
    again.prefill(prompts[0])
    assert greedy(again, None, 8) == greedy_by_hand(model, prompts[0], 8)[0]
    assert list(backend._prefill_io) == [3, 1]


def test_batch_is_the_sessions_only_once_a_call_succeeds(checkpoint):
    s = Session.open(checkpoint, device="cpu")
    with pytest.raises(ValueError, match="batch, T >= 1"):
        s.prefill(torch.zeros(0, 3, dtype=torch.long))
    s.generate([[1], [2]], 3)                                       # never iterated: no backend call made
    assert s.batch_size is None and s.prefill([1, 2]).shape == (1, 256)
    with pytest.raises(ValueError, match="decodes 1 row"):
        s.prefill([[1], [2]])


@pytest.mark.parametrize("bad", [dict(top_k=2.5), dict(top_k=True), dict(seed="x"), dict(seed=1.5), dict(stop=5),
                                 dict(stop="ab"), dict(temperature=float("nan")), dict(top_p=float("nan"))])
def test_generate_checks_every_setting_before_consuming_the_prompt(checkpoint, bad):
    s = Session.open(checkpoint, device="cpu")
    with pytest.raises(ValueError, match="bad sampling settings: " + next(iter(bad))):
        s.generate(PROMPT, 3, **{"temperature": 1.0, **bad})
    assert s.state is None                                          # nothing consumed: a retry starts clean


def test_a_tiny_temperature_samples_the_argmax(checkpoint, model):
    s = Session.open(checkpoint, device="cpu")
    tokens = [int(t) for t in s.generate(PROMPT, 4, temperature=1e-40, seed=0)]
    assert tokens == greedy_by_hand(model, PROMPT, 4)[0]


def test_returned_logits_and_tokens_are_copies(checkpoint):
    """A caller that edits what it got (a logits processor masking in place) does not steer the session."""
    s, t = Session.open(checkpoint, device="cpu"), Session.open(checkpoint, device="cpu")
    edited = s.prefill(PROMPT)
    t.prefill(PROMPT)
    edited[:] = 0
    s.logits[:] = 0
    assert int(next(s.generate(None, 1))) == int(next(t.generate(None, 1)))
    a, b = s.generate(None, 3), t.generate(None, 3)
    first = next(a)
    next(b)
    first[0] = 7                                                    # not what the session feeds back
    assert torch.equal(next(a), next(b))


def test_decode_takes_one_byte_sequence(checkpoint, tmp_path):
    s = Session.open(checkpoint, device="cpu")
    assert s.decode([104, 105]) == s.decode(torch.tensor([[104, 105]])) == "hi"
    with pytest.raises(ValueError, match="one sequence"):
        s.decode(torch.tensor([[104, 105], [106, 107]]))
    save_pretrained(make_model(0, vocab_size=300), tmp_path / "v300")
    with pytest.raises(ValueError, match="300 tokens, not 256 bytes"):
        Session.open(tmp_path / "v300", device="cpu").decode([104])


def test_unknown_backend_options_are_named(checkpoint, export_dir):
    with pytest.raises(ValueError, match=r"backend 'torch' takes no option\(s\) \['bogus'\]"):
        Session.open(checkpoint, device="cpu", bogus=1)
    with pytest.raises(ValueError, match=r"backend 'onnxruntime' takes no option\(s\) \['bogus'\]; .*threads"):
        Session.open(export_dir, backend="ort", bogus=1)
    assert Session.open(export_dir, backend="ort", device="cpu:0", threads=1).prefill(PROMPT).shape == (1, 256)


def test_torch_backend_checks_token_ids_as_onnxruntime_does(checkpoint):
    b = open_backend(checkpoint, device="cpu")
    state = b.new_state(1)
    for ids, message in ((torch.tensor([1.9]), "dtype torch.float32"), (torch.tensor([300]), "token id 300"),
                         (torch.tensor([[1, 2]]), "shape")):
        with pytest.raises(ValueError, match=message):
            b.step(ids, state)
    with pytest.raises(ValueError, match="batch must be a positive integer"):
        b.new_state(0)
    with pytest.raises(ValueError, match="token id -1"):
        b.prefill(torch.tensor([[1, -1]]), state)
    assert torch.equal(b.step(torch.tensor([[3]]), state)[0], b.step(torch.tensor([3]), state)[0])


def test_common_input_forms_are_taken(checkpoint, model):
    """What callers hand in: a generator or a tensor of stop ids (read once), one-element tensor settings, a
    stacked batch-1 stream to decode, uint16 token arrays, a numpy batch size."""
    import numpy as np

    first = greedy_by_hand(model, PROMPT, 1)[0][0]
    for stop in ((t for t in [first]), torch.tensor([first]), np.array([first])):
        assert len(list(Session.open(checkpoint, device="cpu").generate(PROMPT, 6, stop=stop))) == 1
    s = Session.open(checkpoint, device="cpu")
    stream = torch.stack(list(s.generate(PROMPT, 3, temperature=torch.tensor(1.0), seed=np.int64(3))))  # [T, 1]
    assert s.decode(stream) == s.decode(stream[:, 0]) and len(stream) == 3
    b = open_backend(checkpoint, device="cpu")
    ids = np.array([PROMPT[:4], PROMPT[4:8]], dtype=np.uint16)
    logits, _ = b.prefill(ids, b.new_state(np.int64(2)))
    assert torch.equal(logits, b.prefill(torch.tensor(ids.astype(np.int64)), b.new_state(2))[0])
