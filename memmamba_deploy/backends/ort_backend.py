"""ONNX Runtime backend: runs an export directory's decode_step.onnx and prefill.onnx (either flavour).

State lives in OrtValues on the session's device and moves through IOBinding: no host round trip per token.
Each step writes the new state into a second set of buffers and hands back a new OrtState; the old one is never
written (Backend protocol: states can be kept, copied, rewound). Buffers are recycled once no OrtState refers to
them any more, so the usual `logits, state = backend.step(tok, state)` loop ping-pongs between two sets of state
buffers instead of allocating per token (and never updates a state in place, the lesson of deployment-notes).
"""
from __future__ import annotations

import weakref
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..export.manifest import read_manifest
from ..models import MemMambaConfig, State
from ..models.memmamba import check_lengths
from .base import check_batch, check_ids

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
_ORT_TYPE = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64",
             "tensor(int32)": "int32"}
GRAPHS = ("decode_step", "prefill")


class OrtState:
    """The stacked state tensors of one batch as OrtValues, keyed by the graphs' state input names."""

    __slots__ = ("values", "batch", "__weakref__")

    def __init__(self, values: dict, batch: int):
        self.values = values
        self.batch = batch

    def numpy(self) -> dict[str, np.ndarray]:
        """Copies on the host (the OrtValues' buffers may be recycled once this state is dropped)."""
        return {k: np.array(v.numpy(), copy=True) for k, v in self.values.items()}


