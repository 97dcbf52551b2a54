"""ctypes access to libmemmamba (through tests/capi.cpp's libmemmamba_capi.so), for the GPU tests and the benchmark
only: tests/gpu/test_native_gpu.py, cpp/bench_native.py. Users of the runtime use the C++ API (memmamba.h).

    build = build_runtime("/tmp/mm-build")                       # or an existing build folder
    s = NativeSession(build, "ckpt", dtype="fp16", batch=1)
    s.prefill(ids)                                               # [B, T] int
    logits = s.logits()                                          # torch [B, V] fp32
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import torch

CPP = Path(__file__).resolve().parent
REPO = CPP.parent
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class NativeError(RuntimeError):
    pass


def build_runtime(build_dir, archs: str = "", aot_dir: str = "", configs=(), log=None) -> Path:
    """cmake configure + build of cpp/ into build_dir (the CUDA runtime, memmamba_chat and the shims)."""
    build_dir = Path(build_dir)
    cmd = ["cmake", "-S", str(CPP), "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}"]
    if archs:
        cmd.append(f"-DMEMMAMBA_CUDA_ARCHS={archs}")
    if aot_dir:
        cmd.append(f"-DMEMMAMBA_AOT_DIR={aot_dir}")
    if configs:
        cmd.append("-DMEMMAMBA_MODEL_CONFIGS=" + ";".join(str(c) for c in configs))
    for c in (cmd, ["cmake", "--build", str(build_dir), "-j", str(os.cpu_count() or 2)]):
        run = subprocess.run(c, capture_output=True, text=True)
        if log:
            Path(log).open("a").write(run.stdout + run.stderr)
        if run.returncode != 0:
            raise NativeError(f"{' '.join(c)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return build_dir


def _lib(build_dir) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(build_dir) / "libmemmamba_capi.so"))
    P, I, F, U64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_ulonglong
    sig = {
        "mm_last_error": ([], ctypes.c_char_p), "mm_open": ([ctypes.c_char_p] * 3 + [I, I, I, U64, ctypes.c_char_p, ctypes.c_char_p, I], P),
        "mm_close": ([P], None), "mm_describe": ([P], ctypes.c_char_p), "mm_prefill": ([P, P, I], I), "mm_prefill_rows": ([P, P, I, P], I),
        "mm_step": ([P, P], I), "mm_logits": ([P, P], I), "mm_sample": ([P, F, I, F, P], I),
        "mm_generate": ([P, I, F, I, F, P, I, P, P], I), "mm_bench_generate": ([P, I, P], I),
        "mm_reset": ([P], I), "mm_reseed": ([P, U64], I), "mm_fork": ([P], P), "mm_copy_row": ([P, P, I, I], I),
        "mm_sibling": ([P, I], P),
        "mm_state_bytes": ([P, ctypes.c_char_p], ctypes.c_longlong), "mm_read_state": ([P, ctypes.c_char_p, P, U64], I),
        "mm_write_state": ([P, ctypes.c_char_p, P, U64], I), "mm_save_state": ([P, ctypes.c_char_p], I),
        "mm_load_state": ([P, ctypes.c_char_p], I), "mm_pending": ([P, P], I),
    }
    for name, (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


class NativeSession:
    """One memmamba::Session. Token ids are int32 on the host; results are CPU torch tensors."""

    def __init__(self, build_dir, path, dtype="fp16", batch=1, backend="native", device=0, cuda_graph=True, seed=0,
                 plugins="", plan="cublas", prefill_rows=8192, _handle=None, _lib_obj=None):
        # prefill_rows: SessionOptions::prefillRows (8192 there too)
        self.lib = _lib_obj or _lib(build_dir)
        self.batch, self.dtype = batch, dtype
        self.h = _handle or self.lib.mm_open(str(path).encode(), backend.encode(), dtype.encode(), batch, device,
                                             int(cuda_graph), seed, plugins.encode(), plan.encode(), prefill_rows)
        if not self.h:
            raise NativeError(self.lib.mm_last_error().decode())
        self._vocab = None

    def _check(self, rc):
        if rc != 0:
            raise NativeError(self.lib.mm_last_error().decode())

    def close(self):
        if self.h:
            self.lib.mm_close(self.h)
            self.h = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def describe(self) -> str:
        return self.lib.mm_describe(self.h).decode()

    def prefill(self, ids, lengths=None):
        """ids [B, T]; lengths [B] (Session::prefill's rows of their own lengths) or None."""
        ids = torch.as_tensor(ids, dtype=torch.int32).reshape(self.batch, -1).contiguous()
        if lengths is None:
            self._check(self.lib.mm_prefill(self.h, ids.data_ptr(), ids.shape[1]))
            return
        lengths = torch.as_tensor(lengths, dtype=torch.int32).reshape(self.batch).contiguous()
        self._check(self.lib.mm_prefill_rows(self.h, ids.data_ptr(), ids.shape[1], lengths.data_ptr()))

    def step(self, tokens):
        t = torch.as_tensor(tokens, dtype=torch.int32).reshape(self.batch).contiguous()
        self._check(self.lib.mm_step(self.h, t.data_ptr()))

    def logits(self, vocab: int) -> torch.Tensor:
        out = torch.empty(self.batch, vocab, dtype=torch.float32)
        self._check(self.lib.mm_logits(self.h, out.data_ptr()))
        return out

    def sample(self, temperature=0.0, top_k=0, top_p=1.0) -> torch.Tensor:
        out = torch.empty(self.batch, dtype=torch.int32)
        self._check(self.lib.mm_sample(self.h, temperature, top_k, top_p, out.data_ptr()))
        return out

    def generate(self, n, temperature=0.0, top_k=0, top_p=1.0, stop=()) -> torch.Tensor:
        out = torch.full((self.batch, n), -1, dtype=torch.int32)
        stop_t = torch.tensor(list(stop), dtype=torch.int32)
        produced = ctypes.c_int(0)
        self._check(self.lib.mm_generate(self.h, n, temperature, top_k, top_p, stop_t.data_ptr() if len(stop) else None,
                                         len(stop), out.data_ptr(), ctypes.byref(produced)))
        return out[:, :produced.value]

    def bench_generate(self, n) -> float:
        ms = ctypes.c_float(0)
        self._check(self.lib.mm_bench_generate(self.h, n, ctypes.byref(ms)))
        return ms.value

    def reset(self):
        self._check(self.lib.mm_reset(self.h))

    def reseed(self, seed):
        self._check(self.lib.mm_reseed(self.h, seed))

    def fork(self) -> "NativeSession":
        h = self.lib.mm_fork(self.h)
        if not h:
            raise NativeError(self.lib.mm_last_error().decode())
        return NativeSession(None, None, self.dtype, self.batch, _handle=h, _lib_obj=self.lib)

    def sibling(self, batch: int) -> "NativeSession":
        """Session::sibling: a session of `batch` rows on this one's weights, in the empty state."""
        h = self.lib.mm_sibling(self.h, batch)
        if not h:
            raise NativeError(self.lib.mm_last_error().decode())
        return NativeSession(None, None, self.dtype, batch, _handle=h, _lib_obj=self.lib)

    def copy_row(self, source: "NativeSession", from_row: int, to_row: int):
        """Session::copyRow: row to_row of this session goes on from row from_row of `source`."""
        self._check(self.lib.mm_copy_row(self.h, source.h, from_row, to_row))

    def state(self, name: str, shape) -> torch.Tensor:
        """One state tensor in models.State layout (conv/pool in the model dtype, ssm/prio fp32)."""
        dt = _DTYPES[self.dtype] if name in ("conv", "pool") else torch.float32
        out = torch.empty(tuple(shape), dtype=dt)
        self._check(self.lib.mm_read_state(self.h, name.encode(), out.data_ptr(), out.numel() * out.element_size()))
        return out

    def set_state(self, name: str, value: torch.Tensor):
        v = value.contiguous().cpu()
        self._check(self.lib.mm_write_state(self.h, name.encode(), v.data_ptr(), v.numel() * v.element_size()))

    def pending(self) -> torch.Tensor:
        """generate()'s last tokens, not yet fed ([batch], or empty)."""
        out = torch.full((self.batch,), -1, dtype=torch.int32)
        n = self.lib.mm_pending(self.h, out.data_ptr())
        if n < 0:
            raise NativeError(self.lib.mm_last_error().decode())
        return out[:n]

    def save_state(self, path):
        self._check(self.lib.mm_save_state(self.h, str(path).encode()))

    def load_state(self, path):
        self._check(self.lib.mm_load_state(self.h, str(path).encode()))
