"""Session: one stream of generation over any backend, holding its own fixed-size recurrent state.

    from memmamba_deploy.session import Session

    s = Session.open("memmamba_deploy/assets/demo-memmamba")        # a checkpoint: PyTorch reference
    s = Session.open("runs/demo/export", backend="onnxruntime")      # an export (manifest.json; `memdeploy demo`)
    text = s.text_stream()                                           # UTF-8 that may split a character
    for token in s.generate("Once upon a time", max_new_tokens=64):  # text: byte-level models (vocab 256) only
        print(text.decode(bytes([int(token)])), end="", flush=True)
    branch = s.fork()                                                # an independent copy of the state
    branch.prefill([ids_a, ids_b, "text"])    # prompts of any lengths as one batch's rows, each its own stream
    batch = Session.stack([branch, c])  # rows of sessions of one backend (c: a fork prefilled apart) as one batch
    batch = batch.rows([1])             # the rows that go on (continuous batching; beams: rows([0, 0, 1]))

Prompts are token ids ([T], [B, T], a list, or a tensor), or a list of prompts of different lengths (one row each);
a `str` is encoded as UTF-8 bytes, which is the tokenisation of byte-level models (vocab 256) and an error for any
other vocabulary.

Backends are opened by name through BACKENDS, each imported only when asked for, so a missing runtime (no
onnxruntime, no TensorRT, no CUDA) is one clear error naming what to install, not an import failure at start-up.
Sessions never share state: every Session owns its own, and fork() copies it. Backends whose calls are not
re-entrant (they keep device buffers between calls) are called under a lock shared by the sessions using them.
"""
from __future__ import annotations

import codecs
import dataclasses
import functools
import hashlib
import importlib
import inspect
import itertools
import json
import threading
import weakref
from numbers import Integral
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from . import sampling
from .models.checkpoint import DTYPES_BY_NAME
from .models.memmamba import is_integer

CHECKPOINT, EXPORT = "checkpoint", "export"
ALIASES = {"ort": "onnxruntime", "trt": "tensorrt", "pytorch": "torch"}
DTYPES = {k: v for k, v in DTYPES_BY_NAME.items() if v != torch.float64}   # what the backends run
STATE_FORMAT, STATE_FORMAT_VERSION = "memmamba-session-state", 1          # Session.save_state's files
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------------------------------
# What a path holds
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Artifact:
    """A checkpoint directory (config.json + weights) or an export directory (manifest.json + graphs)."""

    kind: str                         # CHECKPOINT or EXPORT
    path: Path
    manifest: dict | None = None      # exports only
    checkpoint: Path | None = None    # the PyTorch weights: the path itself, or the copy an export carries


def inspect_path(path) -> Artifact:
    """Say whether `path` is a checkpoint or an export directory; a clear error when it is neither."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such directory: {path} (expected a checkpoint directory with config.json, or "
                                f"an export directory with manifest.json)")
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is a file; pass the directory that holds config.json (a checkpoint) or "
                                 f"manifest.json (an export)")
    manifest_file = path / "manifest.json"
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{manifest_file} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or "config" not in manifest:
            raise ValueError(f"{manifest_file} is not a memdeploy export manifest (it has no model config)")
        return Artifact(EXPORT, path, manifest, _carried_checkpoint(path, manifest))
    if (path / "config.json").is_file():
        return Artifact(CHECKPOINT, path, None, path)
    if (path / "model" / "config.json").is_file():
        raise ValueError(f"{path} has no config.json, but {path / 'model'} does: the checkpoint of a training run "
                         f"is its model/ folder")
    raise ValueError(f"{path} is neither a checkpoint directory (config.json + model.safetensors) nor an export "
                     f"directory (manifest.json from `memdeploy export`)")


def _carried_checkpoint(path: Path, manifest: dict) -> Path | None:
    """The copy of the source checkpoint an export keeps beside its graphs, if any (parity reads it too)."""
    named = manifest.get("reference") or manifest.get("checkpoint")
    if isinstance(named, dict):
        named = named.get("path") or named.get("dir")
    candidates = [path / named] if isinstance(named, str) else []
    candidates += [path / "checkpoint", path / "reference", path]
    for c in candidates:
        if (c / "config.json").is_file() and (c / "model.safetensors").is_file():
            return c
    return None


def config_of(artifact: Artifact):
    from .models import MemMambaConfig
    from .models.checkpoint import CheckpointError, _is_hf_mamba, hf_mamba_config

    if artifact.kind == EXPORT:
        try:
            return MemMambaConfig.from_dict(artifact.manifest["config"])
        except ValueError as e:
            raise ValueError(f"{artifact.path / 'manifest.json'}: {e}") from None
    raw = json.loads((artifact.path / "config.json").read_text())
    try:
        return hf_mamba_config(raw) if _is_hf_mamba(raw) else MemMambaConfig.from_dict(raw)
    except (ValueError, CheckpointError) as e:
        raise ValueError(f"{artifact.path / 'config.json'}: {e}") from None


def parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, fp16, bf16")
    return DTYPES[str(dtype).lower()]


# --------------------------------------------------------------------------------------------------------------
# Backend registry
# --------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BackendSpec:
    name: str
    needs: str            # the artifact it runs: CHECKPOINT or EXPORT
    reentrant: bool       # may one instance run calls from several threads at once?
    cuda_only: bool
    about: str
    opener: Callable[[Artifact, str | None, torch.dtype | None, dict], Any]


def _import(backend: str, module: str, attr: str, hint: str):
    try:
        mod = importlib.import_module(module, __package__)
    except ImportError as e:
        missing = getattr(e, "name", None)
        if missing and missing.startswith(__package__):        # our own module is not there yet
            raise ImportError(f"backend {backend!r} is not part of this installation ({missing} is missing)") from None
        raise ImportError(f"backend {backend!r} needs {hint}: {e}") from None
    return getattr(mod, attr)


def check_device(device) -> str:
    """`device` as a string once it names a CPU or a visible CUDA GPU ('cpu', 'cuda', 'cuda:1'); else ValueError."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: use cpu, cuda or cuda:N")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA GPU is visible to torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return str(device)