def _default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtBackend:
    """Backend protocol (backends/base.py) over ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, out, providers: list[str] | None = None, threads: int | None = None, verify: bool = True):
        import onnxruntime as ort

        self.out = Path(out)
        graph_files = ()
        self.manifest = read_manifest(self.out, verify=False)
        for g in GRAPHS:
            if g not in self.manifest["graphs"]:
                raise ValueError(f"the export in {self.out} has no {g} graph")
            entry = self.manifest["graphs"][g]
            graph_files += (entry["file"],) + ((entry["external_data"],) if entry.get("external_data") else ())
        if verify:
            read_manifest(self.out, verify=True, only=graph_files)
        self.config = MemMambaConfig.from_dict(self.manifest["config"])
        self.dtype = self.manifest["dtype"]
        self.state_specs = self.manifest["state"]
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = providers or _default_providers()
        self.sessions = {}
        for g in GRAPHS:
            path = self.out / self.manifest["graphs"][g]["file"]
            try:
                self.sessions[g] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:   # onnxruntime raises its own Fail/InvalidGraph types
                raise ValueError(f"ONNX Runtime cannot load {path}: {e}") from None
            self._check_io(g)
        # exports since prefill took lengths: rows of their own lengths in one call (Session.prefill of prompts)
        self.ragged_prefill = "lengths" in {i.name for i in self.sessions["prefill"].get_inputs()}
        used = self.sessions["decode_step"].get_providers()
        self.device = "cuda" if used[0] == "CUDAExecutionProvider" else "cpu"
        self.providers = used
        self._free: dict[int, list[dict]] = {}          # batch -> spare state buffer sets (at most 2)

    @classmethod
    def open(cls, out, providers: list[str] | None = None, threads: int | None = None) -> "OrtBackend":
        return cls(out, providers, threads)

    def _check_io(self, graph: str) -> None:
        """The session's I/O must be what the manifest says (guards against a hand-edited directory)."""
        sess, entry = self.sessions[graph], self.manifest["graphs"][graph]
        have = [(i.name, _ORT_TYPE.get(i.type, i.type)) for i in sess.get_inputs()]
        want = [(i["name"], i["dtype"]) for i in entry["inputs"]]
        if have != want:
            raise ValueError(f"{graph}: graph inputs {have} do not match manifest.json {want}")

    # ---- state -----------------------------------------------------------------------------------------------------
    def _shape(self, spec: dict, batch: int) -> list[int]:
        return [batch if d == "batch" else int(d) for d in spec["shape"]]

    def _alloc(self, batch: int) -> dict:
        import onnxruntime as ort

        return {s["name"]: ort.OrtValue.ortvalue_from_shape_and_type(self._shape(s, batch), _NP[s["dtype"]],
                                                                     self.device, 0) for s in self.state_specs}

    def _adopt(self, values: dict, batch: int) -> OrtState:
        """Wrap buffers this backend allocated; they return to the free list when the state is dropped."""
        state = OrtState(values, batch)
        weakref.finalize(state, self._recycle, batch, values)
        return state

    def _recycle(self, batch: int, values: dict) -> None:
        spare = self._free.setdefault(batch, [])
        if len(spare) < 2:
            spare.append(values)

    def _buffers(self, batch: int) -> dict:
        spare = self._free.get(batch)
        return spare.pop() if spare else self._alloc(batch)

    def new_state(self, batch: int) -> OrtState:
        """The state before any token, from the manifest's initial values (0; -1 for pool priorities)."""
        batch = check_batch(batch)
        return self.state_from_arrays({s["name"]: np.full(self._shape(s, batch), s["initial"], _NP[s["dtype"]])
                                       for s in self.state_specs})

    def state_from_arrays(self, arrays: Mapping, copy: bool = True) -> OrtState:
        """An OrtState from {state name: numpy array or torch tensor}; a wrong name, shape or dtype is refused
        with a message naming the tensor."""
        import onnxruntime as ort

        names = [s["name"] for s in self.state_specs]
        unknown = sorted(set(arrays) - set(names))
        if unknown:
            raise ValueError(f"unknown state tensor(s) {unknown}; this export's state is {names}")
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ValueError(f"state tensor(s) {missing} missing; this export's state is {names}")
        first = arrays[names[0]]
        batch = int(first.shape[1]) if len(first.shape) > 1 else -1
        values = {}
        for s in self.state_specs:
            a = arrays[s["name"]]
            a = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
            want = self._shape(s, batch)
            if list(a.shape) != want:
                raise ValueError(f"state tensor {s['name']!r} has shape {list(a.shape)}, expected {want} "
                                 f"(layers, batch, ...: {s['shape']})")
            if a.dtype != _NP[s["dtype"]]:
                raise ValueError(f"state tensor {s['name']!r} has dtype {a.dtype}, expected {s['dtype']}")
            a = np.ascontiguousarray(a)
            values[s["name"]] = ort.OrtValue.ortvalue_from_numpy(a.copy() if copy else a, self.device, 0)
        return OrtState(values, batch)

    def _as_state(self, state, batch: int) -> OrtState:
        if isinstance(state, OrtState):
            for s in self.state_specs:
                v = state.values.get(s["name"])
                if v is None or v.shape() != self._shape(s, batch) or _ORT_TYPE.get(v.data_type()) != s["dtype"]:
                    got = None if v is None else f"{v.shape()} {_ORT_TYPE.get(v.data_type(), v.data_type())}"
                    raise ValueError(f"state tensor {s['name']!r} is {got}, expected "
                                     f"{self._shape(s, batch)} {s['dtype']} (batch {batch} from the token ids)")
            return state
        if isinstance(state, State):
            return self.state_from_reference(state)
        if isinstance(state, Mapping):
            st = self.state_from_arrays(state, copy=False)
        else:
            raise ValueError(f"state must be an OrtState (from new_state/step/prefill) or a dict of arrays, got "
                             f"{type(state).__name__}")
        if st.batch != batch:
            raise ValueError(f"state has batch {st.batch} but the token ids have batch {batch}")
        return st

    def copy_state(self, state: OrtState) -> OrtState:
        return self.state_from_arrays(state.numpy(), copy=False)

    def state_nbytes(self, state: OrtState) -> int:
        return sum(v.tensor_size_in_bytes() for v in state.values.values())

    def state_to_reference(self, state: OrtState) -> State:
        """As models.State (torch, CPU): what parity compares against the PyTorch reference."""
        arrays = state.numpy()
        return State(**{s["field"]: torch.from_numpy(arrays[s["name"]]) for s in self.state_specs})

    def state_from_reference(self, state: State) -> OrtState:
        """From models.State (any device/dtype), cast to this export's state dtypes."""
        tensors = state.tensors()
        missing = [s["field"] for s in self.state_specs if s["field"] not in tensors]
        if missing:
            raise ValueError(f"State lacks {missing} (memory={self.config.memory} export)")
        return self.state_from_arrays({s["name"]: tensors[s["field"]].detach().cpu().numpy().astype(_NP[s["dtype"]])
                                       for s in self.state_specs}, copy=False)

    # ---- running ----------------------------------------------------------------------------------------------------
    def _ids(self, ids, what: str, dims: int) -> np.ndarray:
        ids = ids.detach() if isinstance(ids, torch.Tensor) else ids
        return np.ascontiguousarray(check_ids(ids, self.config.vocab_size, what, dims).cpu().numpy())

    def _run(self, graph: str, ids: np.ndarray, state, lengths: np.ndarray | None = None):
        import onnxruntime as ort

        batch = ids.shape[0]
        state = self._as_state(state, batch)
        sess = self.sessions[graph]
        binding = sess.io_binding()
        binding.bind_ortvalue_input("input_ids", ort.OrtValue.ortvalue_from_numpy(ids, self.device, 0))
        if lengths is not None:
            binding.bind_ortvalue_input("lengths", ort.OrtValue.ortvalue_from_numpy(lengths, self.device, 0))
        binding.bind_output("logits", "cpu")      # first (get_outputs()[0]); small, and wanted on the host
        out = self._buffers(batch)
        for s in self.state_specs:
            binding.bind_ortvalue_input(s["name"], state.values[s["name"]])
            binding.bind_ortvalue_output(s["output"], out[s["name"]])
        try:
            sess.run_with_iobinding(binding)
        except Exception as e:
            self._recycle(batch, out)
            raise RuntimeError(f"ONNX Runtime failed in {graph}: {e}") from None
        logits = torch.from_numpy(np.array(binding.get_outputs()[0].numpy(), dtype=np.float32, copy=True))
        return logits, self._adopt(out, batch)

    def prefill(self, input_ids, state, lengths=None) -> tuple[torch.Tensor, OrtState]:
        """input_ids [B,T], T >= 1 -> (logits of the last token [B,vocab] fp32, state after it). lengths [B]: rows
        of their own lengths, the rest padding (MemMambaLM.prefill's; exports whose prefill graph takes them,
        ragged_prefill)."""
        ids = self._ids(input_ids, "input_ids", 2)
        n = np.full(ids.shape[0], ids.shape[1], np.int64) if lengths is None else \
            np.ascontiguousarray(check_lengths(lengths, *ids.shape).cpu().numpy())
        if self.ragged_prefill:
            return self._run("prefill", ids, state, n)
        if (n != ids.shape[1]).any():
            raise ValueError(f"the export in {self.out} predates prefill's lengths input: export it again to prefill "
                             f"rows of their own lengths in one call, or prefill the rows one at a time")
        return self._run("prefill", ids, state)

    def step(self, token_ids, state) -> tuple[torch.Tensor, OrtState]:
        """token_ids [B] (or [B,1]) -> (logits [B,vocab] fp32, state after the token)."""
        return self._run("decode_step", self._ids(token_ids, "token_ids", 1)[:, None], state)

    def generate(self, prompt, max_new_tokens: int, **sampling):
        """sampling.generate over this backend (greedy / top-k / top-p / temperature / seed)."""
        from ..sampling import generate

        return generate(self, prompt, max_new_tokens, **sampling)
