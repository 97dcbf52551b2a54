"""In-run baselines for BENCHMARKS.md (GPU): copy bandwidth -> HBM floor, and Hugging Face Mamba-130M decode.

The anchor figures were measured on another day; ratios in BENCHMARKS.md are taken against these, measured in the
same run as the figures they divide.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read + written (median of `reps`)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * nbytes / statistics.median(times)


def hf_mamba_decode_ms(dtype: torch.dtype, new_tokens: int = 128, prompt_len: int = 16) -> float:
    """ms/token of transformers' MambaForCausalLM (130m shape, random weights) decoding with its cache:
    (time of generate(N+1 tokens) - time of generate(1 token)) / N, medians of 3."""
    import transformers

    cfg = transformers.MambaConfig(vocab_size=50280, hidden_size=768, state_size=16, num_hidden_layers=24, expand=2)
    model = transformers.MambaForCausalLM(cfg).to("cuda", dtype).eval()
    ids = torch.randint(0, 50280, (1, prompt_len), device="cuda")

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)
    short = statistics.median(run(1) for _ in range(3))
    long = statistics.median(run(new_tokens + 1) for _ in range(3))
    return (long - short) / new_tokens * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu"))
    args = ap.parse_args(argv)
    bw = copy_bandwidth()
    params_130m = 129_135_360  # memory-off 130m preset: tied embeddings, 24 layers
    rows = {"copy_bandwidth_TBps": bw / 1e12, "hbm_floor_130m_fp16_ms": 2 * params_130m / bw * 1e3,
            "hbm_floor_130m_fp32_ms": 4 * params_130m / bw * 1e3}
    print(f"@@ copy bandwidth {bw / 1e12:.2f} TB/s; HBM floor 130m fp16 {rows['hbm_floor_130m_fp16_ms']:.3f} ms/token")
    for name, dt in (("fp16", torch.float16), ("fp32", torch.float32)):
        try:
            ms = hf_mamba_decode_ms(dt)
            rows[f"hf_mamba_130m_{name}_ms"] = ms
            print(f"@@ HF MambaForCausalLM 130m {name} decode {ms:.2f} ms/token "
                  f"({ms / rows['hbm_floor_130m_fp16_ms']:.0f}x the fp16 floor)")
        except Exception as e:  # a baseline that cannot run is reported, not fatal
            print(f"@@ HF MambaForCausalLM {name}: not measured ({type(e).__name__}: {e})")
    with open(os.path.join(args.out, "results.jsonl"), "a") as f:
        f.write(json.dumps({"bench": "baselines", "device": torch.cuda.get_device_name(), **rows}) + "\n")


if __name__ == "__main__":
    main()
