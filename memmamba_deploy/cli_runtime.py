"""`memdeploy bench`, `memdeploy generate` and the main job `memdeploy demo` (issue 6)."""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from .cli import app, console, print_checks, user_errors

BACKEND_HELP = ("torch | triton | onnxruntime | tensorrt (torch, triton: a checkpoint; onnxruntime, tensorrt: an "
                "export). Default: onnxruntime for an export directory, torch for a checkpoint")
PATH_HELP = "checkpoint directory (config.json) or export directory (manifest.json)"
DEMO_ASSET = Path(__file__).resolve().parent / "assets" / "demo-memmamba"


@app.command()
@user_errors
def bench(path: Path = typer.Argument(..., help=PATH_HELP),
          backend: Optional[str] = typer.Option(None, help=BACKEND_HELP),
          contexts: str = typer.Option("1k,4k,16k,64k", help="context lengths to decode after (k = 1024 tokens)"),
          tokens: int = typer.Option(256, help="timed decode tokens per context"),
          batch: int = typer.Option(1, help="sequences decoded together"),
          dtype: Optional[str] = typer.Option(None, help="fp32 | fp16 | bf16 (default: the checkpoint's or export's)"),
          device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when there is one)"),
          out: Path = typer.Option(Path("runs/bench"), help="folder for bench.json and bench.png"),
          baseline: bool = typer.Option(True, "--baseline/--no-baseline",
                                        help="also time the KV-cache transformer of the same width and depth"),
          warmup: int = typer.Option(16, help="untimed decode steps per context first"),
          rounds: int = typer.Option(4, help="interleaved rounds over the contexts (spreads machine drift)"),
          chunk: int = typer.Option(2048, help="tokens per prefill call"),
          seed: int = typer.Option(0, min=0, help="seed of the random prompt and decode tokens"),
          prefill_kernels: Optional[str] = typer.Option(
              None, help="torch backend only: prefill with this kernel set, decode with the one opened (default on "
                         "a GPU: triton when it loads; the reference scan is a Python loop)")):
    """Decode latency per token against context length (median, p90), prefill throughput and state bytes, beside a
    KV-cache transformer of the same width and depth; prints a table, writes bench.json + bench.png."""
    from .bench import bench_cli, parse_contexts

    bench_cli(path, backend, parse_contexts(contexts), tokens, batch, dtype, device, out, baseline, warmup, rounds,
              chunk, seed, prefill_kernels, console)


