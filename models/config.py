"""MemMambaConfig: the model's hyper-parameters (spec §1), validated and JSON round-trippable."""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path

ARCHITECTURE = "memmamba"


@dataclasses.dataclass(frozen=True)
class MemMambaConfig:
    """Hyper-parameters of MemMambaLM. Symbols follow spec §1.

    `memory=False` drops the memory path (§3–§5): the model is then plain Mamba-1.
    """

    vocab_size: int = 256
    d_model: int = 64          # d
    n_layers: int = 4          # L
    d_state: int = 8           # N
    expand: int = 2
    d_conv: int = 4            # k
    dt_rank: int = 0           # R; 0 means ceil(d/16)
    norm_eps: float = 1e-5
    memory: bool = True
    pool_size: int = 8         # K
    summary_dim: int = 16      # d_s
    memory_heads: int = 2      # H
    cross_layer_every: int = 2  # p
    insert_threshold: float = 0.5  # tau1
    read_threshold: float = 0.3    # tau2
    architecture: str = ARCHITECTURE

    def __post_init__(self):
        for f in dataclasses.fields(self):         # numpy scalars (sizes read from arrays) as Python numbers
            v = getattr(self, f.name)
            numpy_bool = type(v).__module__ == "numpy" and getattr(getattr(v, "dtype", None), "kind", "") == "b"
            if f.type == "int" and isinstance(v, numbers.Integral) and type(v) not in (bool, int):
                object.__setattr__(self, f.name, int(v))
            elif f.type == "float" and isinstance(v, numbers.Real) and type(v) not in (bool, int, float):
                object.__setattr__(self, f.name, float(v))
            elif f.type == "bool" and numpy_bool:
                object.__setattr__(self, f.name, bool(v))
        d = self.d_model
        if self.dt_rank == 0 and isinstance(d, int) and not isinstance(d, bool) and d >= 1:
            object.__setattr__(self, "dt_rank", math.ceil(d / 16))
        self.validate()

    # Derived sizes -------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def is_cross_layer(self, layer: int) -> bool:
        """§5: layers l (from 0) with (l+1) mod p == 0 read the pools of layers l-p+1..l."""
        return self.memory and (layer + 1) % self.cross_layer_every == 0

    # Validation ----------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, msg: str):
            if not cond:
                raise ValueError(f"invalid MemMambaConfig: {msg}")

        if self.architecture != ARCHITECTURE:
            raise ValueError(f"unknown architecture {self.architecture!r}: this loader reads {ARCHITECTURE!r}")
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "expand", "d_conv", "dt_rank"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        need(isinstance(self.memory, bool), f"memory must be true or false, got {self.memory!r}")
        need(self.d_conv >= 2, f"d_conv must be >= 2, got {self.d_conv}")
        need(isinstance(self.norm_eps, (int, float)) and not isinstance(self.norm_eps, bool)
             and 0 < self.norm_eps < math.inf, f"norm_eps must be a finite number > 0, got {self.norm_eps!r}")
        for name in ("pool_size", "summary_dim", "memory_heads", "cross_layer_every"):   # with memory off too:
            v = getattr(self, name)                                                      # config.json keeps them
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name} must be a positive integer, got {v!r}")
        for name in ("insert_threshold", "read_threshold"):
            v = getattr(self, name)
            need(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v < 1.0,
                 f"{name} must lie in [0, 1) (scores are sigmoids), got {v!r}")
        if not self.memory:
            return
        need(self.d_model >= 4, f"d_model must be >= 4 with the memory path on (Note Block width d/4), got {self.d_model}")
        need(self.summary_dim % self.memory_heads == 0,
             f"summary_dim ({self.summary_dim}) must be divisible by memory_heads ({self.memory_heads})")
        need(self.d_model % self.memory_heads == 0,
             f"d_model ({self.d_model}) must be divisible by memory_heads ({self.memory_heads})")
        need(self.cross_layer_every <= self.n_layers,
             f"cross_layer_every ({self.cross_layer_every}) must be <= n_layers ({self.n_layers})")

    # JSON ------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MemMambaConfig":
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config key(s) {unknown}; known keys: {sorted(known)}")
        arch = d.get("architecture", ARCHITECTURE)
        if arch != ARCHITECTURE:
            raise ValueError(f"unknown architecture {arch!r}: this loader reads {ARCHITECTURE!r}")
        return cls(**d)

    @classmethod
    def from_complete_dict(cls, d: dict) -> "MemMambaConfig":
        """from_dict for a stored config (a checkpoint's, a state file's), which must name every field: a default
        would pass unseen (pool_size has no weights to disagree)."""
        if isinstance(d, dict):
            known = {f.name for f in dataclasses.fields(cls)}
            missing, unknown = sorted(known - set(d)), sorted(set(d) - known)
            if missing:
                typo = f"; it has unknown key(s) {unknown} (a misspelling?)" if unknown else ""
                raise ValueError(f"it lacks {missing} (a stored config names every field){typo}")
        return cls.from_dict(d)

    def differences(self, other: "MemMambaConfig") -> list[str]:
        """'field mine vs other' for each field where the two configs differ."""
        return [f"{f.name} {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}" for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(other, f.name)]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "MemMambaConfig":
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"config is not valid JSON: {e}") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path) -> "MemMambaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no config file at {path}")
        try:
            return cls.from_json(path.read_text())
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def preset(cls, name: str, **overrides) -> "MemMambaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


# Spec §1 presets.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, d_model=64, n_layers=4, d_state=8, expand=2, pool_size=8, summary_dim=16,
                 memory_heads=2, cross_layer_every=2, insert_threshold=0.5, read_threshold=0.3),
    "130m": dict(vocab_size=50280, d_model=768, n_layers=24, d_state=16, expand=2, pool_size=50, summary_dim=64,
                 memory_heads=4, cross_layer_every=4, insert_threshold=0.5, read_threshold=0.3),
}
