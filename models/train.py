"""Train a byte-level MemMamba (or its plain-Mamba twin) on passkey retrieval mixed with Python's own sources.

    python -m memmamba_deploy.models.train --out runs/demo-memmamba                 # the demo model (GPU: Triton)
    python -m memmamba_deploy.models.train --out runs/demo-mamba --no-memory        # its plain-Mamba twin
    python -m memmamba_deploy.models.train --out runs/t --preset tiny --steps 50 --curriculum 128x8   # CPU smoke run
    python -m memmamba_deploy.models.train --out runs/ft --init-from CKPT --lr 3e-4 --warmup 10       # fine-tune

Seeded and resumable: run the same command again and it continues from OUT/last (weights, optimizer, step, RNG
state and elapsed time, written atomically every --save-every steps); batches are a pure function of (seed, step),
so an interrupted and resumed run ends with the same weights as an uninterrupted one (bit for bit on CPU).
OUT/train_log.jsonl gets one JSON line every --log-every steps; OUT/model is the final checkpoint.

Why the memory path can learn passkey retrieval far beyond the training length (spec §3: the pool keeps the K
highest-scoring tokens, so the key survives any amount of filler that scores below it):
  * the filler repeats, so its importance scores are the same at 1k and at 64k tokens;
  * the Note Block's score gets a direct target on passkey rows (--note-weight: 1 on the key's digits, 0 on every
    other byte, classes balanced); the model's straight-through factor alone only trains tokens already in the pool;
  * at training lengths the SSM itself still remembers the key, so the model would learn to answer from the SSM,
    which forgets it at long lengths. With probability --swap-fraction a batch is run in two chunks and, at the
    split (after the key, before the question), paired rows that differ only in their key swap their conv/SSM
    states while keeping their own pools: only the pool then knows the right key;
  * read triggers start open (bias +2): a closed trigger passes no gradient through its straight-through gate.
The plain-Mamba twin trains on the same batches without the memory-only parts (no pool, no swap).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import (atomic_directory, atomic_file, creatable_dir, recover_directory, save_pretrained,
                         Terminated, terminate_as_interrupt, write_json)
from .config import PRESETS, MemMambaConfig
from .data import make_batch, passkey_min_length, stdlib_text
from .memmamba import MemMambaLM, State

# The bundled demo model: a few MB of fp32 safetensors, 6 layers, two cross-layer groups of 3.
DEMO_MODEL = dict(vocab_size=256, d_model=128, n_layers=6, d_state=16, expand=2, pool_size=16, summary_dim=32,
                  memory_heads=2, cross_layer_every=3, insert_threshold=0.5, read_threshold=0.3)


@dataclasses.dataclass
class TrainConfig:
    out: str = "runs/train"
    preset: str = "demo"                  # demo | tiny | 130m (model size)
    init_from: str = ""                   # a checkpoint (ours, or Hugging Face Mamba: --no-memory) to start from;
                                          # its config is the model's (no --set; --preset is not used)
    model: dict = dataclasses.field(default_factory=dict)   # MemMambaConfig overrides (--set key=value)
    memory: bool = True
    seed: int = 0
    steps: int = 2000
    max_seconds: float = 0.0              # > 0: the schedule also advances with time and ends at this budget
                                          # (training time; a CUDA run's first step, which compiles, is free)
    curriculum: str = "256x64,512x32,1024x16"   # LENGTHxBATCH phases, each an equal share of training
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    text_fraction: float = 0.25           # share of rows that are Python source windows
    text_bytes: int = 16 << 20
    text_dir: str = ""                    # default: this Python's standard library
    answer_weight: float = 5.0            # loss weight of the answer's digits
    note_weight: float = 1.0              # Note Block score target (memory only)
    swap_fraction: float = -1.0           # state-swap batches; -1: 0.5 with memory, 0 without
    kernels: str = "auto"                 # auto | torch | triton
    device: str = "auto"                  # auto | cpu | cuda
    dtype: str = "auto"                   # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    save_every: int = 200
    log_every: int = 10

    # Fields that may change between a run and its resumption (they do not change what is computed).
    RESUMABLE_CHANGES = ("out", "save_every", "log_every", "kernels", "device")

    def resolved(self) -> "TrainConfig":
        c = dataclasses.replace(self)
        if c.swap_fraction < 0:
            c.swap_fraction = 0.5 if c.memory else 0.0
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        if c.kernels == "auto":
            c.kernels = "triton" if c.device.startswith("cuda") and _triton_available() else "torch"
        if c.dtype == "auto":
            c.dtype = "bf16" if c.device.startswith("cuda") else "fp32"
        return c

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ValueError(f"invalid training config: {msg}")
        need(self.preset == "demo" or self.preset in PRESETS,
             f"unknown preset {self.preset!r}; choose demo or one of {sorted(PRESETS)}")
        need(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        need("memory" not in self.model, "--set memory: the memory path is --no-memory's (the plain-Mamba twin); "
                                         "drop --set memory")
        need(0 <= self.text_fraction < 1, f"text_fraction must lie in [0, 1), got {self.text_fraction}")
        need(0 <= self.swap_fraction <= 1, f"swap_fraction must lie in [0, 1], got {self.swap_fraction}")
        need(self.memory or self.swap_fraction == 0, "swap_fraction > 0 needs the memory path (the twin has no "
                                                     "pool to answer from)")
        need(self.dtype in ("bf16", "fp32"), f"dtype must be bf16 or fp32, got {self.dtype!r}")
        need(self.kernels in ("torch", "triton"), f"kernels must be torch or triton, got {self.kernels!r}")
        need(self.save_every >= 1 and self.log_every >= 1, "save_every and log_every must be >= 1")
        phases(self.curriculum)
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"invalid training config: unknown device {self.device!r} (cpu, cuda or cuda:N)") from None
        need(device.type in ("cpu", "cuda"), f"device must be cpu or cuda, got {self.device!r}")
        need(device.type != "cuda" or torch.cuda.is_available(), f"device {self.device!r} but this machine has no "
                                                                  f"CUDA device (use --device cpu)")
        config = self.model_config()
        need(config.vocab_size >= 256, f"vocab_size {config.vocab_size} < 256: the training data is bytes")
        # a new model trained on bytes is a byte-level model: generate, eval and the Session treat vocabulary 256
        # as text; a larger one would train ids it never sees and then be refused text prompts. (A run begun
        # before this rule resumes as it was.)
        resuming = (Path(self.out) / "last" / "trainer.pt").is_file()
        need(self.init_from or resuming or config.vocab_size == 256, f"vocab_size {config.vocab_size}: the training "
             f"data is bytes, so a new model's vocabulary is 256 (a byte-level model, which generate and eval read "
             f"text with): drop --set vocab_size; a larger vocabulary only with --init-from a checkpoint that has one")

    def model_config(self) -> MemMambaConfig:
        if self.init_from:
            from .checkpoint import read_config

            if self.model:
                raise ValueError("invalid training config: --set cannot change the model --init-from loads")
            config = read_config(self.init_from)
            if config.memory != self.memory:
                raise ValueError(f"invalid training config: {self.init_from} has the memory path "
                                 f"{'on: drop --no-memory' if config.memory else 'off: add --no-memory'}")
            return config
        if self.preset == "demo":
            return MemMambaConfig.from_dict({**DEMO_MODEL, **self.model, "memory": self.memory})
        # a preset's shape with the bytes' vocabulary (130m's is GPT-NeoX's 50280), unless --set says otherwise; a
        # run begun before presets trained in it resumes with the vocabulary it has
        vocab = 256
        saved = Path(self.out) / "last" / "model" / "config.json"
        if "vocab_size" not in self.model and saved.is_file():
            try:
                vocab = int(json.loads(saved.read_text())["vocab_size"])
            except (ValueError, KeyError, TypeError):
                pass                                    # a damaged run: resuming it reports that
        return MemMambaConfig.preset(self.preset, **{"vocab_size": vocab, **self.model, "memory": self.memory})


def _triton_available() -> bool:
    try:
        from .ops.triton import TRITON_OPS  # noqa: F401
        return True
    except ImportError:
        return False


def phases(curriculum: str) -> list[tuple[int, int]]:
    """'256x64,512x32' -> [(256, 64), (512, 32)]: (sequence length, batch) per phase."""
    out = []
    for part in curriculum.split(","):
        try:
            length, batch = (int(v) for v in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"bad curriculum phase {part!r}: write LENGTHxBATCH, e.g. 512x32") from None
        if length < passkey_min_length() or batch < 2:
            raise ValueError(f"curriculum phase {part!r}: length must be >= {passkey_min_length()} (a passkey "
                             f"sample) and batch >= 2")
        out.append((length, batch))
    if not out:
        raise ValueError("the curriculum has no phase")
    return out


def learning_rate(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to lr * min_lr_ratio over the run's progress."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


def init_model(config: MemMambaConfig, seed: int, kernels: str) -> MemMambaLM:
    torch.manual_seed(seed)
    model = MemMambaLM(config, kernels=kernels)
    if config.memory:
        with torch.no_grad():
            for layer in model.layers:                  # reads start open (see the module docstring)
                layer.token_attn.trigger.bias.fill_(2.0)
    return model


def make_optimizer(model: MemMambaLM, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, A_log, D, alpha), as Mamba trains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


# ---- one step -----------------------------------------------------------------------------------------------------
def _swap_recurrent(state: State, partner: torch.Tensor, dtype: torch.dtype) -> State:
    """Give each row its partner's conv and SSM state, keeping its own pool (dtypes as State expects)."""
    dts = State.dtypes(dtype)
    t = {k: v.to(dts[k]) for k, v in state.tensors().items()}
    t["conv"], t["ssm"] = t["conv"][:, partner], t["ssm"][:, partner]
    return State(**t)


