"""Byte-level training data: synthetic passkey retrieval mixed with text that ships with Python itself.

Passkey sample (one row, exactly `length` bytes; vocab 256 = bytes):

    <filler ...> The pass key is 71432. Remember it. <filler ...> What is the pass key? The pass key is 71432.

The filler is one short paragraph repeated, so it is predictable: a Note Block can learn to score it low, and a
fixed-size pool then keeps the key at any length (the pool holds the K highest-scoring tokens, spec §3). The key
appears once; the question is at the end; `prompt` stops right after "The pass key is " so a model answers it.

Every batch is a pure function of (seed, step): a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
import sysconfig
from pathlib import Path

import numpy as np
import torch

FILLER_SENTENCES = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ",
                    "There and back again. ")
KEY_INTRO, KEY_OUTRO = "The pass key is ", ". Remember it. "
QUESTION = "What is the pass key? The pass key is "
KEY_DIGITS = 5
ANSWER_END = "."   # trained after the key so a model learns where the answer stops


@dataclasses.dataclass
class PasskeySample:
    ids: np.ndarray          # uint8 [n] the prompt, ending with QUESTION (plus the answer when with_answer)
    key: str                 # the digits
    key_pos: int             # index of the key's first digit in ids
    answer_pos: int          # index where the answer starts (== len(prompt))


def _filler(n_sentences: int, start: int = 0) -> str:
    return "".join(FILLER_SENTENCES[(start + i) % len(FILLER_SENTENCES)] for i in range(n_sentences))


def passkey_min_length(with_answer: bool = True) -> int:
    """The shortest passkey row: the key sentence and the question (and the answer), no filler."""
    return len(KEY_INTRO + "0" * KEY_DIGITS + KEY_OUTRO) + len(QUESTION) + (KEY_DIGITS + len(ANSWER_END)
                                                                             if with_answer else 0)


def passkey_sample(rng: np.random.Generator, length: int, with_answer: bool = False, key: str | None = None,
                   depth: float | None = None, key_before: int | None = None) -> PasskeySample:
    """A passkey row of exactly `length` bytes (the prompt; + answer and "." when with_answer).

    depth in [0, 1]: where the key sits in the filler, 0 = start, 1 = just before the question (None: uniform).
    key_before: the key sentence must end before this index (used to place a training split after the key). The
    filler is one continuous stream of the repeated paragraph with the key sentence inserted at a sentence boundary;
    the stream starts at a random phase so the row is exactly `length` bytes.
    """
    key = key if key is not None else "".join(str(d) for d in rng.integers(0, 10, KEY_DIGITS))
    if len(key) != KEY_DIGITS or not key.isdigit():
        raise ValueError(f"a pass key is {KEY_DIGITS} digits, got {key!r}")
    key_sentence = KEY_INTRO + key + KEY_OUTRO
    tail = QUESTION + (key + ANSWER_END if with_answer else "")
    filler_total = length - len(key_sentence) - len(tail)
    if filler_total < 0:
        raise ValueError(f"length {length} is too short for a passkey sample (needs >= {length - filler_total})")
    depth = rng.uniform() if depth is None else depth
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1], got {depth}")
    # The filler after the key is whole sentences (so the question starts a sentence); the filler before the key
    # takes the remaining bytes as the tail of the stream, which ends where the key sentence begins.
    phase = int(rng.integers(0, len(FILLER_SENTENCES)))            # sentence that follows the key
    post_target = (1.0 - depth) * filler_total
    need = 0 if key_before is None else length - len(tail) - key_before  # filler bytes that must follow the key
    post, n_post = "", 0
    while True:
        nxt = FILLER_SENTENCES[(phase + n_post) % len(FILLER_SENTENCES)]
        if len(post) + len(nxt) > filler_total or (len(post) >= need and len(post) + len(nxt) > post_target):
            break
        post += nxt
        n_post += 1
    if len(post) < need:
        raise ValueError(f"cannot place the key before index {key_before} in a {length}-byte sample")
    n_pre = filler_total - len(post)
    cycles = n_pre // len(_filler(len(FILLER_SENTENCES))) + 2
    stream = _filler(cycles * len(FILLER_SENTENCES), start=phase)  # ends just before sentence `phase`
    pre = stream[len(stream) - n_pre:] if n_pre else ""
    text = pre + key_sentence + post + tail
    assert len(text) == length, (len(text), length)
    answer_pos = length - (len(key) + len(ANSWER_END) if with_answer else 0)
    return PasskeySample(np.frombuffer(text.encode("ascii"), dtype=np.uint8).copy(), key,
                         len(pre) + len(KEY_INTRO), answer_pos)


def passkey_prompt(length: int, seed: int, index: int = 0) -> PasskeySample:
    """The evaluation prompt number `index` of the given length: seeded, `length` bytes, ending with QUESTION."""
    return passkey_sample(np.random.default_rng([seed, length, index]), length)


# ---- text that ships with Python ------------------------------------------------------------------------------
def stdlib_text(max_bytes: int = 16 << 20, root: str | Path | None = None) -> bytes:
    """Python's own standard-library sources (docstrings and code; pydoc_data holds the docs' text), read from disk
    in sorted order up to max_bytes. No download: every Python install has them. Test suites and installed
    packages (site-packages) are skipped."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"no text directory at {root}")
    parts, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(p in ("site-packages", "dist-packages", "test", "tests", "idle_test") for p in rel):
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if b"\0" in data:
            continue
        parts.append(data + b"\n\n")
        total += len(parts[-1])
        if total >= max_bytes:
            break
    text = b"".join(parts)[:max_bytes]
    if len(text) < 1 << 16:
        raise FileNotFoundError(f"found only {len(text)} bytes of Python sources under {root}; pass --text-dir, or "
                                f"--text-fraction 0 to train on passkey data alone")
    return text


