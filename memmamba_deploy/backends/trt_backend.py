"""TensorRT: build engines from an export directory (`memdeploy build`) and run them as a Backend.

The export directory (memdeploy export, flavour `plugins`) holds decode_step.onnx, prefill.onnx and manifest.json.
`build_engines` loads the plugin library (plugins_trt/, libmemmamba_plugins.so) into TensorRT's registry, parses
each graph with TensorRT's ONNX parser (the `memmamba` custom nodes become plugin layers; their function bodies,
which ONNX Runtime runs, are left out of what the parser sees), sets one optimization profile (batch 1..max_batch,
prefill tokens 1..max_prefill), builds, and writes <graph>.engine beside the ONNX file, recording the engines
under "tensorrt" in manifest.json.

Written for the TensorRT 10.x and 11.x Python APIs. The networks are strongly typed on both (11.x knows no
other kind): the precision is the exported graph's (`memdeploy export --dtype fp16`), so the parts the export keeps
in fp32 whatever the dtype (the note scores, the pool's thresholds, RMSNorm, the SSM state) stay fp32. TensorRT
10.x's weakly typed fp16 (the FP16 builder flag on an fp32 graph) would be free to run them in fp16 and flip pool
decisions; it is not offered.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import torch

from ..export.manifest import sha256 as _sha256
from ..models.checkpoint import atomic_file, write_json

INSTALL_HINT = ("TensorRT is not installed: on x86-64 `pip install tensorrt` (NVIDIA's wheel for CUDA 12/13); on "
                "Jetson install JetPack, which ships TensorRT (`sudo apt install nvidia-jetpack`, then use the system "
                "python3 or a venv created with --system-site-packages)")
GRAPHS = ("decode_step", "prefill")
BATCH_DIMS = {"batch", "B", "batch_size"}       # symbolic dims the profile sizes from --max-batch
TOKEN_DIMS = {"T", "tokens", "seq", "seq_len", "sequence"}   # ... and from --max-prefill


def require_tensorrt():
    """import tensorrt, or ImportError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise ImportError(f"{INSTALL_HINT} ({e})") from None
    return trt


def trt_major(trt) -> int:
    return int(str(trt.__version__).split(".")[0])


def _logger(trt, messages: list[str]):
    """A TensorRT logger that keeps errors and warnings for our error messages."""
    class Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                messages.append(str(msg))
    return Logger()


# TensorRT's plugin registry is one per process, and load_library fails (returns None) when a library's plugins are
# registered already (IPluginRegistry::loadLibrary): each library is loaded once, and its handle kept here.
_LOADED: dict[Path, Any] = {}


def load_plugins(trt, library: str | Path, logger) -> Any:
    """Load the plugin library into TensorRT's registry (once a process) and check that every memmamba op is
    registered. Where the process holds every memmamba plugin already (loaded by the application, or by a C++
    session), those are used and None is returned."""
    from ..export.contract import CUSTOM_OPS, PLUGIN_NAMESPACE, PLUGIN_VERSION

    library = Path(library)
    if not library.is_file():
        raise FileNotFoundError(f"no plugin library at {library} (build it: cmake -S plugins_trt -B plugins_trt/build "
                                f"&& cmake --build plugins_trt/build; see plugins_trt/README.md)")
    path = library.resolve()
    registry = trt.get_plugin_registry()
    if path not in _LOADED:
        if _LOADED:
            raise ValueError(f"this process loaded the plugin library {next(iter(_LOADED))} already; TensorRT holds "
                             f"one per process, so {library} cannot be loaded beside it (use the same library)")
        registered = [n for n in CUSTOM_OPS if registry.get_creator(n, PLUGIN_VERSION, PLUGIN_NAMESPACE) is not None]
        if len(registered) == len(CUSTOM_OPS):         # the application (or a C++ session) registered them: use those
            return None
        if registered:
            raise ValueError(f"the plugin(s) {registered} are registered in this process already, not from {library}: "
                             f"TensorRT cannot load a library whose plugins it holds (load only {library})")
        handle = registry.load_library(str(path))
        if not handle:
            raise ValueError(f"TensorRT could not load the plugin library {library} (built for another TensorRT or "
                             f"CUDA?)")
        _LOADED[path] = handle
    missing = [n for n in CUSTOM_OPS if registry.get_creator(n, PLUGIN_VERSION, PLUGIN_NAMESPACE) is None]
    if missing:
        raise ValueError(f"{library} does not register the plugin(s) {missing}: is it libmemmamba_plugins.so?")
    return _LOADED[path]


