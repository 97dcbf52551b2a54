"""Passkey retrieval accuracy of any backend (issue 8): a 5-digit key hidden in repeated filler, asked for at the end.

Each prompt is exactly `length` bytes (models/data.py passkey_prompt: seeded by (seed, length, index), the key at a
random depth). The backend prefills it in chunks (a resumable prefill is exact, and it bounds memory), then decodes
greedily with sampling.generate; a sample counts when the decoded bytes equal the key exactly.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Callable

import numpy as np
import torch

from .models.data import KEY_DIGITS, passkey_min_length, passkey_prompt
from .sampling import generate

_LENGTH = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_lengths(text: str, what: str = "length") -> list[int]:
    """'1k,4k,16k,64k' -> [1024, 4096, 16384, 65536] (k = 1024, m = 1024², plain numbers are tokens; empty
    parts are skipped). The one parser of token counts (`eval passkey --lengths`, `bench --contexts`)."""
    out = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        m = _LENGTH.match(part)
        if not m:
            raise ValueError(f"bad {what} {part!r}: write a token count like 1000, 4k or 1m")
        n = float(m.group(1)) * {"": 1, "k": 1024, "m": 1024 ** 2}[m.group(2).lower()]
        if n != int(n) or n < 1:
            raise ValueError(f"bad {what} {part!r}: not a whole number of tokens")
        out.append(int(n))
    if not out:
        raise ValueError(f"no {what}s given")
    return out


def format_length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 and n >= 1024 else str(n)


@dataclasses.dataclass
class PasskeyResult:
    length: int
    samples: int
    correct: int
    digit_accuracy: float     # share of key digits decoded right, position by position
    seconds: float
    predictions: list[dict]   # per sample: key, answer, depth

    @property
    def accuracy(self) -> float:
        return self.correct / self.samples if self.samples else 0.0

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "accuracy": self.accuracy}


def _answer_text(tokens: list[int]) -> str:
    return "".join(chr(t) if 32 <= t < 127 else f"\\x{t:02x}" for t in tokens)


def check_passkey_run(backend, lengths: list[int], samples: int, batch: int, chunk: int, name: str = "") -> None:
    """What evaluate_passkey needs, checked before any prompt runs: a byte-level model, lengths that hold a
    passkey sample, and positive counts."""
    if backend.config.vocab_size != 256:
        raise ValueError(f"passkey prompts are bytes: {name or 'the model'}'s vocabulary has "
                         f"{backend.config.vocab_size} tokens, not 256 bytes (a byte-level model's); without its "
                         f"tokenizer the prompts mean nothing to it")
    shortest = passkey_min_length(with_answer=False)
    short = [format_length(n) for n in lengths if n < shortest]
    if short:
        raise ValueError(f"length(s) {', '.join(short)} too short for a passkey sample (needs >= {shortest} tokens)")
    settings = (("samples", samples), ("batch", batch), ("chunk", chunk))
    bad = [f"--{k} must be >= 1, got {v}" for k, v in settings if v < 1]
    if bad:
        raise ValueError("; ".join(bad))


def evaluate_passkey(backend, lengths: list[int], samples: int = 5, seed: int = 0, batch: int = 4,
                     chunk: int = 4096, on_tokens: Callable[[int], None] | None = None) -> list[PasskeyResult]:
    """Accuracy per length for `backend` (any Backend: new_state, prefill, step). on_tokens(n) is called as
    prompt tokens are consumed (for a progress bar). The model must be byte-level (vocab_size 256): the prompts
    are UTF-8 bytes, meaningless as ids of another tokenizer's vocabulary."""
    check_passkey_run(backend, lengths, samples, batch, chunk)
    results = []
    for length in lengths:
        t0 = time.perf_counter()
        prompts = [passkey_prompt(length, seed, i) for i in range(samples)]
        predictions, digits_right = [], 0
        for start in range(0, samples, batch):
            group = prompts[start:start + batch]
            ids = torch.from_numpy(np.stack([p.ids for p in group])).long()
            state = backend.new_state(len(group))
            cut = ((length - 1) // chunk) * chunk                  # prefill all but the last chunk here ...
            for s in range(0, cut, chunk):
                _, state = backend.prefill(ids[:, s:s + chunk], state)
                if on_tokens:
                    on_tokens(ids[:, s:s + chunk].numel())
            answer = torch.stack(list(generate(backend, ids[:, cut:], KEY_DIGITS, state=state, finite=False)),
                                 1)                                # ... the rest; a NaN row answers wrong, no more
            if on_tokens:
                on_tokens(ids[:, cut:].numel())
            for p, row in zip(group, answer.tolist()):
                text = _answer_text(row)
                digits_right += sum(a == b for a, b in zip(text, p.key))
                predictions.append({"key": p.key, "answer": text, "depth": round(p.key_pos / length, 3)})
        results.append(PasskeyResult(length, samples, sum(p["key"] == p["answer"] for p in predictions),
                                     digits_right / (samples * KEY_DIGITS), time.perf_counter() - t0, predictions))
    return results