@app.command()
@user_errors
def generate(path: Path = typer.Argument(..., help=PATH_HELP),
             prompt: Optional[List[str]] = typer.Option(
                 None, help="prompt text, encoded as UTF-8 bytes (byte-level models, vocab 256, only); - reads it "
                            "from stdin. Repeat for several prompts: they decode as one batch"),
             ids: Optional[List[str]] = typer.Option(None, help="prompt as comma-separated token ids (any "
                                                                "vocabulary); repeat for several prompts"),
             backend: Optional[str] = typer.Option(None, help=BACKEND_HELP),
             device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda when there is one)"),
             dtype: Optional[str] = typer.Option(None, help="fp32 | fp16 | bf16"),
             max_new_tokens: int = typer.Option(200, min=1, help="tokens to generate"),
             temperature: float = typer.Option(0.7, help="0 = greedy (Session.generate's default; this command "
                                                          "samples by default)"),
             top_k: int = typer.Option(0, help="keep the k most likely tokens (0 = all)"),
             top_p: float = typer.Option(0.9, help="keep the smallest set with this much probability"),
             seed: Optional[int] = typer.Option(0, min=0, help="sampling seed (same seed, same text)"),
             stop: Optional[str] = typer.Option(None, help="comma-separated token ids that end generation")):
    """Stream generated tokens to stdout as they come (text for byte-level models, token ids otherwise). Several
    prompts (of any lengths) decode together as one batch and each is printed whole once every row is done (sampled
    rows draw from one stream for the batch: the same seed gives the same texts for the same prompts together)."""
    from .parity import parse_prompt
    from .session import Session

    if bool(prompt) == bool(ids):
        raise ValueError("give exactly one of --prompt TEXT or --ids 1,2,3 (either may repeat)")
    if prompt and prompt.count("-") > 1:
        raise ValueError("--prompt - (standard input) may be given once")
    prompt = [sys.stdin.read() if p == "-" else p for p in prompt] if prompt else None
    many = len(prompt or ids) > 1
    if prompt is not None and not all(prompt):
        at = prompt.index("")
        raise ValueError(f"--prompt {at + 1} of {len(prompt)} is empty" if many else "--prompt is empty")
    session = Session.open(path, backend=backend, device=device, dtype=dtype)
    vocab = session.config.vocab_size
    prompts = ([session.encode(p) for p in prompt] if prompt is not None
               else [parse_prompt(v, vocab, what=f"--ids {i + 1}" if many else "--ids") for i, v in enumerate(ids)])
    stop_ids = parse_prompt(stop, vocab, what="--stop") if stop else []
    if len(prompts) > 1:
        return _generate_batch(session, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids)
    stream = session.generate(prompts[0], max_new_tokens, temperature, top_k, top_p, seed, stop_ids)
    text = session.text_stream() if session.byte_level else None
    stamps = [time.perf_counter()]
    for i, token in enumerate(stream):
        stamps.append(time.perf_counter())
        piece = text.decode(bytes([int(token[0])])) if text else f"{' ' if i else ''}{int(token[0])}"
        sys.stdout.write(piece)
        sys.stdout.flush()
    if text:
        sys.stdout.write(text.decode(b"", final=True))
    sys.stdout.write("\n")
    # the first token waits for the prefill and, on a backend's first use, its compiles and graph captures: the
    # decode rate is the median gap between the later tokens, so one-off costs do not read as a slow model
    n, gaps = len(stamps) - 1, sorted(b - a for a, b in zip(stamps[1:], stamps[2:]))
    rate = f"; then {1 / gaps[len(gaps) // 2]:.1f} tokens/s (median)" if gaps else ""
    Console(stderr=True, soft_wrap=True).print(
        f"[dim]{n} tokens in {stamps[-1] - stamps[0]:.2f}s on {session.backend.name}: the first after "
        f"{stamps[1] - stamps[0]:.2f}s (the prompt's prefill, and on first use the kernels' compile){rate}; "
        f"state {session.state_nbytes:,} bytes[/]")




