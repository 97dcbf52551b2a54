"""What Session.stack and Session.rows cost beside a decode step (README: rows join and leave between generate()
calls), and B prompts of different lengths prefilled apart and stacked against one Session.prefill of them all.
Usage: python3 scripts/rows_cost.py CHECKPOINT [--backend triton] [--dtype fp16] [--batches 1,4,16,64]
Prints a table: per batch size (prompts of 64 + 31 i tokens), the median time of the prompts prefilled apart in
forks and stacked, of one prefill of them as rows (each warmed once: graph captures not counted), of stack (B
prefilled forks -> one session), rows (drop one row), the first decode step at that batch size (the backend's
graph capture for it) and a decode step after it, each timed after a CUDA synchronize."""
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
    print(f"{'rows':>5} {'state MB':>9} {'apart ms':>9} {'together ms':>12} {'stack ms':>9} {'rows ms':>8} "
          f"{'first step ms':>14} {'step ms':>8}")
    for B in (int(b) for b in args.batches.split(",")):
        prompts = [torch.randint(0, root.config.vocab_size, (64 + 31 * i,), generator=gen) for i in range(B)]

        def apart():
            forks = [root.fork() for _ in prompts]
            for f, p in zip(forks, prompts):
                f.prefill(p)
            return forks

        def together():
            s = root.fork()
            s.prefill(prompts)
            return s

        apart(), together()                                         # first use: the prefill graphs captured
        apart_ms, _ = timed(lambda: Session.stack(apart()))
        together_ms, _ = timed(together)
        forks = apart()
        stack_ms, batch = timed(lambda: Session.stack(forks))
        rows_ms, _ = timed(lambda: batch.rows(list(range(max(1, B - 1)))))
        token = torch.zeros(B, dtype=torch.long)
        first_ms, _ = timed(lambda: batch.step(token), repeats=1)   # a new batch size: its decode graphs captured
        step_ms, _ = timed(lambda: batch.step(token), repeats=31)
        print(f"{B:>5} {batch.state_nbytes / 1e6:>9.1f} {apart_ms:>9.2f} {together_ms:>12.2f} {stack_ms:>9.3f} "
              f"{rows_ms:>8.3f} {first_ms:>14.1f} {step_ms:>8.3f}")


if __name__ == "__main__":
    main()
