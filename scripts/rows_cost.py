"""What Session.stack and Session.rows cost beside a decode step (README: rows join and leave between generate()
calls). Usage: python3 scripts/rows_cost.py CHECKPOINT [--backend triton] [--dtype fp16] [--batches 1,4,16,64]
Prints a table: per batch size, the median time of stack (B prefilled forks -> one session), rows (drop one row),
the first decode step at that batch size (the backend's graph capture for it) and a decode step after it, each
timed after a CUDA synchronize."""
import argparse
import statistics
import time

import torch

from memmamba_deploy.session import Session


def timed(fn, repeats=7):
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--dtype", default="fp16")
    ap.add_argument("--batches", default="1,4,16,64")
    args = ap.parse_args()
    root = Session.open(args.checkpoint, backend=args.backend, device="cuda", dtype=args.dtype)
    gen = torch.Generator().manual_seed(0)
    print(f"{'rows':>5} {'state MB':>9} {'stack ms':>9} {'rows ms':>8} {'first step ms':>14} {'step ms':>8}")
    for B in (int(b) for b in args.batches.split(",")):
        forks = []
        for i in range(B):
            forks.append(root.fork())
            forks[-1].prefill(torch.randint(0, root.config.vocab_size, (64 + 31 * i,), generator=gen))
        stack_ms, batch = timed(lambda: Session.stack(forks))
        rows_ms, _ = timed(lambda: batch.rows(list(range(max(1, B - 1)))))
        token = torch.zeros(B, dtype=torch.long)
        first_ms, _ = timed(lambda: batch.step(token), repeats=1)   # a new batch size: its decode graphs captured
        step_ms, _ = timed(lambda: batch.step(token), repeats=31)
        print(f"{B:>5} {batch.state_nbytes / 1e6:>9.1f} {stack_ms:>9.3f} {rows_ms:>8.3f} {first_ms:>14.1f} "
              f"{step_ms:>8.3f}")


if __name__ == "__main__":
    main()
