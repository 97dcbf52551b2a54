"""Checkpoints: `config.json` + `model.safetensors`, written atomically; import of Hugging Face Mamba.

Every failure names the problem (missing file, corrupt file, unknown architecture, a tensor of the wrong shape).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
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
def atomic_directory(target, force: bool = False):
    """Yield a temporary directory beside `target`; on success it takes `target`'s place.

    A new `target` appears in one rename. An existing one is swapped with the new one in one atomic exchange
    (Linux renameat2) and then removed; where the system has no exchange, it is moved aside (one rename), the new
    one renamed in, and if that fails moved back; a process killed between the two renames leaves the old one
    aside, and the next atomic_directory (or recover_directory) on `target` puts it back. Readers see the old or
    the new directory, never a mix. On any exception the temporary directory is removed and `target` is left as
    it was. An existing non-empty `target` is replaced only with force=True: it is removed whole, so callers pass
    force only for directories this project writes (an export, a kernel library, a training run's `last`). The
    result gets the modes a plain mkdir / open would give (temporary directories are created 0700)."""
    # absolute (the renames must not depend on a working directory that moves), through symlinks (a link to a
    # folder is written where it points, not replaced by a folder)
    target = Path(os.path.realpath(target))
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory")
    recover_directory(target)
    if not force and target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty (use --force to overwrite)")
    if target.is_dir() and _working_dir().is_relative_to(target):
        raise OSError(f"cannot replace {target}: it holds the working directory (give a new folder)")
    creatable_dir(target.parent, target)
    _remove_stale_temporaries(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    except OSError as e:                    # e.g. a read-only or virtual file system: name the target, not the temp
        raise OSError(f"cannot create {target}: {e.strerror} (in {target.parent})") from None
    try:
        yield tmp
        usual_permissions(tmp)
        if not target.exists():
            os.replace(tmp, target)
        elif _exchange(tmp, target):        # tmp now holds the old directory
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "x")
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old / "x", target)
                raise
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _working_dir() -> Path:
    try:
        return Path.cwd().resolve()
    except OSError:                         # the working directory was removed: it is in no target
        return Path("/nonexistent-working-directory")


def _host_prefix(target: Path) -> str:
    return f".{target.name}.tmp-{socket.gethostname()}-"


def _temp_prefix(target: Path) -> str:
    return f"{_host_prefix(target)}{os.getpid()}-"


def _remove_stale_temporaries(target: Path) -> None:
    """Remove `.NAME.tmp-HOST-PID-*` folders beside `target` whose writer, on this host, is gone: what a killed
    atomic_directory leaves (a live writer's are kept; another host's or container's are left alone)."""
    mine = _host_prefix(target)             # this host's writers: a PID means something here
    for tmp in target.parent.glob(glob.escape(mine) + "*-*") if target.parent.is_dir() else ():
        pid = tmp.name[len(mine):].split("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:               # another user's live process
            pass


def recover_directory(target) -> bool:
    """Put back a directory that atomic_directory's two-rename fallback had moved aside when its process was
    killed (`target` missing, `.NAME.old-*/x` beside it; the newest wins). True if one was put back."""
    target = Path(os.path.realpath(target))
    if target.exists() or not target.parent.is_dir():
        return False
    aside = sorted(target.parent.glob(glob.escape(f".{target.name}.old-") + "*/x"), key=lambda p: p.stat().st_mtime)
    if not aside:
        return False
    os.replace(aside[-1], target)
    shutil.rmtree(aside[-1].parent, ignore_errors=True)
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths atomically (Linux renameat2 RENAME_EXCHANGE). False where the C library or the file
    system has no such call: the caller then renames in two steps."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    # any failure (no support on this file system, a seccomp filter's EPERM, ...) leaves both paths as they were:
    # the caller's two renames then do the work, and report a real error themselves
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


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


def save_safetensors(tensors: dict, path: Path, meta: dict) -> None:
    """safetensors' save_file, with its write failures (a full disk, a quota) as the OSError they are: safetensors
    raises its own SafetensorError, which callers would not take for a file-system error."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=meta)
    except SafetensorError as e:
        raise OSError(f"could not write {path}: {e}") from None


def save_pretrained(model, directory, force: bool = False) -> None:
    """Write `directory`/config.json and model.safetensors. A new directory appears whole in one rename. Into an
    existing one both files are written beside their final names, then renamed over them back to back, the
    weights first, with Ctrl-C and SIGTERM held between: other files there are left alone, as Hugging Face's
    save_pretrained leaves them. force=False refuses a non-empty directory (memdeploy init without --force).
    Weights that are NaN or infinite are refused before anything is written (load_pretrained would refuse them)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    for k, v in tensors.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ValueError(f"cannot save {directory}: tensor {k!r} holds NaN or infinite values")
    meta = {"format": "pt", "architecture": ARCHITECTURE}
    directory = Path(os.path.realpath(directory))
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory")
    recover_directory(directory)
    if not directory.exists():
        with atomic_directory(directory) as tmp:                 # a new folder appears whole
            (tmp / CONFIG_NAME).write_text(model.config.to_json())
            save_safetensors(tensors, tmp / WEIGHTS_NAME, meta)
        return
    if not force and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty (use --force to overwrite)")
    writable_file(directory / WEIGHTS_NAME)
    temps = []
    try:
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=directory)
            os.close(fd)
            temps.append(Path(tmp))
        save_safetensors(tensors, temps[0], meta)
        temps[1].write_text(model.config.to_json())
        for t in temps:
            usual_permissions(t)
        with _signals_held():               # the two renames, weights first, with no Ctrl-C / SIGTERM between
            os.replace(temps[0], directory / WEIGHTS_NAME)
            os.replace(temps[1], directory / CONFIG_NAME)
    finally:
        for t in temps:
            t.unlink(missing_ok=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwinding as Ctrl-C does (terminate_as_interrupt); a command exits 143 for it, 130 for Ctrl-C."""


def _interrupt(signum, frame):
    raise Terminated


@contextmanager
def terminate_as_interrupt():
    """For the block, SIGTERM (timeout, docker stop, Kubernetes) unwinds as Ctrl-C does, so that a command's
    half-written output is removed on the way out. Off the main thread, where no handler can be set, nothing."""
    import signal

    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM (delivered on leaving) where the system can: a handled signal then cannot stop a
    pair of renames half way."""
    import signal

    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, OSError, ValueError):
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        hint = ""
        if (path.parent / "manifest.json").is_file() and (path.parent / "reference" / path.name).is_file():
            hint = f": it is an export directory; its checkpoint is {path.parent / 'reference'}"
        raise CheckpointError(f"missing {path.name} in {path.parent}{hint}")
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


def read_config(directory) -> MemMambaConfig:
    """The MemMambaConfig of a checkpoint directory (ours, or a Hugging Face Mamba one), without its weights."""
    return _config(Path(directory))[0]


def _config(directory: Path) -> tuple[MemMambaConfig, dict]:
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoint directory at {directory}")
    if not (directory / CONFIG_NAME).exists() and (directory / "model" / CONFIG_NAME).is_file():
        raise CheckpointError(f"{directory} has no {CONFIG_NAME}, but {directory / 'model'} does: the checkpoint "
                              f"of a training run is its model/ folder")
    raw = _read_json(directory / CONFIG_NAME)
    if _is_hf_mamba(raw):
        return hf_mamba_config(raw), raw
    if "architecture" not in raw:
        raise CheckpointError(f"{directory / CONFIG_NAME}: unknown architecture (no 'architecture' key, and not "
                              f"a Hugging Face Mamba config); expected architecture {ARCHITECTURE!r}")
    try:
        return MemMambaConfig.from_complete_dict(raw), raw
    except ValueError as e:
        raise CheckpointError(f"{directory / CONFIG_NAME}: {e}") from None


def load_pretrained(directory, kernels: str = "torch", device=None, dtype=None):
    """Load a memmamba-deploy checkpoint, or a Hugging Face `MambaForCausalLM` one (as memory=False)."""
    from .memmamba import MemMambaLM
    from .ops import check_kernels_on

    if device is not None:                  # else the caller may still move the model (kernels_for guards then)
        check_kernels_on(kernels, device)
    directory = Path(directory)
    dtype = None if dtype is None else parse_dtype(dtype)     # before the weights are read
    config, raw = _config(directory)
    tensors = hf_mamba_tensors(directory, raw) if _is_hf_mamba(raw) else read_safetensors(directory / WEIGHTS_NAME)
    with torch.device("meta"):
        model = MemMambaLM(config, kernels=kernels)
    load_tensors(model, tensors, source=str(directory), dtype=dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


DTYPES_BY_NAME = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp64": torch.float64,
               "float64": torch.float64}


def parse_dtype(dtype) -> torch.dtype:
    """A parameter dtype from a torch dtype or a name (fp32, fp16, bf16, fp64, or torch's names)."""
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES_BY_NAME:
        return DTYPES_BY_NAME[dtype.lower().removeprefix("torch.")]
    if dtype in PARAM_DTYPES:
        return dtype
    raise ValueError(f"dtype must be fp32, fp16, bf16 or fp64 (or the torch dtype), got {dtype!r}")


PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def load_tensors(model, tensors: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None = None) -> None:
    """Strictly load `tensors` into a (possibly meta) model: every key present, no extra key, same shapes, finite
    values. They load in `dtype`, else in the dtype that holds most of their numbers (a checkpoint of mixed dtypes,
    fp16 weights with fp32 norms say, becomes one model); a value the cast overflows is named."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise CheckpointError(f"{source}: missing tensor(s) {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if extra:
        raise CheckpointError(f"{source}: unexpected tensor(s) {extra[:8]}{' ...' if len(extra) > 8 else ''} "
                              f"(does config.json match the weights?)")
    counts: dict[torch.dtype, int] = {}
    for k, v in expected.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(v.shape):
            raise CheckpointError(f"{source}: tensor {k!r} has shape {list(t.shape)} in the file but the "
                                  f"config needs {list(v.shape)}")
        if t.dtype not in PARAM_DTYPES:
            raise CheckpointError(f"{source}: tensor {k!r} is {t.dtype}; parameters must be fp32, fp16 or "
                                  f"bf16 (or fp64)")
        if not torch.isfinite(t).all():                 # a diverged training run: every output would be NaN
            raise CheckpointError(f"{source}: tensor {k!r} holds NaN or infinite values")
        counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    dtype = dtype or max(counts, key=counts.get)
    cast = {}
    for k, t in tensors.items():
        cast[k] = t.to(dtype)
        if t.dtype != dtype and not torch.isfinite(cast[k]).all():
            raise CheckpointError(f"{source}: tensor {k!r} ({t.dtype}) holds values beyond {dtype}'s range")
    model.load_state_dict(cast, strict=True, assign=True)


# ---- Hugging Face MambaForCausalLM -------------------------------------------------------------------------
def hf_mamba_config(cfg: dict) -> MemMambaConfig:
    """Map a transformers MambaConfig (as JSON) to a memory-off MemMambaConfig (spec §1)."""
    def get(k, default=None):
        if k not in cfg and default is None:
            raise CheckpointError(f"Hugging Face Mamba config lacks {k!r}")
        v = cfg.get(k, default)
        if isinstance(default, bool) or k in ("use_bias", "use_conv_bias"):
            ok = isinstance(v, bool)
        elif isinstance(default, float) or k == "layer_norm_epsilon":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        else:
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= (0 if k == "time_step_rank" else 1)
        if not ok:
            raise CheckpointError(f"Hugging Face Mamba config: {k} = {v!r} is not a valid value")
        return v

    if get("use_bias", False):
        raise CheckpointError("Hugging Face Mamba with use_bias=true (biased in/out projections) is not supported")
    if not get("use_conv_bias", True):
        raise CheckpointError("Hugging Face Mamba with use_conv_bias=false is not supported")
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise CheckpointError(f"Hugging Face Mamba with hidden_act={act!r} is not supported (only silu, as Mamba "
                              f"trains)")
    d, expand = get("hidden_size"), get("expand", 2)
    if cfg.get("intermediate_size", d * expand) != d * expand:
        raise CheckpointError(f"intermediate_size {cfg['intermediate_size']} != expand*hidden_size {d * expand}")
    try:
        return MemMambaConfig(vocab_size=get("vocab_size"), d_model=d, n_layers=get("num_hidden_layers"),
                              d_state=get("state_size", 16), expand=expand, d_conv=get("conv_kernel", 4),
                              dt_rank=0 if cfg.get("time_step_rank", "auto") == "auto" else get("time_step_rank"),
                              norm_eps=get("layer_norm_epsilon", 1e-5), memory=False)
    except ValueError as e:
        raise CheckpointError(f"Hugging Face Mamba config: {e}") from None


def hf_mamba_tensors(directory: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """Read HF weights (model.safetensors or pytorch_model.bin) and rename `backbone.*` to our keys."""
    st, bin_ = directory / WEIGHTS_NAME, directory / "pytorch_model.bin"
    index = directory / (WEIGHTS_NAME + ".index.json")
    if st.is_file():
        raw = read_safetensors(st)
    elif index.is_file():                       # sharded (transformers' save_pretrained past max_shard_size)
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
        raw = {}
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:
                raise CheckpointError(f"{index} names a shard outside its directory: {shard!r}")
            raw.update(read_safetensors(directory / shard))
        missing = sorted(set(weight_map) - set(raw))
        if missing:
            raise CheckpointError(f"{index} lists tensor(s) its shards lack: {missing[:8]}")
    elif bin_.is_file():
        try:
            raw = torch.load(bin_, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises several types for a bad pickle/zip
            raise CheckpointError(f"{bin_} is corrupt: {e}") from None
    else:
        raise CheckpointError(f"missing {WEIGHTS_NAME} (or its sharded index, or pytorch_model.bin) in {directory}")
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
