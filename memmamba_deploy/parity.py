"""`memdeploy parity`: run the PyTorch reference and any Backend side by side and measure how far apart they are.

For every case (random prompts of the given lengths, and prompts given as token ids) the comparator
  1. prefills both from the empty state: last-token logits error, state error, pool slots that differ;
  2. decodes `steps` tokens, feeding both the reference's greedy token (so the two never drift apart by sampling):
     per-step logits error (max abs / max rel), greedy-token agreement, and the Note Block's insert decisions of
     both sides, read from the pool priorities before and after each step;
  3. compares the states at the end.

Decision flips (spec §9) are counted apart from numeric error: a threshold decision (a > τ1, a > π[j]) that the two
sides take differently changes which summary a pool keeps, after which the logits legitimately differ by far more
than rounding. The comparator records the reference's margin for every decision (from forward hooks on the Note
Block and the read trigger); a flip whose margin is within `flip_radius` (10·rtol by default) is rounding and is
reported, then the backend is re-synchronised to the reference state so that numeric error keeps being measured;
a flip with a larger margin is a bug and fails the run. Read-trigger decisions (b > τ2) are not visible in a
backend's state: their smallest margin and the number within flip_radius are reported.

Any Backend plugs in (backends/base.py). To compare states the comparator reads a backend's state through
`backend.state_to_reference(state) -> models.State` when it has one, else a torch `State`, else a mapping keyed by
the export's state names (conv_state, ssm_state, pool, pool_prio); re-synchronising uses
`backend.state_from_reference(State)` or builds the same kind of mapping.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .metrics import align_pool_slots, rel_err
from .models import MemMambaLM, State
from .models.ops.pool import fp32

DEFAULT_RTOL = {"fp32": 1e-4, "fp16": 1e-2}
FIELD_OF_NAME = {"conv_state": "conv", "ssm_state": "ssm", "pool": "pool", "pool_prio": "prio"}


# ---- reading any backend's state -------------------------------------------------------------------------------------
def state_view(backend, state, device="cpu") -> State:
    """A backend's state as a torch State on `device` (None: wherever the backend's reference view puts it, e.g.
    the CPU for onnxruntime; float tensors as they are). Treat it as read-only: it may share memory with the
    backend's state."""
    if hasattr(backend, "state_to_reference"):
        ref = backend.state_to_reference(state)
    elif isinstance(state, State):
        ref = state
    elif isinstance(state, Mapping):
        ref = State(**{FIELD_OF_NAME[k]: v.detach() if isinstance(v, torch.Tensor) else torch.from_numpy(
            np.asarray(v)) for k, v in state.items()})
    else:
        ref = None
    if ref is not None:
        return ref if device is None else ref.to(device)
    raise TypeError(f"cannot read the state of backend {backend.name!r} ({type(state).__name__}): give the backend a "
                    f"state_to_reference(state) method")


def state_like(backend, reference: State, like):
    """The reference state converted into the backend's own state type (for re-synchronising after a flip)."""
    if hasattr(backend, "state_from_reference"):
        return backend.state_from_reference(reference)
    ref = reference.tensors()
    if isinstance(like, State):
        return State(**{k: v.to(like.tensors()[k].device, like.tensors()[k].dtype) for k, v in ref.items()})
    if isinstance(like, Mapping):
        out = {}
        for name, old in like.items():
            t = ref[FIELD_OF_NAME[name]]
            out[name] = (t.to(old.device, old.dtype).contiguous() if isinstance(old, torch.Tensor)
                         else t.numpy().astype(np.asarray(old).dtype))
        return out
    raise TypeError(f"cannot write a state for backend {backend.name!r}: give it state_from_reference(State)")