def read_manifest(out: Path, verify: bool = True) -> dict:
    """The export's manifest (export/manifest.py); `verify` checks the sha256 of every exported file."""
    from ..export import read_manifest as read

    return read(out, verify=verify)


def graph_file(out: Path, manifest: dict, graph: str) -> Path:
    g = manifest["graphs"].get(graph)
    if g is None:
        raise ValueError(f"the export in {out} has no {graph} graph (graphs: {sorted(manifest['graphs'])})")
    return Path(out) / (g["file"] if isinstance(g, dict) and "file" in g else f"{graph}.onnx")


def plugin_only_graph(onnx_path: Path) -> tuple[bytes, int]:
    """The graph without its `memmamba` function bodies, and how many custom nodes it has.

    TensorRT's parser prefers a model-local function over a plugin before 10.7 (JetPack 6.1/6.2 ship 10.3), and from
    10.15 for nodes without a `plugin_namespace` attribute (exports before that attribute); with the bodies removed
    every version takes the plugin, so one engine build behaves the same on all of them. (ONNX Runtime keeps using
    the exported file, bodies included.)"""
    import onnx

    from ..export.contract import DOMAIN

    model = onnx.load(str(onnx_path), load_external_data=False)   # weights stay in the external file, if any
    kept = [f for f in model.functions if f.domain != DOMAIN]
    del model.functions[:]
    model.functions.extend(kept)
    n_custom = sum(n.domain == DOMAIN for n in model.graph.node)
    return model.SerializeToString(), n_custom


def _parser_error(e) -> str:
    """One parser error as "node NAME (OP): description"."""
    name = getattr(e, "node_name", lambda: "")()
    op = getattr(e, "node_operator", lambda: "")()
    where = f"node {name} ({op}): " if name or op else ""
    return where + str(e.desc() if hasattr(e, "desc") else e)


def _profile_shape(name: str, shape, symbols: list[str], max_batch: int, max_prefill: int):
    """(min, opt, max) for one network input: batch dims 1..max_batch, token dims 1..max_prefill."""
    lo, opt, hi = [], [], []
    for i, d in enumerate(shape):
        if d >= 0:
            lo.append(d), opt.append(d), hi.append(d)
            continue
        sym = symbols[i] if i < len(symbols) else "?"
        if sym in BATCH_DIMS:
            lo.append(1), opt.append(1), hi.append(max_batch)          # tuned for batch 1, decode's usual
        elif sym in TOKEN_DIMS:
            lo.append(1), opt.append(max(1, max_prefill // 2)), hi.append(max_prefill)
        else:
            raise ValueError(f"input {name!r} has a dynamic dimension {i} ({sym!r}) that is neither a batch nor a "
                             f"token dimension; cannot size the optimization profile")
    return tuple(lo), tuple(opt), tuple(hi)


def _input_symbols(manifest: dict, graph: str) -> dict[str, list[str]]:
    """input name -> symbolic dim names, from the manifest's graph I/O description."""
    g = manifest["graphs"][graph]
    out = {}
    for t in g.get("inputs", []) if isinstance(g, dict) else []:
        out[t["name"]] = [str(d) for d in t.get("shape", [])]
    return out


def build_engines(out: str | Path, plugins: str | Path, precision: str | None = None, max_batch: int = 8,
                  max_prefill: int = 2048, workspace_mb: int = 1024,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Build one engine per graph of the export in `out`; returns the manifest's new "tensorrt" entry."""
    trt = require_tensorrt()
    out = Path(out)
    manifest = read_manifest(out)
    if max_batch < 1 or max_prefill < 1 or workspace_mb < 1:
        raise ValueError(f"--max-batch, --max-prefill and --workspace-mb must be >= 1, got {max_batch}, {max_prefill} "
                         f"and {workspace_mb}")
    graph_dtype = manifest.get("dtype", "fp32")
    precision = precision or graph_dtype
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"unknown precision {precision!r}: choose fp16 or fp32")
    if precision != graph_dtype:
        raise ValueError(f"{out} holds an {graph_dtype} export and the engines take the graph's precision (strongly "
                         f"typed, so its fp32 parts stay fp32): export again with --dtype {precision} for an "
                         f"{precision} engine")
    if manifest.get("flavor") != "plugins":
        raise ValueError(f"{out} holds the {manifest.get('flavor')!r} flavour; TensorRT engines are built from the "
                         f"plugins flavour (`memdeploy export --flavor plugins`)")
    messages: list[str] = []
    logger = _logger(trt, messages)
    load_plugins(trt, plugins, logger)
    engines = {}
    # the engines are written beside their final names and renamed over them together once both have built, then
    # the manifest: a failed build leaves the folder (and any engines it held) as it was
    with contextlib.ExitStack() as staged:
        for graph in GRAPHS:
            onnx_path = graph_file(out, manifest, graph)
            if progress:
                progress(graph)
            builder = trt.Builder(logger)
            # 11.x networks are strongly typed always (the flag is deprecated there and ignored); 10.x is told so
            flags = 0 if trt_major(trt) >= 11 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            model_bytes, n_custom = plugin_only_graph(onnx_path)
            if not parser.parse(model_bytes, str(onnx_path)):
                errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
                raise ValueError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors}")
            n_plugins = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
            if n_plugins != n_custom:
                raise ValueError(f"{onnx_path}: {n_custom} memmamba custom nodes but {n_plugins} plugin layers after "
                                 f"parsing: the parser did not map every custom node to the memmamba plugins")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
            profile = builder.create_optimization_profile()
            symbols = _input_symbols(manifest, graph)
            for i in range(network.num_inputs):
                t = network.get_input(i)
                profile.set_shape(t.name, *_profile_shape(t.name, tuple(t.shape), symbols.get(t.name, []),
                                                          max_batch, max_prefill))
            config.add_optimization_profile(profile)
            blob = builder.build_serialized_network(network, config)
            if blob is None:
                raise ValueError(f"TensorRT could not build {onnx_path}: " + ("; ".join(messages[-5:]) or "no message"))
            engine_path = onnx_path.with_suffix(".engine")
            tmp = staged.enter_context(atomic_file(engine_path))
            tmp.write_bytes(bytes(blob))
            engines[graph] = {"file": engine_path.name, "sha256": _sha256(tmp)}
    entry = {
        "engines": engines,
        "plugins": str(Path(plugins).resolve()),
        "plugins_sha256": _sha256(Path(plugins)),
        "tensorrt": str(trt.__version__),
        "precision": precision,
        "max_batch": max_batch,
        "max_prefill": max_prefill,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "unknown",
    }
    manifest["tensorrt"] = entry
    write_json(out / "manifest.json", manifest)
    return entry


# ---- runtime ---------------------------------------------------------------------------------------------------------
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int32": torch.int32, "int64": torch.int64,
                 "bool": torch.bool}