# ---- batches ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
    """One training batch. ids [B,T]; weight [B,T-1] is the loss weight of predicting ids[:, 1:];
    note_target [B,T] is 1 on the key's digits (0 elsewhere) and note_mask [B,T] says where it applies (passkey
    rows up to the answer); partner [B] pairs passkey rows that share everything but the key (a text row is its
    own partner); split is the position at which the training step may swap the recurrent state of partners
    (None: no swap)."""

    ids: torch.Tensor
    weight: torch.Tensor
    note_target: torch.Tensor
    note_mask: torch.Tensor
    partner: torch.Tensor
    split: int | None

    def to(self, device) -> "Batch":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def make_batch(seed: int, step: int, batch: int, length: int, text: bytes | None, text_fraction: float,
               answer_weight: float, swap_fraction: float) -> Batch:
    """The batch of `step`: rows of passkey samples (in pairs) and text windows, a pure function of its arguments.

    With probability swap_fraction the batch gets a split point; its passkey pairs then hold their keys before
    the split and differ only in the key's digits, so a training step can swap their SSM states there."""
    rng = np.random.default_rng([seed, step])
    n_text = int(round(batch * text_fraction)) if text else 0
    n_pass = batch - n_text
    n_pass -= n_pass % 2                                           # passkey rows come in pairs
    n_text = batch - n_pass
    tail = len(QUESTION) + KEY_DIGITS + len(ANSWER_END)
    key_len = len(KEY_INTRO) + KEY_DIGITS + len(KEY_OUTRO)
    split = None
    if n_pass and rng.uniform() < swap_fraction and length - tail > key_len + 1 + max(map(len, FILLER_SENTENCES)):
        # the key ends before the split, the question after it (+ one sentence of slack for whole-sentence filler)
        split = int(rng.integers(key_len + 1 + max(map(len, FILLER_SENTENCES)), length - tail + 1))
    ids = np.zeros((batch, length), dtype=np.int64)
    weight = np.ones((batch, length - 1), dtype=np.float32)
    note_target = np.zeros((batch, length), dtype=np.float32)
    note_mask = np.zeros((batch, length), dtype=np.float32)
    partner = np.arange(batch)
    for r in range(0, n_pass, 2):
        first = int(rng.integers(0, 10 ** KEY_DIGITS))            # two different keys ...
        second = (first + int(rng.integers(1, 10 ** KEY_DIGITS))) % 10 ** KEY_DIGITS
        layout = rng.bit_generator.state                           # ... in the same layout and filler
        for j, key in enumerate((f"{first:0{KEY_DIGITS}d}", f"{second:0{KEY_DIGITS}d}")):
            rng.bit_generator.state = layout
            s = passkey_sample(rng, length, with_answer=True, key=key, key_before=split)
            ids[r + j] = s.ids
            weight[r + j, s.answer_pos - 1:s.answer_pos - 1 + KEY_DIGITS] = answer_weight
            note_target[r + j, s.key_pos:s.key_pos + KEY_DIGITS] = 1.0
            note_mask[r + j, :s.answer_pos] = 1.0                 # the answer repeats the key: no target there
        partner[r], partner[r + 1] = r + 1, r
    for r in range(n_pass, batch):
        start = int(rng.integers(0, len(text) - length))
        ids[r] = np.frombuffer(text, dtype=np.uint8, count=length, offset=start)
    return Batch(torch.from_numpy(ids), torch.from_numpy(weight), torch.from_numpy(note_target),
                 torch.from_numpy(note_mask), torch.from_numpy(partner), split)
