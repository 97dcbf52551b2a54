"""`memdeploy export CKPT -o OUT`: checkpoint -> decode_step.onnx + prefill.onnx + reference weights + manifest.

OUT is written into a temporary directory beside it and swapped into place at the end (models.checkpoint
.atomic_directory), so an export that fails or is interrupted leaves no OUT (and an old OUT untouched). Only a new,
empty or (with force) earlier-export OUT is written, never the checkpoint's own folder (_check_out).
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import onnx
from onnx import inliner

from .. import __version__
from ..models.checkpoint import atomic_directory, load_pretrained, save_pretrained
from .contract import CUSTOM_OPS, DOMAIN, PLUGIN_NAMESPACE
from .graphs import GraphWriter
from .manifest import FORMAT, FORMAT_VERSION, MANIFEST_NAME, REFERENCE_DIR, file_hashes
from .onnx_builder import DTYPE_NAMES, OPSET

FLAVORS = ("portable", "plugins")
DTYPES = ("fp32", "fp16")
GRAPHS = ("decode_step", "prefill")
PROTOBUF_LIMIT = 2 ** 31 - 1        # a ModelProto larger than this cannot be serialised in one piece
EXTERNAL_DATA_MARGIN = 64 << 20     # room for the nodes beside the weights


class ExportError(ValueError):
    """The export cannot go on: the message names the graph, node or file."""


def export_model(checkpoint, out, flavor: str = "portable", dtype: str = "fp32", force: bool = False,
                 external_data: bool | None = None, show_progress: bool = True) -> dict:
    """Export a checkpoint directory to OUT; returns the manifest. external_data=None: only when over 2 GB."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavour {flavor!r}: choose one of {list(FLAVORS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {list(DTYPES)}")
    _check_out(Path(out), Path(checkpoint), force)
    model = load_pretrained(checkpoint)
    writer = GraphWriter(model, dtype)
    L = model.config.n_layers
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), transient=True,
                        disable=not show_progress)
    with progress, atomic_directory(out, force=force) as tmp:
        graphs = {}
        for name in GRAPHS:
            task = progress.add_task(f"building {name}", total=L)
            build = writer.decode_step if name == "decode_step" else writer.prefill
            graph = build(on_layer=lambda task=task: progress.advance(task))
            if flavor == "portable":
                graph = _inline(graph, name)
            graphs[name] = graph
        task = progress.add_task("saving + checking", total=len(graphs) + 1)
        described = {}
        for name, graph in graphs.items():
            described[name] = _save(graph, tmp, name, external_data)
            progress.advance(task)
        save_pretrained(model, tmp / REFERENCE_DIR)
        progress.advance(task)
        manifest = _manifest(model, flavor, dtype, graphs, described, writer, checkpoint, tmp)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_out(out: Path, checkpoint: Path, force: bool) -> None:
    """OUT is replaced whole: refuse one that is not a new folder, an empty one or (with force) an earlier export,
    and one that is or holds the checkpoint."""
    if str(out) in ("", "."):
        raise ValueError("give OUT a folder of its own (-o NAME), not the working directory")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    o, c = Path(os.path.realpath(out)), Path(os.path.realpath(checkpoint))
    if c.is_relative_to(o):
        raise ValueError(f"OUT {out} {'is' if o == c else 'holds'} the checkpoint {checkpoint}: give OUT a folder of "
                         f"its own")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} is not empty (use --force to overwrite)")
        ours = _earlier_export_files(out)
        others = sorted(rel for rel in (p.relative_to(out).as_posix() for p in out.rglob("*") if not p.is_dir())
                        if rel not in ours and not _ours_by_name(rel))
        if others:
            raise FileExistsError(f"{out} holds files that are not part of its earlier export ({', '.join(others[:5])}"
                                  f"{', ...' if len(others) > 5 else ''}): --force would delete them; move them or "
                                  f"choose another OUT")


def _earlier_export_files(out: Path) -> set[str]:
    """The files an earlier export in `out` lists (any format version, a manifest that fails today's checks too);
    FileExistsError where `out` holds no export manifest at all."""
    try:
        earlier = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        earlier = None
    if not isinstance(earlier, dict) or earlier.get("format") != FORMAT:
        raise FileExistsError(f"{out} is not empty and holds no earlier export (a readable {MANIFEST_NAME}): refusing "
                              f"to replace it, even with --force")
    files = earlier.get("files")
    ours = set(files) if isinstance(files, dict) else set()
    engines = (earlier.get("tensorrt") or {}).get("engines") if isinstance(earlier.get("tensorrt"), dict) else None
    for e in (engines.values() if isinstance(engines, dict) else ()):
        ours.add(e.get("file") if isinstance(e, dict) else e)
    return ours | {MANIFEST_NAME}