def compute_loss(model: MemMambaLM, batch, cfg: TrainConfig) -> tuple[torch.Tensor, dict]:
    """Weighted next-byte cross-entropy (+ the Note Block score target). Returns (loss, figures for the log)."""
    c = model.config
    scores: list[torch.Tensor] = []
    hooks = [layer.note.register_forward_hook(lambda m, i, o: scores.append(o[0])) for layer in model.layers
             if c.memory and cfg.note_weight > 0]
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bf16")
    try:
        with autocast:
            if batch.split is not None and cfg.swap_fraction > 0:
                first, state = model.prefill(batch.ids[:, :batch.split])
                state = _swap_recurrent(state, batch.partner, model.dtype)
                second, _ = model.prefill(batch.ids[:, batch.split:], state)
                logits = torch.cat([first, second], 1)
            else:
                logits = model(batch.ids)
    finally:
        for h in hooks:
            h.remove()
    targets = batch.ids[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                         reduction="none").view_as(targets)
    lm = (ce * batch.weight).sum() / batch.weight.sum()
    figures = {"lm_loss": lm.item()}
    answer = batch.weight > 1
    if answer.any():
        figures["answer_loss"] = ce[answer].mean().item()
        figures["answer_acc"] = (logits[:, :-1].argmax(-1) == targets)[answer].float().mean().item()
    loss = lm
    if scores:
        L = c.n_layers
        per_layer = [torch.cat(scores[l::L], dim=1) for l in range(L)]       # chunks in order, per layer
        a = torch.stack(per_layer).float().clamp(1e-6, 1 - 1e-6)             # [L, B, T]
        if not torch.isfinite(a).all():                                      # a diverged run: BCE would raise
            raise FloatingPointError("the Note Block's scores are NaN")
        bce = F.binary_cross_entropy(a, batch.note_target.expand_as(a), reduction="none")
        pos = batch.note_mask * batch.note_target
        neg = batch.note_mask * (1 - batch.note_target)
        if pos.sum() > 0:
            note = (bce * pos).sum() / (pos.sum() * L) + (bce * neg).sum() / (neg.sum() * L)
            loss = loss + cfg.note_weight * note
            figures["note_loss"] = note.item()
            # the key survives any length when its lowest score beats the highest filler score (spec §3)
            figures["key_min"] = a.detach()[:, pos > 0].min().item()
            figures["filler_max"] = a.detach()[:, neg > 0].max().item()
    figures["loss"] = loss.item()
    return loss, figures


