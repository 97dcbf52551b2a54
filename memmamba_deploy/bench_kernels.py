"""Benchmarks of the Triton path (issue 3), for scripts/gpu_stages/20-kernel-bench.sh.

In one run, on one GPU:
  copy bandwidth   device-to-device copy of 1 GiB of random data (bytes read + written); every floor below
                   is bytes / this bandwidth
  decode           130m preset (random weights), batch 1, fp16 and fp32, after a 256-token prefill: ms/token of
                   the PyTorch reference step, the Triton path launched eagerly, the Triton path as one CUDA graph
                   (graph replay alone, and backend.step() with its token copy and logits clone); also the
                   memory-off 130m (plain Mamba) for the 1.22 ms mamba_ssm anchor; floor = parameter bytes / copy BW
  prefill          tokens/s of MemMambaLM.prefill(last_only=True) (the state and the last token's logits, what
                   generation needs), 130m fp16, batch 1, at 2k/16k/64k with kernels="triton", launched eagerly
                   and as TritonBackend.prefill's CUDA graphs (the summary line's figures); the reference at
                   2k only (its scan is a Python loop over tokens). Each graphed length then runs for ~2 s under
                   a PowerSampler: the SM clock and board power it sustains (an H100 prefills 16k tokens at
                   its 700 W cap, below the clock a kernel alone gets). Then prompts whose length is no power
                   of two (1,500 and 2,047 tokens), graphed as shipped (TritonBackend.prefill_plan: padded to
                   fewer pieces) and as their exact power-of-two pieces (PIECE_COST_TOKENS = 0)
  kernels          each kernel on 130m shapes against its own bytes floor, replayed as a CUDA graph (graph_ms: L2
                   flushed before every repeat)

Timing: CUDA events, warm-up first, median of many repeats. Prints a rich table; appends JSON lines to
$OUT/results.jsonl and prints "@@ " summary lines for gpu_check.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch

from .models import MemMambaConfig, MemMambaLM

DEV = "cuda"
DTYPE_NAMES = {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}
ROWS: list[dict] = []
_FLUSH: torch.Tensor | None = None


def time_ms(fn, reps: int = 50, warmup: int = 5, flush: bool = False) -> float:
    """Median milliseconds of fn() between CUDA events; flush=True evicts L2 (256 MiB write) before each repeat."""
    global _FLUSH
    if flush and _FLUSH is None:
        _FLUSH = torch.empty(64 << 20, dtype=torch.float32, device=DEV)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush:
            _FLUSH.fill_(1.0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, reps: int = 50) -> float:
    """Median milliseconds of fn's kernels replayed as one CUDA graph, L2 flushed before each repeat. A single
    kernel runs for microseconds, less than Python takes to launch it: timed eagerly, the events would measure
    the launch (a 5 µs kernel read 50-108 µs). The flush (~90 µs of GPU work) also keeps the stream busy while
    the host launches the replay, so the start event does not fire before the graph is queued."""
    from .backends.triton_backend import warm_and_capture
    return time_ms(warm_and_capture(fn).replay, reps=reps, warmup=3, flush=True)


class PowerSampler:
    """The SM clock and board power while a benchmark runs: `nvidia-smi` (NVML's readings) every `period` seconds
    from a thread. A graphed 16k prefill holds an H100 at its 700 W cap, where the clock drops below the 1980 MHz a
    kernel alone runs at (BENCHMARKS.md, nineteenth session), so a figure that adds instructions to save cycles
    can measure as a gain alone and as nothing in the prefill. summary() is None where nvidia-smi is absent or
    gives no reading (the rows then say nothing of power)."""

    QUERY = "clocks.sm,power.draw,power.limit"

    def __init__(self, device: int = 0, period: float = 0.05):
        self.period, self.readings = period, []
        self.command = [shutil.which("nvidia-smi") or "nvidia-smi", f"--query-gpu={self.QUERY}",
                        "--format=csv,noheader,nounits"]
        props = torch.cuda.get_device_properties(device) if torch.cuda.is_available() else None
        if props is not None and hasattr(props, "pci_bus_id"):      # the same GPU, whatever CUDA_VISIBLE_DEVICES
            self.command.append(f"--id={props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0")
        self._stop = threading.Event()
        self._thread = None

    @staticmethod
    def parse(line: str) -> tuple[float, float, float] | None:
        """(SM MHz, power W, power limit W) of one nvidia-smi answer line; None for "[N/A]" or anything else."""
        try:
            clock, power, limit = (float(v) for v in line.strip().split(","))
        except ValueError:
            return None
        return clock, power, limit

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(self.command, capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.TimeoutExpired):
                return                                               # no nvidia-smi here: no readings
            reading = self.parse(out.splitlines()[0]) if out.strip() else None
            if reading is not None:
                self.readings.append(reading)
            self._stop.wait(self.period)

    def __enter__(self) -> "PowerSampler":
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict | None:
        """Medians (and the lowest clock) over the readings, or None without any."""
        if not self.readings:
            return None
        clocks, powers, limits = zip(*self.readings)
        return dict(sm_clock_mhz=statistics.median(clocks), sm_clock_min_mhz=min(clocks),
                    power_w=statistics.median(powers), power_limit_w=statistics.median(limits),
                    power_samples=len(self.readings))


def sustained_power(fn, seconds: float = 2.0) -> dict:
    """fn() run back to back for `seconds` under a PowerSampler; its summary (empty without readings)."""
    fn()
    torch.cuda.synchronize()
    with PowerSampler() as sampler:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            fn()
            torch.cuda.synchronize()
    return sampler.summary() or {}


def power_note(r: dict) -> str:
    """"692 of 700 W, SM 1950 MHz (min 1830)" for a row with PowerSampler figures, else ""."""
    if "power_w" not in r:
        return ""
    return (f"{r['power_w']:.0f} of {r['power_limit_w']:.0f} W, SM {r['sm_clock_mhz']:.0f} MHz "
            f"(min {r['sm_clock_min_mhz']:.0f})")


def row(group: str, what: str, ms: float | None = None, floor_ms: float | None = None, **extra) -> dict:
    r = {"stage": "kernel-bench", "group": group, "what": what, "ms": ms, "floor_ms": floor_ms,
         "x_floor": (ms / floor_ms) if ms and floor_ms else None, **extra}
    ROWS.append(r)
    return r


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + write), 1 GiB of random floats."""
    src = torch.rand(256 << 20, device=DEV)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=20)
    bw = 2 * src.numel() * 4 / (ms * 1e-3)
    row("baseline", "device-to-device copy, 1 GiB", ms, None, bandwidth_GBps=bw / 1e9)
    return bw


