"""`memdeploy bench`: decode latency per token against context length, MemMamba beside a KV-cache transformer.

Method, the same for both models (kv_baseline.py is the transformer: same vocabulary, width and depth):
  1. Prefill random token ids (seeded) in chunks, resuming each context from the previous one's state: one pass
     reaches 1k, goes on to 4k, and so on, so the state at every length is really reached by prefilling that many
     tokens, at the cost of prefilling the longest context once. Prefill throughput is timed per segment.
  2. At each length keep a copy of the state. Then decode `tokens` random tokens from every length, in `rounds`
     interleaved rounds after `warmup` untimed steps, so slow drift of a shared machine spreads over all lengths
     alike. Each step is timed alone, as a decode loop waits for each token: CUDA events with a synchronize on a
     GPU, perf_counter on a CPU.
  3. Report the median and p90 ms/token, the state (or KV cache) bytes, and the flatness ratio
     median(longest context) / median(shortest context). Target: <= 1.05 for MemMamba on every backend.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import subprocess
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from .kv_baseline import KVBaseline
from .models.checkpoint import atomic_file, creatable_dir, write_json
from .models.ops import check_kernels_on
from .session import DTYPE_NAMES, backend_spec, inspect_path, open_backend

FLATNESS_TARGET = 1.05
REPO = Path(__file__).resolve().parent.parent


def parse_contexts(text: str) -> list[int]:
    """"1k,4k,16k" -> [1024, 4096, 16384] (k = 1024, m = 1024²; plain numbers are tokens: passkey.parse_lengths)."""
    from .passkey import parse_lengths

    out = parse_lengths(text, what="context length")
    if sorted(set(out)) != out:
        raise ValueError(f"context lengths must be distinct and increasing, got {text!r}")
    return out


def fmt_tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def backend_device(backend) -> torch.device:
    model = getattr(backend, "model", None)
    if isinstance(model, torch.nn.Module):
        return next(model.parameters()).device
    dev = getattr(backend, "device", "cpu")
    return torch.device(dev if isinstance(dev, (str, torch.device)) else "cpu")


class StepTimer:
    """Seconds taken by one call, the call's device work included."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.method = "cuda events + synchronize per step" if self.cuda else "time.perf_counter per step"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        import time
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


@contextmanager
def prefill_kernels(backend, kernels: str | None):
    """Prefill a TorchBackend with another kernel set (the reference scan is a Python loop: 64k tokens take
    minutes); the State it reaches is the same type and matches the reference, and decode is timed as opened."""
    model = getattr(backend, "model", None)
    if not kernels or not hasattr(model, "set_kernels") or model.kernels == kernels:
        yield
        return
    before = model.kernels
    model.set_kernels(kernels)
    try:
        yield
    finally:
        model.set_kernels(before)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    i = (len(xs) - 1) * q
    lo, hi = math.floor(i), math.ceil(i)
    return xs[lo] + (xs[hi] - xs[lo]) * (i - lo)


def check_settings(**settings: int) -> None:
    """ValueError naming each setting below its least (warmup may be 0, the others must be >= 1)."""
    bad = [f"--{k} must be >= {int(k != 'warmup')}, got {v}" for k, v in settings.items() if v < int(k != "warmup")]
    if bad:
        raise ValueError("bad bench settings: " + "; ".join(bad))


