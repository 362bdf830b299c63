"""sandgate: a serverless-style gateway for running untrusted code."""

__version__ = "0.1.0"

# Re-exported so plugins write `from gateway import hookimpl`.
from gateway.hookspecs import hookimpl

__all__ = ["__version__", "hookimpl"]