def make_130m(dtype, memory: bool = True, seed: int = 0) -> MemMambaLM:
    torch.manual_seed(seed)
    return MemMambaLM(MemMambaConfig.preset("130m", memory=memory)).to(DEV, dtype).eval()


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())       # tied embedding counted once


# ---- decode --------------------------------------------------------------------------------------------------------
@torch.no_grad()
def bench_decode(dtype, bw: float, memory: bool = True, reference: bool = True) -> dict:
    from .backends.triton_backend import TritonBackend

    name = f"130m{'' if memory else ' no-memory'} {DTYPE_NAMES[dtype]}"
    model = make_130m(dtype, memory)
    floor = param_bytes(model) / bw * 1e3
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50280, (1, 256), generator=g)
    tokens = torch.randint(0, 50280, (64,), generator=g)
    result = {}
    graphed = TritonBackend(model, cuda_graph=True)
    _, state = graphed.prefill(prompt, graphed.new_state(1))
    ref_state = graphed.state_to_reference(state)
    it = iter(range(1 << 30))

    def token():                                    # a different token every step
        i = next(it) % len(tokens)
        return tokens[i:i + 1]

    def graph_step():
        nonlocal state
        _, state = graphed.step(token(), state)
    result["graph_step"] = time_ms(graph_step, reps=200, warmup=10)
    bufs = graphed._get_buffers(1)
    result["graph_replay"] = time_ms(lambda: bufs.graphs[0].replay(), reps=300, warmup=10)
    if graphed.pdl:                                 # what programmatic dependent launch buys
        nb = TritonBackend(model, cuda_graph=True, pdl=False)._get_buffers(1)   # a step costs the same on any state
        result["graph_replay_no_pdl"] = time_ms(lambda: nb.graphs[0].replay(), reps=300, warmup=10)
    # the same step as one persistent kernel (TritonBackend step_kernel="persistent")
    pb = TritonBackend(model, cuda_graph=True, step_kernel="persistent")._get_buffers(1)
    result["graph_replay_persistent"] = time_ms(lambda: pb.graphs[0].replay(), reps=300, warmup=10)
    eager = TritonBackend(model, cuda_graph=False)
    e_state = eager.copy_state(ref_state)

    def eager_step():
        nonlocal e_state
        _, e_state = eager.step(token(), e_state)
    result["eager_step"] = time_ms(eager_step, reps=30, warmup=3)
    if reference:
        r_state = ref_state.clone()

        def ref_step():
            nonlocal r_state
            _, r_state = model.step(token().to(DEV), r_state)
        result["reference_step"] = time_ms(ref_step, reps=10, warmup=2)
    for k, ms in result.items():
        row("decode", f"{name}: {k.replace('_', ' ')}", ms, floor, param_MB=param_bytes(model) / 1e6)
    return {"name": name, "floor": floor, **result}


