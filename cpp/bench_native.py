"""Benchmark of the C++ native runtime (GPU; run by scripts/gpu_stages/60-native.sh).

130m preset (random weights, memory path on), batch 1: decode ms/token of libmemmamba's generate() (CUDA graph,
greedy sampling on the GPU, the host waiting for every token as a streaming user does) at fp16 and fp32, for both
plans (cublas: projections in cuBLASLt; fused: decode.py's four kernels per layer), against
  - the HBM floor: parameter bytes / device-to-device copy bandwidth, both measured in this run;
  - the Python Triton backend (memmamba_deploy.backends.triton_backend, CUDA graph), same weights, same run;
  - itself without the CUDA graph (eager launches);
and flatness: ms/token after 1k and after 64k tokens of context. Then prefill: tokens/s of one prefill call of
2k and 16k tokens (the parallel form in chunks of SessionOptions::prefillRows, 8192, two in flight), against the Python Triton backend's graphed prefill of the same prompt, same run.
Prints rich tables, `@@ ` summary lines, and appends JSON lines to $OUT/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native_shim import NativeSession  # noqa: E402


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """bytes/s of a device-to-device copy, counting bytes read + written (median of reps)."""
    from memmamba_deploy.bench_baselines import copy_bandwidth as bw
    return bw(nbytes, reps)


def triton_decode_ms(ckpt: Path, dtype: torch.dtype, steps: int, context: int) -> float:
    """ms/token of TritonBackend (CUDA graph) decoding greedily, timed with CUDA events over `steps` steps."""
    from memmamba_deploy.backends.triton_backend import TritonBackend

    backend = TritonBackend.open(ckpt, device="cuda", dtype=dtype, cuda_graph=True)
    V = backend.config.vocab_size
    state = backend.new_state(1)
    logits, state = backend.prefill(torch.randint(0, V, (1, context), device="cuda"), state)
    token = logits.argmax(-1)
    for _ in range(10):                                            # warm-up (graph capture happens here)
        logits, state = backend.step(token, state)
        token = logits.argmax(-1)
    times = []
    for _ in range(3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(steps):
            logits, state = backend.step(token, state)
            token = logits.argmax(-1)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / steps)
    return statistics.median(times)


def triton_prefill_s(ckpt: Path, dtype: torch.dtype, n: int, rounds: int = 5) -> float:
    """Seconds of TritonBackend's prefill of n tokens from a fresh state (graphed; median after a warm-up)."""
    from memmamba_deploy.backends.triton_backend import TritonBackend

    backend = TritonBackend.open(ckpt, device="cuda", dtype=dtype, cuda_graph=True)
    ids = torch.randint(0, backend.config.vocab_size, (1, n), device="cuda")
    times = []
    for _ in range(rounds + 1):
        state = backend.new_state(1)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, state = backend.prefill(ids, state)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def native_prefill_s(session: NativeSession, n: int, V: int, rounds: int = 5) -> float:
    """Seconds of one prefill call of n tokens from a reset state (median after a warm-up; the call returns when
    the GPU is done)."""
    ids = torch.randint(0, V, (1, n), generator=torch.Generator().manual_seed(n))
    times = []
    for _ in range(rounds + 1):
        session.reset()
        t0 = time.perf_counter()
        session.prefill(ids)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def native_decode_ms(session: NativeSession, steps: int) -> float:
    session.bench_generate(16)                                     # warm-up
    return statistics.median(session.bench_generate(steps) for _ in range(3))