class TensorRTBackend:
    """Backend protocol (backends/base.py) over the two engines. A state is a dict of CUDA tensors keyed by the
    decode graph's state input names; step/prefill write the new state into freshly allocated tensors (the inputs
    are never written: no in-place update, the allocator recycles the old buffers as they are dropped)."""

    name = "tensorrt"

    def __init__(self, out: str | Path, plugins: str | Path | None = None, device: str = "cuda"):
        trt = require_tensorrt()
        if not torch.cuda.is_available():
            raise ValueError("the TensorRT backend needs a CUDA GPU; none is visible to torch")
        from ..models import MemMambaConfig

        self.out = Path(out)
        self.manifest = read_manifest(self.out, verify=False)   # the engines' own sha256 is checked below
        entry = self.manifest.get("tensorrt")
        if not entry:
            raise ValueError(f"{self.out} has no TensorRT engines yet: run `memdeploy build {self.out} --plugins LIB`")
        self.config = MemMambaConfig.from_dict(self.manifest["config"])
        self.device = torch.device(device)
        self._messages: list[str] = []
        self._logger = _logger(trt, self._messages)
        load_plugins(trt, plugins or entry["plugins"], self._logger)
        self._runtime = trt.Runtime(self._logger)
        self._trt = trt
        self.engines, self.contexts = {}, {}
        for graph, e in entry["engines"].items():
            path = self.out / e["file"]
            if not path.is_file():
                raise FileNotFoundError(f"missing engine {path} (listed in manifest.json): run `memdeploy build` again")
            if _sha256(path) != e["sha256"]:
                raise ValueError(f"{path} does not match the sha256 recorded in manifest.json: rebuild the engines")
            engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if engine is None:
                raise ValueError(f"TensorRT could not load {path} (built by another TensorRT version or for another "
                                 f"GPU?): " + "; ".join(self._messages[-3:]))
            self.engines[graph] = engine
            self.contexts[graph] = engine.create_execution_context()
        self.max_batch, self.max_prefill = entry["max_batch"], entry["max_prefill"]
        self._io = {g: self._describe(e) for g, e in self.engines.items()}
        self.state_specs = self.manifest["state"]     # [{name, output, field, shape, dtype, initial}]
        self.stream = torch.cuda.Stream(self.device)

    @classmethod
    def open(cls, out, plugins=None, device="cuda") -> "TensorRTBackend":
        return cls(out, plugins, device)

    def _describe(self, engine) -> dict[str, tuple[str, torch.dtype]]:
        trt = self._trt
        io = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            mode = "in" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "out"
            dtype = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
                     trt.int64: torch.int64, trt.bool: torch.bool}[engine.get_tensor_dtype(name)]
            io[name] = (mode, dtype)
        return io

    # ---- state ---------------------------------------------------------------------------------------------------
    def new_state(self, batch: int) -> dict[str, torch.Tensor]:
        """The state before any token, as the export describes it (zeros; -1 priorities: empty pool slots)."""
        if not 1 <= batch <= self.max_batch:
            raise ValueError(f"batch {batch} is outside the engines' profile 1..{self.max_batch} (memdeploy build "
                             f"--max-batch)")
        state = {}
        for spec in self.state_specs:
            shape = [batch if d == "batch" else d for d in spec["shape"]]
            state[spec["name"]] = torch.full(shape, float(spec["initial"]), dtype=_TORCH_DTYPES[spec["dtype"]],
                                             device=self.device)
        return state

    def _check_state(self, state, batch: int) -> None:
        for spec in self.state_specs:
            t = state.get(spec["name"]) if isinstance(state, dict) else None
            want = tuple(batch if d == "batch" else d for d in spec["shape"])
            if t is None:
                raise ValueError(f"state lacks {spec['name']!r} (a TensorRTBackend state is the dict new_state gives)")
            if tuple(t.shape) != want or t.dtype != _TORCH_DTYPES[spec["dtype"]]:
                raise ValueError(f"state {spec['name']!r} is {list(t.shape)} {t.dtype}, expected {list(want)} "
                                 f"{spec['dtype']}")

    def copy_state(self, state):
        return {k: v.clone() for k, v in state.items()}

    def state_nbytes(self, state) -> int:
        return sum(v.numel() * v.element_size() for v in state.values())

    # ---- execution -------------------------------------------------------------------------------------------------
    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx, io = self.contexts[graph], self._io[graph]
        for name, (mode, dtype) in io.items():
            if mode == "in":
                if name not in feeds:
                    raise ValueError(f"{graph}: no value for input {name!r}")
                t = feeds[name].to(self.device, dtype).contiguous()
                feeds[name] = t
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise ValueError(f"{graph}: input {name!r} of shape {list(t.shape)} is outside the engine's "
                                     f"optimization profile (memdeploy build --max-batch {self.max_batch} "
                                     f"--max-prefill {self.max_prefill}): " + "; ".join(self._messages[-2:]))
                ctx.set_tensor_address(name, t.data_ptr())
        outputs = {}
        for name, (mode, dtype) in io.items():
            if mode == "out":
                outputs[name] = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=dtype, device=self.device)
                ctx.set_tensor_address(name, outputs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to run {graph}: " + "; ".join(self._messages[-3:]))
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for t in list(feeds.values()) + list(outputs.values()):
            t.record_stream(self.stream)
        return outputs

    def _split(self, outputs: dict[str, torch.Tensor]):
        """Graph outputs -> (logits fp32, state keyed by the state inputs' names)."""
        return outputs["logits"].float(), {spec["name"]: outputs[spec["output"]] for spec in self.state_specs}

    @torch.no_grad()
    def step(self, token_ids, state):
        ids = torch.as_tensor(token_ids).reshape(-1, 1).to(self.device, torch.int64)
        self._check_state(state, ids.shape[0])
        logits, new_state = self._split(self._run("decode_step", {"input_ids": ids, **state}))
        return logits.reshape(ids.shape[0], -1), new_state

    @torch.no_grad()
    def prefill(self, input_ids, state):
        ids = torch.as_tensor(input_ids).to(self.device, torch.int64)
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, T] with T >= 1, got shape {list(ids.shape)}")
        self._check_state(state, ids.shape[0])
        logits = None
        for start in range(0, ids.shape[1], self.max_prefill):  # resumable prefill: chunks of the profile's max
            chunk = ids[:, start:start + self.max_prefill]
            feeds = {"input_ids": chunk, **state}
            if "lengths" in self._io["prefill"]:           # (exports since the prefill graph took lengths) whole rows
                feeds["lengths"] = torch.full((ids.shape[0],), chunk.shape[1], dtype=torch.int64)
            logits, state = self._split(self._run("prefill", feeds))
        return logits.reshape(ids.shape[0], -1), state
