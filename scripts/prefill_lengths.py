"""The Triton backend's graphed prefill at prompt lengths that are no power of two: each captured piece costs a
fixed ~2 ms (the 130m on an H100), so TritonBackend.prefill_plan pads a prompt rather than run more pieces.
Usage: python3 scripts/prefill_lengths.py CHECKPOINT [--dtype fp16] [--lengths 100,1000,...] [--costs 0,2048,4096]
Prints, per prompt length, the plan and the median time of a batch-1 prefill (after a warm-up that captures its
graphs) for each PIECE_COST_TOKENS setting (0: the exact pieces, no padding), all backends alternated."""
import argparse
import statistics
import time

import torch

from memmamba_deploy.backends.triton_backend import TritonBackend


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--lengths", default="100,500,1000,1024,1500,2047,2048,3000,5000,9000,17000,40000")
    ap.add_argument("--costs", default="0,2048,4096")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    costs = [int(c) for c in args.costs.split(",")]
    backends = {}
    for c in costs:
        backends[c] = TritonBackend.open(args.checkpoint, device="cuda", dtype=dtype)
        backends[c].PIECE_COST_TOKENS = c
    gen = torch.Generator().manual_seed(0)
    print(f"{'tokens':>7} " + " ".join(f"{f'cost {c}: plan':>24} {'ms':>7}" for c in costs))
    for T in (int(t) for t in args.lengths.split(",")):
        ids = torch.randint(0, backends[costs[0]].config.vocab_size, (1, T), generator=gen)
        times = {c: [] for c in costs}
        for c in costs:                                           # first use: the pieces' graphs captured
            backends[c].prefill(ids, backends[c].new_state(1))
        for _ in range(args.rounds):
            for c in costs:
                b = backends[c]
                state = b.new_state(1)
                torch.cuda.synchronize()
                t = time.perf_counter()
                b.prefill(ids, state)
                torch.cuda.synchronize()
                times[c].append((time.perf_counter() - t) * 1e3)
        row = []
        for c in costs:
            plan = backends[c].prefill_plan(1, T)
            row.append(f"{'+'.join(map(str, plan)):>24} {statistics.median(times[c]):>7.2f}")
        print(f"{T:>7} " + " ".join(row), flush=True)


if __name__ == "__main__":
    main()