def _ours_by_name(rel: str) -> bool:
    """Files memdeploy writes into an export besides those its manifest lists: engines (`memdeploy build`) and the
    temporaries of a killed writer (`.NAME.tmp-*`)."""
    name = rel.rsplit("/", 1)[-1]
    return ("/" not in rel and name.endswith(".engine")) or (name.startswith(".") and ".tmp-" in name)


def _inline(graph: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The portable flavour: the same graph with every custom node replaced by its function body. The weights
    are set aside meanwhile: the inliner serialises the model, which protobuf refuses past 2 GB."""
    weights = list(graph.graph.initializer)
    del graph.graph.initializer[:]
    try:
        flat = inliner.inline_local_functions(graph)
    finally:
        graph.graph.initializer.extend(weights)
    flat.graph.initializer.extend(weights)
    left = [n.name for n in flat.graph.node if n.domain == DOMAIN]
    if left:
        raise ExportError(f"{name}: inlining left custom nodes {left[:4]}")
    del flat.functions[:]
    keep = [o for o in flat.opset_import if o.domain != DOMAIN]
    del flat.opset_import[:]
    flat.opset_import.extend(keep)
    return flat


def _weights_nbytes(graph: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in graph.graph.initializer)


def _save(graph: onnx.ModelProto, directory: Path, name: str, external_data: bool | None) -> dict:
    """Write <name>.onnx (weights in <name>.onnx.data when over 2 GB), run the full checker with shape inference
    on the file, and describe its I/O for the manifest."""
    path = directory / f"{name}.onnx"
    if external_data is None:
        external_data = _weights_nbytes(graph) > PROTOBUF_LIMIT - EXTERNAL_DATA_MARGIN
    data = f"{name}.onnx.data" if external_data else None
    io = {"inputs": [_describe(v) for v in graph.graph.input], "outputs": [_describe(v) for v in graph.graph.output]}
    onnx.save_model(graph, str(path), save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=data, size_threshold=0)
    check_graph_file(path, graph)
    return {"file": path.name, "external_data": data, **io}


def check_graph_file(path: Path, graph: onnx.ModelProto | None = None) -> None:
    """onnx.checker full check (with strict shape inference) of a saved graph; an error names the node."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path.name}: the ONNX checker rejected the graph: {_node_context(e, graph)}") from None


def _node_context(error: Exception, graph: onnx.ModelProto | None) -> str:
    """The checker's message, plus the offending node's op, inputs and outputs when the message names it."""
    msg = " ".join(str(error).split())
    m = re.search(r"(?:Name|node)[:\s]+\(?([\w/.:\-]+)\)?", msg)
    if graph is None or m is None:
        return msg
    node = next((n for n in graph.graph.node if n.name == m.group(1)), None)
    if node is None:
        return msg
    return (f"{msg} [node {node.name!r}: {node.domain + '::' if node.domain else ''}{node.op_type}"
            f"({', '.join(node.input)}) -> ({', '.join(node.output)})]")


def _describe(v: onnx.ValueInfoProto) -> dict:
    t = v.type.tensor_type
    shape = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
    return {"name": v.name, "shape": shape, "dtype": DTYPE_NAMES[t.elem_type]}


def _manifest(model, flavor, dtype, graphs, described, writer, checkpoint, directory: Path) -> dict:
    import numpy
    import onnxruntime
    import torch

    plugins = []
    if flavor == "plugins":
        for op in CUSTOM_OPS.values():
            used = [g for g, m in graphs.items()
                    if any(n.domain == DOMAIN and n.op_type == op.name for n in m.graph.node)]
            if used:
                plugins.append({"op": op.name, "domain": DOMAIN, "version": op.version, "namespace": PLUGIN_NAMESPACE,
                                "graphs": used})
    state = [{"name": s.name, "output": s.output, "field": s.field, "shape": list(s.shape),
              "dtype": DTYPE_NAMES[s.dtype], "initial": s.initial} for s in writer.state]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "flavor": flavor,
        "dtype": dtype,
        "opset": OPSET,
        "source_checkpoint": str(Path(checkpoint).resolve()),
        "reference": REFERENCE_DIR,
        "graphs": described,
        "state": state,
        "plugins": plugins,
        "files": file_hashes(directory),
        "producer": {"memmamba_deploy": __version__, "onnx": onnx.__version__, "torch": torch.__version__,
                     "onnxruntime": onnxruntime.__version__, "numpy": numpy.__version__,
                     "python": sys.version.split()[0]},
    }
