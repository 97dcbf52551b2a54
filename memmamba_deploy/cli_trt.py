"""`memdeploy aot`, `memdeploy build` and `memdeploy selftest --tensorrt` (issue 5: TensorRT plugins and engines)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .cli import app, console, user_errors

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PLUGINS = REPO / "plugins_trt" / "build" / "libmemmamba_plugins.so"


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/"
                    "{task.total}"), TimeElapsedColumn(), console=console)


@app.command()
@user_errors
def aot(out: Path = typer.Option(..., "--out", help="folder for memmamba_kernels.{h,cpp} and kernels.json"),
        arch: str = typer.Option("80,86,87,89,90", help="SMs to compile cubins for (87 = Jetson Orin)"),
        ptx: bool = typer.Option(True, "--ptx/--no-ptx", help="embed PTX of the lowest SM (JIT on newer GPUs)"),
        only: str = typer.Option("", help="comma-separated kernel variants (default: every AOT_KERNELS entry)")):
    """Compile the Triton kernels ahead of time into a C++ kernel library (no GPU needed)."""
    from rich.table import Table

    from .aot import AotError, build_library, check_library_out, missing_ptx, parse_archs, project_kernels

    archs = parse_archs(arch)
    try:
        check_library_out(out)                 # before the kernels are even imported
        kernels = project_kernels(only.split(","))
        with _progress() as bar:
            task = bar.add_task("compiling", total=len(kernels))

            def step(name):
                bar.update(task, description=f"compiling {name} for sm_{'/'.join(map(str, archs))}",
                           completed=[k.name for k in kernels].index(name))
            meta = build_library(kernels, out, archs, ptx=ptx, progress=step)
            bar.update(task, completed=len(kernels), description="compiled")
    except AotError as e:
        raise ValueError(str(e)) from None
    table = Table(title=f"AOT kernel library: {out} (triton {meta['triton']}, {meta['ptxas']})")
    for col in ("variant", "Triton kernel", "warps", "shared B", "params", "cubins", "PTX"):
        table.add_column(col, overflow="fold")     # names stay whole (folded) in a narrow or piped terminal
    for name, k in meta["kernels"].items():
        table.add_row(name, k["fn"], str(k["num_warps"]), str(k["shared"]), str(len(k["params"])),
                      " ".join(f"sm_{sm}" for sm in k["cubins"]), f"sm_{k['ptx_sm']}" if k["ptx_sm"] else "-")
    console.print(table)
    note = missing_ptx(meta)
    if note:
        console.print(f"[yellow]note:[/yellow] {note}")


@app.command()
@user_errors
def build(out: Path = typer.Argument(..., help="export directory (memdeploy export --flavor plugins)"),
          plugins: Path = typer.Option(DEFAULT_PLUGINS, help="libmemmamba_plugins.so (cmake -S plugins_trt ...)"),
          precision: Optional[str] = typer.Option(None, help="fp16 | fp32: the exported graph's dtype, the default "
                                                  "(the engines are strongly typed)"),
          max_batch: int = typer.Option(8, help="largest batch the engines accept"),
          max_prefill: int = typer.Option(2048, help="most tokens one prefill call takes (longer prompts are chunked)"),
          workspace_mb: int = typer.Option(1024, help="TensorRT builder workspace (MiB)")):
    """Build TensorRT engines (decode step + prefill) beside the ONNX graphs and record them in manifest.json."""
    from rich.table import Table

    from .backends.trt_backend import GRAPHS, build_engines, require_tensorrt

    require_tensorrt()                      # fail at once, before reading anything
    with _progress() as bar:
        task = bar.add_task("building", total=len(GRAPHS))
        done = []

        def step(graph):
            bar.update(task, completed=len(done), description=f"building {graph}.engine (TensorRT picks kernels: "
                                                              f"minutes)")
            done.append(graph)
        entry = build_engines(out, plugins, precision, max_batch, max_prefill, workspace_mb, progress=step)
        bar.update(task, completed=len(GRAPHS), description="built")
    table = Table(title=f"TensorRT {entry['tensorrt']} engines in {out} ({entry['precision']}, {entry['device']})")
    table.add_column("graph")
    table.add_column("engine")
    table.add_column("profile")
    for graph, e in entry["engines"].items():
        prof = f"batch 1..{entry['max_batch']}" + (f", tokens 1..{entry['max_prefill']}" if graph == "prefill" else "")
        table.add_row(graph, e["file"], prof)
    console.print(table)


@app.command()
@user_errors
def selftest(tensorrt: bool = typer.Option(False, "--tensorrt", help="build a tiny TensorRT engine and run parity"),
             plugins: Path = typer.Option(DEFAULT_PLUGINS, help="libmemmamba_plugins.so"),
             workdir: Path = typer.Option(Path("runs/selftest-tensorrt"), help="where the tiny model and engines go"),
             steps: int = typer.Option(64, help="decode steps compared with the PyTorch reference")):
    """Check a deployment path end to end on a tiny model (today: --tensorrt)."""
    if not tensorrt:
        raise ValueError("choose what to self-test: --tensorrt (TensorRT engines with the memmamba plugins)")
    from .backends.trt_backend import require_tensorrt

    require_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise ValueError("selftest --tensorrt needs a CUDA GPU; none is visible to torch")
    if not Path(plugins).is_file():
        raise FileNotFoundError(f"no plugin library at {plugins}: build plugins_trt first (see plugins_trt/README.md)")
    _selftest_tensorrt(Path(plugins), Path(workdir), steps)


def _selftest_tensorrt(plugins: Path, workdir: Path, steps: int) -> None:
    """Tiny model -> plugins-flavour export -> TensorRT engines -> parity with the PyTorch reference."""
    import torch

    from .backends.trt_backend import TensorRTBackend, build_engines
    from .export import export_model
    from .models import MemMambaConfig, MemMambaLM
    from .models.checkpoint import save_pretrained
    from .parity import report_table, run_parity

    ckpt, out = workdir / "checkpoint", workdir / "export"
    torch.manual_seed(0)
    save_pretrained(MemMambaLM(MemMambaConfig.preset("tiny")), ckpt, force=True)
    with console.status("1/3 exporting the tiny model (plugins flavour, fp32)"):
        export_model(ckpt, out, flavor="plugins", dtype="fp32", force=True, show_progress=False)
    with console.status("2/3 building TensorRT engines (batch <= 2, prefill <= 64 tokens per call)"):
        build_engines(out, plugins, "fp32", max_batch=2, max_prefill=64)
    with console.status(f"3/3 parity: TensorRT vs PyTorch, prompts of 5 and 100 tokens (two prefill calls) + "
                        f"{steps} steps"):
        report = run_parity(out, TensorRTBackend(out, plugins), steps=steps, prompt_lens=[5, 100], batch=2,
                            device="cuda")
    console.print(report_table(report))
    for case in report.cases:
        for f in case.failures:
            console.print(f"[red]FAIL[/] {case.name}: {f}")
    console.print("[green]selftest --tensorrt passed[/]" if report.ok else "[red]selftest --tensorrt FAILED[/]")
    raise typer.Exit(0 if report.ok else 1)
