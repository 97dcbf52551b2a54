"""OUT/manifest.json: what an export directory holds, read back with every file's sha256 verified.

{
  "format": "memmamba-deploy-export", "format_version": 2,   # 2: prefill takes lengths [batch] (1 is still read)
  "config": {...MemMambaConfig...}, "flavor": "portable" | "plugins", "dtype": "fp32" | "fp16", "opset": 17,
  "source_checkpoint": "/abs/path/of/CKPT",
  "reference": "reference",                      # config.json + model.safetensors of the exported weights
  "graphs": {"decode_step": {"file", "external_data", "inputs": [{"name", "shape", "dtype"}], "outputs": [...]},
             "prefill": {...}},                  # shapes: ints, or the symbols "batch" / "T"
  "state": [{"name", "output", "field", "shape", "dtype", "initial"}],
  "plugins": [{"op", "domain", "version", "namespace", "graphs"}],   # empty for the portable flavour
  "files": {"decode_step.onnx": "<sha256>", ...},                     # every file in OUT but this one
  "producer": {...versions...}
}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

FORMAT = "memmamba-deploy-export"
FORMAT_VERSION = 2            # 2: the prefill graph takes lengths [batch] (rows of their own lengths)
READS_VERSIONS = (1, 2)       # version 1 exports still run: their prefill takes whole rows (backends ask the graph)
MANIFEST_NAME = "manifest.json"
REFERENCE_DIR = "reference"


class ManifestError(ValueError):
    """An export directory that cannot be used as is: the message says which file and why."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (relative POSIX paths), the manifest itself excepted."""
    return {p.relative_to(directory).as_posix(): sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def read_manifest(out, verify: bool = True, only: tuple[str, ...] | None = None) -> dict:
    """Load OUT/manifest.json; with `verify`, check the sha256 of every listed file (or of the files whose path
    starts with one of `only`). Raises ManifestError / FileNotFoundError naming the problem."""
    out = Path(out)
    path = out / MANIFEST_NAME
    if not out.is_dir():
        raise FileNotFoundError(f"no export directory at {out}")
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not an export directory (no {MANIFEST_NAME}): run `memdeploy export` first")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path} is not a memdeploy export manifest (format != {FORMAT!r})")
    if manifest.get("format_version") not in READS_VERSIONS:
        raise ManifestError(f"{path} has format_version {manifest.get('format_version')!r}; this memdeploy reads "
                            f"{', '.join(map(str, READS_VERSIONS))}: export again with this memdeploy")
    for key in ("config", "flavor", "dtype", "graphs", "state", "files"):
        if key not in manifest:
            raise ManifestError(f"{path} lacks {key!r}")
    _check_types(manifest, path)
    if verify:
        for rel, digest in manifest["files"].items():
            if only is not None and not rel.startswith(only):
                continue
            f = out / rel
            if not f.is_file():
                raise ManifestError(f"{f} is listed in {MANIFEST_NAME} but missing")
            if sha256(f) != digest:
                raise ManifestError(f"{f} does not match the sha256 recorded in {MANIFEST_NAME} (modified or corrupt "
                                    f"since export): export again")
    return manifest


def _check_types(manifest: dict, path: Path) -> None:
    """Each field read by the backends has the type the exporter writes (a hand-edited or foreign manifest would
    otherwise fail deep inside a backend)."""
    def bad(key, want):
        raise ManifestError(f"{path}: {key!r} must be {want}, got {json.dumps(manifest.get(key))[:60]}")

    if not isinstance(manifest["config"], dict):
        bad("config", "an object (the model's config)")
    if manifest["flavor"] not in ("portable", "plugins"):
        bad("flavor", '"portable" or "plugins"')
    if manifest["dtype"] not in ("fp32", "fp16"):
        bad("dtype", '"fp32" or "fp16"')
    graphs = manifest["graphs"]
    if not isinstance(graphs, dict) or not graphs or not all(isinstance(g, dict) and isinstance(g.get("file"), str)
                                                             for g in graphs.values()):
        bad("graphs", "an object of graphs, each with its \"file\"")
    if not isinstance(manifest["state"], list) or not all(isinstance(t, dict) for t in manifest["state"]):
        bad("state", "a list of state tensors")
    files = manifest["files"]
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        bad("files", "an object of file: sha256")
    trt = manifest.get("tensorrt")
    if trt is not None and not (isinstance(trt, dict) and isinstance(trt.get("engines"), dict)):
        bad("tensorrt", "an object with the engines (written by memdeploy build)")