# ---- margins of the reference's threshold decisions ------------------------------------------------------------------
class DecisionRecorder:
    """Forward hooks on every layer's Note Block (score a) and read trigger (b = sigmoid(logit)), recording only
    inside `with recorder.on():` (the backend may run the very same modules, e.g. the torch backend)."""

    def __init__(self, model: MemMambaLM):
        self.model, self.scores, self.reads, self._hooks, self._active = model, [], [], [], False

    def _keep(self, into: list, value: torch.Tensor) -> None:
        if self._active:
            into.append(value)

    def __enter__(self):
        if self.model.config.memory:
            for layer in self.model.layers:
                self._hooks.append(layer.note.register_forward_hook(
                    lambda m, i, o: self._keep(self.scores, o[0].float())))
                self._hooks.append(layer.token_attn.trigger.register_forward_hook(
                    lambda m, i, o: self._keep(self.reads, torch.sigmoid(o.float()[..., 0]))))
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()

    @contextlib.contextmanager
    def on(self):
        self._active = True
        try:
            yield
        finally:
            self._active = False

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(a [L, B, ...], b [L, B, ...]) recorded since the last take."""
        a = torch.stack(self.scores).cpu() if self.scores else None
        b = torch.stack(self.reads).cpu() if self.reads else None
        self.scores, self.reads = [], []
        return a, b


def _inserted_slot(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """[L,B,K] priorities before/after one token -> [L,B]: the slot that took the token, -1 none, -2 several
    (impossible under §3: a state that changed two slots is wrong)."""
    changed = old != new
    n = changed.sum(-1)
    slot = torch.where(n == 1, changed.int().argmax(-1), torch.full_like(n, -1))
    return torch.where(n > 1, torch.full_like(n, -2), slot)


def _insert_margins(a: torch.Tensor, prio_before: torch.Tensor, tau1: float):
    """[L,B] distance of each insert decision from flipping: |a - τ1|; when a clears τ1 also |a - π[j]| (j the
    argmin slot) and, when the token is taken, the gap between the two lowest priorities (which slot it evicts).
    Also [L,B] ties: a == π[j] exactly (a token meeting its own earlier score, as a repeated token's often is in
    a layer that sees only the token); their distance is 0."""
    m = (a - tau1).abs()
    low = prio_before.topk(min(2, prio_before.shape[-1]), dim=-1, largest=False).values
    above = a > tau1
    tie = above & (a == low[..., 0])
    m = torch.where(above, torch.minimum(m, (a - low[..., 0]).abs()), m)
    if low.shape[-1] == 2:
        taken = above & (a > low[..., 0]) & (low[..., 1] >= 0)      # two empty slots are interchangeable
        m = torch.where(taken, torch.minimum(m, low[..., 1] - low[..., 0]), m)
    return m, tie


# ---- results ---------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CaseResult:
    name: str
    batch: int
    prompt_len: int
    steps: int
    prefill_logits_rel: float = 0.0
    prefill_logits_abs: float = 0.0
    prefill_state_rel: dict = dataclasses.field(default_factory=dict)
    prefill_slot_mismatches: int = 0       # pool entries that differ, whatever slots hold them
    prefill_slots_permuted: int = 0        # pools holding the same entries in another slot order (harmless)
    prefill_flips: int = 0                 # flips found by replaying the prompt token by token (both sides)
    step_logits_max_rel: float = 0.0
    step_logits_max_abs: float = 0.0
    step_logits_rel: list = dataclasses.field(default_factory=list)
    final_state_rel: dict = dataclasses.field(default_factory=dict)
    greedy_agreement: float = 1.0
    greedy_first_mismatch: int | None = None
    insert_decisions: int = 0
    insert_flips: int = 0
    flip_margins: list = dataclasses.field(default_factory=list)
    min_insert_margin: float | None = None  # ties (below) left out of its a-vs-priority distance
    insert_ties: int = 0                    # decisions on an exact tie (a token's score equal to the priority it
    min_read_margin: float | None = None    # meets, as a repeated token's often is): the same on both sides when
                                            # both compute the two values alike; insert_flips says whether they did
    reads_within_radius: int = 0
    resyncs: int = 0
    failures: list = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "ok": self.ok}


@dataclasses.dataclass
class ParityReport:
    backend: str
    dtype: str
    rtol: float
    flip_radius: float
    cases: list[CaseResult]
    info: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.cases)

    def to_dict(self) -> dict:
        return _finite({"ok": self.ok, "backend": self.backend, "dtype": self.dtype, "rtol": self.rtol,
                        "flip_radius": self.flip_radius, "info": self.info,
                        "cases": [c.to_dict() for c in self.cases]})


def _worst(a: float, b: float) -> float:
    """max(a, b) that keeps a NaN (Python's max drops it when it comes second)."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def _finite(value):
    """The report as JSON can carry it: NaN and infinities become null (json.dumps would write bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _min(current, values: torch.Tensor | None):
    if values is None or values.numel() == 0:
        return current
    v = float(values.min())
    return v if current is None else min(current, v)


def _slot_mismatches(ref: State, got: State, radius: float) -> int:
    """Pool slots whose entries differ: occupancy, or priority / summary beyond radius."""
    if ref.prio is None:
        return 0
    scale = max(float(ref.pool.float().abs().max()), 1e-12)
    diff = ((ref.prio >= 0) != (got.prio >= 0)) | ((ref.prio - got.prio.float()).abs() > radius)
    diff |= (ref.pool.float() - got.pool.float()).abs().amax(-1) > radius * scale
    return int(diff.sum())


def _state_errors(ref: State, got: State) -> dict[str, float]:
    return {k: rel_err(got.tensors()[k].float(), v.float()) for k, v in ref.tensors().items()}


# ---- the comparator --------------------------------------------------------------------------------------------------
class _Decisions:
    """Books the reference's threshold margins and both sides' insert decisions into a CaseResult."""

    def __init__(self, r: CaseResult, rec: DecisionRecorder, config, flip_radius: float):
        self.r, self.rec, self.radius = r, rec, flip_radius
        self.tau1, self.tau2 = fp32(config.insert_threshold), fp32(config.read_threshold)


    def reads(self, b: torch.Tensor) -> None:
        self.r.min_read_margin = _min(self.r.min_read_margin, (b - self.tau2).abs())
        self.r.reads_within_radius += int(((b - self.tau2).abs() <= self.radius).sum())

    def token(self, ref_before, ref_after, got_before, got_after) -> bool:
        """One token's decisions ([L,B,K] priorities before/after on each side); True when any flipped."""
        a, b = self.rec.take()
        margins, tie = _insert_margins(a, ref_before, self.tau1)
        # a tie is reported apart: its 0 would pin the smallest margin (flips are still judged by the full one)
        self.r.min_insert_margin = _min(self.r.min_insert_margin, torch.where(tie, (a - self.tau1).abs(), margins))
        self.r.insert_ties += int(tie.sum())
        self.reads(b)
        self.r.insert_decisions += margins.numel()
        flips = _inserted_slot(ref_before, ref_after) != _inserted_slot(got_before, got_after)
        self.r.insert_flips += int(flips.sum())
        self.r.flip_margins += [float(m) for m in margins[flips]]
        return bool(flips.any())


def _replay_prompt(reference, backend, prompt, decisions: _Decisions) -> int:
    """Run the prompt token by token on both sides (re-syncing after each flip) to find which insert decisions
    of the prefill the two sides took differently. Returns the number of flips found."""
    B, dev, before = prompt.shape[0], reference.device, decisions.r.insert_flips
    ref_state, state = reference.new_state(B), backend.new_state(B)
    got_prio = state_view(backend, state).prio
    for t in range(prompt.shape[1]):
        ref_before = ref_state.prio.cpu()
        with decisions.rec.on():
            _, ref_state = reference.step(prompt[:, t].to(dev), ref_state)
        _, state = backend.step(prompt[:, t], state)
        got_after = state_view(backend, state).prio
        if decisions.token(ref_before, ref_state.prio.cpu(), got_prio, got_after):
            state, got_after = state_like(backend, ref_state, state), ref_state.prio.cpu()
        got_prio = got_after
    return decisions.r.insert_flips - before


@torch.no_grad()
def compare(reference: MemMambaLM, backend, prompt: torch.Tensor, steps: int, rtol: float, flip_radius: float,
            name: str = "case", resync: bool = True, on_step: Callable[[], None] = lambda: None) -> CaseResult:
    """Compare `backend` with `reference` on one prompt [B,T] then `steps` greedy decode steps."""
    c = reference.config
    prompt = torch.as_tensor(prompt).long()
    B, T = prompt.shape
    r = CaseResult(name=name, batch=B, prompt_len=T, steps=steps)
    dev = reference.device

    with DecisionRecorder(reference) as rec:
        decisions = _Decisions(r, rec, c, flip_radius)
        with rec.on():
            ref_logits, ref_state = reference.prefill(prompt.to(dev), last_only=True)   # as backends prefill
        ref_logits = ref_logits[:, -1].float().cpu()
        a, b = rec.take()
        if a is not None:
            r.min_insert_margin = _min(None, (a - decisions.tau1).abs())
            decisions.reads(b)
        logits, state = backend.prefill(prompt, backend.new_state(B))
        logits = logits.float().cpu()
        r.prefill_logits_rel = rel_err(logits, ref_logits)
        r.prefill_logits_abs = float((logits - ref_logits).abs().max())
        got = state_view(backend, state)
        ref_cpu = ref_state.to("cpu")
        aligned = align_pool_slots(ref_cpu, got)
        r.prefill_slot_mismatches = _slot_mismatches(ref_cpu, aligned, flip_radius)
        if c.memory and not r.prefill_slot_mismatches:
            # the same entries in other slots (a parallel prefill may order near-equal priorities otherwise): the
            # backend goes on with its own values in the reference's slots, so decode compares slot by slot
            r.prefill_slots_permuted = int(((aligned.prio != got.prio).any(-1)
                                            | (aligned.pool != got.pool).flatten(-2).any(-1)).sum())
            if r.prefill_slots_permuted:
                state, got = state_like(backend, aligned, state), aligned
        r.prefill_state_rel = _state_errors(ref_cpu, got)
        prefill_flips = 0
        if c.memory and (r.prefill_slot_mismatches or r.prefill_logits_rel > rtol):
            prefill_flips = _replay_prompt(reference, backend, prompt, decisions)   # why do they differ?
        if r.prefill_slot_mismatches and resync:
            state, got = state_like(backend, ref_state, state), ref_cpu
            r.resyncs += 1
        agree = 0
        got_prio = got.prio if c.memory else None
        for i in range(steps):
            token = ref_logits.argmax(-1)
            match = logits.argmax(-1) == token
            agree += int(match.sum())
            if r.greedy_first_mismatch is None and not bool(match.all()):
                r.greedy_first_mismatch = i
            ref_before = ref_state.prio.cpu() if c.memory else None
            with rec.on():
                ref_logits, ref_state = reference.step(token.to(dev), ref_state)
            ref_logits = ref_logits.float().cpu()
            logits, state = backend.step(token, state)
            logits = logits.float().cpu()
            rel = rel_err(logits, ref_logits)
            r.step_logits_rel.append(rel)
            r.step_logits_max_rel = _worst(r.step_logits_max_rel, rel)
            r.step_logits_max_abs = _worst(r.step_logits_max_abs, float((logits - ref_logits).abs().max()))
            if c.memory:
                got_after = state_view(backend, state).prio
                if decisions.token(ref_before, ref_state.prio.cpu(), got_prio, got_after) and resync:
                    state, got_after = state_like(backend, ref_state, state), ref_state.prio.cpu()
                    r.resyncs += 1
                got_prio = got_after
            on_step()
        token = ref_logits.argmax(-1)
        agree += int((logits.argmax(-1) == token).sum())
        r.greedy_agreement = agree / (B * (steps + 1))
        ref_cpu = ref_state.to("cpu")
        r.final_state_rel = _state_errors(ref_cpu, align_pool_slots(ref_cpu, state_view(backend, state)))

    # A flip inside the prompt changes the prefill's later tokens: its logits then differ by more than rounding.
    # Every test reads "not err <= rtol", so that a NaN error (the backend gave NaN or Inf) fails it.
    r.prefill_flips = prefill_flips
    if math.isnan(r.prefill_logits_rel) or (r.prefill_logits_rel > rtol and not prefill_flips):
        r.failures.append(f"prefill logits rel. error {r.prefill_logits_rel:.2e} > {rtol:.0e}")
    if r.prefill_slot_mismatches and not prefill_flips:
        r.failures.append(f"{r.prefill_slot_mismatches} pool slot(s) differ after prefill, but replaying the prompt "
                          f"token by token shows no flipped decision")
    if not r.step_logits_max_rel <= rtol:
        r.failures.append(f"step logits rel. error {r.step_logits_max_rel:.2e} > {rtol:.0e}")
    for k, err in r.final_state_rel.items():
        if not err <= rtol:
            r.failures.append(f"final state.{k} rel. error {err:.2e} > {rtol:.0e}")
    unexplained = [m for m in r.flip_margins if m > flip_radius]
    if unexplained:
        r.failures.append(f"{len(unexplained)} insert decision(s) flipped with margin up to {max(unexplained):.2e} "
                          f"> flip radius {flip_radius:.0e}: not rounding")
    if not resync and (r.insert_flips or r.prefill_slot_mismatches):
        r.failures.append("decisions flipped and resync is off: later errors are not numeric")
    return r


# ---- backends by name ------------------------------------------------------------------------------------------------
def _open_ort(out: Path, manifest: dict, device: str):
    from .backends.ort_backend import OrtBackend
    providers = ["CPUExecutionProvider"] if device == "cpu" else None
    return OrtBackend.open(out, providers=providers)


def _open_torch(out: Path, manifest: dict, device: str, kernels: str = "torch"):
    from .backends import TorchBackend
    dtype = torch.float16 if manifest["dtype"] == "fp16" else torch.float32
    return TorchBackend.open(out / manifest["reference"], device=device, dtype=dtype, kernels=kernels)


def _open_tensorrt(out: Path, manifest: dict, device: str):
    from .backends.trt_backend import TensorRTBackend
    return TensorRTBackend.open(out)


BACKENDS: dict[str, Callable[[Path, dict, str], Any]] = {      # session.ALIASES too ("ort" -> onnxruntime)
    "onnxruntime": _open_ort,
    "torch": _open_torch,
    "triton": lambda out, manifest, device: _open_torch(out, manifest, device, kernels="triton"),
    "tensorrt": _open_tensorrt,
}


def parse_prompt(text: str, vocab_size: int | None = None, what: str = "--prompt") -> list[int]:
    """'5,17,3' (or '5 17 3') -> [5, 17, 3]; with vocab_size, every id in [0, vocab). `what` names the option."""
    try:
        ids = [int(t) for t in text.replace(" ", ",").split(",") if t]
    except ValueError:
        raise ValueError(f"{what} takes comma-separated token ids, got {text!r}") from None
    if not ids:
        raise ValueError(f"{what} is empty")
    bad = [i for i in ids if vocab_size is not None and not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{what} holds token id(s) {bad[:4]} outside the vocabulary [0, {vocab_size})")
    return ids


def run_parity(out, backend: str | Any = "onnxruntime", steps: int = 512, prompt_lens=(32,), prompts=(), batch: int = 2,
               seed: int = 0, rtol: float | None = None, flip_radius: float | None = None, device: str = "cpu",
               resync: bool = True, on_case: Callable[[str, int], Callable[[], None]] | None = None) -> ParityReport:
    """Parity of an export directory's backend against its reference weights (OUT/reference, fp32).

    backend: a name in BACKENDS or an object implementing the Backend protocol. prompts: lists of token ids
    (batch 1 each). on_case(name, steps) may return a per-step callback (progress bars)."""
    from .export.manifest import REFERENCE_DIR, read_manifest

    out = Path(out)
    manifest = read_manifest(out, verify=True, only=(REFERENCE_DIR + "/",))
    from .session import check_device

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if rtol is not None and not 0 < rtol < math.inf:
        raise ValueError(f"--rtol must be a finite number > 0, got {rtol}")
    if flip_radius is not None and not 0 <= flip_radius < math.inf:
        raise ValueError(f"--flip-radius must be a finite number >= 0, got {flip_radius}")
    device = check_device(device)
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    if any(n < 1 for n in prompt_lens):
        raise ValueError(f"--prompt-len values must be >= 1, got {list(prompt_lens)}")
    rtol = DEFAULT_RTOL[manifest["dtype"]] if rtol is None else rtol
    flip_radius = 10 * rtol if flip_radius is None else flip_radius
    reference = MemMambaLM.from_pretrained(out / REFERENCE_DIR, device=device, dtype=torch.float32)
    kernels = None
    if isinstance(backend, str):
        from .session import ALIASES

        name = ALIASES.get(backend.lower(), backend.lower())
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {sorted(set(BACKENDS) | set(ALIASES))}")
        kernels = "triton" if name == "triton" else None
        backend = BACKENDS[name](out, manifest, device)
    label = kernels or backend.name            # "triton" is the torch backend with the Triton kernels
    c = reference.config
    g = torch.Generator().manual_seed(seed)
    cases = [(f"random T={n}", torch.randint(0, c.vocab_size, (batch, n), generator=g)) for n in prompt_lens]
    cases += [(f"prompt {i + 1} T={len(p)}", torch.tensor([p])) for i, p in enumerate(prompts)]
    results = []
    for name, ids in cases:
        cb = on_case(name, steps) if on_case else None
        results.append(compare(reference, backend, ids, steps, rtol, flip_radius, name=name, resync=resync,
                               on_step=cb or (lambda: None)))
    backend_device = getattr(backend, "device", None) or getattr(getattr(backend, "model", None), "device", None)
    info = {"export": str(out), "flavor": manifest["flavor"],
            "backend_device": None if backend_device is None else str(backend_device),
            "reference_device": str(device), "seed": seed}
    return ParityReport(backend=label, dtype=manifest["dtype"], rtol=rtol, flip_radius=flip_radius,
                        cases=results, info=info)


def report_table(report: ParityReport):
    """The rich table `memdeploy parity` prints: one row per measure, one column per case."""
    from rich.table import Table

    steps = sorted({c.steps for c in report.cases})
    t = Table(title=f"{report.backend} vs PyTorch reference ({report.dtype}, {report.info.get('flavor', '-')} "
                    f"export, {'/'.join(map(str, steps))} decode steps)")
    t.add_column("measure")
    t.add_column("limit", justify="right")
    for c in report.cases:
        t.add_column(f"{c.name} x{c.batch}", justify="right")

    def worst_state(c):
        field, err = max(c.final_state_rel.items(), key=lambda kv: kv[1])
        return f"{err:.1e} {field}"

    e = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    rtol = f"{report.rtol:.0e}"
    rows = [
        ("prefill logits, max rel", rtol, lambda c: e(c.prefill_logits_rel)),
        ("decode logits, max rel", rtol, lambda c: e(c.step_logits_max_rel)),
        ("decode logits, max abs", "", lambda c: e(c.step_logits_max_abs)),
        ("final state, max rel", rtol, worst_state),
        ("greedy tokens agree", "", lambda c: f"{100 * c.greedy_agreement:.1f}%"),
        ("insert flips / decisions", "", lambda c: f"{c.insert_flips}/{c.insert_decisions}"),
        ("largest flip margin", f"{report.flip_radius:.0e}", lambda c: e(max(c.flip_margins, default=None))),
        ("smallest margin insert/read", "", lambda c: f"{e(c.min_insert_margin)}/{e(c.min_read_margin)}"),
        ("exact ties (insert)", "", lambda c: str(c.insert_ties)),
        ("prefill pools in another slot order", "", lambda c: str(c.prefill_slots_permuted)),
        ("re-syncs after a flip", "", lambda c: str(c.resyncs)),
        ("verdict", "", lambda c: "[green]ok[/]" if c.ok else "[red]FAIL[/]"),
    ]
    for name, limit, cell in rows:
        t.add_row(name, limit, *[cell(c) for c in report.cases])
    return t


@torch.no_grad()
def time_decode(backend, batch: int = 1, steps: int = 200, warmup: int = 20, prompt_len: int = 16,
                seed: int = 0) -> dict:
    """Median and mean wall time of one backend.step (ms/token at this batch), after a prefill and a warm-up;
    the token fed back is the greedy one, as in generation."""
    import time

    g = torch.Generator().manual_seed(seed)
    logits, state = backend.prefill(torch.randint(0, backend.config.vocab_size, (batch, prompt_len), generator=g),
                                    backend.new_state(batch))
    times = []
    for i in range(warmup + steps):
        token = logits.argmax(-1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits, state = backend.step(token, state)
        logits = logits.cpu()                      # the token is needed on the host to sample the next one
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"backend": backend.name, "batch": batch, "steps": steps, "median_ms": 1e3 * times[len(times) // 2],
            "mean_ms": 1e3 * sum(times) / len(times)}
