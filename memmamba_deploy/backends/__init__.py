"""Backends: one protocol (base.Backend), one implementation per runtime."""
from .base import Backend
from .torch_backend import TorchBackend

__all__ = ["Backend", "TorchBackend"]
