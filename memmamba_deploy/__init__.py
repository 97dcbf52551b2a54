"""memmamba-deploy: MemMamba checkpoints to graphs, engines and runtimes with O(1) cost per token."""
__version__ = "0.1.0"


def __getattr__(name):
    # `from memmamba_deploy import Session` without importing torch and the backends at package import
    if name == "Session":
        from .session import Session
        return Session
    raise AttributeError(f"module 'memmamba_deploy' has no attribute {name!r}")
