"""Training-side MemMamba model (installed as memmamba_deploy.models)."""
from .config import PRESETS, MemMambaConfig
from .memmamba import MemMambaLM, State

__all__ = ["MemMambaConfig", "MemMambaLM", "State", "PRESETS"]
