"""memmamba-deploy: MemMamba checkpoints to graphs, engines and runtimes with O(1) cost per token."""
__version__ = "0.1.0"
