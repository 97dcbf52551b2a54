"""Checkpoints: `config.json` + `model.safetensors`, written atomically; import of Hugging Face Mamba.

Every failure names the problem (missing file, corrupt file, unknown architecture, a tensor of the wrong shape).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import ARCHITECTURE, MemMambaConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: the message says which file and why."""


@contextmanager
def atomic_directory(target, force: bool = True):
    """Yield a temporary directory beside `target`; on success it takes `target`'s place.

    A new `target` appears in one rename. An existing one is first moved aside (one rename), then the new one
    renamed in; if that fails the old one is moved back, so readers see the old or the new directory, never a
    mix. On any exception the temporary directory is removed and `target` is left as it was. With force=False an
    existing non-empty `target` is refused before anything is written. The result gets the modes a plain mkdir /
    open would give (temporary directories are created 0700)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    if not force and target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty (use --force to overwrite)")
    creatable_dir(target.parent, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    except OSError as e:                    # e.g. a read-only or virtual file system: name the target, not the temp
        raise OSError(f"cannot create {target}: {e.strerror} (in {target.parent})") from None
    try:
        yield tmp
        usual_permissions(tmp)
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:
                os.replace(old / "x", target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def usual_permissions(path: Path) -> None:
    """Give `path` (and what is under it) the modes a plain mkdir / open would: umask applies."""
    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def creatable_dir(path, target=None) -> Path:
    """Check before a long run that directory `path` exists or can be made: every existing part of it must be a
    directory, and the deepest existing one must take a new entry (probed with a temporary directory, removed at
    once). Raises an OSError naming the part at fault, and `target` (default: `path`) as what was to be written."""
    path = Path(path)
    target = path if target is None else target
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "" if probe == path else f" (a part of {path})"
        raise NotADirectoryError(f"{probe}{what} is a file, not a directory")
    try:                                    # the one test that holds for root and for virtual file systems too
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=probe))
    except OSError as e:
        raise OSError(f"cannot write {target}: {e.strerror} (in {probe})") from None
    return path


def writable_file(path) -> Path:
    """Check before a long run that `path` can be written: an existing directory, a missing parent or a parent
    that is a file is an error now, not after the work."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory: give a file name")
    probe = path.parent
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotADirectoryError(f"{probe} is a file, not a directory: give another path for {path.name}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} does not exist: create it first, or give another path for {path.name}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {path}: {path.parent} is not writable")
    return path


@contextmanager
def atomic_file(path):
    """Yield a temporary path beside `path` (same suffix, for writers that look at it); on success it replaces
    `path` in one rename with the usual modes, on any exception it is removed and `path` is left as it was."""
    path = writable_file(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.tmp-", suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise OSError(f"cannot write {path}: {e.strerror} (in {path.parent})") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        usual_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path, data) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def save_pretrained(model, directory, force: bool = True) -> None:
    from safetensors.torch import save_file

    with atomic_directory(directory, force=force) as tmp:
        (tmp / CONFIG_NAME).write_text(model.config.to_json())
        tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "architecture": ARCHITECTURE})


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return d


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"missing {path.name} in {path.parent}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or not a safetensors file: {e}") from None


def _is_hf_mamba(cfg: dict) -> bool:
    return cfg.get("model_type") == "mamba" or "MambaForCausalLM" in (cfg.get("architectures") or [])