def prefill_tokens(session: NativeSession, n: int, V: int, chunk: int = 4096) -> float:
    """Feed n random tokens; returns tokens/s."""
    g = torch.Generator().manual_seed(n)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        k = min(chunk, n - done)
        session.prefill(torch.randint(0, V, (1, k), generator=g))
        done += k
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", required=True, help="the cpp/ CMake build folder")
    ap.add_argument("--work", default="/tmp/memmamba-native-bench")
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--long-context", type=int, default=65536)
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    args = ap.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    from memmamba_deploy.models import MemMambaConfig, MemMambaLM

    torch.manual_seed(0)
    work = Path(args.work)
    ckpt = work / "130m"
    if not (ckpt / "model.safetensors").is_file():
        MemMambaLM(MemMambaConfig.preset("130m")).half().save_pretrained(ckpt)   # random init, fp16 on disk
    cfg = MemMambaConfig.load(ckpt / "config.json")
    V = cfg.vocab_size
    from safetensors.torch import load_file
    n_params = sum(t.numel() for t in load_file(str(ckpt / "model.safetensors")).values())
    bw = copy_bandwidth()
    rows, results, prefill_rows = [], [], []
    device = torch.cuda.get_device_name()

    def add(what, dtype, ms, note=""):
        floor = n_params * (2 if dtype == "fp16" else 4) / bw * 1e3
        rows.append((what, dtype, ms, floor, note))
        results.append({"stage": "native-bench", "what": what, "dtype": dtype, "ms_per_token": ms,
                        "floor_ms": floor, "x_floor": ms / floor if ms else None, "device": device, "note": note})

    for dtype in ("fp16", "fp32"):
        s = NativeSession(args.build, ckpt, dtype=dtype, batch=1)
        prefill_tps = prefill_tokens(s, 1024, V)
        ms_1k = native_decode_ms(s, args.steps)
        add("native cublas plan, CUDA graph, context 1k", dtype, ms_1k, f"prefill of 1k {prefill_tps:,.0f} tok/s")
        what = "native fused plan (decode.py kernels), CUDA graph, context 1k"
        try:
            fused = NativeSession(args.build, ckpt, dtype=dtype, batch=1, plan="fused")
            fused.prefill(torch.randint(0, V, (1, 1024)))
            add(what, dtype, native_decode_ms(fused, args.steps))
            fused.close()
        except Exception as e:  # reported in the table, not hidden
            add(what, dtype, float("nan"), f"failed: {type(e).__name__}: {e}"[:120])
        if dtype == "fp16":
            eager = NativeSession(args.build, ckpt, dtype=dtype, batch=1, cuda_graph=False)
            eager.prefill(torch.randint(0, V, (1, 1024)))
            add("native cublas plan, eager launches, context 1k", dtype, native_decode_ms(eager, args.steps // 5))
            eager.close()
            prefill_tokens(s, args.long_context - 1024 - args.steps, V)
            ms_64k = native_decode_ms(s, args.steps)
            add(f"native cublas plan, CUDA graph, context {args.long_context // 1024}k", dtype, ms_64k,
                f"flatness {ms_64k / ms_1k:.3f} (64k / 1k)")
            results.append({"stage": "native-bench", "what": "flatness", "dtype": dtype, "ratio_64k_1k": ms_64k / ms_1k,
                            "device": device})
        for n in (2048, 16384):
            native_s = native_prefill_s(s, n, V)
            try:
                triton_s = triton_prefill_s(ckpt, torch.float16 if dtype == "fp16" else torch.float32, n)
            except Exception as e:  # reported, not hidden
                triton_s, why = float("nan"), f"failed: {type(e).__name__}: {e}"[:120]
            else:
                why = ""
            prefill_rows.append((n, dtype, native_s, triton_s, why))
            results.append({"stage": "native-bench", "what": "prefill", "dtype": dtype, "tokens": n,
                            "native_tokens_per_s": n / native_s, "triton_tokens_per_s": n / triton_s,
                            "device": device, "note": why})
        s.close()
        try:
            add("Python Triton backend, CUDA graph, context 1k", dtype,
                triton_decode_ms(ckpt, torch.float16 if dtype == "fp16" else torch.float32, args.steps, 1024))
        except Exception as e:  # report, do not hide: the comparison is part of the benchmark
            add("Python Triton backend, CUDA graph, context 1k", dtype, float("nan"), f"failed: {type(e).__name__}: {e}"[:120])

    table = Table(title=f"native decode, 130m preset, batch 1, {device}, copy bandwidth {bw / 1e12:.2f} TB/s")
    for col in ("what", "dtype", "ms/token", "HBM floor ms", "x floor", "note"):
        table.add_column(col)
    for what, dtype, ms, floor, note in rows:
        table.add_row(what, dtype, f"{ms:.4f}", f"{floor:.4f}", f"{ms / floor:.2f}", note)
    Console(width=160).print(table)
    ptable = Table(title="native prefill (one call, batch 1, fresh state) vs the Python Triton backend's graphed "
                         "prefill")
    for col in ("tokens", "dtype", "native s", "native tok/s", "Triton backend tok/s", "native / Triton", "note"):
        ptable.add_column(col)
    for n, dtype, ns, ts, why in prefill_rows:
        ptable.add_row(str(n), dtype, f"{ns:.4f}", f"{n / ns:,.0f}", f"{n / ts:,.0f}", f"{ts / ns:.2f}", why)
    Console(width=160).print(ptable)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / "results.jsonl", "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    for what, dtype, ms, floor, note in rows:
        print(f"@@ native-bench: {what} {dtype}: {ms:.4f} ms/token = {ms / floor:.2f}x floor {floor:.4f}"
              + (f" ({note})" if note else ""))
    for n, dtype, ns, ts, why in prefill_rows:
        print(f"@@ native-bench: prefill {n} tokens {dtype}: native {n / ns:,.0f} tok/s, Triton backend "
              f"{n / ts:,.0f} tok/s ({ts / ns:.2f}x)" + (f" ({why})" if why else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