def _generate_batch(session, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop_ids) -> None:
    """Several prompts as the rows of one batch: prefilled together, each row to its own length (Session.prefill
    of rows), then decoded together; a row's text ends at its first stop token. Greedy rows are what each prompt
    gives alone, within rounding (the batch's kernels may round otherwise: fp16 rows can part at near ties)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    limit = getattr(session.backend, "max_batch", None)             # TensorRT engines' profile: before any prefill
    if limit is not None and len(prompts) > limit:
        raise ValueError(f"{len(prompts)} prompts, but the engines take batches of up to {limit} (memdeploy build "
                         f"--max-batch)")
    start = time.perf_counter()
    err = Console(stderr=True, soft_wrap=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task(f"prefill of {len(prompts)} prompts", total=None)
        session.prefill(prompts)
        prefilled = time.perf_counter()
        bar.update(task, description="generate", completed=0, total=max_new_tokens)
        rows = [[] for _ in prompts]
        done = [False] * len(prompts)
        for token in session.generate(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                    top_p=top_p, seed=seed, stop=stop_ids):
            for i, t in enumerate(token.tolist()):
                if not done[i]:
                    rows[i].append(t)
                    done[i] = t in stop_ids
            bar.advance(task)
    end = time.perf_counter()
    for i, row in enumerate(rows):
        body = session.decode(row) if session.byte_level else " ".join(map(str, row))
        gap = "\n" if i else ""
        sys.stdout.write(f"{gap}--- prompt {i + 1} of {len(rows)} ---\n{body}\n")
    sys.stdout.flush()
    n = sum(len(r) for r in rows)
    err.print(f"[dim]{len(rows)} prompts ({sum(len(p) for p in prompts):,} tokens) prefilled in "
              f"{prefilled - start:.2f}s, then {n} tokens generated as one batch in {end - prefilled:.2f}s on "
              f"{session.backend.name}; state {session.state_nbytes:,} bytes[/]")


# --------------------------------------------------------------------------------------------------------------
# The main job
# --------------------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def demo(workdir: Path = typer.Option(Path("runs/demo"), help="where the export and reports go"),
         checkpoint: Optional[Path] = typer.Option(None, help="default: the bundled demo model"),
         contexts: Optional[str] = typer.Option(None, help="bench contexts (default: 1k,4k,16k,64k on a GPU, "
                                                           "1k,4k,16k on a CPU)"),
         tokens: Optional[int] = typer.Option(None, help="timed decode tokens per context (default: 256 on a GPU, "
                                                         "64 on a CPU)"),
         parity_steps: int = typer.Option(256, help="decode steps of the ORT vs PyTorch parity check")):
    """The main job: bundled checkpoint -> step ≡ forward self-check -> ONNX export (portable, fp32) -> parity
    (ONNX Runtime vs PyTorch) -> bench on the best backend here (Triton + CUDA graph on a GPU, ONNX Runtime on a
    CPU) against a KV-cache transformer. About 20 s on 2 CPU cores."""
    import torch

    from .bench import (FLATNESS_TARGET, default_progress, flatness_verdict, fmt_flatness, fmt_tokens, noise_note,
                        parse_contexts, results_table, run_bench, write_results)
    from .export import export_model
    from .models import MemMambaConfig, MemMambaLM
    from .models.checkpoint import creatable_dir, save_pretrained, write_json
    from .parity import report_table, run_parity
    from .selfcheck import step_vs_forward

    steps: list[tuple[str, str, str]] = []          # (stage, what happened, ok | MISS | FAIL)
    gpu = torch.cuda.is_available()
    ctx = parse_contexts(contexts or ("1k,4k,16k,64k" if gpu else "1k,4k,16k"))     # bad settings fail before work
    if tokens is not None and tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {tokens}")
    if parity_steps < 1:
        raise ValueError(f"--parity-steps must be >= 1, got {parity_steps}")
    creatable_dir(workdir)                     # a file there, or an unwritable place: named before any work

    # 1. checkpoint
    if checkpoint is None and DEMO_ASSET.is_dir():
        checkpoint, what = DEMO_ASSET, "bundled demo model"
    elif checkpoint is None:
        checkpoint = workdir / "checkpoint"
        torch.manual_seed(0)
        save_pretrained(MemMambaLM(MemMambaConfig.preset("tiny")), checkpoint, force=True)
        what = "no bundled model in this install: seeded tiny init (random weights)"
    else:
        what = "given"
    model = MemMambaLM.from_pretrained(checkpoint)
    n_params = sum(p.numel() for p in model.parameters())
    console.rule(f"[bold]1/5 checkpoint[/] {checkpoint}")
    console.print(f"{what}; {n_params / 1e6:.2f}M parameters, vocab {model.config.vocab_size}, "
                  f"memory {'on' if model.config.memory else 'off'}")
    steps.append(("checkpoint", f"{checkpoint.name}: {what}", "ok"))

    # 2. self-check
    console.rule("[bold]2/5 step ≡ forward[/] (the recurrent step reproduces the parallel form)")
    with console.status("step vs forward..."):
        rows, info = step_vs_forward(model)
    ok = print_checks(f"step ≡ forward ({info['tokens']} tokens x {info['batch']})", rows)
    steps.append(("self-check", f"{len(rows)} checks, worst {max(r.error for r in rows):.1e}", "ok" if ok else "FAIL"))

    # 3. export
    console.rule("[bold]3/5 export[/] (portable ONNX, fp32)")
    export_dir = workdir / "export"
    t = time.perf_counter()
    export_model(checkpoint, export_dir, flavor="portable", dtype="fp32", force=True)
    console.print(f"wrote {export_dir} in {time.perf_counter() - t:.1f}s")
    steps.append(("export", f"{export_dir} (portable, fp32)", "ok"))

    # 4. parity
    console.rule(f"[bold]4/5 parity[/] ONNX Runtime vs PyTorch, {parity_steps} decode steps")
    with default_progress(console) as bar:
        def on_case(name, n):
            task = bar.add_task(f"parity {name}", total=n)
            return lambda: bar.advance(task)
        report = run_parity(export_dir, "onnxruntime", steps=parity_steps, prompt_lens=(64,), batch=2, on_case=on_case)
    console.print(report_table(report))
    write_json(workdir / "parity.json", report.to_dict())
    worst = max(c.step_logits_max_rel for c in report.cases)
    agree = min(c.greedy_agreement for c in report.cases)
    steps.append(("parity", f"max rel. error {worst:.1e} (tol {report.rtol:.0e}), greedy tokens "
                            f"{100 * agree:.1f}% equal", "ok" if report.ok else "FAIL"))

    # 5. bench
    tokens = tokens or (256 if gpu else 64)
    name, path, options = _best_backend(gpu, checkpoint, export_dir)
    console.rule(f"[bold]5/5 bench[/] {name}: decode latency vs context, beside a KV-cache transformer")
    with default_progress(console) as bar:
        results = run_bench(path, name, ctx, tokens, progress=bar, **options)
        cmp = None
        if not gpu and name == "onnxruntime":        # the CPU target: ONNX Runtime >= 2x PyTorch eager
            eager = run_bench(checkpoint, "torch", ctx[:1], tokens, device="cpu", baseline=False, progress=bar)
            cmp = (eager["models"]["memmamba"]["rows"][0]["decode_ms_median"],
                   results["models"]["memmamba"]["rows"][0]["decode_ms_median"])
    _, png_path = write_results(results, workdir / "bench")
    console.print(results_table(results))
    mm = results["models"]["memmamba"]
    span = f"{fmt_tokens(ctx[0])} to {fmt_tokens(ctx[-1])}"
    steps.append(("bench", f"{name}: flatness {fmt_flatness(mm['flatness'], why=True)} from {span} context (target ≤ "
                           f"{FLATNESS_TARGET}); {png_path}", flatness_verdict(mm["flatness"])))
    if cmp:
        steps.append(("ORT vs eager", f"decode at {fmt_tokens(ctx[0])} context: PyTorch eager {cmp[0]:.3f} ms, "
                                      f"ONNX Runtime {cmp[1]:.3f} ms: {cmp[0] / cmp[1]:.1f}x (target ≥ 2x)",
                      "ok" if cmp[0] / cmp[1] >= 2 else "MISS"))
    note = noise_note(results, *([eager] if cmp else []))
    if note:
        steps.append(("timing noise", note, "NOISY"))

    table = Table(title=f"memdeploy demo: {workdir}")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("", justify="center")
    colour = {"ok": "green", "FAIL": "red", "MISS": "yellow", "NOISY": "yellow", "n/a": "yellow"}  # benchmarks
    for stage, result, status in steps:
        table.add_row(stage, result, f"[{colour[status]}]{status}[/]")
    console.print(table)
    write_json(workdir / "demo.json", {"checkpoint": str(checkpoint), "stages": [
        {"stage": stage, "result": result, "status": status} for stage, result, status in steps],
        "selfcheck": [{**dataclasses.asdict(r), "ok": r.ok} for r in rows]})
    console.print(f"reports: {workdir / 'demo.json'}, {workdir / 'parity.json'}, {workdir / 'bench'}")
    raise typer.Exit(1 if any(s == "FAIL" for _, _, s in steps) else 0)


def _best_backend(gpu: bool, checkpoint: Path, export_dir: Path) -> tuple[str, Path, dict]:
    """Triton (CUDA graph) on a GPU when its backend loads, else PyTorch on the GPU; ONNX Runtime on a CPU."""
    import importlib

    if gpu:
        try:
            importlib.import_module(".backends.triton_backend", __package__)
            return "triton", checkpoint, {}
        except ImportError as e:
            console.print(f"[yellow]triton backend unavailable ({e}); benchmarking PyTorch on the GPU[/]")
            return "torch", checkpoint, {}
    return "onnxruntime", export_dir, {}
