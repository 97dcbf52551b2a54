"""`memdeploy`: small verbs over the pipeline (init, selfcheck, ...). Errors print one line and exit 2."""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="MemMamba checkpoints to graphs, engines and runtimes with O(1) cost per generated token.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)   # one unbroken line per error: easy to grep

# Errors a user can cause (bad path, bad config, bad checkpoint, missing optional package): one clear line.
USER_ERRORS = (ValueError, OSError, ImportError)   # OSError: missing files, a directory given for a file, ...


def user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .models.checkpoint import terminate_as_interrupt

        try:
            with terminate_as_interrupt():
                return fn(*args, **kwargs)
        except KeyboardInterrupt as e:      # Ctrl-C, or SIGTERM (terminate_as_interrupt): one line, the usual code
            from .models.checkpoint import Terminated

            term = isinstance(e, Terminated)
            err_console.print(f"[bold red]{'terminated' if term else 'interrupted'}:[/] stopped; files it writes "
                              f"appear whole or not at all")
            raise typer.Exit(143 if term else 130) from None
        except BrokenPipeError:             # `memdeploy generate ... | head`: the reader left; end quietly, as
            devnull = os.open(os.devnull, os.O_WRONLY)    # Unix tools do (128 + SIGPIPE), without the flush error
            os.dup2(devnull, sys.stdout.fileno())         # Python would print at exit
            raise typer.Exit(141) from None
        except USER_ERRORS as e:
            err_console.print(f"[bold red]error:[/] {e}")
            raise typer.Exit(2) from None
    return wrapper


def print_checks(title: str, rows) -> bool:
    table = Table(title=title)
    table.add_column("check")
    table.add_column("max rel. error", justify="right")
    table.add_column("tolerance", justify="right")
    table.add_column("", justify="center")
    for r in rows:
        table.add_row(r.name, f"{r.error:.2e}", f"{r.tolerance:.0e}", "[green]ok[/]" if r.ok else "[red]FAIL[/]")
    console.print(table)
    return all(r.ok for r in rows)


@app.command()
@user_errors
def init(directory: Path = typer.Argument(..., help="where to write config.json + model.safetensors"),
         preset: str = typer.Option("tiny", help="tiny | 130m (spec §1)"),
         memory: bool = typer.Option(True, "--memory/--no-memory", help="--no-memory gives plain Mamba"),
         seed: int = typer.Option(0, min=0, help="seed of the random initialisation"),
         force: bool = typer.Option(False, help="write into a non-empty DIRECTORY (its config.json and "
                                                "model.safetensors are replaced, other files kept)")):
    """Write a seeded random-init checkpoint."""
    import torch

    from .models import MemMambaConfig, MemMambaLM
    from .models.checkpoint import save_pretrained

    config = MemMambaConfig.preset(preset, memory=memory)
    torch.manual_seed(seed)
    model = MemMambaLM(config)
    save_pretrained(model, directory, force=force)
    n = sum(p.numel() for p in model.parameters())
    console.print(f"wrote {directory} ({preset}, memory={'on' if memory else 'off'}, {n / 1e6:.2f}M parameters, seed {seed})")


@app.command()
@user_errors
def selfcheck(checkpoint: Path = typer.Argument(..., help="checkpoint directory"),
              batch: int = typer.Option(2),
              tokens: Optional[int] = typer.Option(None, help="default: 4x the pool size, at least 64"),
              seed: int = typer.Option(0, min=0),
              tol: Optional[float] = typer.Option(None, help="max relative error; default 1e-5 for fp32 "
                                                             "checkpoints, 1e-2 for fp16 / bf16 (in bf16 a pool "
                                                             "decision can flip at a near-tie: see parity)"),
              json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results here")):
    """Check that the recurrent step reproduces the parallel forward pass (spec §8)."""
    from .models import MemMambaLM
    from .models.checkpoint import writable_file, write_json
    from .selfcheck import step_vs_forward

    if json_out:
        writable_file(json_out)
    model = MemMambaLM.from_pretrained(checkpoint)
    with console.status("running step vs forward..."):
        rows, info = step_vs_forward(model, batch=batch, length=tokens, seed=seed, tol=tol)
    ok = print_checks(f"step ≡ forward: {checkpoint} ({info['tokens']} tokens x {info['batch']})", rows)
    if "note" in info:
        console.print(f"[yellow]note:[/] {info['note']}")
    if "pool_insertions_per_layer" in info:
        console.print(f"pool insertions per layer (pool size {model.config.pool_size}): "
                      f"{info['pool_insertions_per_layer']}")
    if json_out:
        write_json(json_out, {"ok": ok, "info": info, "checks": [r.__dict__ for r in rows]})
    raise typer.Exit(0 if ok else 1)


# Verb groups live in their own modules and register themselves on `app` when imported (one line each).
from . import cli_export  # noqa: E402,F401  export, parity            (issue 4)
from . import cli_runtime  # noqa: E402,F401  bench, generate, demo  (issue 6)
from . import cli_trt  # noqa: E402,F401  aot, build, selftest --tensorrt (issue 5)
from . import cli_eval  # noqa: E402,F401  eval passkey, fidelity  (issue 8)

if __name__ == "__main__":
    # `python -m memmamba_deploy.cli` runs this file as __main__, while the verb modules above registered on the
    # imported memmamba_deploy.cli: run that app, which has every verb
    from memmamba_deploy.cli import app as registered

    registered()