def _device(device: str | None, default: str) -> str:
    return check_device(device or default)


def _takes(fn, options: dict, backend: str, fixed=()) -> None:
    """ValueError naming the options `fn` does not take (`fixed`: those the opener passes itself)."""
    params = inspect.signature(fn).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    takes = [n for n in params if n not in ("cls", "self", *fixed)]
    unknown = sorted(set(options) - set(takes))
    if unknown:
        raise ValueError(f"backend {backend!r} takes no option(s) {unknown}; its options: {takes or 'none'}")


def _checkpoint_dtype(art: Artifact, dtype):
    """An export run by a checkpoint backend computes in the export's dtype unless told otherwise (its reference/
    weights are the fp32 originals; `memdeploy parity` runs them so too)."""
    if dtype is None and art.kind == EXPORT and art.manifest is not None:
        return parse_dtype(art.manifest.get("dtype", "fp32"))
    return dtype


def _open_torch(art: Artifact, device, dtype, options):
    from .backends import TorchBackend

    _takes(lambda kernels="torch": None, options, "torch")
    kernels = options.pop("kernels", "torch")
    device = _device(device, "cuda" if torch.cuda.is_available() else "cpu")
    return TorchBackend.open(art.checkpoint, device=device, dtype=_checkpoint_dtype(art, dtype), kernels=kernels)


def _open_triton(art: Artifact, device, dtype, options):
    cls = _import("triton", ".backends.triton_backend", "TritonBackend", "the triton package (pip install triton)")
    device = _device(device, "cuda")
    dtype = _checkpoint_dtype(art, dtype)
    if hasattr(cls, "open"):
        _takes(cls.open, options, "triton", fixed=("checkpoint", "device", "dtype"))
        return cls.open(art.checkpoint, device=device, dtype=dtype, **options)
    from .models import MemMambaLM
    return cls(MemMambaLM.from_pretrained(art.checkpoint, kernels="triton", device=device, dtype=dtype), **options)


def _export_dtype(art: Artifact, dtype):
    have = parse_dtype(art.manifest.get("dtype", "fp32"))
    if dtype is not None and dtype != have:
        from .export.exporter import DTYPES as EXPORT_DTYPES

        name = DTYPE_NAMES.get(dtype, str(dtype))
        fix = (f"needs `memdeploy export --dtype {name}`" if name in EXPORT_DTYPES else
               f"has no export (exports are {' or '.join(EXPORT_DTYPES)}); use the checkpoint with --backend torch or triton")
        raise ValueError(f"{art.path} holds an {DTYPE_NAMES.get(have, have)} export; --dtype {name} {fix}")


def _open_ort(art: Artifact, device, dtype, options):
    cls = _import("onnxruntime", ".backends.ort_backend", "OrtBackend", "onnxruntime (pip install onnxruntime, or "
                  "onnxruntime-gpu for CUDA)")
    _export_dtype(art, dtype)
    if device is not None and "providers" not in options:
        import onnxruntime

        if str(device).startswith("cuda"):
            if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
                raise ValueError("device 'cuda' with onnxruntime needs onnxruntime-gpu (CUDAExecutionProvider); this "
                                 "onnxruntime has " + ", ".join(onnxruntime.get_available_providers()))
            options["providers"] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        elif str(device).split(":")[0] == "cpu":
            options["providers"] = ["CPUExecutionProvider"]
        else:
            raise ValueError(f"unknown device {device!r} for onnxruntime: use cpu or cuda")
    _takes(cls.open, options, "onnxruntime", fixed=("out",))
    return cls.open(art.path, **options)


