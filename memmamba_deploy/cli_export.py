"""`memdeploy export` and `memdeploy parity` (issue 4)."""
from .cli import app, console, user_errors  # noqa: F401