def load_pretrained(directory, kernels: str = "torch", device=None, dtype=None):
    """Load a memmamba-deploy checkpoint, or a Hugging Face `MambaForCausalLM` one (as memory=False)."""
    from .memmamba import MemMambaLM
    from .ops import check_kernels_on

    if device is not None:                  # else the caller may still move the model (kernels_for guards then)
        check_kernels_on(kernels, device)
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    raw = _read_json(directory / CONFIG_NAME)
    if _is_hf_mamba(raw):
        config, tensors = hf_mamba_config(raw), hf_mamba_tensors(directory, raw)
    else:
        if "architecture" not in raw:
            raise CheckpointError(f"{directory / CONFIG_NAME}: unknown architecture (no 'architecture' key, and not "
                                  f"a Hugging Face Mamba config); expected architecture {ARCHITECTURE!r}")
        try:
            config = MemMambaConfig.from_dict(raw)
        except ValueError as e:
            raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from None
        tensors = read_safetensors(directory / WEIGHTS_NAME)
    with torch.device("meta"):
        model = MemMambaLM(config, kernels=kernels)
    load_tensors(model, tensors, source=str(directory))
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def load_tensors(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Strictly load `tensors` into a (possibly meta) model: every key present, no extra key, same shapes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} "
                              f"(does config.json match the weights?)")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: tensor {k!r} has shape {list(tensors[k].shape)} in the file but the "
                                  f"config needs {list(v.shape)}")
        if tensors[k].dtype not in PARAM_DTYPES:
            raise CheckpointError(f"{source}: tensor {k!r} is {tensors[k].dtype}; parameters must be fp32, fp16 or "
                                  f"bf16 (or fp64)")
        if not torch.isfinite(tensors[k]).all():        # a diverged training run: every output would be NaN
            raise CheckpointError(f"{source}: tensor {k!r} holds NaN or infinite values")
    model.load_state_dict(tensors, strict=True, assign=True)


# ---- Hugging Face MambaForCausalLM -------------------------------------------------------------------------
def hf_mamba_config(cfg: dict) -> MemMambaConfig:
    """Map a transformers MambaConfig (as JSON) to a memory-off MemMambaConfig (spec §1)."""
    def get(k, default=None):
        if k not in cfg and default is None:
            raise CheckpointError(f"Hugging Face Mamba config lacks {k!r}")
        return cfg.get(k, default)

    if cfg.get("use_bias", False):
        raise CheckpointError("Hugging Face Mamba with use_bias=true (biased in/out projections) is not supported")
    if not cfg.get("use_conv_bias", True):
        raise CheckpointError("Hugging Face Mamba with use_conv_bias=false is not supported")
    d, expand = get("hidden_size"), get("expand", 2)
    if cfg.get("intermediate_size", d * expand) != d * expand:
        raise CheckpointError(f"intermediate_size {cfg['intermediate_size']} != expand*hidden_size {d * expand}")
    try:
        return MemMambaConfig(vocab_size=get("vocab_size"), d_model=d, n_layers=get("num_hidden_layers"),
                              d_state=get("state_size", 16), expand=expand, d_conv=get("conv_kernel", 4),
                              dt_rank=get("time_step_rank", 0) if cfg.get("time_step_rank") != "auto" else 0,
                              norm_eps=get("layer_norm_epsilon", 1e-5), memory=False)
    except ValueError as e:
        raise CheckpointError(f"Hugging Face Mamba config: {e}") from None


def hf_mamba_tensors(directory: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """Read HF weights (model.safetensors or pytorch_model.bin) and rename `backbone.*` to our keys."""
    st, bin_ = directory / WEIGHTS_NAME, directory / "pytorch_model.bin"
    if st.is_file():
        raw = read_safetensors(st)
    elif bin_.is_file():
        try:
            raw = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad pickle/zip
            raise CheckpointError(f"{bin_} is corrupt: {e}") from None
    else:
        raise CheckpointError(f"missing {WEIGHTS_NAME} (or pytorch_model.bin) in {directory}")
    out = {}
    for k, v in raw.items():
        if k == "lm_head.weight":
            continue
        out[k.removeprefix("backbone.")] = v
    head = raw.get("lm_head.weight")
    emb = out.get("embeddings.weight")
    if head is not None and emb is not None and not cfg.get("tie_word_embeddings", True) and not torch.equal(head, emb):
        raise CheckpointError("untied lm_head weights are not supported (memmamba ties input and output embeddings)")
    return out