def _open_tensorrt(art: Artifact, device, dtype, options):
    cls = _import("tensorrt", ".backends.trt_backend", "TensorRTBackend", "TensorRT")
    _export_dtype(art, dtype)
    _takes(cls.open, options, "tensorrt", fixed=("out", "device"))
    return cls.open(art.path, device=_device(device, "cuda"), **options)


BACKENDS: dict[str, BackendSpec] = {s.name: s for s in (
    BackendSpec("torch", CHECKPOINT, True, False, "PyTorch reference (eager; kernels='torch')", _open_torch),
    BackendSpec("triton", CHECKPOINT, False, True, "Triton kernels, decode step in a CUDA graph", _open_triton),
    BackendSpec("onnxruntime", EXPORT, False, False, "ONNX Runtime over the exported graphs", _open_ort),
    BackendSpec("tensorrt", EXPORT, False, True, "TensorRT engines + memmamba plugins", _open_tensorrt),
)}


def backend_spec(name: str | None, path=None) -> BackendSpec:
    """The backend a name (or alias) stands for; None: default_backend(path)."""
    name = default_backend(path) if name is None else ALIASES.get(str(name).lower(), str(name).lower())
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list(BACKENDS)} (or {', '.join(ALIASES)})")
    return BACKENDS[name]


def default_backend(path) -> str:
    """The backend a path (or its inspect_path Artifact) runs on when none is named: ONNX Runtime for an export
    directory (what was exported, not the checkpoint copy it carries), PyTorch for a checkpoint."""
    art = path if isinstance(path, Artifact) else inspect_path(path)
    return "onnxruntime" if art.kind == EXPORT else "torch"


def open_backend(path, backend: str | None = None, device: str | None = None, dtype=None, **options):
    """Open `path` with the named backend (None: default_backend). Checks that the path holds what it runs."""
    art = inspect_path(path)
    spec = backend_spec(backend, art)
    if spec.needs == EXPORT and art.kind != EXPORT:
        raise ValueError(f"backend {spec.name!r} runs an export directory; {art.path} is a checkpoint: run "
                         f"`memdeploy export {art.path} -o OUT` and pass OUT")
    if spec.needs == CHECKPOINT and art.checkpoint is None:
        raise ValueError(f"backend {spec.name!r} runs a PyTorch checkpoint; {art.path} is an export directory that "
                         f"carries no copy of its checkpoint: pass the checkpoint directory")
    if spec.cuda_only and not torch.cuda.is_available():
        raise ValueError(f"backend {spec.name!r} needs a CUDA GPU and torch sees none; on CPU use 'torch' or "
                         f"'onnxruntime'")
    return spec.opener(art, device, parse_dtype(dtype), dict(options))


# --------------------------------------------------------------------------------------------------------------
# Session
# --------------------------------------------------------------------------------------------------------------
_LOCKS: "weakref.WeakKeyDictionary[Any, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _lock_for(backend) -> threading.Lock | None:
    """One lock per non-re-entrant backend instance, shared by every session that uses it."""
    name = str(getattr(backend, "name", ""))
    spec = BACKENDS.get(ALIASES.get(name, name))
    if spec is not None and spec.reentrant:
        return None
    with _LOCKS_GUARD:
        try:
            return _LOCKS.setdefault(backend, threading.Lock())
        except TypeError:                     # not weak-referenceable: forks still share this session's lock
            return threading.Lock()


@functools.lru_cache(maxsize=8)
def weights_fingerprint(file: str, size: int, mtime_ns: int) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes and bytes, in name order): two files of the
    same tensors agree, as a checkpoint and its export's reference/ do. Once a process per file version (size and
    mtime are part of the key), whichever sessions and forks ask."""
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(file, framework="pt") as f:
        for name in sorted(f.keys()):
            t = f.get_tensor(name).contiguous()
            h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _device_of(state) -> torch.device:
    """The device a backend's state (a State, a TritonState, a dict of tensors or of arrays) lives on."""
    inner = getattr(state, "state", state)
    values = inner.tensors().values() if hasattr(inner, "tensors") else \
        (inner.values() if isinstance(inner, dict) else [])
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


