"""`python -m memmamba_deploy` is the `memdeploy` CLI."""
from memmamba_deploy.cli import app

app(prog_name="memdeploy")
