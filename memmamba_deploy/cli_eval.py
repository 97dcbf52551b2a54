"""`memdeploy eval passkey` and `memdeploy fidelity` (issue 8): does the deployed model remember like PyTorch?"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .cli import app, console, user_errors

eval_app = typer.Typer(no_args_is_help=True, help="Evaluate a model or a deployed backend.")
app.add_typer(eval_app, name="eval")


def _device(device: str) -> str:
    import torch

    from .session import check_device

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


def open_backend(path: Path, backend: str | None, device: str = "auto", kernels: str = "auto"):
    """A Backend over `path` by name (None: session.default_backend), through the session registry (a missing
    runtime is one clear error). The torch backend runs the Triton kernels on CUDA when they import
    (kernels="auto")."""
    from .models.train import _triton_available
    from .session import backend_spec
    from .session import open_backend as open_named

    backend = backend_spec(backend, path).name
    if backend != "torch":
        return open_named(path, backend, device=None if device == "auto" else device)
    device = _device(device)
    if kernels == "auto":
        kernels = "triton" if device.startswith("cuda") and _triton_available() else "torch"
    return open_named(path, "torch", device=device, kernels=kernels)


def reference_checkpoint(path: Path, reference: Optional[Path] = None) -> Path:
    """The PyTorch checkpoint behind `path`: `reference` if given, else `path` itself or the copy an export
    directory carries."""
    from .session import inspect_path

    if reference is not None:
        return reference
    found = inspect_path(path).checkpoint
    if found is None:
        raise FileNotFoundError(f"{path} holds no PyTorch checkpoint (config.json + model.safetensors) to compare "
                                f"against: pass --reference CHECKPOINT")
    return found


def _progress() -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


@eval_app.command("passkey")
@user_errors
def passkey(paths: List[Path] = typer.Argument(..., help="checkpoint(s) (or export directories for other backends); "
                                                          "several give one column each"),
            lengths: str = typer.Option("1k,4k,16k,64k", help="prompt lengths in tokens (bytes): 1k = 1024"),
            backend: Optional[str] = typer.Option(None, help="torch | onnxruntime | tensorrt | triton (export "
                                                                "directory for onnxruntime and tensorrt); default: "
                                                                "onnxruntime for an export, torch for a checkpoint"),
            samples: int = typer.Option(5, help="prompts per length"),
            seed: int = typer.Option(0, min=0, help="seed of the prompts (the same for every model)"),
            batch: int = typer.Option(4, help="prompts decoded together"),
            chunk: int = typer.Option(4096, help="prefill chunk in tokens (prefill resumes from the state)"),
            device: str = typer.Option("auto", help="torch backend: auto | cpu | cuda"),
            kernels: str = typer.Option("auto", help="torch backend: auto | torch | triton"),
            json_out: Optional[Path] = typer.Option(None, "--json", help="write the results here")):
    """Passkey retrieval accuracy per length: a 5-digit key hidden in filler, asked for at the end (greedy)."""
    from .passkey import check_passkey_run, evaluate_passkey, format_length, parse_lengths
    from .session import config_of, inspect_path

    from .models.checkpoint import writable_file, write_json

    todo = parse_lengths(lengths)
    if json_out:
        writable_file(json_out)
    for path in paths:                             # every model and setting checked before the first one runs
        model = SimpleNamespace(config=config_of(inspect_path(path)))   # its config, no weights loaded
        check_passkey_run(model, todo, samples, batch, chunk, name=str(path))
    names = [p.resolve().name for p in paths]
    names = [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]   # two .../model: their paths
    runs = []
    for path, name in zip(paths, names):          # one model in memory at a time
        be = open_backend(path, backend, device, kernels)
        with _progress() as bar:
            task = bar.add_task(f"{name} ({be.name})", total=samples * sum(todo))
            results = evaluate_passkey(be, todo, samples=samples, seed=seed, batch=batch, chunk=chunk,
                                       on_tokens=lambda n: bar.advance(task, n))
        runs.append({"path": str(path), "name": name, "backend": be.name, "memory": be.config.memory,
                     "results": [r.to_dict() for r in results]})
    backends = ", ".join(dict.fromkeys(run["backend"] for run in runs))
    table = Table(title=f"passkey retrieval accuracy ({samples} prompts per length, seed {seed}, {backends})")
    table.add_column("length", justify="right")
    for run in runs:
        table.add_column(f"{run['name']}\n(memory {'on' if run['memory'] else 'off'})", justify="right")
    for i, n in enumerate(todo):
        cells = []
        for run in runs:
            r = run["results"][i]
            cells.append(f"{r['accuracy']:.2f} ({r['correct']}/{r['samples']}; digits {r['digit_accuracy']:.2f})")
        table.add_row(format_length(n), *cells)
    console.print(table)
    if json_out:
        write_json(json_out, {"seed": seed, "samples": samples, "lengths": todo, "runs": runs})
        console.print(f"wrote {json_out}")


@app.command()
@user_errors
def fidelity(path: Path = typer.Argument(..., help="checkpoint, or an export directory for --backend onnxruntime"),
             backend: Optional[str] = typer.Option(None, help="the deployed backend: torch | onnxruntime | tensorrt | "
                                                             "triton (default: onnxruntime for an export, torch for "
                                                             "a checkpoint)"),
             reference: Optional[Path] = typer.Option(None, help="the PyTorch checkpoint (default: found from PATH)"),
             samples: int = typer.Option(8, help="sequences (half passkey prompts, half Python source)"),
             length: int = typer.Option(256, help="tokens per sequence (the backend steps token by token)"),
             seed: int = typer.Option(0, min=0),
             tol: float = typer.Option(1e-4, help="max |ETMF(backend) − ETMF(PyTorch)| (use 1e-2 for fp16)"),
             device: str = typer.Option("cpu", help="device of the PyTorch reference and of the backend"),
             kernels: str = typer.Option("auto", help="torch backend: auto | torch | triton"),
             json_out: Optional[Path] = typer.Option(None, "--json", help="write the report here")):
    """Memory fidelity (spec §10): ETMF and ECLMF of the PyTorch model vs a deployed backend."""
    from .fidelity import compare
    from .models import MemMambaLM

    from .models.checkpoint import writable_file, write_json

    if samples < 1 or length < 2:
        raise ValueError(f"--samples must be >= 1 and --length >= 2, got {samples} and {length}")
    if not tol >= 0 or tol == float("inf"):
        raise ValueError(f"--tol must be a finite number >= 0, got {tol}")
    if json_out:
        writable_file(json_out)
    ckpt = reference_checkpoint(path, reference)
    model = MemMambaLM.from_pretrained(ckpt, device=_device(device))
    be = open_backend(path, backend, device, kernels)
    differ = model.config.differences(be.config)
    if differ:
        raise ValueError(f"the reference {ckpt} is not the model at {path}: config differs ({'; '.join(differ[:4])}"
                         f"{' ...' if len(differ) > 4 else ''})")
    ids = fidelity_inputs(samples, length, seed, model.config.vocab_size)
    with _progress() as bar:
        task = bar.add_task(f"{be.name}: stepping {samples} x {length} tokens", total=length)
        report = compare(model, be, ids, tolerance=tol, on_step=lambda: bar.advance(task))
    print_fidelity(report, f"memory fidelity: {path} ({be.name} vs PyTorch, {samples} x {length} tokens)")
    if json_out:
        write_json(json_out, json.loads(json.dumps(report.to_dict(), default=str)))
        console.print(f"wrote {json_out}")
    raise typer.Exit(0 if report.ok else 1)


def fidelity_inputs(samples: int, length: int, seed: int, vocab: int):
    """Half passkey prompts, half windows of Python's own sources (byte-level); random bytes if vocab < 256."""
    import numpy as np
    import torch

    from .models.data import passkey_prompt, stdlib_text

    if vocab < 256:
        return torch.randint(0, vocab, (samples, length), generator=torch.Generator().manual_seed(seed))
    rows = []
    text = stdlib_text(4 << 20) if samples > 1 else None
    rng = np.random.default_rng(seed)
    for i in range(samples):
        if i % 2 == 0 and length >= 80:
            rows.append(passkey_prompt(length, seed, i).ids)
        else:
            start = int(rng.integers(0, len(text) - length)) if text else 0
            rows.append(np.frombuffer(text, dtype=np.uint8, count=length, offset=start) if text
                        else np.frombuffer(b"x" * length, dtype=np.uint8))
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def print_fidelity(report, title: str) -> None:
    def f(v):
        return "n/a" if v is None else f"{v:.4f}"

    table = Table(title=f"{title}\ntolerance |ETMF difference| <= {report.tolerance:.0e}")
    for col in ("metric", "PyTorch", "backend", "|diff|", ""):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for d, v in report.reference["etmf"].items():
        diff = report.etmf_diff[d]
        ok = diff is None or diff <= report.tolerance
        table.add_row("ETMF" if d == 0 else f"ETMF Δ={d}", f(v), f(report.backend["etmf"][d]),
                      "n/a" if diff is None else f"{diff:.1e}", "[green]ok[/]" if ok else "[red]FAIL[/]")
    for g, v in report.reference["eclmf"].items():
        table.add_row(f"ECLMF G={g}", f(v), "(PyTorch)*" if v is not None else "n/a", "", "")
    console.print(table)
    decisions = Table(title="threshold decisions (spec §9)")
    decisions.add_column("check")
    decisions.add_column("value", justify="right")
    decisions.add_row("logits rel. error (backend steps vs PyTorch forward)", f"{report.logits_rel_err:.1e}")
    decisions.add_row("greedy-token disagreements", str(report.argmax_disagreements))
    decisions.add_row("pool insertion flips", "n/a (state has no priorities)" if report.insertion_flips is None
                      else f"{report.insertion_flips} of {report.decisions}")
    for name, m in report.margins.items():
        decisions.add_row(f"smallest margin, {name}", f"{m:.1e}")
    if report.margins:
        decisions.add_row("exact ties (insert): a = min prio, as a repeated token meets its own score",
                          str(report.replace_ties))
    console.print(decisions)
    console.print("[dim]* a backend exposes no hidden states: ECLMF is the PyTorch model's on the same inputs; the "
                  "decisions above are what could make the backend's memory differ. ECLMF n/a: needs more than G "
                  "layers. ECLMF below 0 is not an error: the spec's r divides by the earlier layer's norm, and where "
                  "the residual stream grows with depth the residual exceeds it; compare models of one shape, not "
                  "with the paper's ~0.27.[/]")