class Session:
    """One stream of tokens over a Backend. State is per session; fork() copies it. A session is used by one
    thread at a time; forks of it may run in other threads (they share the backend under a lock).

    Invariant: `_state` and `_logits` describe every token consumed so far; `_pending` is the last token that
    generate() yielded, which is consumed (fed to the model) only when the stream goes on, so a generation that
    stops costs no wasted step.
    """

    _ids = itertools.count()

    def __init__(self, backend, lock: threading.Lock | None = None):
        self.backend = backend
        self.config = backend.config
        self._lock = lock if lock is not None else _lock_for(backend)
        self._generator: torch.Generator | None = None     # the sampling stream, once a seed has been given
        self._weights: Artifact | None = None              # where the weights came from (Session.open), for
        self.reset()                                       # save_state's fingerprint

    @classmethod
    def open(cls, path, backend: str | None = None, device: str | None = None, dtype=None, **options) -> "Session":
        """path: a checkpoint directory (torch, triton) or an export directory (onnxruntime, tensorrt; torch
        and triton also accept an export that carries its checkpoint). backend None: onnxruntime for an export,
        torch for a checkpoint. options go to the backend."""
        session = cls(open_backend(path, backend, device, dtype, **options))
        session._weights = inspect_path(path)
        return session

    # ---- state ----------------------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every token: the next input starts from the empty state. (The sampling stream goes on: a seed
        given to generate() restarts it.)"""
        self._state = self._logits = self._pending = self._batch = None
        self._epoch = next(self._ids)

    def fork(self) -> "Session":
        """An independent session with a copy of this one's state (branches, beams, several streams)."""
        with self._locked():
            state = None if self._state is None else self.backend.copy_state(self._state)
        pending = None if self._pending is None else self._pending.clone()
        return self._derived(state, self._logits, pending, self._batch, self._generator_copy())

    # ---- rows: prompts of different lengths, continuous batching, beams --------------------------------------------
    @classmethod
    def stack(cls, sessions: Sequence["Session"]) -> "Session":
        """One session whose rows go on from the given sessions' rows, in order (copies: the sessions are left as
        they are). Prompts of different lengths start together with prefill(prompts); a row that finishes leaves
        with rows() and a new prompt, prefilled in a fork of one session, joins with stack(). The sessions
        must share one backend (forks of one session do) and have consumed tokens. Tokens generate() yielded last
        stay pending, fed first when the stack goes on (where only some sessions have one, theirs are fed now, in
        copies). The stack's sampling stream is a copy of the first session's (a batch going on keeps its draws)."""
        if isinstance(sessions, Session) or not isinstance(sessions, Sequence) or not sessions or not all(
                isinstance(s, Session) for s in sessions):
            raise ValueError(f"Session.stack takes a non-empty list of Sessions, got "
                             f"{type(sessions).__name__}{f' of {len(sessions)}' if isinstance(sessions, Sequence) else ''}")
        first = sessions[0]
        for i, s in enumerate(sessions):
            if s.backend is not first.backend:
                raise ValueError(f"sessions[{i}] runs on another backend object than sessions[0]: stack forks of one "
                                 f"session (Session.open once, then fork() a session per prompt)")
            if s._state is None:
                raise ValueError(f"sessions[{i}] has consumed no tokens: prefill its prompt before stacking it")
        if len({s._pending is None for s in sessions}) > 1:   # some pending, some not: feed theirs (in copies)
            sessions = [s if s._pending is None else s.fork() for s in sessions]
            for s in sessions:
                s._flush()
        batch = sum(s._batch for s in sessions)
        with first._locked():
            state = first._stacked_state([s._state for s in sessions])
        pending = None if sessions[0]._pending is None else torch.cat([s._pending for s in sessions])
        return first._derived(state, torch.cat([s._logits for s in sessions]), pending, batch,
                              sessions[0]._generator_copy())

    def rows(self, indices) -> "Session":
        """A session of these rows of this one, in the order given (a copy; a row may repeat): drop finished rows
        (rows([0, 2])), take one on alone (rows([i])), or reorder beams (rows([0, 0, 1])). Its sampling stream is a
        copy of this session's, as fork()'s."""
        if self._state is None:
            raise ValueError("this session has consumed no tokens: it has no rows yet")
        try:
            idx = torch.as_tensor(indices)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"rows() takes a list of row indices: {e}") from None
        if idx.dim() == 0:
            idx = idx[None]
        if idx.dim() != 1 or idx.numel() == 0 or not is_integer(idx):
            raise ValueError(f"rows() takes a non-empty list of integer row indices, got {indices!r}")
        idx = idx.long()
        bad = idx[(idx < 0) | (idx >= self._batch)]
        if bad.numel():
            raise ValueError(f"row {int(bad[0])} is outside this session's rows 0..{self._batch - 1}")
        with self._locked():
            state = self._row_state(self._reference(self._state), idx)
        pending = None if self._pending is None else self._pending[idx.to(self._pending.device)]
        return self._derived(state, self._logits[idx.to(self._logits.device)], pending, idx.numel(),
                             self._generator_copy())

    def _reference(self, state) -> dict:
        """A backend state's tensors in the reference layout, where the backend holds them (under the lock)."""
        from .parity import state_view

        return state_view(self.backend, state, device=None).tensors()

    def _row_state(self, ref, rows):
        """These rows (an index tensor or a slice) of a state's _reference tensors, as a backend state of their
        own (under the lock)."""
        from .models import State

        return self._backend_state(State(**{k: v[:, rows.to(v.device) if torch.is_tensor(rows) else rows]
                                           for k, v in ref.items()}))

    def _stacked_state(self, states):
        """The backend's states, of some rows each, one after another as one backend state (under the lock)."""
        from .models import State

        refs = [self._reference(s) for s in states]
        return self._backend_state(State(**{k: torch.cat([r[k] for r in refs], 1) for k in refs[0]}))

    def _backend_state(self, ref):
        """A reference State as the backend's own (under the lock). A backend without state_from_reference gets
        its new_state as the template, which also checks the batch against its limits (TensorRT's profile)."""
        from .parity import state_like

        template = None if hasattr(self.backend, "state_from_reference") else self.backend.new_state(ref.batch_size)
        return state_like(self.backend, ref, template)

    def _derived(self, state, logits, pending, batch: int | None, generator) -> "Session":
        """A new session on this one's backend and weights holding the given stream (logits copied)."""
        other = Session(self.backend, self._lock)
        other._state, other._pending, other._batch = state, pending, batch
        other._logits = None if logits is None else logits.clone()
        other._generator, other._weights = generator, self._weights
        return other

    def _generator_copy(self) -> torch.Generator | None:
        """The sampling stream, to draw the same tokens independently (None: torch's global generator)."""
        return None if self._generator is None else torch.Generator().set_state(self._generator.get_state())

    @property
    def state(self) -> Any:
        """The backend's state after every consumed token (None before the first); treat it as read-only."""
        return self._state

    def _weights_sha256(self) -> str | None:
        """weights_fingerprint of the weights the session was opened from, or None (a session made from a backend
        object; weights not in one safetensors file)."""
        if self._weights is None or self._weights.checkpoint is None:
            return None
        file = Path(self._weights.checkpoint) / "model.safetensors"
        if not file.is_file():
            return None
        stat = file.stat()
        return weights_fingerprint(str(file.resolve()), stat.st_size, stat.st_mtime_ns)

    def save_state(self, path) -> None:
        """Write the stream so far to a safetensors file: the recurrent state (models.State layout, the model's
        dtypes), the last logits, generate()'s pending token and the sampling stream (once a seed was given).
        load_state() on a session of the same model, on any backend, goes on from there as this session would.
        The file records the model's config and its weights' sha256; it appears whole or not at all.
        Like every Session method, not to be called while another thread uses the session."""
        from .models.checkpoint import save_safetensors, atomic_file
        from .parity import state_view

        if self._state is None:
            raise ValueError("nothing to save: this session has consumed no tokens")
        with self._locked():
            ref = state_view(self.backend, self._state)
        tensors = {f"state.{k}": v.contiguous() for k, v in ref.tensors().items()}
        tensors["logits"] = self._logits.float().cpu().contiguous()
        if self._pending is not None:
            tensors["pending"] = self._pending.long().cpu().contiguous()
        if self._generator is not None:
            tensors["sampling_rng"] = self._generator.get_state()
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"this session's {bad} hold NaN or infinite values: not saved")
        from . import __version__

        meta = {"format": STATE_FORMAT, "format_version": str(STATE_FORMAT_VERSION),
                "producer": f"memmamba-deploy {__version__}",
                "config": json.dumps(self.config.to_dict(), sort_keys=True)}
        digest = self._weights_sha256()
        if digest:
            meta["weights_sha256"] = digest
        with atomic_file(path) as tmp:
            save_safetensors(tensors, tmp, meta)

    def load_state(self, path) -> None:
        """Go on from a stream save_state() wrote (any backend, the same model): replaces this session's state,
        logits, pending token, batch and (where the file has one) sampling stream; generate() iterators of the old
        stream stop. Refuses, naming the problem, a file of another format or version, of another model (config,
        or weights where both sides know their sha256), or whose tensors do not fit."""
        from safetensors import SafetensorError, safe_open

        from .models import MemMambaConfig, State
        from .parity import state_like, state_view

        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory: give the session state file save_state() wrote")
        if not path.is_file():
            raise FileNotFoundError(f"no session state file at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{path} is not a readable session state file ({e})") from None
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a session state file (its metadata names format {meta.get('format')!r}, "
                             f"not {STATE_FORMAT!r})")
        if meta.get("format_version") != str(STATE_FORMAT_VERSION):
            raise ValueError(f"{path} is a session state file of format version {meta.get('format_version')!r} "
                             f"({meta.get('producer', 'unknown writer')}); this memmamba-deploy reads version "
                             f"{STATE_FORMAT_VERSION}")
        try:
            saved = MemMambaConfig.from_complete_dict(json.loads(meta.get("config", "")))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: its model config does not read ({e})") from None
        differ = saved.differences(self.config)
        if differ:
            raise ValueError(f"{path} holds the state of another model: {'; '.join(differ[:4])} (the file's vs "
                             f"this session's)")
        theirs, ours = meta.get("weights_sha256"), self._weights_sha256()
        if theirs and ours and theirs != ours:
            raise ValueError(f"{path} holds the state of a model with other weights (sha256 {theirs[:12]}..., "
                             f"this session's {ours[:12]}...): the same config, another checkpoint")
        fields = {k: tensors.get(f"state.{k}") for k in State.FIELDS}
        if fields["conv"] is None or fields["ssm"] is None:
            raise ValueError(f"{path} lacks the state tensors (state.conv, state.ssm)")
        ref = State(**fields)
        batch = ref.batch_size
        try:
            if ref.conv.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise ValueError(f"state.conv has dtype {ref.conv.dtype} (float32, float16 or bfloat16)")
            ref.check(self.config, batch)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        logits, pending, rng = tensors.get("logits"), tensors.get("pending"), tensors.get("sampling_rng")
        if logits is None or tuple(logits.shape) != (batch, self.config.vocab_size) or not logits.is_floating_point():
            raise ValueError(f"{path}: logits must be float [{batch}, {self.config.vocab_size}], got "
                             f"{None if logits is None else f'{list(logits.shape)} {logits.dtype}'}")
        bad = [k for k, v in {**ref.tensors(), "logits": logits}.items() if not bool(torch.isfinite(v).all())]
        if bad:
            raise ValueError(f"{path}: {bad} hold NaN or infinite values")
        if ref.prio is not None and not bool(((ref.prio >= 0) | (ref.prio == -1)).all()):
            raise ValueError(f"{path}: state.prio holds values that are neither scores (>= 0) nor -1 (an empty slot)")
        if pending is not None and (pending.dtype not in (torch.int32, torch.int64) or tuple(pending.shape) != (batch,)
                                    or not bool(((pending >= 0) & (pending < self.config.vocab_size)).all())):
            raise ValueError(f"{path}: the pending token must be [{batch}] integer ids in the vocabulary, got "
                             f"{list(pending.shape)} {pending.dtype}")
        generator = None
        if rng is not None:
            try:
                generator = torch.Generator().set_state(rng)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"{path}: its sampling stream does not read ({e})") from None
        with self._locked():
            state = self._backend_state(ref)
            landed = state_view(self.backend, state)          # in this session's dtypes (fp16: range 65504)
        bad = [k for k, v in landed.tensors().items() if not bool(torch.isfinite(v.float()).all())]
        if bad:
            raise ValueError(f"{path}: {bad} hold values past the range of this session's dtype (finite in the "
                             f"file): a state saved by a session of a wider dtype")
        self.reset()                            # a new epoch: iterators of the old stream stop
        self._state, self._batch = state, batch
        self._logits = logits.float().to(_device_of(state))    # where the backend's own logits would be
        self._pending = None if pending is None else pending.long()
        if generator is not None:
            self._generator = generator

    @property
    def logits(self) -> torch.Tensor | None:
        """Logits [B, vocab] after the last consumed token (a copy: editing it leaves the session as it was)."""
        return None if self._logits is None else self._logits.clone()

    @property
    def batch_size(self) -> int | None:
        return self._batch

    @property
    def state_nbytes(self) -> int:
        """Bytes of recurrent state this session holds (the same at every context length)."""
        with self._locked():
            state = self._state if self._state is not None else self.backend.new_state(self._batch or 1)
            return int(self.backend.state_nbytes(state))

    # ---- tokens in --------------------------------------------------------------------------------------------
    def prefill(self, ids) -> torch.Tensor:
        """Consume `ids` ([T] or [B, T] token ids, or text for byte-level models); returns the logits [B, vocab]
        of the last token (a copy). Resumes from the current state (multi-turn). Rows of different lengths (a
        list of id lists, 1-D tensors or texts) each go on from their own last token: one call where the backend
        takes rows of their own lengths (torch, triton, onnxruntime: `ragged_prefill`), a row at a time elsewhere
        (tensorrt, exports made before the prefill graph took lengths); each row's logits and state are its
        prompt's alone."""
        ids, lengths = self._as_prompts(ids)
        self._check_batch(ids.shape[0])
        ids, lengths = self._after_pending(ids, lengths)
        self._epoch = next(self._ids)
        with self._locked():
            state = self._state if self._state is not None else self.backend.new_state(ids.shape[0])
            self._logits, self._state = self._prefill_rows(ids, lengths, state)
        self._pending, self._batch = None, ids.shape[0]
        return self._logits.clone()

    def _prefill_rows(self, ids, lengths, state):
        """backend.prefill of rows with lengths [B] (None: every row is T long), under the lock. A backend without
        ragged_prefill prefills each row alone, its state cut out of the batch's and the rows put back together
        (as rows() and stack() do)."""
        if lengths is None:
            return self.backend.prefill(ids, state)
        if getattr(self.backend, "ragged_prefill", False):
            return self.backend.prefill(ids, state, lengths=lengths)
        ref, logits, rows = self._reference(state), [], []
        for b, n in enumerate(lengths.tolist()):
            row_logits, row = self.backend.prefill(ids[b:b + 1, :n], self._row_state(ref, slice(b, b + 1)))
            logits.append(row_logits)
            rows.append(row)
        return torch.cat(logits), self._stacked_state(rows)

    def step(self, token) -> torch.Tensor:
        """Consume one token per row (an int, [B] or [B, 1]); returns the logits [B, vocab] (a copy)."""
        token = self._as_tokens(token)
        self._check_batch(token.shape[0])
        self._flush()
        self._epoch = next(self._ids)
        with self._locked():
            state = self._state if self._state is not None else self.backend.new_state(token.shape[0])
            self._logits, self._state = self.backend.step(token, state)
        self._batch = token.shape[0]
        return self._logits.clone()

    def generate(self, prompt=None, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop: Sequence[int] = ()) -> Iterator[torch.Tensor]:
        """Stream up to max_new_tokens tokens ([B] each) after `prompt`; without a prompt, go on from the tokens
        already consumed. temperature 0 is greedy. The session follows the stream: afterwards it holds every
        yielded token, so generate/prefill/step continue the same text. Sampling is memmamba_deploy.sampling's.
        seed restarts this session's sampling stream (torch.Generator(seed)); seed=None goes on with it (or with
        torch's global generator, until a seed is given), so generate(8) draws what generate(4) twice does. Each
        token yielded takes one draw of the stream, and only those; fork() copies the stream. (The C++ Session
        draws from its own stream: the runtimes agree on greedy tokens, not on sampled ones.)
        Arguments are checked here, before the first token is asked for; each yielded token is a copy. A prompt of
        rows of different lengths (prefill's) has each row generate from its own end."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, Integral) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stop = sampling.check_settings(temperature, top_k, top_p, seed, stop)
        ids, lengths = (None, None) if prompt is None else self._as_prompts(prompt)
        if ids is None:
            self._flush()
            if self._logits is None:
                raise ValueError("generate() needs a prompt: this session has consumed no tokens yet")
            ids, follow = torch.zeros(self._batch, 1, dtype=torch.long), _Follow(self, resume=True)
        else:
            self._check_batch(ids.shape[0])
            ids, lengths = self._after_pending(ids, lengths)
            follow = _Follow(self, resume=False, lengths=lengths)
        with self._locked():
            state = self._state if self._state is not None else self.backend.new_state(ids.shape[0])
        if seed is not None:
            self._generator = torch.Generator().manual_seed(int(seed))
        return self._stream(sampling.generate(follow, ids, int(max_new_tokens), temperature, top_k, top_p, None,
                                              stop, state, generator=self._generator))

    def _stream(self, tokens: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
        for token in tokens:
            self._pending = token
            yield token.clone()                 # the session feeds its own copy back to the model

    # ---- text (byte-level models) -------------------------------------------------------------------------------
    @property
    def byte_level(self) -> bool:
        return self.config.vocab_size == 256

    def encode(self, text: str) -> torch.Tensor:
        """UTF-8 bytes as token ids [T] (byte-level models only)."""
        if not self.byte_level:
            raise ValueError(f"this model's vocabulary has {self.config.vocab_size} tokens, not 256 bytes: text "
                             f"cannot be encoded without its tokenizer; pass token ids")
        if not text:
            raise ValueError("empty prompt")
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids) -> str:
        """Token ids of one sequence ([T], [1, T], [T, 1] or an int) -> text (byte-level models; invalid UTF-8
        shows as U+FFFD)."""
        if not self.byte_level:
            raise ValueError(f"this model's vocabulary has {self.config.vocab_size} tokens, not 256 bytes: its ids "
                             f"cannot be decoded without its tokenizer")
        ids = torch.as_tensor(ids)
        if ids.dim() == 2 and 1 in ids.shape:                 # [1, T], or [T, 1]: a batch-1 stream stacked
            ids = ids.reshape(-1)
        if ids.dim() > 1:
            raise ValueError(f"decode takes one sequence ([T], [1, T] or [T, 1]), got shape {list(ids.shape)}: "
                             f"decode each sequence")
        ids = ids.reshape(-1).tolist()
        if any(not 0 <= int(i) < 256 for i in ids):
            raise ValueError(f"byte ids must lie in [0, 256), got {ids[:8]}")
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def text_stream(self) -> "codecs.IncrementalDecoder":
        """An incremental UTF-8 decoder for streaming bytes that may split a character."""
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    # ---- internals ------------------------------------------------------------------------------------------------
    def _locked(self):
        return self._lock if self._lock is not None else _NoLock

    def _as_prompts(self, ids) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts as (ids [B, T], lengths [B] or None where every row is T long): _as_ids's forms, or a list of
        rows (id lists, 1-D tensors, texts) of different lengths, padded with 0 after each row's end."""
        def is_row(r):
            return isinstance(r, (str, Sequence)) or (isinstance(r, (torch.Tensor, np.ndarray)) and r.ndim >= 1)

        if isinstance(ids, np.ndarray) and ids.dtype == object:      # numpy's way to hold rows of other lengths
            ids = [list(r) if isinstance(r, np.ndarray) else r for r in ids]
        if isinstance(ids, str) or not isinstance(ids, Sequence) or not ids:
            return self._as_ids(ids), None
        rowlike = [is_row(r) for r in ids]
        if not all(rowlike):
            if any(rowlike):
                raise ValueError(f"prompts[{rowlike.index(not rowlike[0])}] is "
                                 f"{'a row' if not rowlike[0] else 'not a row'} where prompts[0] is "
                                 f"{'a row' if rowlike[0] else 'a token id'}: give one prompt's token ids, or a list "
                                 f"of prompts")
            return self._as_ids(ids), None
        rows = []
        for i, r in enumerate(ids):
            if len(r) == 0:
                raise ValueError(f"prompts[{i}] is empty")
            try:
                rows.append(self._as_ids(r))
            except ValueError as e:
                raise ValueError(f"prompts[{i}]: {e}") from None
            if rows[-1].shape[0] != 1:
                raise ValueError(f"prompts[{i}] must be one row ([T] token ids or a text), got shape "
                                 f"{list(rows[-1].shape)}")
        lengths = torch.tensor([r.shape[1] for r in rows])
        if (lengths == lengths[0]).all():
            return torch.cat(rows), None
        out = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for b, r in enumerate(rows):
            out[b, :r.shape[1]] = r[0]
        return out, lengths

    def _after_pending(self, ids, lengths):
        """ids [B, T] (and lengths) with the token generate() yielded last, if pending, first in each row."""
        if self._pending is None:
            return ids, lengths
        return torch.cat([self._pending[:, None], ids], 1), None if lengths is None else lengths + 1

    def _as_ids(self, ids) -> torch.Tensor:
        if isinstance(ids, str):
            ids = self.encode(ids)
        try:
            ids = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"token ids must be integers ([T] or [batch, T]): {e}") from None
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or 0 in ids.shape:
            raise ValueError(f"token ids must be [T] or [batch, T] with batch, T >= 1, got shape {list(ids.shape)}")
        if not is_integer(ids):
            raise ValueError(f"token ids must be integers, got dtype {ids.dtype}")
        ids = ids.long()                                      # first: torch has no min/max for uint16 / uint32
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}), got "
                             f"{int(ids.min())}..{int(ids.max())}")
        return ids.cpu()

    def _as_tokens(self, token) -> torch.Tensor:
        """One token per row: an int, [B] or [B, 1] -> [B]."""
        t = torch.as_tensor(token)
        if t.dim() == 0:
            t = t[None]
        if t.dim() == 2 and t.shape[1] == 1:
            t = t[:, 0]
        if t.dim() != 1:
            raise ValueError(f"step() takes one token per row ([batch] or [batch, 1]), got shape {list(t.shape)}")
        return self._as_ids(t[:, None])[:, 0]

    def _check_batch(self, batch: int) -> None:
        # the batch is the session's once a backend call has succeeded with it (prefill, step, _Follow.prefill)
        if self._batch is not None and batch != self._batch:
            raise ValueError(f"this session decodes {self._batch} row(s); got {batch} (reset() or load_state() to "
                             f"change the batch)")

    def _flush(self) -> None:
        """Consume the token generate() yielded last, if the stream goes on."""
        if self._pending is not None:
            token, self._pending = self._pending, None
            with self._locked():
                self._logits, self._state = self.backend.step(token, self._state)

    def __repr__(self) -> str:
        return (f"Session(backend={getattr(self.backend, 'name', type(self.backend).__name__)!r}, "
                f"batch={self._batch}, vocab={self.config.vocab_size})")