# ---- prefill -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def bench_prefill(lengths=(2048, 16384, 65536), reference_at=2048, uneven=(1500, 2047)) -> dict:
    from .backends.triton_backend import TritonBackend

    model = make_130m(torch.float16)
    fast = copy.copy(model).set_kernels("triton")
    graphed = TritonBackend(model, cuda_graph=True)
    out = {}
    g = torch.Generator().manual_seed(2)
    for T in lengths:
        ids = torch.randint(0, 50280, (1, T), generator=g).to(DEV)
        fast.prefill(ids, last_only=True)                          # compiles this length's specialisations
        ms = time_ms(lambda: fast.prefill(ids, last_only=True), reps=3 if T > 16384 else 5, warmup=1)
        row("prefill", f"130m fp16 prefill {T // 1024}k tokens: triton, eager", ms, None, tokens_per_s=T / ms * 1e3)
        state = graphed.new_state(1)
        graphed.prefill(ids, state)                                # captures this length's graphs
        ms = time_ms(lambda: graphed.prefill(ids, state), reps=3 if T > 16384 else 5, warmup=1)
        out[T] = T / (ms * 1e-3)
        row("prefill", f"130m fp16 prefill {T // 1024}k tokens: triton, CUDA graphs (TritonBackend)", ms, None,
            tokens=T, tokens_per_s=out[T], **sustained_power(lambda: graphed.prefill(ids, state)))
    for T in uneven:                                               # time to first token at any prompt length
        ids = torch.randint(0, 50280, (1, T), generator=g).to(DEV)
        ms = {}
        for plan, cost in (("padded", graphed.PIECE_COST_TOKENS), ("exact", 0)):
            graphed.PIECE_COST_TOKENS = cost
            state = graphed.new_state(1)
            graphed.prefill(ids, state)                            # captures this plan's graphs
            ms[plan] = time_ms(lambda: graphed.prefill(ids, state), reps=5, warmup=1)
            pieces = "+".join(map(str, graphed.prefill_plan(1, T)))
            row("prefill", f"130m fp16 prefill {T} tokens: CUDA graphs, {plan} pieces ({pieces})", ms[plan], None,
                tokens_per_s=T / ms[plan] * 1e3)
        del graphed.PIECE_COST_TOKENS                              # the class's setting again
        out.setdefault("uneven", {})[T] = ms
    if reference_at:
        ids = torch.randint(0, 50280, (1, reference_at), generator=g).to(DEV)
        model.prefill(ids[:, :64], last_only=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.prefill(ids, last_only=True)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        out["reference"] = reference_at / (ms * 1e-3)
        row("prefill", f"130m fp16 prefill {reference_at // 1024}k tokens: reference (one run)", ms, None,
            tokens_per_s=out["reference"])
    return out


# ---- single kernels ------------------------------------------------------------------------------------------------
@torch.no_grad()
def bench_kernels(bw: float, T: int = 16384) -> None:
    from .backends.triton_backend import TritonBackend
    from .models.ops.triton import TRITON_OPS
    from .models.ops.triton.pool import pool_mix, pool_sweep_ends

    c = MemMambaConfig.preset("130m")
    Di, N, K, ds, d, H, p = c.d_inner, c.d_state, c.pool_size, c.summary_dim, c.d_model, c.memory_heads, \
        c.cross_layer_every
    g = torch.Generator(device=DEV).manual_seed(3)

    def rand(*shape, dtype=torch.float16):
        return torch.randn(*shape, generator=g, device=DEV, dtype=torch.float32).to(dtype)

    floor = lambda nbytes: nbytes / bw * 1e3                                     # noqa: E731
    # selective scan, prefill shape
    x, dt, z = rand(1, T, Di), rand(1, T, Di) * 0.5 - 2, rand(1, T, Di)
    B, C = rand(1, T, N), rand(1, T, N)
    A = -torch.exp(torch.rand(Di, N, device=DEV) * 2)
    D, bias, h0 = torch.ones(Di, device=DEV), torch.rand(Di, device=DEV) * 0.1, torch.zeros(1, Di, N, device=DEV)
    ms = graph_ms(lambda: TRITON_OPS.selective_scan(x, dt, A, B, C, D, z, bias, h0), reps=20)
    nbytes = 4 * T * Di * 2 + 2 * T * N * 2
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    row("kernel", f"selective_scan T={T // 1024}k fp16", ms, floor(nbytes), bytes=nbytes,
        exp_per_s=T * Di * N / (ms * 1e-3), note=f"issue/MUFU-bound: two passes of T·Di·N exp2 ({sm} SMs x 16/clk)")
    # the prefill's residual add + RMSNorm (h fp32 in and out, y and u fp16) and causal conv (x a strided view of
    # in_proj's output, as in the model)
    h, y, w_norm = rand(1, T, d, dtype=torch.float32), rand(1, T, d), rand(d)
    ms = graph_ms(lambda: TRITON_OPS.residual_norm(h, y, w_norm, 1e-5), reps=20)
    nbytes = T * d * (4 + 2 + 4 + 2)
    row("kernel", f"residual_norm T={T // 1024}k fp16", ms, floor(nbytes), bytes=nbytes)
    xz, w_conv, b_conv = rand(1, T, 2 * Di), rand(Di, c.d_conv), rand(Di)
    window = rand(1, Di, c.d_conv - 1)
    ms = graph_ms(lambda: TRITON_OPS.causal_conv(xz[..., :Di], w_conv, b_conv, window), reps=20)
    nbytes = T * Di * 2 * 2
    row("kernel", f"causal_conv T={T // 1024}k fp16", ms, floor(nbytes), bytes=nbytes)
    # one-token state step
    h = torch.randn(1, Di, N, device=DEV)
    xs, dts, zs, Bs, Cs = x[:, 0], dt[:, 0], z[:, 0], B[:, 0], C[:, 0]
    ms = graph_ms(lambda: TRITON_OPS.selective_state_step(h, xs, dts, A, Bs, Cs, D, zs, bias), reps=100)
    row("kernel", "selective_state_step B=1 fp16", ms, floor(2 * Di * N * 4 + Di * N * 4), bytes=3 * Di * N * 4,
        note="latency-bound: 0.3 MB in one short wave; decode runs it fused into ssm_out")
    # pool sweep
    scores = torch.rand(1, T, generator=g, device=DEV)
    prio0 = torch.full((1, K), -1.0, device=DEV)
    ms = graph_ms(lambda: TRITON_OPS.pool_sweep(scores, prio0, 0.5), reps=20)
    nbytes = T * 4 + (T + 1) * K * 4
    row("kernel", f"pool_sweep T={T // 1024}k K={K}", ms, floor(nbytes), bytes=nbytes,
        note="five launches; the slot replay of the ~300 entering tokens is one warp per batch row")
    index, _, ends = pool_sweep_ends(scores, prio0, 0.5)
    index = index[:, :T]
    for groups in (1, p):
        idx = torch.cat([torch.where(index >= 0, index + i * (K + T), -1) for i in range(groups)], 2).int()
        M = groups * (K + T)
        q, keys, values = rand(1, T, ds), rand(1, M, ds), rand(1, M, d)
        ms = graph_ms(lambda: TRITON_OPS.pool_attention(q, keys, values, idx, H), reps=20)
        nbytes = T * ds * 2 + T * d * 2 + T * groups * K * 4 + M * (ds + d) * 2
        row("kernel", f"pool_attention T={T // 1024}k S={groups * K} (fp32 models, AOT)", ms, floor(nbytes),
            bytes=nbytes, note=f"gathers: each query reads its S entries' keys and values through L2, "
                               f"{T * groups * K * (ds + d) * 2 / 1e9:.1f} GB; the floor counts each entry once")
        # the prefill's read (pool_mix_kernel, between the fused path's GEMMs): queries, index and bank in, m out
        qk, bank, gain = rand(1, T, H * ds), rand(1, M, ds), torch.full((1, T), 0.1, device=DEV)
        m = torch.empty_like(qk)
        banks = list(bank.split(K + T, dim=1))                  # a group's pools, in place, with the sweep's ends
        ms = graph_ms(lambda: pool_mix(qk, banks, [index] * groups, gain, H, m, [ends] * groups), reps=20)
        nbytes = 2 * T * H * ds * 2 + T * groups * K * 4 + M * ds * 2 + T * 4
        row("kernel", f"pool_mix T={T // 1024}k S={groups * K} (the prefill's read)", ms, floor(nbytes),
            bytes=nbytes, note=f"each query reads its S summaries through L2, {T * groups * K * ds * 2 / 1e9:.2f} GB; "
                               "the floor counts each once")
    # the decode kernels of one 130m layer (a cross layer), fp16, batch 1
    model = make_130m(torch.float16)
    backend = TritonBackend(model, cuda_graph=False, step_kernel="layered")
    bufs = backend._get_buffers(1)
    backend._launch(bufs, 0)
    layer = c.cross_layer_every - 1
    w = backend.layers[layer]
    nb = lambda *ts: sum(t.numel() * t.element_size() for t in ts)               # noqa: E731
    state_pool = bufs.states[0].pool[0]
    kbytes = {"norm_proj": nb(w.w_mem) + 2 * d * 4 + 2 * d * 2,
              "note_pool": nb(w.wk, w.wv, w.x_wk, w.x_wv) + (1 + p) * nb(state_pool) + d * 2 * 2,
              "in_proj_conv": nb(w.w_in, w.w_xT, w.conv_w) + 2 * Di * 3 * 2 + 2 * Di * 2,
              "ssm_out": nb(w.w_dt, w.w_outT, w.A) + 2 * Di * N * 4 + d * 4 + 2 * Di * 2}
    for l, name, launch in backend.launches(bufs, 0):
        if l == layer:
            ms = graph_ms(launch, reps=200)
            row("kernel", f"decode {name} (130m layer {layer}, fp16, B=1)", ms, floor(kbytes[name]),
                bytes=kbytes[name], note="batch-1 latency: one short wave and a reduction across programs, "
                                         "microseconds whatever the bytes")


# ---- report --------------------------------------------------------------------------------------------------------
def report(out_dir: Path, decode: list[dict], prefill: dict, bw: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Triton path on {torch.cuda.get_device_name(0)}")
    for col in ("group", "what", "ms", "floor ms", "x floor", "note"):
        table.add_column(col, justify="right" if col in ("ms", "floor ms", "x floor") else "left")
    for r in ROWS:
        note = r.get("note", "")
        if "tokens_per_s" in r:
            power = power_note(r)
            note = f"{r['tokens_per_s'] / 1e6:.2f} M tokens/s" + (f"; {power}" if power else "")
        if "bandwidth_GBps" in r:
            note = f"{r['bandwidth_GBps']:.0f} GB/s"
        table.add_row(r["group"], r["what"], f"{r['ms']:.4f}" if r["ms"] is not None else "",
                      f"{r['floor_ms']:.4f}" if r["floor_ms"] else "", f"{r['x_floor']:.1f}" if r["x_floor"] else "",
                      note)
    Console(width=160).print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.jsonl", "a") as f:
        for r in ROWS:
            f.write(json.dumps({**r, "device": torch.cuda.get_device_name(0)}) + "\n")
    print(f"@@ kernel-bench: copy bandwidth {bw / 1e9:.0f} GB/s")
    for d in decode:
        ref = f", reference {d['reference_step']:.2f}" if "reference_step" in d else ""
        print(f"@@ kernel-bench: decode {d['name']} CUDA graph {d['graph_replay']:.3f} ms/token (step() "
              f"{d['graph_step']:.3f}, eager {d['eager_step']:.2f}{ref}"
              + (f", without PDL {d['graph_replay_no_pdl']:.3f}" if "graph_replay_no_pdl" in d else "")
              + f", persistent kernel {d['graph_replay_persistent']:.3f}"
              + f"); floor {d['floor']:.3f} ms, "
              f"{d['graph_replay'] / d['floor']:.1f}x")
    if prefill:
        parts = [f"{k // 1024}k {v / 1e6:.2f}M" for k, v in prefill.items() if isinstance(k, int)]
        ref = f"; reference at 2k {prefill['reference'] / 1e3:.1f}k" if "reference" in prefill else ""
        print(f"@@ kernel-bench: prefill 130m fp16 tokens/s (CUDA graphs) {', '.join(parts)}{ref}")
        if "uneven" in prefill:
            print("@@ kernel-bench: prefill 130m fp16 at lengths that are no power of two (CUDA graphs, padded to "
                  "fewer pieces / the exact pieces): " + ", ".join(
                      f"{T} tokens {ms['padded']:.2f} / {ms['exact']:.2f} ms" for T, ms in prefill["uneven"].items()))
        sustained = [f"{r['tokens'] // 1024}k {power_note(r)}" for r in ROWS
                     if r["group"] == "prefill" and "power_w" in r]
        if sustained:
            print(f"@@ kernel-bench: prefill sustained (~2 s each): {'; '.join(sustained)}")
    worst = [r for r in ROWS if r["group"] == "kernel" and r["x_floor"]]
    if worst:
        w = max(worst, key=lambda r: r["x_floor"])
        print(f"@@ kernel-bench: kernels vs bytes floor: worst {w['what']} {w['x_floor']:.1f}x; "
              f"{sum(r['x_floor'] <= 3 for r in worst)}/{len(worst)} within 3x")


def release() -> None:
    """Give the previous benchmark's memory back (models, graphs' pools, 64k-token activations)."""
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    ap.add_argument("--skip", default="", help="comma-separated: decode,prefill,kernels,reference")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("@@ kernel-bench: FAIL no CUDA device")
        return 1
    skip = set(args.skip.split(","))
    torch.backends.cuda.matmul.allow_tf32 = False              # fp32 means fp32, as the reference
    torch.backends.cudnn.allow_tf32 = False
    bw = copy_bandwidth()
    decode, prefill = [], {}
    if "decode" not in skip:
        for dtype in (torch.float16, torch.float32):
            decode.append(bench_decode(dtype, bw, reference="reference" not in skip))
            release()
        decode.append(bench_decode(torch.float16, bw, memory=False, reference=False))
        release()
    if "prefill" not in skip:
        prefill = bench_prefill(reference_at=0 if "reference" in skip else 2048)
        release()
    if "kernels" not in skip:
        bench_kernels(bw)
    report(Path(args.out), decode, prefill, bw)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