# ---- checkpoints ----------------------------------------------------------------------------------------------------
def save_training_state(out: Path, model, optimizer, step: int, elapsed: float, cfg: TrainConfig) -> None:
    """OUT/last = model/ (config.json + model.safetensors) + trainer.pt, replaced in one rename."""
    with atomic_directory(out / "last", force=True) as tmp:
        save_pretrained(model, tmp / "model")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"step": step, "elapsed": elapsed, "optimizer": optimizer.state_dict(), "rng": rng,
                    "train_config": dataclasses.asdict(cfg)}, tmp / "trainer.pt")


def load_training_state(out: Path, cfg: TrainConfig, model, optimizer) -> tuple[int, float]:
    from .checkpoint import WEIGHTS_NAME, read_safetensors

    path = out / "last" / "trainer.pt"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad zip/pickle
        raise ValueError(f"{path} is corrupt: {e}") from None
    # a setting a run predates (saved by an older version) had its default then
    old = {**dataclasses.asdict(TrainConfig().resolved()), **saved["train_config"]}
    diff = [k for k, v in dataclasses.asdict(cfg).items()
            if k not in TrainConfig.RESUMABLE_CHANGES and old.get(k) != v]
    if diff:
        changes = ", ".join(f"{k}: {old.get(k)!r} -> {getattr(cfg, k)!r}" for k in diff)
        raise ValueError(f"{out} holds a run with different settings ({changes}); use another --out or the same "
                         f"settings")
    tensors = read_safetensors(out / "last" / "model" / WEIGHTS_NAME)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k not in tensors or tensors[k].shape != v.shape:
                raise ValueError(f"{out}/last does not match the model: tensor {k!r}")
            if not torch.isfinite(tensors[k]).all():
                raise ValueError(f"{out}/last: tensor {k!r} holds NaN or infinite values (the run had diverged): "
                                 f"start again with another --out and a lower --lr")
            v.copy_(tensors[k])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"]["torch"])
    if "cuda" in saved["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return int(saved["step"]), float(saved["elapsed"])


def _truncate_log(path: Path, step: int) -> None:
    """Keep the log lines of steps <= step (a killed run may have logged past its last checkpoint, and left its
    last line half-written: that one is dropped; a bad line before it is an error)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    keep = []
    for i, line in enumerate(lines):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON; fix or remove it to resume") from None
        if entry.get("step", 0) <= step:
            keep.append(line)
    with atomic_file(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in keep))


# ---- the loop ----------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, stop_after: int | None = None, quiet: bool = False) -> dict:
    """Train (or resume) the run in cfg.out. stop_after: return after that many steps of this call (as if killed
    right after saving), for tests. Returns a summary dict."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = cfg.resolved()
    cfg.validate()
    out = Path(cfg.out)
    console = Console(stderr=True, quiet=quiet)

    def progress_of(s: int, t: float) -> float:
        return max(s / cfg.steps, t / cfg.max_seconds if cfg.max_seconds else 0.0)

    config = cfg.model_config()
    if cfg.device.startswith("cuda") and cfg.kernels == "torch":
        console.print("[yellow]warning:[/] training on CUDA with the torch reference kernels (a Python loop per "
                      "token): install triton and the Triton kernels for real speed")
    if cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True            # fp32 runs: TF32 matmuls, fp32 everything else
    if cfg.init_from:                               # fine-tuning: fp32 master weights, as a fresh run has
        from .checkpoint import load_pretrained

        torch.manual_seed(cfg.seed)
        model = load_pretrained(cfg.init_from, kernels=cfg.kernels, dtype=torch.float32)
    else:
        model = init_model(config, cfg.seed, cfg.kernels)
    model = model.to(cfg.device).train()
    optimizer = make_optimizer(model, cfg)
    step, elapsed = 0, 0.0
    log_path = out / "train_log.jsonl"
    creatable_dir(out)
    recover_directory(out / "last")                 # a save killed between its two renames (systems without renameat2)
    if (out / "last" / "trainer.pt").is_file():
        step, elapsed = load_training_state(out, cfg, model, optimizer)
        if progress_of(step, elapsed) >= 1.0 and (out / "summary.json").is_file():
            console.print(f"{out} is finished already (step {step}): nothing to do")
            return json.loads((out / "summary.json").read_text())
        console.print(f"resuming {out} at step {step}")
    _truncate_log(log_path, step)                   # a fresh start (step 0) keeps no line of a run killed early
    out.mkdir(parents=True, exist_ok=True)
    text = None
    if cfg.text_fraction > 0:
        text = stdlib_text(cfg.text_bytes, cfg.text_dir or None)
    plan = phases(cfg.curriculum)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"training {out}: {n_params / 1e6:.2f}M parameters, memory={'on' if config.memory else 'off'}, "
                  f"kernels={cfg.kernels}, {cfg.device}, {cfg.dtype}, {cfg.steps} steps"
                  + (f" or {cfg.max_seconds:.0f} s" if cfg.max_seconds else ""))

    done_this_call, last = 0, {}
    columns = (TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, disable=quiet) as bar, open(log_path, "a") as log:
        task = bar.add_task("train", total=cfg.steps, completed=step, info="")
        while progress_of(step, elapsed) < 1.0:
            t0 = time.perf_counter()
            p = progress_of(step, elapsed)
            length, bsz = plan[min(int(p * len(plan)), len(plan) - 1)]
            batch = make_batch(cfg.seed, step, bsz, length, text, cfg.text_fraction, cfg.answer_weight,
                               cfg.swap_fraction).to(cfg.device)
            lr = learning_rate(cfg, step, p)
            for g in optimizer.param_groups:
                g["lr"] = lr
            try:
                loss, figures = compute_loss(model, batch, cfg)
            except FloatingPointError as e:
                raise FloatingPointError(f"{e} at step {step + 1}: lower --lr") from None
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            if done_this_call == 0 and cfg.device.startswith("cuda"):
                dt = 0.0                          # the first step compiles the kernels: not part of the budget
            step, elapsed, done_this_call = step + 1, elapsed + dt, done_this_call + 1
            if not math.isfinite(figures["loss"]):
                raise FloatingPointError(f"loss is {figures['loss']} at step {step}: lower --lr")
            last = {"step": step, **{k: round(v, 5) for k, v in figures.items()}, "lr": lr,
                    "grad_norm": round(float(grad_norm), 4), "seq_len": length, "batch": bsz,
                    "tokens_per_s": round(length * bsz / dt) if dt else None, "elapsed": round(elapsed, 2)}
            if step % cfg.log_every == 0 or step == 1:
                log.write(json.dumps(last) + "\n")
                log.flush()
            bar.update(task, completed=min(step, cfg.steps), info=f"loss {figures['loss']:.3f}  "
                       f"answer acc {figures.get('answer_acc', float('nan')):.2f}  T={length}")
            finished = progress_of(step, elapsed) >= 1.0
            if step % cfg.save_every == 0 or finished:
                save_training_state(out, model, optimizer, step, elapsed, cfg)
            if stop_after is not None and done_this_call >= stop_after and not finished:
                if step % cfg.save_every:
                    save_training_state(out, model, optimizer, step, elapsed, cfg)
                return {"step": step, "stopped": True, **last}
    save_pretrained(model, out / "model", force=True)   # the final checkpoint (what gets bundled)
    summary = {"out": str(out), "steps": step, "elapsed_s": round(elapsed, 1), "parameters": n_params,
               "memory": config.memory, "kernels": cfg.kernels, "device": cfg.device, "dtype": cfg.dtype,
               "max_train_length": max(n for n, _ in plan), "train_config": dataclasses.asdict(cfg),
               "final": last or {"step": step}}
    write_json(out / "summary.json", summary)
    console.print(f"done: {out / 'model'} after {step} steps in {elapsed:.0f} s")
    return summary