class _NoLockType:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_NoLock = _NoLockType()


class _Follow:
    """The backend as sampling.generate sees it from a Session: every call goes through the session's lock and
    leaves the session holding the newest logits and state. With resume=True the first prefill hands back what
    the session already holds (its tokens were consumed earlier), so generation continues without recomputing.
    lengths: the prompt's rows' own lengths (Session._prefill_rows), or None."""

    def __init__(self, session: Session, resume: bool, lengths=None):
        self.session, self.resume, self.lengths = session, resume, lengths
        self.name, self.config = getattr(session.backend, "name", "?"), session.config
        session._epoch = self.epoch = next(Session._ids)

    def check(self) -> None:
        if self.session._epoch != self.epoch:
            raise RuntimeError("this generate() stream was overtaken by a later prefill/step/generate/reset/"
                               "load_state on the same session; start a new generate() (or fork() first for parallel "
                               "streams)")

    def new_state(self, batch):
        with self.session._locked():
            return self.session.backend.new_state(batch)

    def prefill(self, ids, state):
        self.check()
        s = self.session
        if self.resume:
            self.resume = False
            return s._logits, s._state
        with s._locked():
            s._logits, s._state = s._prefill_rows(ids, self.lengths, state)
        s._pending, s._batch = None, ids.shape[0]
        return s._logits, s._state

    def step(self, token, state):
        self.check()
        s = self.session
        with s._locked():
            s._logits, s._state = s.backend.step(token, state)
        s._pending = None
        return s._logits, s._state
