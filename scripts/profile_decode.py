"""Where the time goes: one decode step of the 130m preset (fp16, batch 1) on the Triton backend's layered kernels
replayed as a CUDA graph, per kernel name under torch.profiler; the persistent kernel's phases, from the clock
stamps it writes with PROFILE on (--phases); and (--prefill T) one Triton-kernel prefill of T tokens, per kernel,
then its time as TritonBackend's CUDA graphs. For perf work on models/ops/triton/.

    python scripts/profile_decode.py [--preset 130m] [--dtype fp16] [--steps 50] [--no-memory] [--prefill 16384]
                                     [--no-pdl] [--sweep] [--phases]
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from memmamba_deploy.backends.triton_backend import TritonBackend
from memmamba_deploy.bench_kernels import time_ms
from memmamba_deploy.models import MemMambaConfig, MemMambaLM


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="130m")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--prefill", type=int, default=0, help="also profile a prefill of this many tokens")
    ap.add_argument("--no-pdl", action="store_true", help="profile without programmatic dependent launch (kernel "
                    "times then do not overlap)")
    ap.add_argument("--sweep", action="store_true", help="time the step over block sizes of in_proj_conv/ssm_out")
    ap.add_argument("--phases", action="store_true", help="profile the persistent kernel's phases")
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = MemMambaLM(MemMambaConfig.preset(args.preset, memory=not args.no_memory)).to("cuda", dtype).eval()
    be = TritonBackend(model, cuda_graph=True, pdl=False if args.no_pdl else None, step_kernel="layered")
    tok = torch.zeros(1, dtype=torch.long, device="cuda")
    _, state = be.prefill(torch.zeros(1, 64, dtype=torch.long), be.new_state(1))
    for _ in range(10):
        _, state = be.step(tok, state)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            _, state = be.step(tok, state)
        torch.cuda.synchronize()
    report(prof, args.steps, f"{args.preset} {args.dtype} memory={'off' if args.no_memory else 'on'}: decode step")
    for pdl in (True, False):                       # wall time per step (graph replays), PDL on / off
        ms = replay_ms(TritonBackend(model, True, pdl, step_kernel="layered"), args.steps)
        print(f"decode step, layered kernels, CUDA graph, pdl={pdl}: {ms:.3f} ms/token (median of 5 runs of "
              f"{args.steps})")
    ms = replay_ms(TritonBackend(model, True, step_kernel="persistent"), args.steps)
    print(f"decode step, persistent kernel, CUDA graph: {ms:.3f} ms/token")
    if args.phases:
        phases(model)
    if args.sweep:
        for c_block in (4, 8, 16, 32):
            for d_block in (8, 16, 32, 64):
                row = []
                for pdl in (True, False):
                    be = TritonBackend(model, cuda_graph=True, pdl=pdl, step_kernel="layered")
                    be.blocks["in_proj_conv"].update(BLOCK_C=c_block, num_warps=4 if c_block <= 8 else 8)
                    be.blocks["ssm_out"].update(BLOCK_C=d_block, num_warps=4 if d_block <= 8 else 8)
                    row.append(replay_ms(be, args.steps))
                print(f"sweep in_proj_conv BLOCK_C={c_block:<3} ssm_out BLOCK_C={d_block:<3} ms/token: pdl "
                      f"{row[0]:.3f}  no pdl {row[1]:.3f}")
    if args.prefill:
        model.set_kernels("triton")
        ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), device="cuda")
        with torch.no_grad():
            model.prefill(ids)                                      # compile and warm up
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model.prefill(ids)
                torch.cuda.synchronize()
        report(prof, 1, f"prefill of {args.prefill} tokens")
        graphed = TritonBackend(model, cuda_graph=True)
        state = graphed.new_state(1)
        graphed.prefill(ids, state)                                 # captures this length's graphs
        ms = time_ms(lambda: graphed.prefill(ids, state), reps=5, warmup=1)
        print(f"prefill of {args.prefill} tokens, TritonBackend (CUDA graphs): {ms:.2f} ms = "
              f"{args.prefill / ms / 1e3:.3f} M tokens/s")


def phases(model):
    """The persistent kernel's phases from its clock stamps (SM cycles): per phase kind, the median over layers of
    the slowest program's work after its wait, and how long programs wait at the barriers."""
    be = TritonBackend(model, cuda_graph=False, step_kernel="persistent")
    grid = be.step_blocks["grid"]
    be.profile = torch.zeros(grid, 256, 6, dtype=torch.int64, device="cuda")
    state, tok = be.new_state(1), torch.zeros(1, dtype=torch.long, device="cuda")
    for _ in range(5):
        _, state = be.step(tok, state)
    torch.cuda.synchronize()
    p, c = be.profile.double(), model.config
    per_layer = 3 if c.memory else 2
    n = c.n_layers * per_layer + 1
    print(f"persistent kernel, {grid} programs: {(p[:, n - 1, 1] - p[:, 0, 0]).median():.0f} cycles per step")
    names = (["note (P1)"] if c.memory else []) + ["in_proj (P2)", "ssm (P3)"]
    for k, name in enumerate(names):
        idx = [l * per_layer + k for l in range(c.n_layers)]
        work = (p[:, idx, 2] - p[:, idx, 1]).max(0).values
        print(f"  {name:<13} slowest program's work: median {work.median():.0f} cycles, max {work.max():.0f}")
    gaps = p[:, 1:n, 1] - p[:, 0:n - 1, 2]
    print(f"  arrive -> barrier open: median {gaps.median():.0f} cycles, p90 {gaps.quantile(0.9):.0f}")


def replay_ms(be, steps):
    """Median over 5 runs of `steps` back-to-back graph replays, ms per step."""
    graph = be._get_buffers(1).graphs[0]
    return time_ms(lambda: [graph.replay() for _ in range(steps)], reps=5, warmup=1) / steps


def report(prof, steps, what):
    per = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            name = e.name.split("(")[0][:60]
            n, t = per.get(name, (0, 0.0))
            per[name] = (n + 1, t + e.device_time)
    total = sum(t for _, t in per.values())
    print(f"\n{what}: GPU time {total / steps:.1f} us per call (sum of kernel times, over {steps} calls)")
    print(f"{'kernel':<60} {'calls':>7} {'us':>9} {'us/call':>8} {'share':>6}")
    for name, (n, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:25]:
        print(f"{name:<60} {n / steps:>7.1f} {t / steps:>9.1f} {t / n:>8.2f} {100 * t / total:>5.1f}%")


if __name__ == "__main__":
    main()