@torch.no_grad()
def measure(backend, contexts: list[int], tokens: int = 256, batch: int = 1, *, warmup: int = 16, rounds: int = 4,
            chunk: int = 2048, seed: int = 0, progress=None, label: str = "", prefill_with: str | None = None,
            copy_state=None) -> dict:
    """Steps 1-3 of the module docstring for one backend. Returns {"rows": [...], "flatness": x}."""
    check_settings(tokens=tokens, batch=batch, warmup=warmup, rounds=rounds, chunk=chunk)
    timer = StepTimer(backend_device(backend))
    vocab = backend.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (batch, contexts[-1]), generator=g)
    decode_ids = torch.randint(0, vocab, (batch, warmup + tokens), generator=g)
    copy_state = copy_state or backend.copy_state
    bar = progress or _NoProgress()
    task = bar.add_task(f"{label} prefill", total=contexts[-1])

    rows, states = [], []
    state, done = backend.new_state(batch), 0
    for ctx in contexts:
        seconds = 0.0
        with prefill_kernels(backend, prefill_with):
            while done < ctx:
                n = min(chunk, ctx - done)
                piece = prompt[:, done:done + n]

                def run(piece=piece):
                    nonlocal state
                    _, state = backend.prefill(piece, state)
                seconds += timer(run)
                done += n
                bar.update(task, completed=done, description=f"{label} prefill → {fmt_tokens(done)}")
        segment = ctx - (contexts[contexts.index(ctx) - 1] if ctx != contexts[0] else 0)
        rows.append({"context": ctx, "prefill_tokens": segment, "prefill_s": seconds,
                     "prefill_tok_s": segment * batch / seconds if seconds > 0 else float("inf"),
                     "state_bytes": int(backend.state_nbytes(state))})
        states.append(copy_state(state))
    del state

    task = bar.add_task(f"{label} decode", total=len(contexts) * (warmup + tokens))
    times: list[list[float]] = [[] for _ in contexts]
    per_round = math.ceil(tokens / rounds)
    for i in range(len(contexts)):                                 # warm-up: untimed steps from every state
        for j in range(warmup):
            _, states[i] = backend.step(decode_ids[:, j], states[i])
            bar.advance(task)
    timer.sync()
    for r in range(rounds):
        for i in range(len(contexts)):
            for j in range(warmup + r * per_round, warmup + min(tokens, (r + 1) * per_round)):
                def run(i=i, j=j):
                    _, states[i] = backend.step(decode_ids[:, j], states[i])
                times[i].append(timer(run))
                bar.advance(task)
    for row, ts in zip(rows, times):
        row["decode_ms_median"] = statistics.median(ts) * 1e3
        row["decode_ms_p90"] = percentile(ts, 0.9) * 1e3
        row["decode_ms_min"] = min(ts) * 1e3
        row["decode_tokens"] = len(ts)
    flatness = rows[-1]["decode_ms_median"] / rows[0]["decode_ms_median"] if len(rows) > 1 else None
    return {"rows": rows, "flatness": flatness, "timer": timer.method}     # None: one context, nothing compared


class _NoProgress:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def advance(self, *a, **k):
        pass