# ---- command line ---------------------------------------------------------------------------------------------------
OPTION_HELP = {
    "out": "run folder: DIR/model is the checkpoint, DIR/last the resumable state",
    "preset": "model size: demo | tiny | 130m (spec §1; vocabulary 256, the data being bytes); --set changes single "
              "fields",
    "init_from": "start from this checkpoint (ours, or Hugging Face Mamba with --no-memory); its config is the model's",
    "seed": "seed of the initialisation and the data",
    "steps": "optimizer steps",
    "max_seconds": "> 0: also end after this much training time, the schedule following the clock",
    "curriculum": "LENGTHxBATCH phases, each an equal share of the steps",
    "lr": "peak learning rate (AdamW)",
    "min_lr_ratio": "the cosine schedule's floor, as a share of --lr",
    "warmup": "linear warm-up steps",
    "weight_decay": "AdamW weight decay",
    "grad_clip": "gradient norm clip",
    "text_fraction": "share of rows that are Python source windows (the rest: passkey prompts)",
    "text_bytes": "bytes of Python source read for those windows",
    "text_dir": "folder of .py files for them (empty: this Python's standard library)",
    "answer_weight": "loss weight of the passkey answer's digits",
    "note_weight": "weight of the Note Block's score target (memory only)",
    "swap_fraction": "share of state-swap batches (-1: 0.5 with memory, 0 without)",
    "kernels": "auto | torch | triton",
    "device": "auto | cpu | cuda",
    "dtype": "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32",
    "save_every": "steps between resumable saves to DIR/last",
    "log_every": "steps between log lines",
}


def parse_args(argv=None) -> TrainConfig:
    ap = argparse.ArgumentParser(prog="python -m memmamba_deploy.models.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("model", "memory"):
            continue
        ap.add_argument("--" + f.name.replace("_", "-"), type=type(getattr(defaults, f.name)),
                        default=getattr(defaults, f.name), metavar=f.name.upper(),
                        help=f"{OPTION_HELP[f.name]} (default: %(default)r)")
    ap.add_argument("--no-memory", action="store_true", help="train the plain-Mamba twin (spec §1 memory=False)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a model config field, e.g. --set d_model=64 (JSON values)")
    args = ap.parse_args(argv)
    model = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set needs KEY=VALUE, got {item!r}")
        try:
            model[key] = json.loads(value)
        except json.JSONDecodeError:
            model[key] = value
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
              if f.name not in ("model", "memory")}
    return TrainConfig(**values, model=model, memory=not args.no_memory)


def main(argv=None) -> int:
    try:
        with terminate_as_interrupt():
            cfg = parse_args(argv)
            summary = train(cfg)
    except (ValueError, OSError, ImportError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("interrupted: run the same command again to resume from the last checkpoint (--save-every)",
              file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
