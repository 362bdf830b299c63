"""sandgate: a serverless-style gateway for running untrusted code."""

__version__ = "0.1.0"