# --------------------------------------------------------------------------------------------------------------
# The whole benchmark: MemMamba on one backend + the KV baseline, JSON + PNG
# --------------------------------------------------------------------------------------------------------------
def git_commit() -> str:
    if os.environ.get("COMMIT"):
        return os.environ["COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} torch threads, " \
           f"{os.cpu_count()} cores)"


def run_bench(path, backend: str | None = None, contexts=(1024, 4096, 16384, 65536), tokens: int = 256, batch: int = 1,
              dtype=None, device: str | None = None, baseline: bool = True, warmup: int = 16, rounds: int = 4,
              chunk: int = 2048, seed: int = 0, prefill_with: str | None = None, progress=None,
              backend_obj=None, **options) -> dict:
    """Bench MemMamba at `path` on `backend` and (baseline=True) the KV-cache transformer of its shape."""
    contexts = list(contexts)
    model = backend_obj or open_backend(path, backend, device=device, dtype=dtype, **options)
    dev = backend_device(model)
    if prefill_with is None and getattr(model, "name", "") == "torch" and dev.type == "cuda":
        prefill_with = _triton_if_available()     # the reference prefill of 64k tokens takes minutes on a GPU
    art = inspect_path(path) if path is not None else None
    model_dtype = _backend_dtype(model, art)
    # the KV baseline in the model's dtype, except on a CPU, whose half-precision matmuls are emulated (slow)
    kv_dtype = torch.float32 if dev.type == "cpu" else {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        model_dtype, torch.float32)
    check_memory(model.config, contexts, batch, warmup + tokens, baseline, torch.finfo(kv_dtype).bits // 8, dev)
    results = {
        "meta": {"path": str(path), "backend": getattr(model, "name", backend), "device": str(dev),
                 "device_name": device_name(dev), "dtype": model_dtype, "batch": batch, "tokens": tokens,
                 "warmup": warmup, "rounds": rounds, "prefill_chunk": chunk, "seed": seed,
                 "prefill_kernels": prefill_with, "commit": git_commit(), "torch": torch.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "config": dataclass_dict(model.config), "contexts": contexts,
                 "flatness_target": FLATNESS_TARGET},
        "models": {},
    }
    mm = measure(model, contexts, tokens, batch, warmup=warmup, rounds=rounds, chunk=chunk, seed=seed,
                 progress=progress, label=f"MemMamba ({results['meta']['backend']})", prefill_with=prefill_with)
    results["models"]["memmamba"] = {"label": f"MemMamba ({results['meta']['backend']})", **mm}
    results["meta"]["timer"] = mm.pop("timer")
    if baseline:
        kv = KVBaseline.like(model.config, device=dev, dtype=kv_dtype, capacity=contexts[-1], seed=seed)
        res = measure(kv, contexts, tokens, batch, warmup=warmup, rounds=rounds, chunk=chunk, seed=seed,
                      progress=progress, label="KV transformer",
                      copy_state=lambda s: kv.copy_state(s, headroom=warmup + tokens))
        res.pop("timer")
        results["models"]["kv_baseline"] = {
            "label": f"Transformer + KV cache (SDPA{', CUDA graph' if kv.graph else ''}, d={kv.config.d_model}, "
                     f"L={kv.config.n_layers}, {kv.config.heads} heads"
                     f"{'' if DTYPE_NAMES[kv_dtype] == model_dtype else ', ' + DTYPE_NAMES[kv_dtype]})",
            "dtype": DTYPE_NAMES[kv_dtype], "params": kv.n_params, **res}
    return results


def _triton_if_available() -> str | None:
    from .models.ops import load_ops
    try:
        load_ops("triton")
        return "triton"
    except ImportError:
        return None


def _backend_dtype(model, art) -> str:
    """What the backend computes in: its module's weights where it has one, else the export's dtype."""
    m = getattr(model, "model", None)
    if isinstance(m, torch.nn.Module):
        return DTYPE_NAMES.get(next(m.parameters()).dtype, str(next(m.parameters()).dtype))
    if art is not None and art.manifest is not None:
        return str(art.manifest.get("dtype", "fp32"))
    return "fp32"


def _available_host_memory() -> int | None:
    """MemAvailable (free memory plus what the kernel can reclaim, the page cache), bytes; None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory(config, contexts: list[int], batch: int, headroom: int, baseline: bool, kv_bytes: int,
                 device: torch.device) -> None:
    """Refuse, before any work, contexts whose prompt (int64 ids) or KV-baseline caches (one per context, as
    measure() keeps them) would not fit in the memory free on `device` now."""
    if device.type == "cuda":                # free, plus what torch's allocator holds unused
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - \
            torch.cuda.memory_allocated(device)
    else:
        free = _available_host_memory()
        if free is None:                     # not Linux: nothing to check against
            return
    need = 8 * batch * contexts[-1]
    if baseline:                             # the working cache (capacity: the longest context) and one copy a context
        need += sum(2 * config.n_layers * (c + headroom) * config.d_model * batch * kv_bytes
                    for c in [contexts[-1], *contexts])
    if need > free:
        what = "the prompt and the KV baseline's caches" if baseline else "the prompt"
        raise ValueError(f"--contexts up to {fmt_tokens(contexts[-1])} tokens: {what} need {need / 2**30:.1f} GiB, "
                         f"{free / 2**30:.1f} GiB free on {device}" + ("; use shorter contexts or --no-baseline"
                                                                        if baseline else "; use shorter contexts"))


def dataclass_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def write_results(results: dict, out: Path) -> tuple[Path, Path]:
    """bench.json and bench.png in `out`, each written to a temporary file and renamed into place."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "bench.json", out / "bench.png"
    write_json(json_path, results)
    with atomic_file(png_path) as tmp:
        plot(results, tmp)
    return json_path, png_path


def plot(results: dict, path: Path) -> None:
    """Two panels against context length: decode ms/token (median, p90 band) and state / KV-cache memory."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    meta = results["meta"]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"memmamba": dict(color="tab:blue", marker="o"), "kv_baseline": dict(color="tab:red", marker="s")}
    for key, res in results["models"].items():
        x = [r["context"] for r in res["rows"]]
        med = [r["decode_ms_median"] for r in res["rows"]]
        p90 = [r["decode_ms_p90"] for r in res["rows"]]
        mem = [r["state_bytes"] / 2**20 for r in res["rows"]]
        st = styles.get(key, {})
        ax_t.plot(x, med, label=f"{res['label']}", **st)
        ax_t.fill_between(x, med, p90, color=st.get("color"), alpha=0.15)
        ax_m.plot(x, mem, label=res["label"], **st)
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xticks(meta["contexts"], [fmt_tokens(c) for c in meta["contexts"]])
        ax.set_xlabel("context length (tokens prefilled before decoding)")
        ax.grid(True, alpha=0.3)
    # log scale: a flat curve stays visible beside one that grows 10x; a noisy machine's p90 band is clipped
    medians = [r["decode_ms_median"] for res in results["models"].values() for r in res["rows"]]
    ax_t.set_yscale("log")
    ax_t.set_ylim(min(medians) / 2, max(medians) * 2)
    ax_t.set_ylabel("decode latency (ms/token, log scale)")
    ax_t.set_title("per-token decode latency (line: median, band: to p90)")
    ax_m.set_yscale("log")
    ax_m.set_ylabel("recurrent state / KV cache (MiB, log scale)")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for ax in (ax_t, ax_m):                                      # 0.5, 1, 2, 5, 10 rather than 10^0 and 5x10^-1
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(subs=(2.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    ax_m.set_title("memory that grows with context")
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9, frameon=False)
    fig.suptitle(f"memdeploy bench: {meta['backend']} on {meta['device_name']}, {meta['dtype']}, batch "
                 f"{meta['batch']}, commit {meta['commit']}", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


NOISY_P90 = 2.0   # p90 / median of a decode row above this: other work shared the machine (quiet: 1.1-1.2)


def noise_note(*runs: dict) -> str | None:
    """A warning where a run's decode timings are too spread to compare (the worst p90 / median), else None."""
    worst = max(((r["decode_ms_p90"] / r["decode_ms_median"], m["label"], r["context"])
                 for res in runs for m in res["models"].values() for r in m["rows"] if r["decode_ms_median"] > 0),
                default=None)
    if worst is None or worst[0] <= NOISY_P90:
        return None
    return (f"noisy timings: p90 is {worst[0]:.1f}x the median ({worst[1]} at {fmt_tokens(worst[2])} context); "
            f"other work probably shared the machine: rerun on a quiet one before comparing")


def results_table(results: dict):
    """A rich Table: one row per context, both models side by side (fits 80 columns)."""
    from rich import box
    from rich.table import Table

    meta, models = results["meta"], results["models"]
    mm, kv = models["memmamba"], models.get("kv_baseline")
    t = Table(title=f"{mm['label']}{' vs a KV-cache transformer' if kv else ''}: decode ms/token, median/p90",
              caption=f"{meta['device_name']}, {meta['dtype']}, batch {meta['batch']}, {meta['tokens']} timed "
                      f"tokens per context ({meta['timer']})"
                      + (f"; ms/token is one decode step, a token for each of the {meta['batch']} rows"
                         if meta['batch'] > 1 else "") + ". flatness: median at the longest / shortest "
                      f"context (target ≤ {FLATNESS_TARGET}). prefill: tokens/s over the segment up to the "
                      f"context" + (" (MemMamba/KV). cache: the KV cache's bytes. KV÷MM: median latency ratio."
                                    if kv else "."), box=box.SIMPLE_HEAD)
    t.add_column("context", justify="right", no_wrap=True, min_width=8)
    t.add_column("MemMamba", justify="right", no_wrap=True, min_width=9)
    t.add_column("state", justify="right", no_wrap=True)
    if kv:
        t.add_column("KV tfm", justify="right", no_wrap=True, min_width=9)
        t.add_column("cache", justify="right", no_wrap=True)
        t.add_column("KV÷MM", justify="right", no_wrap=True)
    t.add_column("prefill", justify="right", no_wrap=True)
    for i, r in enumerate(mm["rows"]):
        cells = [fmt_tokens(r["context"]), f"{r['decode_ms_median']:.3g}/{r['decode_ms_p90']:.3g}",
                 fmt_bytes(r["state_bytes"])]
        prefill = fmt_rate(r["prefill_tok_s"])
        if kv:
            k = kv["rows"][i]
            cells += [f"{k['decode_ms_median']:.3g}/{k['decode_ms_p90']:.3g}", fmt_bytes(k["state_bytes"]),
                      f"{k['decode_ms_median'] / r['decode_ms_median']:.2f}"]
            prefill += f"/{fmt_rate(k['prefill_tok_s'])}"
        t.add_row(*cells, prefill)
    cells = ["flatness", flatness_cell(mm["flatness"]), ""]
    if kv:
        cells += [fmt_flatness(kv["flatness"]), "", ""]
    t.add_section()
    t.add_row(*cells, "")
    return t


def fmt_flatness(x: float | None, why: bool = False) -> str:
    return ("n/a (one context)" if why else "n/a") if x is None else f"{x:.3f}"


def flatness_verdict(x: float | None) -> str:
    return "n/a" if x is None else "ok" if x <= FLATNESS_TARGET else "MISS"


def flatness_cell(x: float | None) -> str:
    colour = {"ok": "green", "MISS": "red"}.get(flatness_verdict(x), "yellow")
    return f"[{colour}]{fmt_flatness(x)}[/]"


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def fmt_bytes(n: int) -> str:
    for unit, size in (("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return f"{n}B"


def summary_lines(results: dict) -> list[str]:
    """One-line summaries (the GPU stages print them as @@ lines)."""
    meta, mm = results["meta"], results["models"]["memmamba"]
    kv = results["models"].get("kv_baseline")
    per_ctx = ", ".join(f"{fmt_tokens(r['context'])} {r['decode_ms_median']:.3f}" for r in mm["rows"])
    lines = [f"{mm['label']} {meta['dtype']} b{meta['batch']}: ms/token {per_ctx}; flatness "
             + (fmt_flatness(None, why=True) if mm["flatness"] is None else
                f"{fmt_flatness(mm['flatness'])} ({flatness_verdict(mm['flatness'])} ≤ {FLATNESS_TARGET})")]
    if kv:
        ratios = ", ".join(f"{fmt_tokens(k['context'])} {k['decode_ms_median']:.3f} "
                           f"({k['decode_ms_median'] / r['decode_ms_median']:.2f}x)"
                           for r, k in zip(mm["rows"], kv["rows"]))
        lines.append(f"KV baseline ms/token (KV/MemMamba): {ratios}; flatness {fmt_flatness(kv['flatness'])}")
    return lines


def default_progress(console=None):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def bench_cli(path, backend, contexts, tokens, batch, dtype, device, out, baseline, warmup, rounds, chunk, seed,
              prefill_with, console, **options) -> dict:
    """What `memdeploy bench` does: run with progress bars, print the table, write bench.json + bench.png."""
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise FileExistsError(f"--out {out} is a file: give a directory for bench.json and bench.png")
    check_settings(tokens=tokens, batch=batch, warmup=warmup, rounds=rounds, chunk=chunk)   # before loading
    if out is not None:
        creatable_dir(out)                         # before the run: its results would be lost after it
    if prefill_with is not None:
        name = backend_spec(backend, path).name
        if name != "torch":
            raise ValueError(f"--prefill-kernels is for the torch backend only (it swaps the torch model's kernels); "
                             f"the {name} backend prefills as it was built")
        check_kernels_on(prefill_with, "cuda" if device is None and torch.cuda.is_available() else device or "cpu")
    with default_progress(console) if console is not None else nullcontext() as bar:
        results = run_bench(path, backend, contexts, tokens, batch, dtype, device, baseline, warmup, rounds, chunk,
                            seed, prefill_with, progress=bar, **options)
    if out is not None:
        json_path, png_path = write_results(results, out)
        results["files"] = [str(json_path), str(png_path)]
    if console is not None:
        console.print(results_table(results))
        note = noise_note(results)
        if note:
            console.print(f"[yellow]{note}[/]")
        if out is not None:
            console.print(f"wrote {results['files'][0]} and {results['files'][1]}")
    return results
