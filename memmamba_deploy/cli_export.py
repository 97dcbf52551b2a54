"""`memdeploy export` and `memdeploy parity` (issue 4)."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from .cli import app, console, user_errors


@app.command()
@user_errors
def export(checkpoint: Path = typer.Argument(..., help="checkpoint directory (memdeploy or Hugging Face Mamba)"),
           out: Path = typer.Option(..., "-o", "--out", help="export directory to write"),
           flavor: str = typer.Option("portable", help="portable (standard ONNX ops) | plugins (memmamba custom ops "
                                                       "with function bodies, for TensorRT)"),
           dtype: str = typer.Option("fp32", help="fp32 | fp16 (SSM state, priorities, exp/softplus/softmax stay "
                                                  "fp32)"),
           force: bool = typer.Option(False, help="overwrite a non-empty OUT")):
    """Export stepwise recurrent ONNX graphs: decode_step.onnx, prefill.onnx, reference weights, manifest.json."""
    from .export import export_model

    manifest = export_model(checkpoint, out, flavor=flavor, dtype=dtype, force=force)
    console.print(export_table(out, manifest))


def export_table(out: Path, manifest: dict) -> Table:
    c = manifest["config"]
    t = Table(title=f"{out}: {manifest['flavor']}, {manifest['dtype']}, opset {manifest['opset']}, "
                    f"{c['n_layers']} layers, memory {'on' if c['memory'] else 'off'}")
    for col in ("file", "size", "input_ids", "custom ops"):
        t.add_column(col, justify="right" if col == "size" else "left")
    for name, g in manifest["graphs"].items():
        files = [f for f in (g["file"], g.get("external_data")) if f]
        size = sum((out / f).stat().st_size for f in files)
        ids = next(i for i in g["inputs"] if i["name"] == "input_ids")
        ops = ", ".join(p["op"] for p in manifest["plugins"] if name in p["graphs"]) or "-"
        t.add_row(" + ".join(files), f"{size / 1e6:.1f} MB", str(ids["shape"]), ops)
    t.caption = "state (in -> new_<name> out): " + ", ".join(
        f"{s['name']} {s['dtype']}{s['shape']}" for s in manifest["state"])
    return t


@app.command()
@user_errors
def parity(out: Path = typer.Argument(..., help="export directory (memdeploy export)"),
           steps: int = typer.Option(512, help="decode steps per case"),
           backend: str = typer.Option("onnxruntime", help="onnxruntime | torch | triton | tensorrt (aliases: ort, "
                                                           "pytorch, trt)"),
           prompt_len: List[int] = typer.Option([32], help="random prompt length (repeat for several cases)"),
           prompt: List[str] = typer.Option([], help="a prompt as comma-separated token ids (repeatable)"),
           batch: int = typer.Option(2, help="rows of each random prompt"),
           seed: int = typer.Option(0, min=0, help="seed of the random prompts"),
           rtol: Optional[float] = typer.Option(None, help="max relative error (default fp32 1e-4, fp16 1e-2)"),
           flip_radius: Optional[float] = typer.Option(None, help="largest decision margin a flip may have to count "
                                                                    "as rounding (default 10*rtol)"),
           device: str = typer.Option("cpu", help="device of the PyTorch reference (and of the torch backend)"),
           json_out: Optional[Path] = typer.Option(None, "--json", help="also write the full report here")):
    """Compare a backend with the PyTorch reference: prefill, N decode steps, state, greedy tokens, decision flips."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .export.manifest import read_manifest
    from .models import MemMambaConfig
    from .parity import parse_prompt, report_table, run_parity

    from .models.checkpoint import writable_file, write_json

    if json_out:
        writable_file(json_out)
    config = MemMambaConfig.from_dict(read_manifest(out, verify=False)["config"])
    prompts = [parse_prompt(p, config.vocab_size) for p in prompt]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=console) as progress:
        def on_case(name, n):
            task = progress.add_task(f"{backend} vs torch: {name}", total=n)
            return lambda: progress.advance(task)
        report = run_parity(out, backend, steps=steps, prompt_lens=prompt_len, prompts=prompts, batch=batch,
                            seed=seed, rtol=rtol, flip_radius=flip_radius, device=device, on_case=on_case)
    console.print(report_table(report))
    for case in report.cases:
        for f in case.failures:
            console.print(f"[red]FAIL[/] {case.name}: {f}")
    if json_out:
        write_json(json_out, report.to_dict())
    raise typer.Exit(0 if report.ok else 1)
